"""85M-parameter transformer (the zoo's nn.TransformerEncoder, BERT-base shaped), fp32: EMA.update
against one flat lerp_ of the same bytes.

    python benchmarks/transformer_update.py [--rounds 15]

Target (issue 13): <= 1.05x the flat lerp_ (the memory-bandwidth bound). Medians of interleaved
samples; the machine may be shared.
"""

from __future__ import annotations

import argparse

import torch
from common import report

import fused_ema
from fused_ema.bench.timer import compare
from fused_ema.bench.zoo import transformer_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = transformer_encoder()
    numel = sum(parameter.numel() for parameter in model.parameters())
    flat_model = torch.randn(numel)
    flat_average = flat_model.clone()
    ema = fused_ema.EMA(model, decay=0.999, backend=args.backend)

    times = compare({"flat lerp_": lambda: flat_average.lerp_(flat_model, 1e-3), "EMA.update": ema.update},
                    baseline="flat lerp_", rounds=args.rounds, label="timing")
    report(f"transformer, {numel / 1e6:.1f}M float32 parameters in {len(list(model.parameters()))} tensors, "
           f"{torch.get_num_threads()} threads, medians:", times, [("EMA / flat (<= 1.05)", "EMA.update", "flat lerp_")])


if __name__ == "__main__":
    main()
