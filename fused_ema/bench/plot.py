"""The chart of a benchmark report: one panel per workload, each contender's time over the limit.

Example::

    from fused_ema import bench
    bench.plot(bench.run(["transformer"], size="quick"), "bench.png")
"""

from __future__ import annotations

import os

from fused_ema.bench.contenders import BASELINE
from fused_ema.bench.report import NO_STOCHASTIC_ROUNDING, Report, _milliseconds, _ratio, _row_label


def plot(report: Report, path: str | os.PathLike) -> None:
    """Draw one panel per workload: each contender's time over the bandwidth limit, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(dict.fromkeys(result.workload for result in report.results))
    panels = [[r for r in report.results if r.workload == name and r.family != "limit"][::-1] for name in names]
    if not any(panels):
        raise ValueError("nothing to plot: no contender was measured")
    colors = {"fused_ema": "#d95f02", "torch": "#7570b3", "library": "#9a9a9a"}
    columns = 1 if len(names) == 1 else 2
    rows = -(-len(names) // columns)
    bars = max(len(panel) for panel in panels)
    figure, axes = plt.subplots(rows, columns, figsize=(8 * columns, rows * (0.28 * bars + 1.3) + 1.0), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    for axis, name, results in zip(axes.flat, names, panels):
        if not results:
            axis.set_visible(False)
            continue
        ratios = [r.x_of_limit or float("nan") for r in results]
        axis.barh(range(len(results)), ratios, color=[colors.get(r.family, "#9a9a9a") for r in results])
        axis.set_xscale("log")
        axis.set_yticks(range(len(results)), [_row_label(r) for r in results], fontsize=8)
        axis.axvline(1.0, color="#1b9e77", linestyle="--", linewidth=1.2)
        for index, result in enumerate(results):
            text = f" {_milliseconds(result.median)} ms"
            if result.speedup_vs_torch is not None and result.contender != BASELINE:
                text += f", {_ratio(result.speedup_vs_torch)}x torch"
            axis.text(ratios[index], index, text, va="center", fontsize=7.5)
        finite = [ratio for ratio in ratios if ratio == ratio]
        axis.set_xlim(min(0.5, min(finite) * 0.7), max(finite) * 12)
        first = results[0]
        axis.set_title(
            f"{name}: {first.numel / 1e6:.2f}M elements in {first.tensors} tensors", fontsize=9.5, loc="left"
        )
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="x", which="major", alpha=0.3)
        axis.set_axisbelow(True)
        axis.set_xlabel("time per update / bandwidth limit (log; shorter is better)", fontsize=8)
    legend = [Patch(color=color, label=label) for label, color in
              (("fused_ema", colors["fused_ema"]), ("torch", colors["torch"]), ("other libraries", colors["library"]))]
    legend.append(plt.Line2D([], [], color="#1b9e77", linestyle="--", label="bandwidth limit (flat lerp_, same bytes)"))
    if any(result.stochastic_rounding is False for result in report.results):
        label = f"{NO_STOCHASTIC_ROUNDING} bfloat16 average rounded to nearest, not stochastically"
        legend.append(Patch(color="none", label=label))
    env = report.environment
    figure.suptitle(
        f"fused-ema bench ({report.settings.get('size')} size): {env['cpu']}, {env['cores']} cores, "
        f"{env['torch_threads']} threads, torch {env['torch']}; labels: median ms per update, speed-up over "
        "torch AveragedModel",
        fontsize=10,
    )
    figure.legend(handles=legend, loc="lower center", ncol=5, fontsize=8.5, frameon=False)
    figure.tight_layout(rect=(0, 0.03, 1, 0.97))
    figure.savefig(path, dpi=110)
    plt.close(figure)
