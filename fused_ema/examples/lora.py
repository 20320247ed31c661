"""Averaging part of a model: an EMA of LoRA adapters only, on scikit-learn's handwritten digits.

A small CNN (the digits example's) is trained on upright digits, then frozen and fine-tuned to
digits turned a quarter turn, through hand-written low-rank adapters (LoRA: ``W x + B A x``, with
``B`` starting at zero) on each convolution and on the classifier. ``fused_ema.EMA(model,
trainable_only=True)`` keeps the average of the adapters alone: the frozen weights are not copied
(the average shares them with the model) and not re-averaged on every step. A full-model EMA runs
beside it, to show that it computes the same function while holding a copy of everything::

    python -m fused_ema.examples.lora            # or: fused-ema demo --lora  /  fused-ema demo lora
    python -m fused_ema.examples.lora --rank 2 --epochs 30 --decay 0.995

No download (the digits ship with scikit-learn) and no peft: the adapters are written out below.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import fused_ema
from fused_ema.examples.digits import (
    SmallCNN,
    batches,
    evaluate,
    load_data,
    setup_error,
)
from fused_ema.progress import progress


class LoRA(nn.Module):
    """``base(x) + scale * B(A(x))`` around a frozen ``nn.Linear`` or ``nn.Conv2d``.

    ``A`` maps to ``rank`` channels (for a convolution: with the base's kernel, stride and
    padding), ``B`` back to the base's outputs (a 1x1 convolution) and starts at zero, so the
    wrapped layer first computes exactly what the base did. Example::

        layer = LoRA(nn.Linear(64, 10), rank=4)   # layer.lora_A, layer.lora_B train; layer.base is frozen
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.lora_A = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False
            )
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")
        nn.init.zeros_(self.lora_B.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, inputs: Tensor) -> Tensor:
        return self.base(inputs) + self.scale * self.lora_B(self.lora_A(inputs))


def add_lora_(model: nn.Module, rank: int) -> nn.Module:
    """Freeze ``model`` and wrap every ``nn.Linear`` and ``nn.Conv2d`` in it with :class:`LoRA`."""
    model.requires_grad_(False)
    for name, child in list(model.named_children()):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(model, name, LoRA(child, rank))
        else:
            add_lora_(child, rank)
    return model


def rotate(images: Tensor) -> Tensor:
    """The digits turned a quarter turn: the new task the adapters learn."""
    return torch.rot90(images, 1, dims=(2, 3))


def average_bytes(average: nn.Module, model: nn.Module) -> int:
    """Bytes held by ``average`` and not shared with ``model`` (each storage counted once)."""
    live = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    own = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in average.state_dict().values()
        if t.untyped_storage().data_ptr() not in live
    }
    return sum(own.values())


@dataclass
class Settings:
    pretrain_epochs: int = 15
    epochs: int = 20
    rank: int = 4
    decay: float = 0.99
    lr: float = 0.1
    batch_size: int = 32
    width: int = 16
    seed: int = 0
    threads: int | None = 1  # tiny batches: more threads only wait on each other (see the digits example)
    train_limit: int | None = None


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
                batch_size: int, generator: torch.Generator, after_step=None) -> None:
    model.train()
    for inputs, targets in batches(images, labels, batch_size, generator):
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def run(settings: Settings, show_progress: bool = True) -> dict[str, Any]:
    """Pretrain, add adapters, fine-tune with two EMAs; the accuracies (%) and bytes of each."""
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, show_progress)
    finally:
        torch.set_num_threads(threads)


def _run(settings: Settings, show_progress: bool) -> dict[str, Any]:
    started = time.monotonic()
    data = load_data(settings.train_limit)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = SmallCNN(settings.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, nesterov=True)
    epochs = range(settings.pretrain_epochs)
    for _ in progress(epochs, "pretraining (upright)") if show_progress else epochs:
        train_epoch(model, optimizer, data.train_images, data.train_labels, settings.batch_size, generator)
    test_images, train_images = rotate(data.test_images), rotate(data.train_images)
    upright = evaluate(model, data.test_images, data.test_labels)["accuracy"]
    before = evaluate(model, test_images, data.test_labels)["accuracy"]

    add_lora_(model, settings.rank)
    adapters = [p for p in model.parameters() if p.requires_grad]
    ema = fused_ema.EMA(model, decay=settings.decay, trainable_only=True)  # the adapters alone
    full = fused_ema.EMA(model, decay=settings.decay)  # everything, for comparison
    optimizer = torch.optim.SGD(adapters, lr=settings.lr, momentum=0.9, nesterov=True)

    def update() -> None:
        ema.update()
        full.update()

    history = []
    epochs = range(settings.epochs)
    for _ in progress(epochs, "fine-tuning adapters (rotated)") if show_progress else epochs:
        train_epoch(model, optimizer, train_images, data.train_labels, settings.batch_size, generator, update)
        record = {"plain": evaluate(model, test_images, data.test_labels)["accuracy"]}
        for label, average in (("adapters EMA", ema), ("full EMA", full)):
            with average.swap(model):
                record[label] = evaluate(model, test_images, data.test_labels)["accuracy"]
        history.append(record)
    return {
        "upright": upright,
        "rotated_before": before,
        "history": history,
        "parameters": {
            "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "adapters": sum(p.numel() for p in adapters),
        },
        "bytes": {"adapters EMA": average_bytes(ema.module, model), "full EMA": average_bytes(full.module, model)},
        "model": model,
        "ema": ema,
        "full": full,
        "seconds": time.monotonic() - started,
    }


def report(result: dict[str, Any], settings: Settings) -> list[str]:
    """The lines the command prints after training."""
    last = result["history"][-1]
    best = {label: max(r[label] for r in result["history"]) for label in last}
    sizes = result["bytes"]
    lines = [
        f"pretrained CNN: {result['upright']:.1f}% on upright digits, {result['rotated_before']:.1f}% on rotated ones",
        (
            f"fine-tuned {result['parameters']['adapters']:,} adapter parameters (rank {settings.rank}) on rotated "
            f"digits, {result['parameters']['frozen']:,} frozen; EMA decay {settings.decay}"
        ),
        "",
        f"{'':24s} {'final':>7s} {'best':>7s}   {'memory of the average':>22s}",
        f"{'plain adapters':24s} {last['plain']:6.1f}% {best['plain']:6.1f}%",
    ]
    for label, name in (("adapters EMA", "averaged adapters"), ("full EMA", "full-model EMA")):
        lines.append(
            f"{name:24s} {last[label]:6.1f}% {best[label]:6.1f}%   {sizes[label] / 1024:17.1f} KiB"
        )
    ratio = sizes["full EMA"] / max(sizes["adapters EMA"], 1)
    lines.append(
        f"the adapters-only EMA holds {ratio:.1f}x less memory than a full-model EMA and computes the same "
        f"function (frozen weights are shared with the model, never copied or re-averaged)"
    )
    lines.append(f"{result['seconds']:.1f} s with {settings.threads or torch.get_num_threads()} torch thread(s)")
    return lines


def parse_args(argv: Sequence[str], prog: str | None = None) -> tuple[Settings, bool]:
    """(settings, quiet) from the command line; SystemExit on --help or a usage error."""
    defaults = Settings()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=defaults.pretrain_epochs)
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="fine-tuning epochs")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="adapter rank")
    parser.add_argument("--decay", type=float, default=defaults.decay)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--width", type=int, default=defaults.width, help="channels of the CNN's first block")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (0: torch's default)")
    parser.add_argument("--train-limit", type=int, help="use only this many training images (quick runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    options = vars(parser.parse_args(argv))
    quiet = options.pop("quiet")
    options["threads"] = options["threads"] or None
    return Settings(**options), quiet


def check(settings: Settings) -> None:
    """ValueError naming the first bad setting."""
    for name in ("pretrain_epochs", "epochs", "rank", "batch_size", "width"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    if not 0.0 <= settings.decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {settings.decay}")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry point (``fused-ema demo --lora``); returns the exit code."""
    try:
        settings, quiet = parse_args(list(sys.argv[1:] if argv is None else argv), prog)
        check(settings)
        import sklearn  # noqa: F401  (fail now, not after training)
    except SystemExit as exit:  # --help, or a usage error already printed by argparse
        return int(exit.code or 0)
    except (ValueError, ImportError) as error:
        return setup_error(error)
    result = run(settings, show_progress=not quiet)
    print("\n".join(report(result, settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
