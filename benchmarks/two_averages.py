"""Two averages of one model: one fused pass (EMA with two decays) against two separate EMAs.

    python benchmarks/two_averages.py

One pass reads each model tensor once for both averages; two EMAs read the model twice.
Contenders are interleaved and medians reported (runs on a shared machine vary by ~20%).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import fused_ema


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

    contenders = {"one pass, two averages": both.update, "two EMAs": separately}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for update in contenders.values():
        update()  # warm up: plans and tables are built on the first call
    for _ in range(args.rounds):
        for name, update in contenders.items():
            start = time.perf_counter()
            update()
            samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters / 1e6:.1f}M float32 parameters, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds, medians:")
    for name, median in medians.items():
        print(f"  {name:24s} {median * 1e3:8.2f} ms")
    ratio = medians["two EMAs"] / medians["one pass, two averages"]
    print(f"one pass is {ratio:.2f}x faster than two separate updates")


if __name__ == "__main__":
    main()
