"""A bfloat16 average with stochastic rounding against a plain bfloat16 lerp_ of the same size.

    python benchmarks/stochastic_rounding.py

The plain lerp_ rounds to nearest (and so stops moving at decay 0.999); the fused update draws its
random bits in the kernel. Also reports the memory torch's CPU allocator handed out during the
fused update (the kernel needs no temporaries). Contenders interleaved, medians.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (the source tree on sys.path)
import torch
from torch import nn

import fused_ema
from fused_ema.bench.timer import compare

PLAIN, FUSED = "plain bfloat16 lerp_ (one flat tensor)", "fused_ema.EMA.update (stochastic)"


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
    times = compare(
        {PLAIN: lambda: flat_average.lerp_(flat_model, 1e-3), FUSED: ema.update}, baseline=PLAIN, rounds=args.rounds
    )
    with torch.profiler.profile(profile_memory=True) as profile:
        ema.update()
    allocated = sum(max(event.cpu_memory_usage, 0) for event in profile.events())
    size = flat_model.numel()
    print(f"{size / 1e6:.1f}M bfloat16 elements, {torch.get_num_threads()} threads, {args.rounds} rounds, medians:")
    print(times.format())
    print(f"stochastic rounding costs {times.ratio(FUSED):.2f}x the plain lerp_; "
          f"memory allocated during one update: {allocated} bytes ({100 * allocated / (2 * size):.4f}% of the model)")


if __name__ == "__main__":
    main()
