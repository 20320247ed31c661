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

The example is split by concern: ``config`` (the settings and the averages they ask for), ``data``
(the digits, the network, accuracy), ``averaging`` (what each average remembers, how it is
evaluated), ``training`` (the loop), ``report`` (table, summary, plot, JSON); this module is the
command line and re-exports every name.

Needs scikit-learn (and matplotlib for ``--plot``): ``pip install scikit-learn matplotlib``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fused_ema.examples.digits.averaging import describe_averages, evaluate_averages, forget_steps, short_repr
from fused_ema.examples.digits.config import (
    DECAY_RULES,
    RULE_NAMES,
    SCHEDULES,
    Config,
    check_config,
    ema_averages,
    make_rule,
)
from fused_ema.examples.digits.data import (
    PACKAGES,
    Data,
    SmallCNN,
    batches,
    evaluate,
    load_data,
    missing_package,
    setup_error,
    shift_,
)
from fused_ema.examples.digits.report import LINESTYLES, cell_width, plot, summary, table_header, table_row, to_json
from fused_ema.examples.digits.training import Result, make_scheduler, run

__all__ = [
    "DECAY_RULES", "LINESTYLES", "PACKAGES", "RULE_NAMES", "SCHEDULES", "Config", "Data", "Result", "SmallCNN",
    "batches", "cell_width", "check_config", "describe_averages", "ema_averages", "evaluate", "evaluate_averages",
    "forget_steps", "load_data", "main", "make_rule", "make_scheduler", "missing_package", "parse_args", "plot",
    "run", "shift_", "short_repr", "summary", "table_header", "table_row", "to_json",
]


def parse_args(argv: Sequence[str], prog: str | None = None) -> argparse.Namespace:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a small CNN on scikit-learn's handwritten digits and compare the trained "
        "weights with their averages (EMA, SWA and variants), epoch by epoch.",
    )
    add = parser.add_argument
    add("--rules", nargs="+", choices=RULE_NAMES, default=defaults.rules,
        help="averages to keep (default: %(default)s)")
    add("--decays", nargs="+", type=float, default=defaults.decays,
        help="decays for ema, ema-warmup, t_adema, bias-corrected; one average each (default: %(default)s)")
    add("--sigma-rel", type=float, default=defaults.sigma_rel,
        help="relative width of the power EMA (default: %(default)s)")
    add("--schedule", choices=SCHEDULES, default=defaults.schedule,
        help="step: /10 at 1/2 and 3/4 of the run; cosine; swa: cosine, then SWALR from --swa-start "
        "(default: %(default)s)")
    add("--epochs", type=int, default=defaults.epochs, help="(default: %(default)s)")
    add("--lr", type=float, default=defaults.lr, help="SGD learning rate (default: %(default)s)")
    add("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    add("--swa-start", type=int, default=None, help="first epoch (0-based) that SWA averages (default: epochs // 2)")
    add("--swa-lr", type=float, default=defaults.swa_lr,
        help="constant LR SWALR anneals to with --schedule swa (default: %(default)s)")
    add("--width", type=int, default=defaults.width, help="channels of the first conv layer (default: %(default)s)")
    add("--seed", type=int, default=defaults.seed, help="seed of initialisation and shuffling (default: %(default)s)")
    add("--threads", type=int, default=defaults.threads,
        help="torch threads; 0 keeps torch's default (default: %(default)s: the model is too small to gain from more)")
    add("--no-augment", action="store_true", help="do not shift training images by up to a pixel")
    add("--train-limit", type=int, default=None, help="train on only this many images (quick checks)")
    add("--plot", metavar="FILE.png", help="draw the accuracy curves with matplotlib")
    add("--json", metavar="FILE", help="write the configuration and every epoch's results")
    add("--every", type=int, default=1, metavar="N",
        help="print every N-th epoch's row (and the last); the JSON and plot keep all")
    add("--quiet", action="store_true", help="no progress bar")
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
    except (ValueError, ImportError) as error:
        return setup_error(error)

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
