"""Two averages of one model: one fused pass (EMA with two decays) against two separate EMAs.

    python benchmarks/two_averages.py

One pass reads each model tensor once for both averages; two EMAs read the model twice.
Contenders are interleaved and medians reported (runs on a shared machine vary by ~20%).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree, ahead of any installed copy
import fused_ema  # noqa: E402
from fused_ema.bench.timer import compare  # noqa: E402

ONE_PASS, TWO_EMAS = "one pass, two averages", "two EMAs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="Linear(2048, 2048) layers (4.2M parameters each)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(2048, 2048) for _ in range(args.layers)))
    both = fused_ema.EMA(model, decay=[0.999, 0.9999], backend=args.backend)
    fast = fused_ema.EMA(model, decay=0.999, backend=args.backend)
    slow = fused_ema.EMA(model, decay=0.9999, backend=args.backend)

    def separately() -> None:
        fast.update()
        slow.update()

    # The warm-up round builds the plans and tables.
    times = compare({ONE_PASS: both.update, TWO_EMAS: separately}, baseline=TWO_EMAS, rounds=args.rounds)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters / 1e6:.1f}M float32 parameters, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds, medians:")
    print(times.format())
    print(f"one pass is {times.speedup(ONE_PASS):.2f}x faster than two separate updates")


if __name__ == "__main__":
    main()
