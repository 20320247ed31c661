"""Post-hoc EMA on the digits demo: train once, then choose the EMA length afterwards.

Trains the digits demo's small CNN once with a :class:`fused_ema.PostHocEMA` that tracks two power
EMAs (``--track``, EDM2's 0.05 and 0.10 by default) and snapshots them every epoch. After training
it rebuilds the power EMA of each ``--sigma-rels`` from the snapshots, evaluates it on the test set
and prints one row per sigma_rel: the fit error of its profile and its accuracy::

    python -m fused_ema.examples.posthoc_digits                 # or: fused-ema demo posthoc
    python -m fused_ema.examples.posthoc_digits --epochs 40 --sigma-rels 0.02 0.05 0.1 0.2

Needs scikit-learn: ``pip install scikit-learn``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from torch.nn import functional as F

import fused_ema
from fused_ema import posthoc
from fused_ema.examples.digits import (
    SmallCNN,
    batches,
    evaluate,
    load_data,
    setup_error,
    shift_,
)
from fused_ema.progress import progress


def parse_args(argv: Sequence[str], prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05, help="constant SGD learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--track", nargs="+", type=float, default=[0.05, 0.10],
                        help="sigma_rels tracked during training (default: %(default)s)")
    parser.add_argument("--sigma-rels", nargs="+", type=float, default=[0.01, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20],
                        help="sigma_rels to synthesize after training (default: %(default)s)")
    parser.add_argument("--directory", help="where the snapshots go (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--train-limit", type=int, default=None, help="train on only this many images (quick checks)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point (``fused-ema demo posthoc``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv, prog)
        for sigma_rel in [*args.track, *args.sigma_rels]:
            posthoc.check_sigma_rel(sigma_rel)
    except SystemExit as exit:
        return int(exit.code or 0)
    except ValueError as error:
        return setup_error(error)
    try:
        data = load_data(args.train_limit)
    except ImportError as error:
        return setup_error(error)
    with tempfile.TemporaryDirectory() as scratch:
        return _run(args, data, args.directory or scratch)


def _run(args: argparse.Namespace, data, directory: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo's reason: 8x8 images gain nothing from more threads
    started = time.monotonic()
    torch.manual_seed(args.seed)
    shuffle = torch.Generator().manual_seed(args.seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = math.ceil(len(data.train_images) / args.batch_size)
    ema = fused_ema.PostHocEMA(model, sigma_rels=args.track, snapshot_every=steps_per_epoch, directory=directory)
    print(f"small CNN on sklearn digits: {len(data.train_images)} training images, {steps_per_epoch} steps per "
          f"epoch, {args.epochs} epochs at constant lr {args.lr}; tracking sigma_rel "
          f"{', '.join(f'{s:g}' for s in args.track)}, one snapshot each per epoch")
    epochs = range(args.epochs)
    try:
        for _ in epochs if args.quiet else progress(epochs, "training"):
            model.train()
            images = shift_(data.train_images.clone(), shuffle)
            for inputs, targets in batches(images, data.train_labels, args.batch_size, shuffle):
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema.update()
        plain = evaluate(model, data.test_images, data.test_labels)
        print(f"\n{'average':<24} {'fit error':>9} {'accuracy':>9} {'loss':>7}")
        print(f"{'trained weights':<24} {'':>9} {plain['accuracy']:>8.2f}% {plain['loss']:>7.4f}")
        averaged = SmallCNN()
        for sigma_rel in args.sigma_rels:
            state = posthoc.synthesize(directory, sigma_rel, show_progress=False)
            averaged.load_state_dict(state)
            scores = evaluate(averaged, data.test_images, data.test_labels)
            label = f"sigma_rel {sigma_rel:g}" + (" (tracked)" if sigma_rel in args.track else "")
            print(f"{label:<24} {state.fit_error:>9.1e} {scores['accuracy']:>8.2f}% {scores['loss']:>7.4f}")
    finally:
        torch.set_num_threads(threads)
    print(f"{time.monotonic() - started:.1f} s, snapshots in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
