"""The benchmark's results and how they are reported: the table ``fused-ema bench`` prints.

Each :class:`Result` is one contender on one workload; :func:`derive` turns its samples into the
median, the bandwidth it reached, its ratio to the limit and its speed-up over torch's
AveragedModel, both measured in the same run.

Example::

    from fused_ema import bench
    report = bench.run(["transformer"], size="quick")
    print(bench.format_table(report))
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fused_ema.bench.contenders import BASELINE


@dataclass
class Result:
    """One contender on one workload. Times in seconds per update; ``samples`` are per update too."""

    workload: str
    contender: str
    family: str
    backend: str | None
    resolved_backends: list[str] | None
    numel: int
    tensors: int
    ideal_bytes: int
    samples: list[float]
    calls_per_sample: int
    stochastic_rounding: bool | None  # None where the workload has no stochastic rounding
    median: float = 0.0
    gb_per_s: float = 0.0
    x_of_limit: float | None = None
    speedup_vs_torch: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Everything a run produced: results, skipped contenders, the machine and the settings."""

    results: list[Result]
    skipped: list[dict[str, str]]
    workloads: dict[str, str]
    environment: dict[str, Any]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "settings": self.settings,
            "workloads": self.workloads,
            "results": [asdict(result) for result in self.results],
            "skipped": self.skipped,
        }



def derive(results: list[Result]) -> None:
    """Fill in each result's median, GB/s and ratios, from results of one workload measured together."""
    limit = next((r for r in results if r.family == "limit"), None)
    baseline = next((r for r in results if r.contender == BASELINE), None)
    for result in results:
        result.median = statistics.median(result.samples)
        result.gb_per_s = result.ideal_bytes / result.median / 1e9
    for result in results:
        if limit is not None:
            result.x_of_limit = result.median / limit.median
        if baseline is not None:
            result.speedup_vs_torch = baseline.median / result.median



def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions and machine facts worth printing beside any timing."""
    info: dict[str, Any] = {
        "fused_ema": package_version("fused_ema"),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def package_version(name: str) -> str | None:
    """The installed version of ``name`` (None when not installed); for fused_ema, the running copy's."""
    if name == "fused_ema":
        # The copy that runs, which is not the installed one when running from a source tree.
        from fused_ema._version import __version__

        return __version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model as the OS reports it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()



def load_average() -> float | None:
    """The 1-minute load average (other processes skew every timing), or None where the OS has none."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


HEADER = ("workload", "backend or library", "median ms", "GB/s", "x of limit", "speed-up vs torch AveragedModel")
NO_STOCHASTIC_ROUNDING = "†"


def _row_label(result: Result) -> str:
    label = result.contender
    if result.backend == "auto" and result.resolved_backends:
        label = label.replace("[auto]", f"[auto: {', '.join(result.resolved_backends)}]")
    if result.stochastic_rounding is False:
        label += " " + NO_STOCHASTIC_ROUNDING
    return label


def _milliseconds(seconds: float) -> str:
    milliseconds = seconds * 1e3
    digits = 3 if milliseconds < 1 else 2 if milliseconds < 100 else 1
    return f"{milliseconds:.{digits}f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def table_rows(report: Report) -> list[tuple[str, ...]]:
    """The rows of the results table, as strings, in the order of :data:`HEADER`."""
    rows = []
    for result in report.results:
        rows.append((
            result.workload,
            _row_label(result),
            _milliseconds(result.median),
            f"{result.gb_per_s:.1f}" if result.gb_per_s >= 1 else f"{result.gb_per_s:.2g}",
            "-" if result.x_of_limit is None else _ratio(result.x_of_limit),
            "-" if result.speedup_vs_torch is None else _ratio(result.speedup_vs_torch) + "x",
        ))
    return rows


def format_table(report: Report) -> str:
    """A Markdown table (pastes into a README) followed by the workloads, notes and skipped rows."""
    rows = table_rows(report)
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(HEADER)]
    numeric = [False, False, True, True, True, True]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if right else "-" * (w + 2) for w, right in zip(widths, numeric)) + "|"
    lines = [line(HEADER), rule] + [line(row) for row in rows]
    lines.append("")
    lines.append("Workloads:")
    lines += [f"- {name}: {text}" for name, text in report.workloads.items()]
    lines.append("")
    timer = report.settings.get("timer", "contenders interleaved, rounds rotated")
    lines.append(
        f"median ms: median time per update ({timer}). GB/s: bytes an ideal single pass moves "
        "(read the model once, read and write each average) divided by that time. x of limit: time over "
        "that of one float32 lerp_ on one flat tensor moving the same bytes, in the same run (1.00 is the "
        "memory-bandwidth bound)."
    )
    if any(result.stochastic_rounding is False for result in report.results):
        lines.append(
            f"{NO_STOCHASTIC_ROUNDING} rounds the bfloat16 average to nearest instead of stochastically: "
            "cheaper, but at decay 0.999 such an average stops moving."
        )
    notes = sorted({(r.contender, note) for r in report.results for note in r.notes})
    if notes:
        lines.append("Warnings raised while measuring:")
        lines += [f"- {contender}: {note}" for contender, note in notes]
    if report.skipped:
        lines.append("Not measured:")
        lines += [f"- {s['workload']} / {s['contender']}: {s['reason']}" for s in report.skipped]
    env = report.environment
    lines.append(
        f"Machine: {env['cpu']} ({env['cores']} cores, {env['torch_threads']} torch threads, "
        f"{env['cpu_capability']}), {env.get('gpu', 'no GPU used')}; python {env['python']}, torch {env['torch']}, "
        f"fused_ema {env['fused_ema']}."
        + (f" The run took {report.settings['seconds']:.0f} s." if "seconds" in report.settings else "")
    )
    load = env.get("load_average")
    if load and None not in load:
        # The load after includes this run's own threads; the one before tells whether others were busy.
        busy = load[0] > 0.5 * (env["cores"] or 1)
        lines.append(
            f"1-minute load average before and after the run: {load[0]:.2f} and {load[1]:.2f}"
            + (" (other processes were busy: these timings are less reliable)." if busy else ".")
        )
    return "\n".join(lines)

