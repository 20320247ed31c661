"""Averaging part of a model: the memory and update time of an EMA of 1M trainable parameters
inside a model with 100M frozen ones (a LoRA-style fine-tune), ``trainable_only=True``.

    python benchmarks/selection_memory.py             # targets: bytes < 1.1x, update < 1.2x
    python benchmarks/selection_memory.py --full      # also build a full-model EMA to compare

Memory is counted from tensor storages: every storage the averaged module holds that the live
model does not (the process's peak resident memory is printed as a cross-check, which would show
a deep copy made and thrown away). Time: ``ema.update()`` against one flat ``lerp_`` over as many
float32 elements as the trainable parameters, interleaved, medians. The machine this runs on may
be shared: ratios within one run are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import resource

import common  # noqa: F401  (the source tree on sys.path)
import torch
from torch import nn

import fused_ema
from fused_ema.bench.timer import compare


class LoRAModel(nn.Module):
    """A frozen ``features x features`` linear layer and a trainable rank-``rank`` update."""

    def __init__(self, features: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(features, features, bias=False)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(features, rank, bias=False)
        self.lora_B = nn.Linear(rank, features, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.base(inputs) + self.lora_B(self.lora_A(inputs))


def average_bytes(average: nn.Module, model: nn.Module) -> int:
    """Bytes of the storages ``average`` holds that ``model`` does not (each storage once)."""
    live = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    own = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in average.state_dict(keep_vars=True).values()
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in live
    }
    return sum(own.values())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=10_000, help="frozen parameters: features**2 (100M)")
    parser.add_argument("--rank", type=int, default=50, help="trainable parameters: 2 * features * rank (1M)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--full", action="store_true", help="also build a full-model EMA (another 400 MB)")
    args = parser.parse_args()

    torch.manual_seed(0)
    with torch.no_grad():
        model = LoRAModel(args.features, args.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.nbytes for p in trainable)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    peak_before = peak_rss_mb()
    ema = fused_ema.EMA(model, decay=0.999, trainable_only=True, backend=args.backend)
    peak_growth = peak_rss_mb() - peak_before
    held = average_bytes(ema.module, model)

    numel = sum(p.numel() for p in trainable)
    flat_average, flat_model = torch.zeros(numel), torch.randn(numel)
    update, flat = "ema.update() (trainable_only)", f"flat lerp_ of {numel / 1e6:.2f}M"
    # The warm-up round builds the plan and its tables.
    times = compare(
        {update: ema.update, flat: lambda: flat_average.lerp_(flat_model, 0.001)},
        baseline=flat, rounds=args.rounds, label="timing",
    )

    print(f"model: {frozen / 1e6:.1f}M frozen + {numel / 1e6:.2f}M trainable float32 parameters; "
          f"backend {ema._binding.plan(model).backend_names}; {torch.get_num_threads()} threads; "
          "shared machine: read the ratios")
    print(f"average holds {held / 1e6:.3f} MB = {held / trainable_bytes:.3f}x the trainable tensors' "
          f"{trainable_bytes / 1e6:.3f} MB (target < 1.1x); a full-model EMA would hold "
          f"{sum(p.nbytes for p in model.parameters()) / 1e6:.1f} MB")
    print(f"peak resident memory grew by {peak_growth:.1f} MB while the EMA was built (no deep copy of the base)")
    print(f"medians of {args.rounds} interleaved rounds:")
    print(times.format())
    print(f"update / flat lerp_ = {times.ratio(update):.2f}x (target < 1.2x)")

    if args.full:
        full = fused_ema.EMA(model, decay=0.999, backend=args.backend)
        full_times = compare({"full": full.update}, rounds=max(3, args.rounds // 30), label="full-model EMA")
        print(f"full-model EMA: holds {average_bytes(full.module, model) / 1e6:.1f} MB, "
              f"update {full_times.median('full') * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
