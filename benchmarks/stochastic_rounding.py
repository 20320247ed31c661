"""A bfloat16 average with stochastic rounding against a plain bfloat16 lerp_ of the same size.

    python benchmarks/stochastic_rounding.py

The plain lerp_ rounds to nearest (and so stops moving at decay 0.999); the fused update draws its
random bits in the kernel. Also reports the memory torch's CPU allocator handed out during the
fused update (the kernel needs no temporaries). Contenders interleaved, medians.
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
    parser.add_argument("--layers", type=int, default=12, help="Linear(2048, 2048) layers in bfloat16")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(2048, 2048) for _ in range(args.layers))).to(torch.bfloat16)
    ema = fused_ema.EMA(model, decay=0.999)  # bfloat16 average: stochastic rounding by default
    assert ema.stochastic_rounding
    flat_model = torch.cat([p.detach().flatten() for p in model.parameters()])
    flat_average = flat_model.clone()
    contenders = {
        "plain bfloat16 lerp_ (one flat tensor)": lambda: flat_average.lerp_(flat_model, 1e-3),
        "fused_ema.EMA.update (stochastic)": ema.update,
    }
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for update in contenders.values():
        update()
    for _ in range(args.rounds):
        for name, update in contenders.items():
            start = time.perf_counter()
            update()
            samples[name].append(time.perf_counter() - start)
    with torch.profiler.profile(profile_memory=True) as profile:
        ema.update()
    allocated = sum(max(event.cpu_memory_usage, 0) for event in profile.events())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    size = flat_model.numel()
    print(f"{size / 1e6:.1f}M bfloat16 elements, {torch.get_num_threads()} threads, {args.rounds} rounds, medians:")
    for name, median in medians.items():
        print(f"  {name:40s} {median * 1e3:8.2f} ms")
    plain, fused = medians.values()
    print(f"stochastic rounding costs {fused / plain:.2f}x the plain lerp_; "
          f"memory allocated during one update: {allocated} bytes ({100 * allocated / (2 * size):.4f}% of the model)")


if __name__ == "__main__":
    main()
