"""Averaged weights against the trained ones: a small CNN on scikit-learn's handwritten digits.

Trains a small convolutional network (with BatchNorm) on the 8x8 digits that ship with
scikit-learn (no download), on the CPU, and after every epoch evaluates the trained ("plain")
model and each averaged copy on a held-out test set. The table shows, per epoch, the plain
accuracy and, for each average, its accuracy and its lag (average minus plain, in points)::

    python -m fused_ema.examples.digits                      # or: fused-ema demo
    python -m fused_ema.examples.digits --rules ema t_adema swa --decays 0.99 0.999 --plot digits.png
    python -m fused_ema.examples.digits --schedule swa --rules swa ema --json run.json

Averages are evaluated the way a user does it: ``with ema.swap(model): evaluate(model)`` puts the
averaged weights (and BatchNorm statistics) into the model and the training ones back afterwards;
SWA, whose average of weights has no matching BatchNorm statistics, gets them recomputed with
``update_bn`` before it is evaluated, as in torch's SWA recipe.

Needs scikit-learn (and matplotlib for ``--plot``): ``pip install scikit-learn matplotlib``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import fused_ema
from fused_ema import rules
from fused_ema.progress import progress

RULE_NAMES = ("ema", "ema-warmup", "swa", "t_adema", "bias-corrected", "power")
SCHEDULES = ("step", "cosine", "swa")
# Rules that take a decay get one average per --decays value; swa and power take none.
DECAY_RULES = {
    "ema": rules.EMA,
    "ema-warmup": rules.WarmupEMA,
    "t_adema": rules.TADEMA,
    "bias-corrected": rules.BiasCorrectedEMA,
}
PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}  # import name -> pip name


def missing_package(module: str) -> str:
    """The error message for a missing optional dependency, with the command that installs it."""
    package = PACKAGES.get(module.split(".")[0], module)
    return (
        f"the digits example needs {package}, which is not installed: pip install {package} "
        "(or pip install 'fused_ema[examples]' for everything the examples use)"
    )


@dataclass
class Config:
    """Everything that decides a run; the defaults are the run the README shows."""

    rules: list[str] = field(default_factory=lambda: ["ema", "t_adema", "swa"])
    decays: list[float] = field(default_factory=lambda: [0.99, 0.999])
    sigma_rel: float = 0.10
    schedule: str = "swa"
    epochs: int = 60
    lr: float = 0.1
    batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 5e-4
    swa_start: int | None = None  # first epoch (0-based) whose end SWA averages; None: epochs // 2
    swa_lr: float = 0.05
    width: int = 16
    seed: int = 0
    threads: int | None = 1  # torch threads during the run (results depend on it); None: torch's default
    augment: bool = True  # shift training images by up to a pixel
    train_limit: int | None = None  # use only this many training images (for quick tests)

    def first_swa_epoch(self) -> int:
        return self.epochs // 2 if self.swa_start is None else self.swa_start


@dataclass
class Data:
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


@dataclass
class Result:
    """What :func:`run` produced: the per-epoch records and the final state of every model."""

    config: Config
    labels: list[str]  # one per average, in table order
    records: list[dict[str, Any]]
    model: nn.Module
    ema: fused_ema.EMA | None
    ema_labels: list[str]  # ema.averages[k] is labels' ema_labels[k]
    swa_model: fused_ema.AveragedModel | None
    data: Data
    seconds: float


def load_data(train_limit: int | None = None) -> Data:
    """The 1797 digits, scaled to [0, 1], split 2/3 train and 1/3 test (stratified, fixed split)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(missing_package("sklearn"), name="sklearn") from error
    images, labels = load_digits(return_X_y=True)
    # The split stays fixed whatever --seed says, so runs with other seeds face the same test set.
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=1 / 3, stratify=labels, random_state=0
    )
    if train_limit is not None:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]

    def to_images(array) -> Tensor:
        return torch.as_tensor(array, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    def to_labels(array) -> Tensor:
        return torch.as_tensor(array, dtype=torch.long)

    return Data(to_images(train_x), to_labels(train_y), to_images(test_x), to_labels(test_y))


class SmallCNN(nn.Sequential):
    """Three 3x3 conv + BatchNorm + ReLU blocks and a linear classifier, for 1x8x8 inputs."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(16 * width, classes),
        )


def make_rule(name: str, decay: float | None, sigma_rel: float) -> rules.Rule:
    """The fused_ema rule behind a ``--rules`` name (swa excepted: it is an AveragedModel)."""
    if name in DECAY_RULES:
        return DECAY_RULES[name](decay)
    if name == "power":
        return rules.PowerEMA(sigma_rel=sigma_rel)
    raise ValueError(f"no EMA rule for {name!r}; rules are {', '.join(RULE_NAMES)}")


def ema_averages(config: Config) -> list[tuple[str, rules.Rule]]:
    """(label, rule) for every EMA-style average the config asks for, in table order."""
    averages = []
    for name in config.rules:
        if name in DECAY_RULES:
            averages += [(f"{name} {decay:g}", make_rule(name, decay, config.sigma_rel)) for decay in config.decays]
        elif name == "power":
            averages.append((f"power {config.sigma_rel:g}", make_rule(name, None, config.sigma_rel)))
    return averages


def forget_steps(rule: rules.Rule, steps: int) -> int | None:
    """Updates the rule needs to shrink the start's share of the average to 1/e (None: never
    within ``steps`` updates); for a constant decay this is ~1/(1 - decay)."""
    remaining = 1.0
    for step in range(steps):
        remaining *= 1.0 - rule(step)
        if remaining <= math.exp(-1.0):
            return step + 1
    return None


def shift_(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image moved by up to one pixel in each direction (zeros come in): fresh every epoch."""
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (len(images), 2), generator=generator)
    for dy in range(3):
        for dx in range(3):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            images[chosen] = padded[chosen, :, dy : dy + 8, dx : dx + 8]
    return images


def batches(images: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Mini-batches of (images, labels), shuffled with ``generator`` when one is given."""
    order = torch.randperm(len(images), generator=generator) if generator is not None else torch.arange(len(images))
    for start in range(0, len(images), batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy (%) and mean cross-entropy of ``model`` in eval mode; restores its mode after."""
    was_training = model.training
    model.eval()
    try:
        logits = model(images)
    finally:
        model.train(was_training)
    return {
        "accuracy": 100.0 * (logits.argmax(dim=1) == labels).double().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }


def evaluate_averages(
    model: nn.Module,
    ema: fused_ema.EMA | None,
    ema_labels: Sequence[str],
    swa_model: fused_ema.AveragedModel | None,
    data: Data,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Evaluate every average through the public API; the training weights come back unchanged."""
    results = {}
    if ema is not None:
        for index, label in enumerate(ema_labels):
            # swap puts the average's weights and BatchNorm statistics into the live model.
            with ema.swap(model, index=index):
                results[label] = evaluate(model, data.test_images, data.test_labels)
    if swa_model is not None:
        # An average of weights needs BatchNorm statistics of its own: one pass over the training data.
        fused_ema.update_bn(batches(data.train_images, data.train_labels, batch_size), swa_model)
        results["swa"] = evaluate(swa_model, data.test_images, data.test_labels)
    return results


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer):
    """(main scheduler, SWALR or None); stepped once per epoch."""
    if config.schedule == "step":
        # Two drops by 10x, at 1/2 and 3/4 of the run.
        milestones = [config.epochs // 2, (3 * config.epochs) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1), None
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs), None
    if config.schedule == "swa":
        # torch's SWA recipe: cosine until SWA starts, then SWALR anneals to a constant swa_lr.
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        anneal_epochs = max(1, min(3, config.epochs - config.first_swa_epoch()))
        return main, fused_ema.SWALR(optimizer, swa_lr=config.swa_lr, anneal_epochs=anneal_epochs)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")


def run(config: Config, on_epoch: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = True) -> Result:
    """Train, evaluating the plain model and every average after each epoch.

    ``on_epoch(record)`` is called after each epoch with ``{"epoch", "step", "lr", "plain",
    "averages": {label: {"accuracy", "loss"}}}`` (accuracy in %).
    """
    check_config(config)
    threads = torch.get_num_threads()
    if config.threads is not None:
        # 8x8 images in batches of 16: intra-op threads have little to split, and on a busy
        # machine they wait on descheduled peers (the default run took 619 s with 2 threads
        # against 38 s with 1 on a shared 2-core VM at load 8).
        torch.set_num_threads(config.threads)
    try:
        return _train(config, on_epoch, show_progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: Config, on_epoch: Callable[[dict[str, Any]], None] | None, show_progress: bool) -> Result:
    started = time.monotonic()
    data = load_data(config.train_limit)
    torch.manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    model = SmallCNN(config.width)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    scheduler, swa_scheduler = make_scheduler(config, optimizer)

    named_rules = ema_averages(config)
    ema_labels = [label for label, _ in named_rules]
    # One EMA keeps all the EMA-style averages: every step updates all of them in one fused pass.
    ema = fused_ema.EMA(model, rule=[rule for _, rule in named_rules], include_buffers=True) if named_rules else None
    swa_model = fused_ema.AveragedModel(model) if "swa" in config.rules else None
    labels = ema_labels + (["swa"] if swa_model is not None else [])

    records = []
    step = 0
    swa_updates = 0
    epochs = range(config.epochs)
    for epoch in progress(epochs, "training") if show_progress else epochs:
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        train_images = shift_(data.train_images.clone(), shuffle) if config.augment else data.train_images
        for images, targets in batches(train_images, data.train_labels, config.batch_size, shuffle):
            loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update()
            step += 1
        swa_phase = epoch >= config.first_swa_epoch()
        if swa_model is not None and swa_phase:
            swa_model.update_parameters(model)  # once per epoch, as in torch's SWA recipe
            swa_updates += 1
        if swa_scheduler is not None and swa_phase:
            swa_scheduler.step()
        else:
            scheduler.step()

        averages = evaluate_averages(
            model, ema, ema_labels, swa_model if swa_updates else None, data, config.batch_size
        )
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "plain": evaluate(model, data.test_images, data.test_labels),
            "averages": averages,
        }
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return Result(
        config, labels, records, model, ema, ema_labels, swa_model, data, time.monotonic() - started
    )


def check_config(config: Config) -> None:
    """ValueError naming the first bad setting."""
    unknown = [name for name in config.rules if name not in RULE_NAMES]
    if unknown or not config.rules:
        raise ValueError(f"rules must be among {', '.join(RULE_NAMES)}, got {config.rules}")
    if any(name in DECAY_RULES for name in config.rules) and not config.decays:
        raise ValueError("give at least one decay with --decays")
    for decay in config.decays:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decays must be in [0, 1), got {decay}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise ValueError(f"batch-size must be >= 1, got {config.batch_size}")
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads must be >= 1, got {config.threads}")
    if ("swa" in config.rules or config.schedule == "swa") and not 0 <= config.first_swa_epoch() < config.epochs:
        raise ValueError(f"swa-start must be an epoch in [0, {config.epochs}), got {config.first_swa_epoch()}")
    ema_averages(config)  # the rules check their own settings (e.g. sigma_rel)


# -- reporting ---------------------------------------------------------------------------------

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


def short_repr(rule: rules.Rule) -> str:
    """``WarmupEMA(decay=0.99, power=0.6667)``: the rule's settings with 4 significant digits."""
    settings = {key: value for key, value in rule.state_dict().items() if key != "rule"}
    return f"{type(rule).__name__}(" + ", ".join(f"{key}={value:.4g}" for key, value in settings.items()) + ")"


def describe_averages(config: Config, steps_per_epoch: int) -> list[str]:
    """One line per average: its rule, how long it remembers the weights it started from, and how
    many recent updates it effectively averages at the end of the run (1 / weight)."""
    total = steps_per_epoch * config.epochs
    averages = [(label, rule, short_repr(rule)) for label, rule in ema_averages(config)]
    width = max([3, *(len(label) for label, _, _ in averages)])
    rule_width = max([13, *(len(text) for _, _, text in averages)])
    lines = []
    for label, rule, text in averages:
        steps = forget_steps(rule, total)
        memory = (
            f"start forgotten after {steps} updates ({steps / steps_per_epoch:.1f} epochs)"
            if steps is not None
            else f"start not forgotten within the run's {total} updates"
        )
        lines.append(f"  {label:<{width}}  {text:<{rule_width}}  {memory}; window at the end ~{1 / rule(total - 1):.0f} updates")
    if "swa" in config.rules:
        first = config.first_swa_epoch()
        lines.append(f"  {'swa':<{width}}  {'AveragedModel':<{rule_width}}  equal average of the weights at the ends of epochs {first + 1}..{config.epochs}")
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
    learning_rates.step(epochs, [r["lr"] for r in result.records], where="pre", color="grey", linestyle=":", linewidth=1.4)
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


def parse_args(argv: Sequence[str], prog: str | None = None) -> argparse.Namespace:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a small CNN on scikit-learn's handwritten digits and compare the trained "
        "weights with their averages (EMA, SWA and variants), epoch by epoch.",
    )
    parser.add_argument("--rules", nargs="+", choices=RULE_NAMES, default=defaults.rules, help="averages to keep (default: %(default)s)")
    parser.add_argument("--decays", nargs="+", type=float, default=defaults.decays, help="decays for ema, ema-warmup, t_adema, bias-corrected; one average each (default: %(default)s)")
    parser.add_argument("--sigma-rel", type=float, default=defaults.sigma_rel, help="relative width of the power EMA (default: %(default)s)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule, help="step: /10 at 1/2 and 3/4 of the run; cosine; swa: cosine, then SWALR from --swa-start (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    parser.add_argument("--swa-start", type=int, default=None, help="first epoch (0-based) that SWA averages (default: epochs // 2)")
    parser.add_argument("--swa-lr", type=float, default=defaults.swa_lr, help="constant LR SWALR anneals to with --schedule swa (default: %(default)s)")
    parser.add_argument("--width", type=int, default=defaults.width, help="channels of the first conv layer (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of initialisation and shuffling (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads; 0 keeps torch's default (default: %(default)s: the model is too small to gain from more)")
    parser.add_argument("--no-augment", action="store_true", help="do not shift training images by up to a pixel")
    parser.add_argument("--train-limit", type=int, default=None, help="train on only this many images (quick checks)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the accuracy curves with matplotlib")
    parser.add_argument("--json", metavar="FILE", help="write the configuration and every epoch's results")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="print every N-th epoch's row (and the last); the JSON and plot keep all")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point (``fused-ema demo digits``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv, prog)
    except SystemExit as exit:  # --help, or a usage error already printed by argparse
        return int(exit.code or 0)
    config = Config(
        rules=list(dict.fromkeys(args.rules)),
        decays=list(dict.fromkeys(args.decays)),
        sigma_rel=args.sigma_rel,
        schedule=args.schedule,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        swa_start=args.swa_start,
        swa_lr=args.swa_lr,
        width=args.width,
        seed=args.seed,
        threads=args.threads or None,
        augment=not args.no_augment,
        train_limit=args.train_limit,
    )
    try:
        check_config(config)
        import sklearn  # noqa: F401  (fail now, not after training)

        if args.plot:
            import matplotlib  # noqa: F401
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"error: {missing_package(error.name or 'sklearn')}", file=sys.stderr)
        return 1

    labels = [label for label, _ in ema_averages(config)] + (["swa"] if "swa" in config.rules else [])
    train_size = len(load_data(config.train_limit).train_images)
    steps_per_epoch = math.ceil(train_size / config.batch_size)
    print(
        f"small CNN on sklearn digits: {train_size} training images, {steps_per_epoch} steps per epoch, "
        f"{config.epochs} epochs, SGD lr {config.lr} with the {config.schedule} schedule, seed {config.seed}"
    )
    print("averages (start forgotten: the weights it began from weigh < 1/e; ~1/(1 - decay) for a plain EMA):")
    print("\n".join(describe_averages(config, steps_per_epoch)))
    print()
    print("\n".join(table_header(labels)))
    # The progress bar shares the terminal: rub it out before a row so rows stay whole.
    clear = "\r\x1b[K" if sys.stdout.isatty() and sys.stderr.isatty() and not args.quiet else ""
    every = max(1, args.every)

    def print_row(record: dict[str, Any]) -> None:
        if record["epoch"] % every == 0 or record["epoch"] in (1, config.epochs):
            print(clear + table_row(record, labels), flush=True)

    result = run(config, on_epoch=print_row, show_progress=not args.quiet)
    print()
    print("\n".join(summary(result)))
    print(f"{result.seconds:.1f} s with {config.threads or torch.get_num_threads()} torch thread(s)")
    if args.plot:
        plot(result, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(to_json(result, argv, prog), file, indent=1)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
