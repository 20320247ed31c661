"""The one timer of every fused_ema benchmark: contenders interleaved, medians, ratios to a baseline.

Identical runs on a shared machine differ by up to 20% from one minute to the next, so two
contenders timed one after the other compare the machine's moods, not the code. :func:`compare`
times them in alternation (A, B, C, A, B, C, ..., the order rotated each round so no contender
always follows the same neighbour), summarises each by its median, and reports every contender as
a ratio to a baseline timed in the same run. Warm-up calls (plan building, lazy copies, compiles)
are never timed, and garbage collection is paused while timing.

Example::

    from fused_ema.bench.timer import compare
    times = compare({"flat": lambda: flat.lerp_(source, 0.001), "ema": ema.update}, baseline="flat", rounds=50)
    print(times.format())        # median per call of each contender and its ratio to "flat"
    times.ratio("ema")           # median(ema) / median(flat): 1.0 is as fast as the baseline
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import torch

from fused_ema.progress import progress

Update = Callable[[], None]


def synchronizer(device: str | torch.device) -> Update:
    """What to call before reading the clock: waits for ``device``'s queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _no_sync() -> None:
    pass


def time_calls(update: Update, calls: int = 1, synchronize: Update = _no_sync, before: Update | None = None) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``update``, device work included.

    ``before``, when given, runs untimed before each call (so each call is timed on its own).
    """
    if before is not None:
        total = 0.0
        for _ in range(calls):
            before()
            total += time_calls(update, 1, synchronize)
        return total / calls
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        update()
    synchronize()
    return (time.perf_counter() - start) / calls


def calls_per_sample(seconds_per_call: float, min_sample_s: float) -> int:
    """How many calls one sample needs to last ``min_sample_s`` (the clock's resolution and jitter)."""
    return max(1, math.ceil(min_sample_s / max(seconds_per_call, 1e-9)))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Collect garbage once, then pause the collector (its pauses land on whichever contender runs)
    and autograd for the block."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Timing:
    """The samples of one contender, in seconds per call (each sample averages ``calls`` calls)."""

    name: str
    samples: list[float]
    calls: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass
class Comparison:
    """What :func:`compare` measured: a :class:`Timing` per contender, in the order given."""

    timings: dict[str, Timing]
    baseline: str | None = None

    def median(self, name: str) -> float:
        """Median seconds per call of contender ``name``."""
        return self.timings[name].median

    def ratio(self, name: str, to: str | None = None) -> float:
        """``median(name) / median(to)``, ``to`` the baseline by default: above 1 is slower than it."""
        reference = to or self.baseline
        if reference is None:
            raise ValueError("ratio needs a contender to compare with: pass to=... or compare(..., baseline=...)")
        return self.median(name) / self.median(reference)

    def speedup(self, name: str, over: str | None = None) -> float:
        """How many times faster ``name`` is than ``over`` (the baseline by default): ``1 / ratio``."""
        return 1.0 / self.ratio(name, over)

    def format(self) -> str:
        """A header, then one line per contender: its median per call and, with a baseline, its ratio to it."""
        width = max(map(len, self.timings))
        header = f"  {'':<{width}}  {'median':>10}"
        if self.baseline is not None:
            header += f"  time / {self.baseline}"
        lines = [header]
        for name, timing in self.timings.items():
            line = f"  {name:<{width}}  {format_seconds(timing.median):>10}"
            if self.baseline is not None:
                line += f"  {self.ratio(name):.2f}"
            lines.append(line)
        return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    """``seconds`` in the unit that keeps three or four significant digits (s, ms or us)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            value = seconds / scale
            return f"{value:.{3 if value < 1 else 2 if value < 100 else 1}f} {unit}"
    raise AssertionError("unreachable")


def compare(
    contenders: Mapping[str, Update],
    *,
    baseline: str | None = None,
    rounds: int = 20,
    calls: int | Mapping[str, int] = 1,
    warmup: int = 1,
    synchronize: Update = _no_sync,
    warm_each_sample: bool = False,
    sparse: Collection[str] = (),
    min_rounds: int | None = None,
    max_seconds: float | None = None,
    label: str | None = None,
    before: Mapping[str, Update] | None = None,
) -> Comparison:
    """Time ``contenders`` (name -> zero-argument update) interleaved and return their medians.

    Each of ``rounds`` rounds takes one sample of every contender, the order rotated by one each
    round; a sample is ``calls`` calls (one number, or one per name) timed together.

    - ``baseline``: the name every :meth:`Comparison.ratio` is taken against.
    - ``warmup``: untimed interleaved rounds first (plans, caches, compiles, page faults).
    - ``synchronize``: waits for queued device work (:func:`synchronizer`), called around each sample.
    - ``warm_each_sample``: one untimed call before each sample, so every contender runs from caches
      it filled itself rather than from whatever its predecessor left.
    - ``sparse``: contenders too slow to sample every round: timed in the middle and last rounds only.
    - ``max_seconds``: once the timed rounds have taken this long, the rounds after ``min_rounds``
      are dropped (a machine that got busy mid-run keeps the run's length bounded).
    - ``label``: draw a progress bar with this label.
    - ``before``: name -> an untimed call before each timed call of that contender: the disturbance
      it is measured under (another library's update, a module created), or fresh inputs.

    Runs under :func:`quiet` (no garbage collection, no autograd).
    """
    names = list(contenders)
    before = dict(before or {})
    if set(before) - set(names):
        raise ValueError(f"before names {sorted(set(before) - set(names))}, which are not contenders ({', '.join(names)})")
    if baseline is not None and baseline not in contenders:
        raise ValueError(f"baseline must be one of the contenders ({', '.join(names)}), got {baseline!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    per_name = {name: calls if isinstance(calls, int) else calls.get(name, 1) for name in names}
    sparse_rounds = {rounds // 2, rounds - 1}
    min_rounds = rounds if min_rounds is None else min_rounds
    samples: dict[str, list[float]] = {name: [] for name in names}
    with quiet():
        for _ in range(warmup):
            for name in names:
                if name in before:
                    before[name]()
                contenders[name]()
        synchronize()
        steps = progress(range(rounds), label) if label is not None else range(rounds)
        deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        for round_index in steps:
            if round_index >= min_rounds and deadline is not None and time.perf_counter() > deadline:
                continue  # keep the progress bar honest: it still reaches its end
            for offset in range(len(names)):
                name = names[(round_index + offset) % len(names)]
                if name in sparse and round_index not in sparse_rounds:
                    continue
                if warm_each_sample:
                    contenders[name]()
                samples[name].append(time_calls(contenders[name], per_name[name], synchronize, before.get(name)))
    return Comparison({name: Timing(name, samples[name], per_name[name]) for name in names}, baseline)
