"""The zoo against the contenders: :func:`run` (what ``fused-ema bench`` calls) and :func:`measure_workload`.

Every contender updates averages of the same model tensors in the same process, timed by
:func:`fused_ema.bench.timer.compare` (interleaved, medians). The first call of each contender
(plan building, lazy copies) is never timed.

Example::

    from fused_ema import bench
    report = bench.run(["transformer"], size="quick")
    print(bench.format_table(report))
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from fused_ema.bench import timer
from fused_ema.bench.contenders import Contender, Skip, backends_not_run, contenders
from fused_ema.bench.report import Report, Result, derive, environment, load_average
from fused_ema.bench.timer import Update
from fused_ema.bench.zoo import ZOO, Workload, build_workload
from fused_ema.progress import progress


@dataclass
class Settings:
    """How long to measure.

    After setup and one untimed interleaved round, ``min_rounds`` to ``max_rounds`` timed rounds
    fill about ``seconds_per_workload`` (rounds past ``min_rounds`` are dropped once twice that has
    passed), each sample at least ``min_sample_s`` long. A contender
    whose first call takes more than ``slow_call_s`` is sampled only in the middle and last rounds
    (its first call counting as a third sample), so one pathological row cannot take the whole run.
    """

    seconds_per_workload: float = 4.0
    min_rounds: int = 5
    max_rounds: int = 25
    min_sample_s: float = 2e-3
    slow_call_s: float = 1.0

    @classmethod
    def for_size(cls, size: str) -> Settings:
        if size == "quick":
            return cls(seconds_per_workload=0.2, min_rounds=3, max_rounds=5, min_sample_s=2e-4, slow_call_s=0.5)
        return cls()



def _resolved_backends(contender: Contender, workload: Workload) -> list[str] | None:
    if contender.backend != "auto":
        return None
    try:
        from fused_ema.plan import Plan

        # Which backend "auto" resolves to depends on devices, dtypes and layout only: the model
        # tensors stand in for averages of the same kind (the plan is built, never run).
        models = workload.models
        if workload.average_dtype != workload.model_dtype:
            models = [torch.empty_like(t, dtype=workload.average_dtype) for t in models]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the contender's own run already recorded them
            plan = Plan([models], workload.models, backend=contender.backend)
        return sorted(set(plan.backend_names))
    except Exception:  # a contender that cannot run reports its own error when made
        return None


def _make(
    contender: Contender, workload: Workload, synchronize: Callable[[], None]
) -> tuple[Update, list[str], float]:
    """Build one contender and run its first call: the update, the warnings raised, that call's time."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        update = contender.make(workload)
        first = timer.time_calls(update, 1, synchronize)
    return update, sorted({str(warning.message) for warning in caught}), first


def measure_workload(
    workload: Workload,
    candidates: Sequence[Contender],
    settings: Settings,
    *,
    show_progress: bool = True,
) -> tuple[list[Result], list[dict[str, str]]]:
    """Time every candidate on ``workload``, interleaved, and return results and skips."""
    synchronize = timer.synchronizer(workload.device)
    label = f"{workload.name:<14}"
    made: dict[str, tuple[Contender, Update, list[str], float]] = {}
    skipped: list[dict[str, str]] = []
    with timer.quiet():
        steps = progress(candidates, label + " setup") if show_progress else candidates
        for contender in steps:
            try:
                made[contender.name] = (contender, *_make(contender, workload, synchronize))
            except Skip as skip:
                skipped.append({"workload": workload.name, "contender": contender.name, "reason": str(skip)})
            except Exception as error:
                reason = f"failed: {type(error).__name__}: {error}"
                skipped.append({"workload": workload.name, "contender": contender.name, "reason": reason})

        updates = {name: update for name, (_, update, _, _) in made.items()}
        firsts = {name: first for name, (_, _, _, first) in made.items()}
        slow = {name for name, first in firsts.items() if first > settings.slow_call_s}
        # One untimed round: the first calls after allocating pay for page faults and for waking
        # the thread pool, whichever contender comes first.
        for name, update in updates.items():
            if name not in slow:
                update()
        estimates = {
            name: firsts[name] if name in slow
            else statistics.median(timer.time_calls(update, 1, synchronize) for _ in range(3))
            for name, update in updates.items()
        }
        calls = {
            name: 1 if name in slow else timer.calls_per_sample(estimate, settings.min_sample_s)
            for name, estimate in estimates.items()
        }
        round_cost = sum(estimates[name] * calls[name] for name in updates if name not in slow)
        rounds = int(settings.seconds_per_workload / max(round_cost, 1e-9))
        rounds = max(settings.min_rounds, min(settings.max_rounds, rounds))
        timings = timer.compare(
            updates, rounds=rounds, calls=calls, warmup=0, synchronize=synchronize, sparse=slow,
            min_rounds=settings.min_rounds, max_seconds=2 * settings.seconds_per_workload,
            label=label + " timing" if show_progress else None,
        ).timings

    results = []
    for name, (contender, _, notes, first) in made.items():
        times = timings[name].samples
        if name in slow:
            times = [first, *times]
            notes.append(
                f"slower than {settings.slow_call_s:g} s in its first call: timed {len(times)} times "
                "(first call, middle and last rounds)"
            )
        stochastic = None
        if workload.stochastic_rounding and contender.family != "limit":
            stochastic = contender.rounds_stochastically
        results.append(Result(
            workload.name, contender.name, contender.family, contender.backend,
            _resolved_backends(contender, workload), workload.numel, len(workload.models),
            workload.ideal_bytes, times, calls[name], stochastic, notes=notes,
        ))
    derive(results)
    return results, skipped


def run(
    workloads: Sequence[str] | None = None,
    *,
    size: str = "default",
    device: str | torch.device = "cpu",
    backends: Sequence[str] | None = None,
    settings: Settings | None = None,
    show_progress: bool = True,
) -> Report:
    """Build each workload in turn, measure every contender on it, free it, and report.

    ``backends`` restricts the fused_ema rows (see :func:`contenders`).
    """
    names = list(workloads or ZOO)
    for name in names:
        if name not in ZOO:
            raise ValueError(f"workload must be one of {', '.join(ZOO)}, got {name!r}")
    started, load_before = time.perf_counter(), load_average()
    settings = settings or Settings.for_size(size)
    device = torch.device(device)
    candidates = contenders(device, backends)
    results: list[Result] = []
    skipped = backends_not_run(device, backends)
    described: dict[str, str] = {}
    for name in names:
        workload = build_workload(name, size, device)
        described[name] = workload.describe()
        workload_results, workload_skipped = measure_workload(
            workload, candidates, settings, show_progress=show_progress
        )
        results += workload_results
        skipped += workload_skipped
        del workload, workload_results
        gc.collect()
    run_settings = {"size": size, **asdict(settings), "seconds": round(time.perf_counter() - started, 1)}
    env = environment(device)
    env["load_average"] = [load_before, load_average()]  # other processes skew every timing
    return Report(results, skipped, described, env, run_settings)

