"""GPU benchmark: one EMA update with each GPU backend, torch's AveragedModel, against a flat ``lerp_``.

Workloads (issue 15): an 85M-parameter transformer (``nn.TransformerEncoder``, 12 layers, d=768,
144 tensors) and 4000 tensors of 256 elements, each in float32 and as a bfloat16 model with a
float32 average. Contenders, timed interleaved (A, B, C, ... repeated ``--rounds`` times) with CUDA
events, ``--calls`` updates per sample, medians reported:

- ``flat lerp_ (limit)``: one float32 ``lerp_`` over a single tensor with the model's element count;
- ``fused_ema.EMA(backend=cuda | triton | foreach)``: the public update;
- ``torch AveragedModel (EMA)``: ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``;
- ``offload: fused_ema.EMA(device="cpu")``: the average kept on the host (staged copies, see
  fused_ema/backends/offload.py) against a plain blocking ``.cpu()`` of every tensor plus
  ``_foreach_lerp_`` on the host.

GB/s counts the bytes an ideal single pass moves (read the model, read and write the average);
"x flat" is that over the flat limit's GB/s in the same run. Run on a machine with an NVIDIA GPU::

    python benchmarks/bench_gpu.py --output bench_gpu.json

Without a CUDA device it prints why and exits 0 (benchmarks/gpu_check.sh relies on that).
Status: written without a GPU and NOT yet run on one; no GPU figures have been measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

from fused_ema.progress import progress

GPU_BACKENDS = ("cuda", "triton", "foreach")
DECAY = 0.999


def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
    return nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)


def small_tensors() -> nn.Module:
    return nn.ParameterList([nn.Parameter(torch.randn(256)) for _ in range(4000)])


WORKLOADS = {"transformer-85M": transformer, "4000x256": small_tensors}
PRECISIONS = {"fp32": (torch.float32, torch.float32), "bf16 model, fp32 average": (torch.bfloat16, torch.float32)}


def _contenders(model: nn.Module, average_dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    import fused_ema
    from fused_ema import backends

    numel = sum(p.numel() for p in model.parameters())
    flat_average = torch.zeros(numel, device="cuda")
    flat_model = torch.randn(numel, device="cuda")
    found = {"flat lerp_ (limit)": lambda: flat_average.lerp_(flat_model, 1 - DECAY)}
    for backend in GPU_BACKENDS:
        reason = backends.get(backend).unavailable_reason()
        if reason is not None:
            print(f"skipping backend {backend!r}: {reason}", file=sys.stderr)
            continue
        ema = fused_ema.EMA(model, decay=DECAY, dtype=average_dtype, backend=backend, stochastic_rounding=False)
        found[f"fused_ema.EMA(backend={backend!r})"] = ema.update
    torch_average = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(DECAY)).to(average_dtype)
    try:
        for _ in range(2):  # the first call copies; the second averages (and may refuse mixed dtypes)
            torch_average.update_parameters(model)
        found["torch AveragedModel (EMA)"] = lambda: torch_average.update_parameters(model)
    except Exception as error:  # noqa: BLE001 - torch's class may refuse mixed dtypes: report, go on
        print(f"skipping torch AveragedModel: {error}", file=sys.stderr)
    on_host = fused_ema.EMA(model, decay=DECAY, dtype=average_dtype, device="cpu", stochastic_rounding=False)
    found['offload: fused_ema.EMA(device="cpu")'] = on_host.update
    host_averages = [p.detach().to("cpu", average_dtype) for p in model.parameters()]
    parameters = list(model.parameters())

    def blocking_offload() -> None:
        models = [p.detach().cpu().to(average_dtype) for p in parameters]  # blocking copies
        torch._foreach_lerp_(host_averages, models, 1 - DECAY)

    found["offload: blocking .cpu() + _foreach_lerp_"] = blocking_offload
    return found


def _time(function: Callable[[], None], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def run(rounds: int, calls: int) -> list[dict]:
    rows = []
    cases = [(w, p) for w in WORKLOADS for p in PRECISIONS]
    for workload, precision in progress(cases, "bench_gpu"):
        model_dtype, average_dtype = PRECISIONS[precision]
        torch.manual_seed(0)
        model = WORKLOADS[workload]().to("cuda", model_dtype).requires_grad_(False)
        numel = sum(p.numel() for p in model.parameters())
        ideal_bytes = numel * (model_dtype.itemsize + 2 * average_dtype.itemsize)
        contenders = _contenders(model, average_dtype)
        for function in contenders.values():  # warm-up: Triton compiles, tables and staging are built
            function()
        torch.cuda.synchronize()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, function in contenders.items():
                samples[name].append(_time(function, calls))
        flat_seconds = statistics.median(samples["flat lerp_ (limit)"])
        flat_rate = numel * 3 * 4 / flat_seconds
        for name, times in samples.items():
            seconds = statistics.median(times)
            rate = (numel * 3 * 4 if name.startswith("flat") else ideal_bytes) / seconds
            rows.append(dict(workload=workload, precision=precision, contender=name, tensors=len(list(model.parameters())),
                             parameters=numel, microseconds=seconds * 1e6, gb_per_s=rate / 1e9,
                             fraction_of_flat=rate / flat_rate))
        del model, contenders
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| workload | precision | contender | us / update | GB/s | x flat |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['workload']} | {row['precision']} | {row['contender']} | {row['microseconds']:.1f} | "
                     f"{row['gb_per_s']:.1f} | {row['fraction_of_flat']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved samples per contender")
    parser.add_argument("--calls", type=int, default=20, help="updates per sample (one event pair)")
    parser.add_argument("--output", help="write the rows and the machine description as JSON here")
    arguments = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is visible to torch; nothing measured", file=sys.stderr)
        return 0
    rows = run(arguments.rounds, arguments.calls)
    machine = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                   command=" ".join(sys.argv))
    print(f"{machine['gpu']}, torch {machine['torch']} (CUDA {machine['cuda']})\n")
    print(table(rows))
    if arguments.output:
        with open(arguments.output, "w") as file:
            json.dump(dict(machine=machine, rows=rows), file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
