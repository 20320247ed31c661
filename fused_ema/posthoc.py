"""Post-hoc EMA (Karras et al. 2024, EDM2): choose the averaging length after training.

During training, :class:`PostHocEMA` keeps a few power-function EMAs of the model (one per
``sigma_rel``, all updated in one fused pass) and saves a snapshot of each every
``snapshot_every`` steps. Afterwards, :func:`synthesize` rebuilds the power EMA of any other
``sigma_rel`` as a linear combination of the snapshots, with the coefficients that make the
combined weighting profile closest (least squares) to the requested one.

The math, in the time variable ``t`` = training steps done (the update after 0-based step ``s``
happens at ``t = s + 1``):

- A power EMA with exponent ``gamma`` (``sigma_rel`` -> ``gamma`` by EDM2's eq. 3) weighs the model
  at time ``tau`` by the profile ``p(tau) = (gamma + 1) tau^gamma / T^(gamma + 1)`` on ``[0, T]``.
- An update at time ``t``, the previous one at ``t_prev``, has decay ``(t_prev / t)^(gamma + 1)``
  (``(1 - 1/t)^(gamma + 1)`` when every step updates). The model of that update then gets exactly
  the profile's mass on ``(t_prev, t]``, so with ``update_every > 1`` (or any steps) a snapshot is
  the continuous profile applied to the trajectory held piecewise constant between updates, and
  it depends only on the time ``T`` of its last update, which the snapshot records.
- Profiles ``a`` and ``b`` have the inner product ``<p_a, p_b> = (a+1)(b+1) / ((a+b+1) T_b)
  (T_a / T_b)^b`` for ``T_a <= T_b`` (EDM2's ``power_function_correlation``); the coefficients
  minimise ``||sum_j x_j p_j - p_target||^2`` (EDM2: ``A x = b`` with ``A`` the snapshots' Gram
  matrix and ``b`` their products with the target), here under ``sum_j x_j = 1`` so that a
  constant weight is reproduced exactly.

Example::

    posthoc = fused_ema.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=1000, directory="phema")
    for batch in loader:
        train_step(model, batch)
        posthoc.update()
    model.load_state_dict(fused_ema.posthoc.synthesize("phema", sigma_rel=0.07))
"""

from __future__ import annotations

import math
import os
import re
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fused_ema import backends, distributed
from fused_ema.binding import Binding, clone_module, unwrap
from fused_ema.progress import progress
from fused_ema.rules import sigma_rel_to_gamma

FORMAT = "fused_ema.posthoc"
VERSION = 1
# sigma_rel -> gamma has a real gamma > 0 only below 12^-1/2 (EDM2 eq. 3 at gamma = 0).
MAX_SIGMA_REL = 12.0**-0.5
# posthoc-<series>-sigma<sigma_rel>-step<step>[-r<n>].pt (a file) or the same name without .pt (a
# DCP directory, FSDP2). A temporary has a leading dot and a .tmp-<pid> tail, so never matches.
_NAME = re.compile(r"^posthoc-(?P<series>[0-9a-f]+)-sigma(?P<sigma>[0-9.]+)-step(?P<step>\d+)(-r\d+)?(\.pt)?$")
_META_FILE = "posthoc.json"  # inside a DCP snapshot directory


def check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, or ValueError unless ``0 < sigma_rel < 12^-1/2`` (about 0.2887)."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise TypeError(f"{name} must be a float, got {sigma_rel!r}")
    sigma_rel = float(sigma_rel)
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:  # also rejects nan
        raise ValueError(
            f"{name} must be in (0, {MAX_SIGMA_REL:.4f}) (the relative width of a power EMA; EDM2 uses "
            f"0.05 to 0.10), got {sigma_rel}"
        )
    return sigma_rel


def power_weight(gamma: float, time: int, previous_time: int) -> float:
    """The weight ``1 - (previous_time / time)^(gamma + 1)`` of a power-EMA update at ``time``.

    ``previous_time`` is the time of the update before (0 for the first, which copies). Computed
    as ``-expm1((gamma + 1) log1p(-(time - previous_time) / time))`` so that the small weights of
    late updates keep full float64 precision.

    Example::

        power_weight(6.94, time=1000, previous_time=999)   # (1 - 1/1000)^(gamma+1) as a decay
    """
    if previous_time == 0:
        return 1.0
    return -math.expm1((gamma + 1.0) * math.log1p(-(time - previous_time) / time))


def power_correlation(
    gamma_a: torch.Tensor, time_a: torch.Tensor, gamma_b: torch.Tensor, time_b: torch.Tensor
) -> torch.Tensor:
    """``<p_a, p_b>``, the integral of the product of two power-EMA profiles (broadcasting, float64).

    ``p(tau) = (gamma + 1) tau^gamma / T^(gamma + 1)`` on ``[0, T]``; for ``T_a <= T_b`` the integral is
    ``(a+1)(b+1) / ((a+b+1) T_b) (T_a / T_b)^b`` (and symmetrically).

    Example::

        g, t = torch.tensor([6.94], dtype=torch.float64), torch.tensor([1000.0], dtype=torch.float64)
        power_correlation(g, t, g, t)      # the squared norm of one profile
    """
    a_first = time_a <= time_b
    ratio = torch.where(a_first, time_a / time_b, time_b / time_a)
    exponent = torch.where(a_first, gamma_b, gamma_a)
    later = torch.maximum(time_a, time_b)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * later)


def power_profile(gammas: torch.Tensor, times: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The profiles ``p_k(tau)`` (rows k) of power EMAs ending at ``times[k]``, 0 after their end."""
    gammas, times = gammas.reshape(-1, 1), times.reshape(-1, 1)
    values = (gammas + 1) * (tau / times) ** gammas / times
    return torch.where(tau <= times, values, torch.zeros_like(values))


# ---------------------------------------------------------------------------------------------
# the update times: compact, so every snapshot can carry the whole schedule
# ---------------------------------------------------------------------------------------------


def _add_update_time(segments: list[list[int]], time: int) -> None:
    """Append ``time`` to the schedule kept as arithmetic runs ``[first, last, stride]``."""
    if segments:
        first, last, stride = segments[-1]
        if first == last or time - last == stride:
            segments[-1] = [first, time, time - last]
            return
    segments.append([time, time, 0])


def last_update_time(segments: Sequence[Sequence[int]], step: int) -> int:
    """The time of the last update at or before ``step`` steps done (0 if there was none)."""
    for first, last, stride in reversed(segments):
        if first <= step:
            if step >= last:
                return last
            return first + (step - first) // stride * stride  # first <= step < last: stride > 0
    return 0


# ---------------------------------------------------------------------------------------------
# snapshots on disk
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One saved power EMA: its exponent, the steps done when saved and the time of its last update."""

    path: Path
    series: str
    sigma_rel: float
    gamma: float
    step: int
    time: int
    written: int  # time.time_ns() when written: among snapshots of one (sigma_rel, step), the last wins
    updates: list = field(default_factory=list, compare=False, repr=False)  # [first, last, stride] runs

    @property
    def sharded(self) -> bool:
        """Whether it was written with torch.distributed.checkpoint (a directory) by FSDP2 ranks."""
        return self.path.is_dir()


def _meta(**values: Any) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **values}


def _read_meta(path: Path) -> dict[str, Any] | None:
    import json

    try:
        if path.is_dir():
            with open(path / _META_FILE) as file:
                return json.load(file)
        # mmap: the tensors stay on disk, only the small header is read.
        content = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return content.get("meta") if isinstance(content, dict) else None
    except (OSError, RuntimeError, ValueError, EOFError):
        return None


def list_snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """Every complete snapshot in ``directory``, oldest step first; temporaries are never listed.

    Raises FileNotFoundError (unknown directory) or NotADirectoryError, naming the path.
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(
            f"post-hoc EMA directory {str(directory)!r} does not exist; pass the directory given to "
            "PostHocEMA(directory=...) during training"
        )
    if not directory.is_dir():
        raise NotADirectoryError(f"{str(directory)!r} is not a directory of post-hoc EMA snapshots")
    snapshots = []
    for path in sorted(directory.iterdir()):
        if not _NAME.match(path.name):
            continue
        meta = _read_meta(path)
        if not meta or meta.get("format") != FORMAT:
            warnings.warn(f"skipping {path}: not a readable post-hoc EMA snapshot", stacklevel=2)
            continue
        snapshots.append(Snapshot(
            path, meta["series"], meta["sigma_rel"], meta["gamma"], meta["step"], meta["time"],
            meta["written"], meta["updates"],
        ))
    return sorted(snapshots, key=lambda s: (s.step, s.sigma_rel, s.written))


def _current(snapshots: list[Snapshot], directory: Path) -> list[Snapshot]:
    """One series, and of each (sigma_rel, step) only the last written (a resumed run's)."""
    series = sorted({s.series for s in snapshots})
    if len(series) > 1:
        raise ValueError(
            f"{str(directory)!r} holds snapshots of {len(series)} different training runs (series "
            f"{', '.join(series)}); give each run its own directory, or move one run's files away"
        )
    latest: dict[tuple[float, int], Snapshot] = {}
    for snapshot in snapshots:
        key = (snapshot.sigma_rel, snapshot.step)
        if key not in latest or snapshot.written > latest[key].written:
            latest[key] = snapshot
    return sorted(latest.values(), key=lambda s: (s.step, s.sigma_rel))


def _unused_name(directory: Path, stem: str, suffix: str) -> Path:
    """``stem + suffix``, or ``stem-r<n> + suffix`` if taken: a snapshot never replaces another."""
    path, revision = directory / f"{stem}{suffix}", 1
    while path.exists():
        path, revision = directory / f"{stem}-r{revision}{suffix}", revision + 1
    return path


def _write_file(path_directory: Path, stem: str, content: dict[str, Any]) -> Path:
    """torch.save to a hidden temporary, fsync, then rename: a crash leaves no half snapshot."""
    temporary = path_directory / f".{stem}.pt.tmp-{os.getpid()}"
    with open(temporary, "wb") as file:
        torch.save(content, file)
        file.flush()
        os.fsync(file.fileno())
    final = _unused_name(path_directory, stem, ".pt")
    os.replace(temporary, final)
    return final


def _write_sharded(path_directory: Path, stem: str, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Every rank writes its shards with torch.distributed.checkpoint; rank 0 renames when all are done."""
    import json

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    names = [None]
    if rank == 0:
        names = [(str(path_directory / f".{stem}.tmp-{os.getpid()}"), str(_unused_name(path_directory, stem, "")))]
    dist.broadcast_object_list(names, src=0)
    temporary, final = map(Path, names[0])
    dcp.save(state, checkpoint_id=temporary)  # collective; returns once every rank's shards are written
    if rank == 0:
        with open(temporary / _META_FILE, "w") as file:
            json.dump(meta, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
    dist.barrier()
    return final


def _load_state(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """The snapshot's averaged state dict, on the CPU, memory-mapped where the format allows."""
    if not snapshot.sharded:
        return torch.load(snapshot.path, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(snapshot.path)).read_metadata()
    state = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=snapshot.path, no_dist=True)  # one process, full tensors
    return state


# ---------------------------------------------------------------------------------------------
# reconstruction
# ---------------------------------------------------------------------------------------------


@dataclass
class Solution:
    """The least-squares answer: ``sum_j coefficients[j] * snapshots[j]`` approximates the target.

    ``fit_error`` is the relative L2 distance ``||p_fit - p_target|| / ||p_target||`` between the
    combined weighting profile and the requested one (0 when the target is a snapshot).
    """

    sigma_rel: float
    gamma: float
    step: int
    time: int
    snapshots: list[Snapshot]
    coefficients: list[float]
    fit_error: float

    def profiles(self, points: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tau, fitted profile, requested profile) on ``points`` times in ``(0, time]``, float64."""
        tau = torch.linspace(0.0, float(self.time), points + 1, dtype=torch.float64)[1:]
        gammas = torch.tensor([s.gamma for s in self.snapshots], dtype=torch.float64)
        times = torch.tensor([float(s.time) for s in self.snapshots], dtype=torch.float64)
        coefficients = torch.tensor(self.coefficients, dtype=torch.float64)
        fitted = coefficients @ power_profile(gammas, times, tau)
        target = power_profile(torch.tensor([self.gamma], dtype=torch.float64),
                               torch.tensor([float(self.time)], dtype=torch.float64), tau)[0]
        return tau, fitted, target


def solve(directory: str | os.PathLike, sigma_rel: float, step: int | None = None) -> Solution:
    """The snapshot coefficients of the power EMA ``sigma_rel`` at ``step`` (default: the last snapshot's).

    Only snapshots taken at or before ``step`` are used. A snapshot of that very ``sigma_rel`` at
    that step is returned alone with coefficient 1 (no least-squares round-off).

    Example::

        solution = solve("phema", 0.07)
        print(solution.fit_error, solution.coefficients)
    """
    sigma_rel = check_sigma_rel(sigma_rel)
    directory = Path(directory)
    snapshots = _current(list_snapshots(directory), directory)
    if not snapshots:
        raise FileNotFoundError(
            f"{str(directory)!r} holds no post-hoc EMA snapshots yet; they are written every "
            "snapshot_every steps of PostHocEMA.update()"
        )
    last = snapshots[-1]
    if step is None:
        step = last.step
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= last.step:
        raise ValueError(
            f"step must be an int in [1, {last.step}] (steps done; the last snapshot is at step {last.step}), got {step!r}"
        )
    time_r = last_update_time(last.updates, step)
    used = [s for s in snapshots if s.step <= step and s.time > 0]
    if not used or time_r == 0:
        raise ValueError(f"no snapshot was taken at or before step {step}; the first is at step {snapshots[0].step}")
    gamma = sigma_rel_to_gamma(sigma_rel)
    for snapshot in used:
        if snapshot.time == time_r and math.isclose(snapshot.gamma, gamma, rel_tol=1e-12):
            return Solution(sigma_rel, gamma, step, time_r, [snapshot], [1.0], 0.0)
    def as_tensor(values):
        return torch.tensor(values, dtype=torch.float64)
    gammas, times = as_tensor([s.gamma for s in used]), as_tensor([float(s.time) for s in used])
    gram = power_correlation(gammas[:, None], times[:, None], gammas[None, :], times[None, :])
    target_gamma, target_time = as_tensor([gamma]), as_tensor([float(time_r)])
    products = power_correlation(gammas, times, target_gamma, target_time)
    # EDM2's least squares, with the coefficients constrained to sum to 1 (the bordered KKT
    # system): every profile has mass 1, so a constant weight is reproduced exactly. Unconstrained,
    # widths away from the tracked ones came out scaled by up to 2% (sum 0.978 for sigma_rel 0.25
    # tracking 0.05 and 0.10), which moves weights with a large mean more than the profile misfit does.
    # gelsd: a minimum-norm answer when snapshots are (nearly) collinear, as EDM2's np.linalg.lstsq.
    count = len(used)
    system = torch.ones(count + 1, count + 1, dtype=torch.float64)
    system[:count, :count], system[count, count] = gram, 0.0
    right = torch.cat([products, torch.ones(1, dtype=torch.float64)])
    coefficients = torch.linalg.lstsq(system, right[:, None], driver="gelsd").solution[:count, 0]
    norm = power_correlation(target_gamma, target_time, target_gamma, target_time)[0]
    residual = coefficients @ gram @ coefficients - 2 * coefficients @ products + norm
    fit_error = math.sqrt(max(float(residual), 0.0) / float(norm))
    return Solution(sigma_rel, gamma, step, time_r, used, coefficients.tolist(), fit_error)


class Synthesis(dict):
    """A state dict (load it with ``model.load_state_dict``) that also carries how it was made:
    ``fit_error``, ``sigma_rel``, ``step`` and the :class:`Solution` (``solution``)."""

    solution: Solution

    @property
    def fit_error(self) -> float:
        return self.solution.fit_error

    @property
    def sigma_rel(self) -> float:
        return self.solution.sigma_rel

    @property
    def step(self) -> int:
        return self.solution.step


@torch.no_grad()
def synthesize(
    directory: str | os.PathLike, sigma_rel: float, step: int | None = None, *, show_progress: bool = True
) -> Synthesis:
    """The power EMA of width ``sigma_rel`` at ``step``, rebuilt from the snapshots in ``directory``.

    Returns a state dict (a :class:`Synthesis`, whose ``fit_error`` says how well the snapshots
    span the requested profile: below about 1e-2 the result is close to a power EMA tracked during
    training). Snapshots are read one at a time, memory-mapped, into one float32 (float64 for float64
    weights) accumulator: memory stays at about two copies of the model whatever their number.
    Integer entries (BatchNorm's ``num_batches_tracked``) come from the latest snapshot used.

    Example::

        state = fused_ema.posthoc.synthesize("phema", sigma_rel=0.07)
        print(f"fit error {state.fit_error:.2e}")
        model.load_state_dict(state)
    """
    solution = solve(directory, sigma_rel, step)
    pairs = [(s, c) for s, c in zip(solution.snapshots, solution.coefficients) if c != 0.0]
    latest = max(s.step for s, _ in pairs)
    accumulated: dict[str, Any] = {}
    items: Iterator = iter(pairs)
    if show_progress:
        items = progress(pairs, f"post-hoc EMA sigma_rel={solution.sigma_rel:g}")
    dtypes: dict[str, torch.dtype] = {}
    for snapshot, coefficient in items:
        # One snapshot mapped at a time; nothing of it outlives _accumulate_ but what it adds.
        _accumulate_(accumulated, dtypes, _load_state(snapshot), coefficient,
                     exact=len(pairs) == 1 and coefficient == 1.0, latest=snapshot.step == latest)
    result = Synthesis((key, value.to(dtypes[key]) if key in dtypes else value) for key, value in accumulated.items())
    result.solution = solution
    return result


def _accumulate_(accumulated: dict[str, Any], dtypes: dict[str, torch.dtype], state: dict[str, Any],
                 coefficient: float, *, exact: bool, latest: bool) -> None:
    """``accumulated += coefficient * state`` for floating tensors; other entries from the latest snapshot."""
    if accumulated and state.keys() != accumulated.keys():
        raise ValueError("the snapshots hold different tensors (was the model changed during training?)")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            if key not in accumulated or latest:
                accumulated[key] = value.clone() if isinstance(value, torch.Tensor) else value
        elif exact:
            accumulated[key] = value.clone()  # the snapshot itself, bit for bit
        elif key not in accumulated:
            dtypes[key] = value.dtype
            compute = torch.float64 if value.dtype == torch.float64 else torch.float32
            accumulated[key] = value.to(compute) * coefficient
        else:
            accumulated[key].add_(value, alpha=coefficient)


def plot_profile(solution: Solution, path: str | os.PathLike) -> None:
    """Draw the reconstructed weighting profile against the requested one (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau, fitted, target = solution.profiles()
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(tau.numpy(), target.numpy(), label=f"requested: sigma_rel={solution.sigma_rel:g}", linewidth=2.5)
    axes.plot(tau.numpy(), fitted.numpy(), "--", label=f"from {len(solution.snapshots)} snapshots "
              f"(fit error {solution.fit_error:.1e})")
    axes.set_xlabel("training step")
    axes.set_ylabel("weight of the model at that step")
    axes.set_title(f"post-hoc EMA profile at step {solution.step}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# training side
# ---------------------------------------------------------------------------------------------


class PostHocEMA(nn.Module):
    """Power-function EMAs of a model, saved as snapshots, for choosing ``sigma_rel`` after training.

    Each ``update()`` moves every average ``k`` towards the model with weight
    ``1 - (t_prev / t)^(gamma_k + 1)``, ``t`` the steps done and ``t_prev`` the time of the update
    before (``(1 - 1/t)^(gamma + 1)`` as a decay when every step updates), all averages in one fused
    pass over the model. Only steps ``s`` with ``s % update_every == 0`` update; the true step count
    enters the weight, so the averages follow the power profile whatever the spacing of updates.
    Every ``snapshot_every`` steps each average is written to ``directory`` (atomically, never
    replacing a file); under FSDP2 every rank writes its own shards with torch.distributed.checkpoint.
    ``dtype`` keeps the averages (and so the snapshots) in another floating dtype than the model's,
    e.g. float32 averages of a bfloat16 model, whose late updates would round away in bfloat16.

    Example::

        posthoc = fused_ema.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=1000, directory="phema")
        for batch in loader:
            train_step(model, batch)
            posthoc.update()
        posthoc.synthesize_into(model, sigma_rel=0.07)
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        directory: str | os.PathLike = "posthoc_ema",
        update_every: int = 1,
        backend: str = "auto",
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sigma_rels, (int, float)):
            sigma_rels = (sigma_rels,)
        sigma_rels = [check_sigma_rel(s, "sigma_rels") for s in sigma_rels]
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must be distinct values, at least one, got {sigma_rels}")
        for name, value in (("snapshot_every", snapshot_every), ("update_every", update_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {directory!r}")
        self.sigma_rels = sigma_rels
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.snapshot_every = snapshot_every
        self.directory = Path(directory)
        self.update_every = update_every
        self.backend = backends.check_name(backend)
        self.__dict__["_model"] = unwrap(model)
        self.averages = nn.ModuleList(clone_module(self._model, None, dtype).requires_grad_(False) for _ in sigma_rels)
        self._binding = Binding(list(self.averages), average_buffers=True, backend=backend)
        self.series = uuid.uuid4().hex[:12]  # marks this run's snapshots; kept across resume
        self.step = 0  # steps done (update() calls, or the last step given + 1)
        self.time = 0  # steps done at the last averaging update (the profile's end)
        self.updates: list[list[int]] = []  # update times as [first, last, stride] runs
        self.snapshots_written = 0
        self._snapshot_step = 0  # steps done at the last snapshot

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.averages[0](*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module | None = None, step: int | None = None) -> None:
        """Fold the model into every power EMA, and write snapshots when one is due.

        ``step`` (optional) is the 0-based training step just taken; by default calls are counted.
        Steps must not go backwards.
        """
        if step is None:
            step = self.step
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if step < self.step:
            raise ValueError(
                f"step {step} is before the steps already averaged ({self.step} done); power EMA times "
                "only go forward (to resume, load_state_dict the checkpoint of this run)"
            )
        live = self._model if model is None else unwrap(model)
        plan = self._binding.plan(live)
        time_now = step + 1
        if step % self.update_every == 0:
            plan.lerp_([power_weight(gamma, time_now, self.time) for gamma in self.gammas])
            self.time = time_now
            _add_update_time(self.updates, time_now)
        self.step = time_now
        if self.time and self.step // self.snapshot_every > self._snapshot_step // self.snapshot_every:
            self.snapshot()

    @torch.no_grad()
    def snapshot(self) -> list[Path]:
        """Write every average now (``update`` calls this every ``snapshot_every`` steps); returns the paths."""
        if self.time == 0:
            raise RuntimeError("nothing to snapshot yet: call update() at least once first")
        sharded = distributed.mesh_of(self.averages[0]) is not None
        rank0 = not sharded or _rank() == 0
        if rank0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.snapshots_written == 0:
                self._warn_foreign_series()
        paths = []
        for sigma_rel, gamma, average in zip(self.sigma_rels, self.gammas, self.averages):
            stem = f"posthoc-{self.series}-sigma{sigma_rel:.4f}-step{self.step:09d}"
            meta = _meta(series=self.series, sigma_rel=sigma_rel, gamma=gamma, step=self.step, time=self.time,
                         written=time.time_ns(), updates=[list(s) for s in self.updates],
                         update_every=self.update_every)
            if sharded:
                distributed.reshard_(average)
                paths.append(_write_sharded(self.directory, stem, average.state_dict(), meta))
            else:
                state = {k: v.detach() for k, v in average.state_dict().items()}
                paths.append(_write_file(self.directory, stem, {"meta": meta, "state_dict": state}))
        self._snapshot_step = self.step
        self.snapshots_written += 1
        return paths

    def _warn_foreign_series(self) -> None:
        others = {p.name.split("-")[1] for p in self.directory.iterdir() if _NAME.match(p.name)} - {self.series}
        if others:
            warnings.warn(
                f"{str(self.directory)!r} already holds snapshots of another run; synthesize() will refuse "
                "to mix them: give this run its own directory, or load_state_dict() the old run's "
                "checkpoint to continue its series",
                stacklevel=3,
            )

    def solve(self, sigma_rel: float, step: int | None = None) -> Solution:
        """The coefficients of :meth:`synthesize` and its fit error, without reading any weights."""
        return solve(self.directory, sigma_rel, step)

    def synthesize(self, sigma_rel: float, step: int | None = None) -> Synthesis:
        """The power EMA of width ``sigma_rel`` at ``step`` (default: the last snapshot), as a state dict.

        See :func:`fused_ema.posthoc.synthesize`; ``result.fit_error`` is the profile's relative error.
        """
        return synthesize(self.directory, sigma_rel, step)

    @torch.no_grad()
    def synthesize_into(self, model: nn.Module, sigma_rel: float, step: int | None = None) -> Synthesis:
        """Load the synthesized average into ``model``; returns it too.

        An FSDP2 model gets its own shards of the full tensors on every rank (every rank reads the
        snapshots, so ``directory`` must be visible to all of them; no communication).
        """
        state = self.synthesize(sigma_rel, step)
        _load_full_(unwrap(model), state)
        return state

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "series": self.series,
            "sigma_rels": list(self.sigma_rels),
            "update_every": self.update_every,
            "snapshot_every": self.snapshot_every,
            "step": self.step,
            "time": self.time,
            "updates": [list(s) for s in self.updates],
            "snapshots_written": self.snapshots_written,
            "snapshot_step": self._snapshot_step,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(
                f"this checkpoint tracks sigma_rels {state['sigma_rels']}, this PostHocEMA {self.sigma_rels}: "
                "build it with the same sigma_rels to continue the series"
            )
        if state["update_every"] != self.update_every:
            warnings.warn(f"update_every changes from {state['update_every']} to {self.update_every} on resume; "
                          "the snapshots stay exact (they record the update times)", stacklevel=2)
        self.series = state["series"]
        self.step, self.time = state["step"], state["time"]
        self.updates = [list(s) for s in state["updates"]]
        self.snapshots_written = state["snapshots_written"]
        self._snapshot_step = state["snapshot_step"]


@torch.no_grad()
def _load_full_(model: nn.Module, state: dict[str, Any]) -> None:
    """``model.load_state_dict(state)`` for full tensors, cut to this rank's shards where sharded."""
    if not distributed.is_fsdp(model):
        model.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    distributed.reshard_(model)
    own = model.state_dict()
    loaded = dict(state)
    for key, target in own.items():
        if distributed.is_dtensor(target) and key in loaded:
            full = loaded[key].to(target._local_tensor.device, target.dtype)
            # src_data_rank=None: every rank holds the full tensor and keeps its part, no scatter.
            loaded[key] = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    model.load_state_dict(loaded)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
