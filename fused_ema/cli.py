"""The ``fused-ema`` command: ``info`` (what runs here and why), ``bench`` (the numbers), ``demo``.

Example::

    fused-ema info
    fused-ema bench --quick --json results.json --plot results.png
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import sys
import warnings
from collections.abc import Sequence

import torch

from fused_ema import backends as registry
from fused_ema import benchmark

PROGRAM = "fused-ema"


def _error(message: str) -> int:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def _auto_choice(device_type: str) -> tuple[str | None, list[str]]:
    """What "auto" picks for dense float32 tensors on ``device_type``, and why the others lost."""
    from fused_ema.plan import Plan

    order = registry.AUTO_ORDER.get(device_type, ("foreach",))
    reasons = []
    for name in order:
        reason = registry.get(name).unavailable_reason()
        if reason is None and name != "foreach" and device_type == "cpu":
            probe = Plan([[torch.zeros(4)]], [torch.zeros(4)], backend="foreach").groups[0]
            reason = registry.get(name).cannot_run(probe)
        if reason is None:
            break
        reasons.append(f"{name}: {reason}")
    if device_type == "cuda" and not torch.cuda.is_available():
        return None, reasons
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reasons are printed above; no need to warn as well
        tensor = torch.zeros(4, device=device_type)
        chosen = Plan([[tensor.clone()]], [tensor], backend="auto").backend_names
    return ", ".join(chosen), reasons


def _extension_line() -> str:
    """Where the C++ extension came from and what it holds, or why it did not load."""
    from fused_ema import build_config, ops

    if ops._C is None:
        return f"not loaded: {ops.UNAVAILABLE_REASON}"
    record = build_config.read_record(os.path.dirname(ops.__file__))
    if ops._C.__name__ != "fused_ema._C" or record is None:
        return f"{ops._C.__file__} (compiled on first use, {build_config.JIT_VARIABLE}=1)"
    line = f"{ops._C.__file__} (built against torch {record.get('torch')}"
    if record.get("cuda_kernels"):
        line += f"; CUDA kernels for TORCH_CUDA_ARCH_LIST={record.get('cuda_arch_list') or 'torch default'}"
    return line + ")"


def backend_line(name: str, reason: str | None) -> str:
    """``info``'s status of one backend: "available", "needs a GPU ..." or "not available: <reason>".

    A CUDA build of torch on a machine without a GPU can hold everything the cuda and triton
    backends need except the GPU: they are listed as needing one, with what is compiled.
    """
    if reason is None:
        return "available"
    if name not in ("cuda", "triton") or not torch.version.cuda or torch.cuda.is_available():
        return f"not available: {reason}"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return f"not available: {reason}"
        import triton

        return f"needs a GPU (triton {triton.__version__} is installed; it compiles the kernel on the GPU)"
    from fused_ema import build_config, ops

    if ops._C is None:
        return f"needs a GPU, and the C++ extension did not load: {ops.UNAVAILABLE_REASON}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fused_ema::multi_lerp_", "CUDA"):
        why = ops.CUDA_NOTE or f"it was built without them; {build_config.REBUILD_COMMAND} with the CUDA toolkit"
        return f"needs a GPU, and the extension has no CUDA kernels: {why}"
    record = build_config.read_record(os.path.dirname(ops.__file__)) or {}
    arch = record.get("cuda_arch_list")
    return "needs a GPU (CUDA kernels compiled" + (f" for TORCH_CUDA_ARCH_LIST={arch})" if arch else ")")


def info(_: argparse.Namespace | None = None) -> int:
    """Print versions, the backends and why any is unavailable, and what "auto" picks."""
    env = benchmark.environment()
    import fused_ema

    print(f"fused_ema  {env['fused_ema']} ({os.path.dirname(fused_ema.__file__)})")
    print(f"torch      {env['torch']}")
    print(f"triton     {env['triton'] or 'not installed (pip install triton; needed for the triton backend)'}")
    print(f"python     {env['python']} ({env['platform']})")
    print(
        f"CPU        {env['cpu']}: {env['cores']} logical cores, {env['torch_threads']} torch threads, "
        f"vector ISA {env['cpu_capability']}"
    )
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        print(f"CUDA       {torch.version.cuda}: {', '.join(names)}")
    else:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build of torch"
        print(f"CUDA       no GPU visible ({build})")

    print(f"extension  {_extension_line()}")

    print("\nBackends:")
    status = registry.status()
    width = max(map(len, status))
    for name, reason in status.items():
        print(f"  {name:<{width}}  {backend_line(name, reason)}")

    print('\nbackend="auto" (the default) picks the first of its order that can run the tensors:')
    for device_type in ("cpu", "cuda"):
        order = " > ".join(registry.AUTO_ORDER.get(device_type, ("foreach",)))
        chosen, reasons = _auto_choice(device_type)
        label = f"  {device_type.upper()} tensors"
        if chosen is None:
            print(f"{label}: no CUDA device here; on one, auto tries {order}")
            continue
        print(f"{label}: {chosen}  (order: {order})")
        for reason in reasons:
            print(f"      passed over {reason}")

    value = os.environ.get(registry.ENVIRONMENT_VARIABLE)
    names = ", ".join(name for name in registry.NAMES if name != "auto")
    variable = registry.ENVIRONMENT_VARIABLE
    if value:
        print(f'\n{variable}={value}: overrides "auto" for this process (the picks above include it)')
    else:
        print(f'\n{variable} is not set; set it to one of {names} to override "auto" for a whole run')
    return 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def _check_device(device: str) -> str | None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        return f"--device {device!r} is not a torch device ({error}); use cpu or cuda"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else f"torch {torch.__version__} is CPU-only"
        return (
            f"--device {device}: torch sees no CUDA GPU ({build}); run on a machine with an NVIDIA GPU "
            "and a CUDA build of torch, or leave out --device to benchmark on the CPU"
        )
    if parsed.type not in ("cpu", "cuda"):
        return f"--device {device}: only cpu and cuda are benchmarked"
    return None


def bench(args: argparse.Namespace) -> int:
    """Run the zoo against every contender and print the table (see :mod:`fused_ema.benchmark`)."""
    problem = _check_device(args.device)
    if problem:
        return _error(problem)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return _error("--plot needs matplotlib: pip install matplotlib (or pip install 'fused_ema[plot]')")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "default"
    settings = benchmark.Settings.for_size(size)
    if args.rounds:
        settings.min_rounds = settings.max_rounds = args.rounds
    report = benchmark.run(args.workload, size=size, device=args.device, backends=args.backend, settings=settings)
    command = shlex.join([PROGRAM, *args.argv])
    report.settings["command"] = command
    print(benchmark.format_table(report))
    print(f"Command: {command}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report.to_json(), file, indent=1)
        print(f"Raw results written to {args.json}", file=sys.stderr)
    if args.plot:
        benchmark.plot(report, args.plot)
        print(f"Chart written to {args.plot}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def demo(argv: Sequence[str]) -> int:
    """Hand ``fused-ema demo ...`` to ``fused_ema.examples.main``."""
    try:
        examples = importlib.import_module("fused_ema.examples")
    except ModuleNotFoundError as error:
        if error.name in ("fused_ema.examples", "fused_ema"):
            return _error("the demo is not part of this install (fused_ema.examples is missing)")
        return _error(f"the demo needs {error.name}: pip install 'fused_ema[examples]'")
    return int(examples.main(list(argv)) or 0)


# ---------------------------------------------------------------------------------------------
# posthoc
# ---------------------------------------------------------------------------------------------


def posthoc(args: argparse.Namespace) -> int:
    """Synthesize the power EMA ``--sigma-rel`` from a PostHocEMA directory into ``--out``."""
    from fused_ema import posthoc as posthoc_module

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return _error("--plot needs matplotlib: pip install matplotlib (or pip install 'fused_ema[plot]')")
    try:
        state = posthoc_module.synthesize(args.directory, args.sigma_rel, args.step)
    except (OSError, ValueError, TypeError) as error:
        return _error(str(error))
    solution = state.solution
    print(f"sigma_rel {solution.sigma_rel:g} (gamma {solution.gamma:.3f}) at step {solution.step}, "
          f"from {len(solution.snapshots)} snapshots: relative profile fit error {solution.fit_error:.2e}")
    if solution.fit_error > 0.05:
        print("  the snapshots span this profile poorly: choose a sigma_rel closer to the tracked ones")
    torch.save(dict(state), args.out)
    print(f"Averaged weights written to {args.out} (model.load_state_dict(torch.load({args.out!r})))")
    if args.plot:
        posthoc_module.plot_profile(solution, args.plot)
        print(f"Profile plot written to {args.plot}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Fused weight averaging for PyTorch: what runs here, and how fast."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,bench,demo,posthoc}")
    commands.add_parser("info", help="versions, backends available here and why others are not, what 'auto' picks")
    bench_parser = commands.add_parser(
        "bench",
        help="time fused_ema against torch, timm, ema-pytorch and torch_ema on a model zoo",
        description=(
            "Time every fused_ema backend and the libraries users would otherwise use on the same "
            "tensors in the same process, interleaved, and report medians against the memory-bandwidth limit."
        ),
    )
    bench_parser.add_argument("--quick", action="store_true", help="tiny models and few rounds (a smoke test, seconds)")
    bench_parser.add_argument("--json", metavar="FILE", help="write the raw results (every sample) as JSON")
    bench_parser.add_argument("--plot", metavar="FILE.png", help="draw a bar chart (needs matplotlib)")
    bench_parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    bench_parser.add_argument(
        "--workload", action="append", choices=list(benchmark.ZOO), metavar="NAME",
        help=f"run only this workload (repeatable): {', '.join(benchmark.ZOO)}",
    )
    backend_names = [name for name in registry.NAMES]
    bench_parser.add_argument(
        "--backend", action="append", choices=backend_names, metavar="NAME",
        help=f"time only these fused_ema backends (repeatable): {', '.join(backend_names)}",
    )
    bench_parser.add_argument(
        "--rounds", type=int, metavar="N", help="interleaved rounds per workload (default: as many as fit its time)"
    )
    bench_parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) first")
    posthoc_parser = commands.add_parser(
        "posthoc",
        help="post-hoc EMA: rebuild the power EMA of any sigma_rel from PostHocEMA snapshots",
        description=(
            "Solve EDM2's least-squares problem over the snapshots in DIRECTORY (written by "
            "fused_ema.PostHocEMA) and save the averaged weights of the requested sigma_rel."
        ),
    )
    posthoc_parser.add_argument("directory", metavar="DIRECTORY", help="the PostHocEMA(directory=...) of the run")
    posthoc_parser.add_argument("--sigma-rel", type=float, required=True, help="relative EMA width, e.g. 0.07")
    posthoc_parser.add_argument("--out", required=True, metavar="FILE.pt", help="where to torch.save the state dict")
    posthoc_parser.add_argument("--step", type=int, help="steps done at which to average (default: the last snapshot)")
    posthoc_parser.add_argument("--plot", metavar="FILE.png", help="draw the reconstructed profile (needs matplotlib)")
    commands.add_parser(
        "demo", help="run the examples (arguments are passed on; see fused-ema demo --help)", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fused-ema`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return demo(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "info":
        return info(args)
    if args.command == "posthoc":
        return posthoc(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
