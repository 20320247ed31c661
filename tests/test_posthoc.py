"""Post-hoc EMA (EDM2): the power-EMA weights, snapshots on disk, synthesis, resume and the CLI.

Oracles are float64 closed forms: the profile of a power EMA updated at times ``t_1 < ... < t_n``
gives the model of update ``i`` the weight ``(t_i^(g+1) - t_(i-1)^(g+1)) / t_n^(g+1)``.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import fused_ema
from fused_ema import cli
from fused_ema import posthoc as posthoc_module
from fused_ema.rules import sigma_rel_to_gamma

STEPS = 2000
SNAPSHOT_EVERY = 100
TRACKED = (0.05, 0.10)


class Vector(nn.Module):
    """One float64 parameter vector the tests set by hand at every step."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(size, dtype=torch.float64))


def closed_form_coefficients(gamma: float, update_times: list[int]) -> torch.Tensor:
    """The weight of each update's model in a power EMA after its last update, float64."""
    times = torch.tensor([0, *update_times], dtype=torch.float64)
    mass = (times / times[-1]) ** (gamma + 1)
    return mass[1:] - mass[:-1]


def update_steps(steps: int, update_every: int) -> list[int]:
    return [step for step in range(steps) if step % update_every == 0]


# ---------------------------------------------------------------- the weight of each update


@pytest.mark.parametrize("update_every", [1, 3])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_power_ema_weights_follow_the_closed_form(tmp_path: Path, update_every: int, backend: str) -> None:
    """Model = one-hot of the step, so the average's entries are the weights of the steps."""
    steps = 60
    model = Vector(steps)
    posthoc = fused_ema.PostHocEMA(model, sigma_rels=TRACKED, snapshot_every=1000, directory=tmp_path,
                                   update_every=update_every, backend=backend)
    for step in range(steps):
        with torch.no_grad():
            model.value.zero_()[step] = 1.0
        posthoc.update()
    updated = update_steps(steps, update_every)
    times = [step + 1 for step in updated]
    for sigma_rel, average in zip(TRACKED, posthoc.averages):
        gamma = sigma_rel_to_gamma(sigma_rel)
        # Product form: update at time t (previous at t_prev) has decay (t_prev / t)^(gamma+1),
        # i.e. (1 - 1/t)^(gamma+1) when every step updates.
        decays = [(previous / time) ** (gamma + 1) for previous, time in zip([0, *times], times)]
        if update_every == 1:
            decays = [(1 - 1 / time) ** (gamma + 1) for time in times]
        products = torch.tensor([(1 - decays[i]) * math.prod(decays[i + 1:]) for i in range(len(times))],
                                dtype=torch.float64)
        expected = torch.zeros(steps, dtype=torch.float64)
        expected[updated] = products
        torch.testing.assert_close(average.value.detach(), expected, rtol=1e-12, atol=1e-15)
        # The telescoped profile form, also float64: the same numbers by another route.
        expected[updated] = closed_form_coefficients(gamma, times)
        torch.testing.assert_close(average.value.detach(), expected, rtol=1e-12, atol=1e-15)
        assert average.value.detach()[[s for s in range(steps) if s not in updated]].eq(0).all()


def test_power_weight_keeps_precision_late_in_training() -> None:
    gamma = sigma_rel_to_gamma(0.05)
    time = 10**9
    # float64 closed form of 1 - (1 - 1/t)^(g+1) by the binomial series, exact to ~1e-27 here.
    a = gamma + 1
    series = a / time - a * (a - 1) / (2 * time**2) + a * (a - 1) * (a - 2) / (6 * time**3)
    assert posthoc_module.power_weight(gamma, time, time - 1) == pytest.approx(series, rel=1e-12)
    assert posthoc_module.power_weight(gamma, 5, 0) == 1.0


# ---------------------------------------------------------------- synthesis on a known trajectory


def trajectory(step: int) -> torch.Tensor:
    """Weights that are known functions of the step: slow and fast oscillations and a drift."""
    time = step + 1
    return torch.tensor([math.sin(time / 300), (time / STEPS) ** 2, math.cos(time / 77)], dtype=torch.float64)


def direct_power_ema(sigma_rel: float, steps_done: int, update_every: int) -> torch.Tensor:
    """The power EMA of ``trajectory`` after ``steps_done`` steps, from the float64 closed form."""
    updated = update_steps(steps_done, update_every)
    coefficients = closed_form_coefficients(sigma_rel_to_gamma(sigma_rel), [s + 1 for s in updated])
    return coefficients @ torch.stack([trajectory(step) for step in updated])


@pytest.fixture(scope="module", params=[1, 4], ids=["update_every=1", "update_every=4"])
def trained(request, tmp_path_factory) -> tuple[fused_ema.PostHocEMA, int]:
    directory = tmp_path_factory.mktemp(f"posthoc{request.param}")
    model = Vector(3)
    posthoc = fused_ema.PostHocEMA(model, sigma_rels=TRACKED, snapshot_every=SNAPSHOT_EVERY,
                                   directory=directory, update_every=request.param)
    for step in range(STEPS):
        with torch.no_grad():
            model.value.copy_(trajectory(step))
        posthoc.update()
    return posthoc, request.param


# Measured (max abs difference from the direct power EMA, values of size ~1, for update_every 1
# and 4 alike): step 2000: sigma_rel 0.03 -> 1.2e-3, 0.07 -> 7.6e-5, 0.15 -> 6.5e-5; step 1500:
# 0.03 -> 2.3e-3, 0.07 -> 1.9e-4, 0.15 -> 2.0e-4. The difference is the least-squares misfit of the
# profile (fit error 2.6e-2, 2.5e-3, 5.8e-3 at step 2000), not round-off: snapshots taken at
# discrete times span a power profile only approximately, and worse outside the tracked widths.
# Tolerances are about 3x the measurements.
SYNTHESIS_TOLERANCE = {0.03: 5e-3, 0.07: 5e-4, 0.15: 8e-4}


@pytest.mark.parametrize("step", [None, 1500])
@pytest.mark.parametrize("sigma_rel", list(SYNTHESIS_TOLERANCE), ids=["below", "between", "above"])
def test_synthesize_matches_the_direct_power_ema(trained, sigma_rel: float, step: int | None) -> None:
    posthoc, update_every = trained
    state = posthoc.synthesize(sigma_rel, step)
    direct = direct_power_ema(sigma_rel, step or STEPS, update_every)
    tolerance = SYNTHESIS_TOLERANCE[sigma_rel]
    torch.testing.assert_close(state["value"], direct, rtol=0, atol=tolerance)
    assert 0 < state.fit_error < 0.05
    assert state.step == (step or STEPS)
    # The tolerance must be able to fail: the tracked widths' own averages are much farther off.
    for tracked in TRACKED:
        assert (direct_power_ema(tracked, step or STEPS, update_every) - direct).abs().max() > 5 * tolerance


def test_a_constant_weight_comes_back_unchanged(tmp_path: Path) -> None:
    """The coefficients sum to 1 (every profile has mass 1), also far from the tracked widths."""
    model = Vector(2)
    with torch.no_grad():
        model.value.copy_(torch.tensor([3.0, -7.0], dtype=torch.float64))
    posthoc = fused_ema.PostHocEMA(model, sigma_rels=TRACKED, snapshot_every=10, directory=tmp_path)
    for _ in range(100):
        posthoc.update()
    for sigma_rel in (0.01, 0.07, 0.25):
        state = posthoc.synthesize(sigma_rel, step=50)
        assert sum(state.solution.coefficients) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(state["value"], model.value.detach(), rtol=1e-12, atol=0)


def test_fit_error_flags_a_step_between_snapshots(trained) -> None:
    posthoc, _ = trained
    # 50 steps after the last usable snapshot, no combination has the weight the target puts there.
    assert posthoc.solve(0.07, step=1550).fit_error > 0.3
    assert posthoc.solve(0.07, step=1500).fit_error < 0.01


@pytest.mark.parametrize("sigma_rel", TRACKED)
@pytest.mark.parametrize("step", [SNAPSHOT_EVERY, 1500, STEPS])
def test_tracked_sigma_rel_at_a_snapshot_step_is_that_snapshot_exactly(trained, sigma_rel: float, step: int) -> None:
    posthoc, _ = trained
    state = posthoc.synthesize(sigma_rel, step)
    (path,) = [s.path for s in posthoc_module.list_snapshots(posthoc.directory)
               if s.step == step and s.sigma_rel == sigma_rel]
    saved = torch.load(path, weights_only=True)["state_dict"]["value"]
    assert torch.equal(state["value"], saved)
    assert state.fit_error == 0.0
    if step == STEPS:
        index = TRACKED.index(sigma_rel)
        assert torch.equal(state["value"], posthoc.averages[index].value.detach())


def test_dtype_keeps_the_averages_and_snapshots_in_another_dtype(tmp_path: Path) -> None:
    model = nn.Linear(3, 2).to(torch.bfloat16)
    posthoc = fused_ema.PostHocEMA(model, sigma_rels=TRACKED, snapshot_every=4, directory=tmp_path, dtype=torch.float32)
    for _ in range(8):
        posthoc.update()
    assert all(p.dtype == torch.float32 for average in posthoc.averages for p in average.parameters())
    state = posthoc.synthesize(0.07)
    assert state["weight"].dtype == torch.float32
    torch.testing.assert_close(state["weight"], model.weight.float())  # a constant model averages to itself
    posthoc.synthesize_into(model, 0.07)  # load_state_dict casts back to the model's dtype
    assert model.weight.dtype == torch.bfloat16


def test_synthesize_into_loads_the_model(trained) -> None:
    posthoc, _ = trained
    model = Vector(3)
    result = posthoc.synthesize_into(model, 0.07)
    assert torch.equal(model.value.detach(), result["value"])


def test_synthesize_streams_one_snapshot_at_a_time(trained, monkeypatch) -> None:
    """Memory stays at two copies: each snapshot is released before the next one is read."""
    posthoc, _ = trained
    loaded: list[weakref.ref] = []
    alive_at_load: list[int] = []
    original = posthoc_module._load_state

    def watched(snapshot):
        alive_at_load.append(sum(reference() is not None for reference in loaded))
        state = original(snapshot)
        loaded.append(weakref.ref(state["value"]))
        return state

    monkeypatch.setattr(posthoc_module, "_load_state", watched)
    state = posthoc.synthesize(0.07)
    assert len(state.solution.snapshots) == 2 * STEPS // SNAPSHOT_EVERY
    assert alive_at_load == [0] * len(alive_at_load)


def test_snapshots_record_step_gamma_and_update_times(trained) -> None:
    posthoc, update_every = trained
    snapshots = posthoc_module.list_snapshots(posthoc.directory)
    assert len(snapshots) == len(TRACKED) * STEPS // SNAPSHOT_EVERY
    for snapshot in snapshots:
        assert snapshot.step % SNAPSHOT_EVERY == 0
        assert snapshot.gamma == sigma_rel_to_gamma(snapshot.sigma_rel)
        assert snapshot.time == max(s + 1 for s in update_steps(snapshot.step, update_every))


def test_plot_profile(trained, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    posthoc, _ = trained
    solution = posthoc.solve(0.07)
    _, fitted, target = solution.profiles()
    assert (fitted - target).abs().max() < 0.05 * target.max()
    posthoc_module.plot_profile(solution, tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 0


# ---------------------------------------------------------------- crash, resume and the series


KILLED_RUN = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import fused_ema
    from fused_ema import posthoc
    from tests.test_posthoc import Vector, trajectory
    model = Vector(3)
    ema = fused_ema.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=10, directory={directory!r})
    renames = 0
    real_replace = os.replace
    def replace(source, target):
        global renames
        renames += 1
        if renames == 7:        # the 4th snapshot step's first file: written, fsynced, not renamed
            os._exit(9)
        real_replace(source, target)
    posthoc.os.replace = replace
    for step in range(100):
        model.value.data.copy_(trajectory(step))
        ema.update()
        if step + 1 == 25:
            torch.save(ema.state_dict(), {checkpoint!r})
""")


def run_uninterrupted(directory: Path, steps: int) -> fused_ema.PostHocEMA:
    model = Vector(3)
    posthoc = fused_ema.PostHocEMA(model, sigma_rels=TRACKED, snapshot_every=10, directory=directory)
    for step in range(steps):
        with torch.no_grad():
            model.value.copy_(trajectory(step))
        posthoc.update()
    return posthoc


def test_run_killed_between_write_and_rename_then_resumed(tmp_path: Path) -> None:
    directory, checkpoint = tmp_path / "snapshots", tmp_path / "checkpoint.pt"
    root = str(Path(__file__).resolve().parent.parent)
    script = KILLED_RUN.format(root=root, directory=str(directory), checkpoint=str(checkpoint))
    result = subprocess.run([sys.executable, "-c", script], check=False, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr
    leftovers = [p for p in directory.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-done snapshot exists...
    snapshots = posthoc_module.list_snapshots(directory)
    assert [s.step for s in snapshots] == [10, 10, 20, 20, 30, 30]  # ...but is never read
    assert posthoc_module.synthesize(directory, 0.07).step == 30

    # Resume from the checkpoint at step 25: the series continues (step 30 is written again, and
    # the newer file wins), and the result equals a run that was never interrupted.
    model = Vector(3)
    posthoc = fused_ema.PostHocEMA(model, sigma_rels=TRACKED, snapshot_every=10, directory=directory)
    posthoc.load_state_dict(torch.load(checkpoint, weights_only=True))
    assert posthoc.step == 25
    for step in range(25, 100):
        with torch.no_grad():
            model.value.copy_(trajectory(step))
        posthoc.update()
    assert len(posthoc_module.list_snapshots(directory)) == 2 * 10 + 2  # step 30 twice
    assert not any(path.name.endswith(".pt") and "-r" not in path.name and path.stat().st_size == 0
                   for path in directory.iterdir())
    reference = run_uninterrupted(tmp_path / "reference", 100)
    for sigma_rel in (0.03, 0.07, 0.10):
        resumed, uninterrupted = posthoc.synthesize(sigma_rel), reference.synthesize(sigma_rel)
        torch.testing.assert_close(resumed["value"], uninterrupted["value"], rtol=1e-12, atol=1e-14)
        assert resumed.fit_error == pytest.approx(uninterrupted.fit_error, rel=1e-9)


def test_a_snapshot_never_replaces_another(tmp_path: Path) -> None:
    posthoc = run_uninterrupted(tmp_path, 10)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    posthoc.snapshot()  # same step again: written beside, not over
    assert all(tmp_path.joinpath(name).read_bytes() == data for name, data in first.items())
    assert len(list(tmp_path.iterdir())) == 2 * len(first)


def test_state_dict_round_trip_keeps_the_series(tmp_path: Path) -> None:
    posthoc = run_uninterrupted(tmp_path, 35)
    resumed = fused_ema.PostHocEMA(Vector(3), sigma_rels=TRACKED, snapshot_every=10, directory=tmp_path)
    resumed.load_state_dict(posthoc.state_dict())
    assert (resumed.series, resumed.step, resumed.time, resumed.updates) == (
        posthoc.series, posthoc.step, posthoc.time, posthoc.updates)
    for mine, theirs in zip(resumed.averages, posthoc.averages):
        assert torch.equal(mine.value, theirs.value)


def test_two_runs_in_one_directory_are_refused(tmp_path: Path) -> None:
    run_uninterrupted(tmp_path, 10)
    with pytest.warns(UserWarning, match="another run"):
        run_uninterrupted(tmp_path, 10)
    with pytest.raises(ValueError, match="2 different training runs"):
        posthoc_module.synthesize(tmp_path, 0.07)


# ---------------------------------------------------------------- bad input


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        posthoc_module.synthesize(tmp_path / "missing", 0.07)
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        posthoc_module.synthesize(tmp_path, 0.07)
    posthoc = run_uninterrupted(tmp_path, 20)
    for bad in (0.0, -0.1, 0.3, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            posthoc.synthesize(bad)
    with pytest.raises(TypeError, match="sigma_rel must be a float"):
        posthoc.synthesize("0.07")
    with pytest.raises(ValueError, match=r"step must be an int in \[1, 20\]"):
        posthoc.synthesize(0.07, step=21)
    with pytest.raises(ValueError, match="no snapshot was taken at or before step 5"):
        posthoc.synthesize(0.07, step=5)


def test_constructor_and_update_errors_leave_the_averages_untouched(tmp_path: Path) -> None:
    model = Vector(3)
    for bad in ((), (0.05, 0.05), (0.5,)):
        with pytest.raises(ValueError, match="sigma_rels"):
            fused_ema.PostHocEMA(model, sigma_rels=bad, snapshot_every=10, directory=tmp_path)
    for name in ("snapshot_every", "update_every"):
        with pytest.raises(ValueError, match=name):
            fused_ema.PostHocEMA(model, **{name: 0}, directory=tmp_path)
    posthoc = run_uninterrupted(tmp_path, 5)
    before = [average.value.clone() for average in posthoc.averages]
    with pytest.raises(ValueError, match="before the steps already averaged"):
        posthoc.update(step=2)
    with pytest.raises(ValueError, match="the model has no parameter"):
        posthoc.update(nn.Linear(2, 2))
    assert all(torch.equal(a.value, b) for a, b in zip(posthoc.averages, before))
    other = fused_ema.PostHocEMA(Vector(3), sigma_rels=(0.05, 0.2), snapshot_every=10, directory=tmp_path)
    with pytest.raises(ValueError, match="same sigma_rels"):
        other.load_state_dict(posthoc.state_dict())


# ---------------------------------------------------------------- the command line


def test_cli_posthoc_writes_the_synthesized_state(trained, tmp_path: Path, capsys) -> None:
    posthoc, _ = trained
    out = tmp_path / "average.pt"
    assert cli.main(["posthoc", str(posthoc.directory), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    assert "fit error" in capsys.readouterr().out
    assert torch.equal(torch.load(out, weights_only=True)["value"], posthoc.synthesize(0.07)["value"])


def test_cli_posthoc_plot(trained, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    posthoc, _ = trained
    plot = tmp_path / "profile.png"
    arguments = ["posthoc", str(posthoc.directory), "--sigma-rel", "0.12", "--step", "1000",
                 "--out", str(tmp_path / "a.pt"), "--plot", str(plot)]
    assert cli.main(arguments) == 0
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("arguments, message", [
    (["MISSING", "--sigma-rel", "0.07"], "does not exist"),
    (["EMPTY", "--sigma-rel", "0.07"], "no post-hoc EMA snapshots"),
    (["EMPTY", "--sigma-rel", "1.5"], "sigma_rel must be in"),
])
def test_cli_posthoc_errors(tmp_path: Path, capsys, arguments: list[str], message: str) -> None:
    (tmp_path / "EMPTY").mkdir()
    arguments = [str(tmp_path / arguments[0]), *arguments[1:], "--out", str(tmp_path / "a.pt")]
    assert cli.main(["posthoc", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()


def test_update_times_schedule() -> None:
    segments: list[list[int]] = []
    for time in [1, 5, 9, 13, 14, 15, 40]:
        posthoc_module._add_update_time(segments, time)
    assert segments == [[1, 13, 4], [14, 15, 1], [40, 40, 0]]
    expected = {0: 0, 1: 1, 4: 1, 5: 5, 12: 9, 13: 13, 14: 14, 39: 15, 40: 40, 99: 40}
    assert {step: posthoc_module.last_update_time(segments, step) for step in expected} == expected



# ---------------------------------------------------------------- the worked example


def test_digits_example_prints_one_row_per_sigma_rel(tmp_path: Path, capsys) -> None:
    pytest.importorskip("sklearn")
    from fused_ema import examples

    arguments = ["posthoc", "--epochs", "2", "--train-limit", "160", "--quiet", "--directory", str(tmp_path),
                 "--sigma-rels", "0.03", "0.05", "0.2"]
    assert examples.main(arguments) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sigma_rel")]
    assert [row.split()[1] for row in rows] == ["0.03", "0.05", "0.2"]
    assert "(tracked)" in rows[1] and "0.0e+00" in rows[1]
    assert len(posthoc_module.list_snapshots(tmp_path)) == 4  # 2 epochs x 2 tracked sigma_rels


def test_digits_example_rejects_a_bad_sigma_rel(capsys) -> None:
    from fused_ema import examples

    assert examples.main(["posthoc", "--sigma-rels", "0.5"]) == 2
    assert "sigma_rel must be in" in capsys.readouterr().err
