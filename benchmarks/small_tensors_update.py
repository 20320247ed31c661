"""Many small tensors (4000 x 256 fp32): the per-tensor overhead of one update, against the bandwidth bound.

    python benchmarks/small_tensors_update.py                  # the issue-13 targets
    python benchmarks/small_tensors_update.py --diagnose       # + Plan.lerp_, the table's check and its run apart
    python benchmarks/small_tensors_update.py --count 20000 --length 50

Contenders, on the same tensors: one float32 ``lerp_`` over a single tensor of the same size (the
bound), ``torch._foreach_lerp_`` on prebuilt lists, ``EMA.update``, ``AveragedModel.update_parameters``
and torch's ``AveragedModel``. Targets (issue 13): EMA and AveragedModel <= 1.5x the flat lerp_, and
>= 10x faster than ``_foreach_lerp_``. Each sample is the mean of ``--calls`` calls after one untimed
call, so every contender runs from caches it filled itself (in a training loop the step between two
updates evicts them: there every contender is slower, the bound too). Contenders interleaved, medians.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from common import report, small_tensors_model, small_tensors_parser
from torch.optim import swa_utils

import fused_ema
from fused_ema.bench.timer import compare
from fused_ema.plan import Plan

WEIGHT = 1e-3


def main() -> None:
    parser = small_tensors_parser(__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="calls averaged into one sample")
    parser.add_argument("--diagnose", action="store_true", help="also time Plan.lerp_ and the CPU table's two halves")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = small_tensors_model(args)
    models = [parameter.detach() for parameter in model]
    foreach_averages = [tensor.clone() for tensor in models]
    flat_model = torch.randn(args.count * args.length)
    flat_average = flat_model.clone()
    ema = fused_ema.EMA(model, decay=1 - WEIGHT, backend=args.backend)
    averaged = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(1 - WEIGHT),
                                       backend=args.backend)
    torch_average = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(1 - WEIGHT))
    contenders: dict[str, Callable[[], None]] = {
        "flat lerp_": lambda: flat_average.lerp_(flat_model, WEIGHT),
        "torch._foreach_lerp_": lambda: torch._foreach_lerp_(foreach_averages, models, WEIGHT),
        "EMA.update": ema.update,
        "AveragedModel.update_parameters": lambda: averaged.update_parameters(model),
        "torch AveragedModel": lambda: torch_average.update_parameters(model),
    }
    before: dict[str, Callable[[], None]] = {}
    if args.diagnose:
        # The plan updates the EMA's own averages: it shares the EMA's working set.
        plan = Plan([list(ema.module.parameters())], models, backend=args.backend)
        plan.lerp_([WEIGHT])
        contenders["Plan.lerp_"] = lambda: plan.lerp_([WEIGHT])
        table = plan.groups[0].cache.get("cpu_table")
        if table is not None:
            # The table's two halves, each measured as it runs in an update: the check right after
            # a pass (whose stream has evicted the tensors' metadata from L2), and the pass alone
            # (a lerp_ right after refresh() trusts that check instead of repeating it).
            contenders["CpuTable.lerp_ (check + run)"] = lambda: table.lerp_([WEIGHT])
            contenders["  its check (refresh after a run)"] = table.refresh
            before["  its check (refresh after a run)"] = lambda: table.lerp_([WEIGHT])
            contenders["  its run (lerp_ after refresh)"] = lambda: table.lerp_([WEIGHT])
            before["  its run (lerp_ after refresh)"] = table.refresh

    times = compare(contenders, baseline="flat lerp_", rounds=args.rounds, calls=args.calls,
                    warm_each_sample=True, sparse={"torch AveragedModel"}, label="timing", before=before)
    report(f"{args.count} x {args.length} float32, backend {args.backend!r}, {torch.get_num_threads()} threads, "
           f"{args.rounds} rounds x {args.calls} calls, medians:", times, [
               ("EMA / flat (<= 1.5)", "EMA.update", "flat lerp_"),
               ("AveragedModel / flat (<= 1.5)", "AveragedModel.update_parameters", "flat lerp_"),
               ("foreach / AveragedModel (>= 10)", "torch._foreach_lerp_", "AveragedModel.update_parameters"),
               ("torch AveragedModel / AveragedModel", "torch AveragedModel", "AveragedModel.update_parameters"),
           ])


if __name__ == "__main__":
    main()
