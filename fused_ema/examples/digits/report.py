"""What the digits run shows: the per-epoch table, the closing summary, the plot and the JSON.

Example::

    from fused_ema.examples.digits import Config, run, summary
    print("\\n".join(summary(run(Config(epochs=2, train_limit=200), show_progress=False))))
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from fused_ema.examples.digits.training import Result


def cell_width(label: str) -> int:
    return max(14, len(label) + 2)


def table_header(labels: Sequence[str]) -> list[str]:
    names = "".join(f"{label:>{cell_width(label)}}" for label in labels)
    units = "".join(f"{'acc   lag':>{cell_width(label)}}" for label in labels)
    return [f"{'epoch':>5} {'step':>5} {'lr':>7} {'plain':>6}{names}", f"{'':>5} {'':>5} {'':>7} {'acc':>6}{units}"]


def table_row(record: dict[str, Any], labels: Sequence[str]) -> str:
    plain = record["plain"]["accuracy"]
    cells = []
    for label in labels:
        width = cell_width(label)
        result = record["averages"].get(label)
        if result is None:
            cells.append(f"{'-':>{width}}")  # not started yet (SWA before swa-start)
        else:
            cells.append(f"{result['accuracy']:>{width - 7}.1f}{result['accuracy'] - plain:>+7.1f}")
    return f"{record['epoch']:>5} {record['step']:>5} {record['lr']:>7.4f} {plain:>6.1f}" + "".join(cells)


def summary(result: Result) -> list[str]:
    """Closing lines: where each average ended against the plain model, and when it first beat it."""
    last = result.records[-1]
    lines = [f"final test accuracy: plain {last['plain']['accuracy']:.1f}%"]
    width = max(len(label) for label in result.labels)
    for label in result.labels:
        final = last["averages"][label]["accuracy"]
        lines.append(f"  {label:<{width}}  {final:5.1f}%  ({final - last['plain']['accuracy']:+.1f} points)")
    first_ahead = {}
    for label in result.labels:
        for record in result.records:
            averaged = record["averages"].get(label)
            if averaged is not None and averaged["accuracy"] > record["plain"]["accuracy"]:
                first_ahead[label] = record["epoch"]
                break
    if first_ahead:
        ahead = ", ".join(f"{label} at epoch {epoch}" for label, epoch in first_ahead.items())
        lines.append(f"first epoch each average beat the plain model: {ahead}")
    return lines


# Curves of rules that coincide (t_adema and ema forget the start alike) are drawn dashed over
# solid, so both stay visible.
LINESTYLES = {"ema": "-", "ema-warmup": "-.", "t_adema": "--", "bias-corrected": ":", "power": "-.", "swa": "-"}


def plot(result: Result, path: str) -> None:
    """Test accuracy per epoch of the plain and averaged models, in full and zoomed on the top,
    and each average's lag with the learning rate beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [record["epoch"] for record in result.records]
    plain = [record["plain"]["accuracy"] for record in result.records]
    figure, (full, zoom, lag) = plt.subplots(3, 1, figsize=(9, 10.5), sharex=True, height_ratios=[3, 3, 2])
    colors = plt.get_cmap("tab10").colors
    zoomed = list(plain[len(plain) // 2 :])
    for axes in (full, zoom):
        axes.plot(epochs, plain, color="black", linewidth=2.2, label="plain (trained weights)", zorder=5)
    lag.axhline(0.0, color="black", linewidth=1.0)
    for color, label in zip(colors[: 7] + colors[8:], result.labels):  # tab10's grey is the LR's
        points = [(r["epoch"], r["averages"][label]["accuracy"]) for r in result.records if label in r["averages"]]
        xs, ys = zip(*points)
        style = dict(color=color, linewidth=1.8, linestyle=LINESTYLES[label.split()[0]], label=label)
        full.plot(xs, ys, **style)
        zoom.plot(xs, ys, **style)
        lag.plot(xs, [y - plain[x - 1] for x, y in points], **style)
        zoomed += [y for x, y in points if x > len(plain) // 2]
    full.set_ylim(0.0, 101.0)
    full.set_ylabel("test accuracy (%)")
    full.legend(loc="lower right", fontsize=9)
    config = result.config
    full.set_title(
        f"small CNN on sklearn digits ({len(result.data.train_images)} train / {len(result.data.test_images)} test "
        f"images), {config.schedule} LR schedule, seed {config.seed}",
        fontsize=10,
    )
    # The second half, where the averages are close to the plain model, needs its own scale.
    zoom.set_ylim(max(0.0, min(zoomed) - 0.5), min(100.0, max(zoomed) + 0.5))
    zoom.set_ylabel("test accuracy (%), zoomed")
    lag.set_ylim(-5.0, 5.0)  # the slow averages' early lags are off this scale: the top panel shows them
    lag.set_ylabel("average − plain (points)")
    lag.set_xlabel("epoch")
    for axes in (full, zoom, lag):
        axes.grid(alpha=0.3)
    learning_rates = lag.twinx()
    rates = [r["lr"] for r in result.records]
    learning_rates.step(epochs, rates, where="pre", color="grey", linestyle=":", linewidth=1.4)
    learning_rates.set_ylim(bottom=0.0)
    learning_rates.set_ylabel("learning rate (dotted)", color="grey")
    learning_rates.tick_params(axis="y", colors="grey")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def to_json(result: Result, argv: Sequence[str], prog: str | None = None) -> dict[str, Any]:
    """The run as JSON: the command, the settings, every epoch's accuracies and losses, the time."""
    return {
        "command": " ".join([prog or "python -m fused_ema.examples.digits", *argv]),
        "config": asdict(result.config),
        "averages": result.labels,
        "epochs": result.records,
        "seconds": round(result.seconds, 2),
        "torch": torch.__version__,
        "threads": result.config.threads or torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
