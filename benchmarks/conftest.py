"""Shared by the pytest-benchmark files: the zoo size option, one workload alive at a time, and a
summary table with the ratios pytest-benchmark cannot compute (x of the limit, speed-up over torch).

    pytest benchmarks/ --benchmark-only                     # default sizes, minutes
    pytest benchmarks/ --benchmark-only --zoo-size quick --benchmark-max-time=0.05    # a smoke test
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest

from fused_ema import bench
from fused_ema.bench import Contender, Report, Result, Workload

RESULTS = pytest.StashKey[list[Result]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("fused_ema").addoption(
        "--zoo-size", choices=bench.SIZES, default="default",
        help="model sizes of fused_ema's benchmark zoo: default (as in the README) or quick (seconds)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RESULTS] = []


@pytest.fixture(scope="session")
def zoo(request: pytest.FixtureRequest) -> Callable[..., Workload]:
    """``zoo(name, device="cpu")``: the workload, built once; building another frees the previous."""
    size = request.config.getoption("--zoo-size")
    built: dict[tuple[str, str], Workload] = {}

    def get(name: str, device: str = "cpu") -> Workload:
        if (name, device) not in built:
            built.clear()
            gc.collect()
            built[name, device] = bench.build_workload(name, size, device)
        return built[name, device]

    return get


@pytest.fixture
def record_result(request: pytest.FixtureRequest) -> Callable[[Workload, Contender, object], None]:
    """Keep one pytest-benchmark measurement for the summary table and the JSON ratios."""

    def record(workload: Workload, contender: Contender, fixture: object) -> None:
        stats = getattr(fixture, "stats", None)
        if stats is None:  # --benchmark-disable: nothing was timed
            return
        samples = list(stats.stats.data)
        stochastic = None
        if workload.stochastic_rounding and contender.family != "limit":
            stochastic = contender.rounds_stochastically
        result = Result(
            workload.name, contender.name, contender.family, contender.backend, None, workload.numel,
            len(workload.models), workload.ideal_bytes, samples, stats.iterations, stochastic,
        )
        request.config.stash[RESULTS].append(result)
        gb_per_s = workload.ideal_bytes / stats.stats.median / 1e9
        fixture.extra_info.update(ideal_bytes=workload.ideal_bytes, gb_per_s=gb_per_s)

    return record


def _report(config: pytest.Config) -> Report | None:
    results = config.stash.get(RESULTS, [])
    if not results:
        return None
    for name in dict.fromkeys(result.workload for result in results):
        bench.derive([result for result in results if result.workload == name])
    described = {name: bench.ZOO[name].summary for name in dict.fromkeys(r.workload for r in results)}
    settings = {"size": config.getoption("--zoo-size"), "timer": "pytest-benchmark (not interleaved)"}
    return Report(results, [], described, bench.environment(), settings)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    report = _report(config)
    if report is not None:
        terminalreporter.section("fused_ema: ratios to the limit and to torch AveragedModel")
        terminalreporter.write_line(bench.format_table(report))


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    report = _report(config)
    if report is None:
        return
    ratios = {(r.workload, r.contender): r for r in report.results}
    for entry in output_json.get("benchmarks", []):
        params = entry.get("params") or {}
        result = ratios.get((params.get("workload_name"), params.get("contender_name")))
        if result is not None:
            entry["extra_info"].update(x_of_limit=result.x_of_limit, speedup_vs_torch=result.speedup_vs_torch)
