"""Many small tensors: the per-tensor overhead of one update, against the bandwidth bound.

Times, interleaved (A, B, C, ... repeated) and summarised by medians, on the same tensors:

- ``flat``: one float32 ``lerp_`` over a single tensor of ``count * length`` elements (the limit);
- ``foreach``: ``torch._foreach_lerp_`` on prebuilt lists;
- ``plan``: ``fused_ema.plan.Plan(..., backend=...).lerp_``;
- ``ema``: ``fused_ema.EMA(model, backend=...).update()`` (the public call);
- ``refresh`` and ``run``: the two halves of the CPU backend's update, timed alone (diagnostics).

Each sample times ``--calls`` calls after one untimed call, so every contender runs from warm caches
(in a training loop the step between two updates evicts them: there every contender is slower, the
flat limit too). Run by hand (not part of the test suite)::

    python benchmarks/many_small_tensors.py                 # 4000 x 256 float32, backend cpu
    python benchmarks/many_small_tensors.py --count 20000 --length 50 --rounds 200

Identical runs on a shared machine differ by up to 20%: compare medians of interleaved runs, and
run it twice.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.optim import swa_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree, ahead of any installed copy
import fused_ema  # noqa: E402
from fused_ema.bench.timer import compare  # noqa: E402
from fused_ema.plan import Plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000, help="number of tensors")
    parser.add_argument("--length", type=int, default=256, help="elements per tensor")
    parser.add_argument("--rounds", type=int, default=300, help="interleaved samples per contender")
    parser.add_argument("--calls", type=int, default=5, help="calls averaged into one sample")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--contenders", default="flat,foreach,torch,plan,ema,refresh,run",
                        help="comma-separated subset to time (flat is always timed: the ratios need it)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = nn.ParameterList(nn.Parameter(torch.randn(args.length)) for _ in range(args.count))
    models = [parameter.detach() for parameter in model]
    foreach_averages = [tensor.clone() for tensor in models]
    flat_model = torch.randn(args.count * args.length)
    flat_average = flat_model.clone()
    weight = 1e-3

    ema = fused_ema.EMA(model, decay=1 - weight, backend=args.backend)
    torch_average = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(1 - weight))
    torch_average.update_parameters(model)
    # The plan updates the EMA's own averages: the two contenders share a working set, as the flat
    # limit and foreach each have theirs, so none evicts another's tensors more than the others do.
    plan = Plan([list(ema.module.parameters())], list(model), backend=args.backend)
    contenders: dict[str, Callable[[], None]] = {
        "flat": lambda: flat_average.lerp_(flat_model, weight),
        "foreach": lambda: torch._foreach_lerp_(foreach_averages, models, weight),
        "plan": lambda: plan.lerp_([weight]),
        "ema": ema.update,
        "torch": lambda: torch_average.update_parameters(model),
    }
    with torch.no_grad():
        plan.lerp_([weight])
        ema.update()
    table = plan.groups[0].cache.get("cpu_table")
    if table is not None:
        contenders["refresh"] = table.refresh
        contenders["run"] = lambda: table.lerp_([weight])

    wanted = {"flat", *args.contenders.split(",")}
    # One untimed call before each sample: the contender before this one evicted this one's tensors
    # from the caches, and every contender (the flat limit too) is then timed from warm caches alike.
    times = compare(
        {name: update for name, update in contenders.items() if name in wanted},
        baseline="flat", rounds=args.rounds, calls=args.calls, warm_each_sample=True,
    )
    print(f"{args.count} tensors x {args.length} float32, backend {args.backend!r}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.calls} calls, medians:")
    print(times.format())
    for other, label in (("foreach", "torch._foreach_lerp_"), ("torch", "torch AveragedModel")):
        if other in times.timings:
            speedups = ", ".join(f"{name} {times.speedup(name, over=other):.2f}x" for name in times.timings)
            print(f"faster than {label}: {speedups}")


if __name__ == "__main__":
    main()
