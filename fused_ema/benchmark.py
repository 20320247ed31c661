"""The benchmark behind ``fused-ema bench`` and ``benchmarks/``: a model zoo, the contenders, a timer.

Every contender updates averages of the same model tensors in the same process, and each result is
reported against the limit measured in the same run: one float32 ``lerp_`` over a single flat
tensor moving the bytes an ideal single pass moves (for a float32 model: the same element count),
i.e. what the memory bus allows. Contenders are interleaved (A, B, C, A, B, C, ...) and summarised
by their median, because identical runs on a shared machine differ by up to 20% from one minute to
the next. The first call of each contender (plan building, lazy copies) is never timed.

Example::

    from fused_ema import benchmark
    report = benchmark.run(["transformer"], size="quick")
    print(benchmark.format_table(report))
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fused_ema import backends as registry
from fused_ema.progress import progress

SIZES = ("default", "quick")

# ---------------------------------------------------------------------------------------------
# The model zoo: torch.nn only, nothing downloaded.
# ---------------------------------------------------------------------------------------------


class ManySmallTensors(nn.Module):
    """``count`` parameters of ``length`` floats each: per-tensor overhead dominates the update."""

    def __init__(self, count: int, length: int) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(length)) for _ in range(count))


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1, 3x3 (strided), 1x1 convolutions, each followed by BatchNorm."""

    expansion = 4

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        outputs = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(inputs, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, outputs, 1, bias=False), nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(inputs)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (inputs if self.downsample is None else self.downsample(inputs)))


def resnet50_shaped(width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3), classes: int = 1000) -> nn.Module:
    """A ResNet-50 (25.6M parameters, 161 parameter tensors, 53 BatchNorms) without torchvision."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ]
    inputs = width
    for stage, count in enumerate(blocks):
        stage_width = width * 2**stage
        for index in range(count):
            layers.append(Bottleneck(inputs, stage_width, 2 if index == 0 and stage > 0 else 1))
            inputs = stage_width * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, classes)]
    return nn.Sequential(*layers)


def transformer_encoder(width: int = 768, layers: int = 12, heads: int = 12) -> nn.Module:
    """nn.TransformerEncoder, BERT-base shaped by default (85.1M parameters in 144 tensors)."""
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def linear_stack(width: int = 2048, depth: int = 12) -> nn.Module:
    """``depth`` square Linear layers (50.4M parameters at the default size)."""
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))


@dataclass
class WorkloadSpec:
    """How to build one workload: the model, the dtypes and the number of averages."""

    name: str
    summary: str
    build: Callable[[str], nn.Module]  # size -> model (float32, on the current default device)
    model_dtype: torch.dtype = torch.float32
    average_dtype: torch.dtype | None = None  # None: the model's dtype
    decays: tuple[float, ...] = (0.999,)
    stochastic_rounding: bool = False


def _sized(default: Callable[[], nn.Module], quick: Callable[[], nn.Module]) -> Callable[[str], nn.Module]:
    return lambda size: quick() if size == "quick" else default()


ZOO: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in (
        WorkloadSpec(
            "small-tensors", "many small tensors (default: 4000 of 256)",
            _sized(lambda: ManySmallTensors(4000, 256), lambda: ManySmallTensors(200, 64)),
        ),
        WorkloadSpec(
            "transformer", "nn.TransformerEncoder (default: 12 layers, d=768)",
            _sized(transformer_encoder, lambda: transformer_encoder(64, 2, 4)),
        ),
        WorkloadSpec(
            "resnet50", "ResNet-50-shaped conv net, BatchNorm buffers averaged too",
            _sized(resnet50_shaped, lambda: resnet50_shaped(8, (1, 1, 1, 1), 10)),
        ),
        WorkloadSpec(
            "bf16-model", "bfloat16 Linear stack (default: 12 of 2048x2048), float32 average",
            _sized(linear_stack, lambda: linear_stack(64, 2)),
            model_dtype=torch.bfloat16, average_dtype=torch.float32,
        ),
        WorkloadSpec(
            "bf16-sr", "bfloat16 Linear stack, bfloat16 average with stochastic rounding",
            _sized(linear_stack, lambda: linear_stack(64, 2)),
            model_dtype=torch.bfloat16, stochastic_rounding=True,
        ),
        WorkloadSpec(
            "two-averages",
            "two averages (decays 0.999 and 0.9999) of one ResNet-50-shaped net; fused_ema.EMA and "
            "fused_ema.lerp_ (as multi_lerp_) update both in one pass, the others keep two instances",
            _sized(resnet50_shaped, lambda: resnet50_shaped(8, (1, 1, 1, 1), 10)),
            decays=(0.999, 0.9999),
        ),
    )
}


@dataclass(eq=False)
class Workload:
    """A built model and what every contender must do with it on each update."""

    name: str
    summary: str
    model: nn.Module
    average_dtype: torch.dtype
    decays: tuple[float, ...]
    stochastic_rounding: bool
    device: torch.device
    models: list[torch.Tensor]  # parameters and floating buffers: what every contender averages

    @property
    def weights(self) -> list[float]:
        return [1.0 - decay for decay in self.decays]

    @property
    def numel(self) -> int:
        return sum(tensor.numel() for tensor in self.models)

    @property
    def model_dtype(self) -> torch.dtype:
        return self.models[0].dtype

    @property
    def ideal_bytes(self) -> int:
        """Bytes one ideal pass moves: read each model tensor once, read and write every average."""
        average_size = self.average_dtype.itemsize
        return sum(t.numel() * (t.element_size() + 2 * average_size * len(self.decays)) for t in self.models)

    def new_averages(self) -> list[torch.Tensor]:
        """A fresh average of every model tensor, in the workload's average dtype."""
        return [tensor.detach().to(self.average_dtype, copy=True) for tensor in self.models]

    def describe(self) -> str:
        dtypes = _dtype_name(self.model_dtype)
        if self.average_dtype != self.model_dtype:
            dtypes += f" model, {_dtype_name(self.average_dtype)} average"
        return f"{self.summary}: {self.numel / 1e6:.2f}M elements in {len(self.models)} tensors, {dtypes}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_workload(name: str, size: str = "default", device: str | torch.device = "cpu") -> Workload:
    """Build workload ``name`` of the zoo (see :data:`ZOO`) at ``size`` ("default" or "quick")."""
    if name not in ZOO:
        raise ValueError(f"workload must be one of {', '.join(ZOO)}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    spec, device = ZOO[name], torch.device(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = spec.build(size)
    model = model.to(dtype=spec.model_dtype)
    models = [t.detach() for t in model.parameters()] + [t.detach() for t in model.buffers() if t.is_floating_point()]
    return Workload(
        name, spec.summary, model, spec.average_dtype or spec.model_dtype, spec.decays,
        spec.stochastic_rounding, device, models,
    )


# ---------------------------------------------------------------------------------------------
# Contenders: each turns a workload into a zero-argument update.
# ---------------------------------------------------------------------------------------------


class Skip(Exception):
    """A contender that cannot run this workload here (library missing, dtype unsupported)."""


Update = Callable[[], None]


@dataclass(frozen=True)
class Contender:
    """One way to update the averages; ``make(workload)`` returns the update or raises :class:`Skip`."""

    name: str
    family: str  # "limit", "fused_ema", "torch" or "library"
    make: Callable[[Workload], Update]
    backend: str | None = None  # fused_ema backend requested
    rounds_stochastically: bool = False  # whether bfloat16 averages get stochastic rounding


def _each(updates: list[Update]) -> Update:
    if len(updates) == 1:
        return updates[0]

    def update() -> None:
        for one in updates:
            one()

    return update


def _limit(workload: Workload) -> Update:
    # The memory-bandwidth bound: one float32 lerp_ over one flat tensor moving the bytes an ideal
    # single pass moves. For a float32 workload that is one lerp_ of the same element count. For
    # bfloat16 it is not ATen's bfloat16 lerp_ (compute-bound, several times slower than memory
    # here), nor a mixed-dtype add_ (TensorIterator's unvectorised cast path): neither is the bound.
    elements = -(-workload.ideal_bytes // 12)  # float32 lerp_ reads 8 and writes 4 bytes per element
    model = torch.ones(elements, device=workload.device)  # values do not change the speed
    average = model.clone()
    return lambda: average.lerp_(model, 0.001)


def _fused_public(name: str) -> Any:
    value = getattr(importlib.import_module("fused_ema"), name, None)
    if value is None:
        raise Skip(f"fused_ema.{name} is not in this build")
    return value


def _fused_ema_wrapper(backend: str) -> Callable[[Workload], Update]:
    def make(workload: Workload) -> Update:
        # One EMA keeps every average of the workload and updates them in one pass over the model.
        ema = _fused_public("EMA")(
            workload.model, workload.decays, dtype=workload.average_dtype, backend=backend,
            stochastic_rounding=workload.stochastic_rounding,
        )
        return ema.update

    return make


def _fused_averaged_model(backend: str) -> Callable[[Workload], Update]:
    def make(workload: Workload) -> Update:
        if workload.average_dtype != workload.model_dtype:
            raise Skip("like torch's, it keeps the average in the model's dtype")
        AveragedModel, multi_avg_fn = _fused_public("AveragedModel"), _fused_public("get_ema_multi_avg_fn")
        instances = [
            AveragedModel(workload.model, multi_avg_fn=multi_avg_fn(decay), use_buffers=True, backend=backend)
            for decay in workload.decays
        ]
        model = workload.model
        return _each([lambda instance=instance: instance.update_parameters(model) for instance in instances])

    return make


def _fused_functional(backend: str) -> Callable[[Workload], Update]:
    def make(workload: Workload) -> Update:
        from fused_ema.functional import multi_lerp_  # lerp_ is multi_lerp_ with one set

        average_sets = [workload.new_averages() for _ in workload.decays]
        models, weights, sr = workload.models, workload.weights, workload.stochastic_rounding
        step = iter(range(1 << 62))

        def update() -> None:
            multi_lerp_(average_sets, models, weights, backend=backend, stochastic_rounding=sr, step=next(step))

        return update

    return make


def _torch_averaged_model(workload: Workload) -> Update:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if workload.average_dtype != workload.model_dtype:
        raise Skip("it keeps the average in the model's dtype (_foreach_lerp_ needs matching dtypes)")
    instances = [
        AveragedModel(workload.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        for decay in workload.decays
    ]
    model = workload.model
    return _each([lambda instance=instance: instance.update_parameters(model) for instance in instances])


def _foreach_lerp(workload: Workload) -> Update:
    if workload.average_dtype != workload.model_dtype:
        raise Skip("torch._foreach_lerp_ needs matching dtypes")
    models = workload.models
    pairs = [(workload.new_averages(), weight) for weight in workload.weights]
    return _each([lambda a=a, w=w: torch._foreach_lerp_(a, models, w) for a, w in pairs])


def _mul_add_loop(workload: Workload) -> Update:
    # timm's ModelEmaV2 and most hand-written EMAs: one mul_ and one add_ per tensor.
    models = workload.models
    pairs = [(workload.new_averages(), decay) for decay in workload.decays]

    def loop(averages: list[torch.Tensor], decay: float) -> None:
        for average, model in zip(averages, models):
            average.mul_(decay).add_(model, alpha=1.0 - decay)

    return _each([lambda a=a, d=d: loop(a, d) for a, d in pairs])


def _load_timm_model_ema() -> Any:
    # timm imports torchvision at package import; its EMA file needs only torch, so load that file.
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise Skip("timm is not installed (pip install --no-deps timm)")
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "model_ema.py"
    if not path.is_file():
        raise Skip(f"timm has no {path}")
    module_spec = importlib.util.spec_from_file_location("_fused_ema_benchmark_timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "ModelEmaV3"):
        raise Skip("this timm has no ModelEmaV3 (timm >= 1.0.10 has it)")
    return module


def _timm(workload: Workload) -> Update:
    ModelEmaV3 = _load_timm_model_ema().ModelEmaV3
    instances = [ModelEmaV3(workload.model, decay, dtype=workload.average_dtype) for decay in workload.decays]
    model = workload.model
    return _each([lambda instance=instance: instance.update(model) for instance in instances])


def _import_or_skip(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise Skip(f"{package} is not installed (pip install --no-deps {package})") from error


def _ema_pytorch(workload: Workload) -> Update:
    EMA = _import_or_skip("ema_pytorch", "ema-pytorch").EMA
    coerce = workload.average_dtype != workload.model_dtype
    instances = []
    for decay in workload.decays:
        instance = EMA(workload.model, beta=decay, update_after_step=0, update_every=1, coerce_dtype=coerce)
        instance.ema_model.to(workload.average_dtype)
        instance.update()  # its first call copies the model
        instances.append(instance)
    return _each([instance.update for instance in instances])


def _torch_ema(workload: Workload) -> Update:
    ExponentialMovingAverage = _import_or_skip("torch_ema", "torch_ema").ExponentialMovingAverage
    instances = []
    for decay in workload.decays:
        instance = ExponentialMovingAverage(workload.models, decay)
        instance.to(dtype=workload.average_dtype)
        instances.append(instance)
    return _each([instance.update for instance in instances])


BASELINE = "torch AveragedModel"
LIMIT = "limit: one flat float32 lerp_, same bytes"

LIBRARY_CONTENDERS = (
    Contender(BASELINE, "torch", _torch_averaged_model),
    Contender("torch._foreach_lerp_ (prebuilt lists)", "torch", _foreach_lerp),
    Contender("mul_().add_() loop (ModelEmaV2 style)", "torch", _mul_add_loop),
    Contender("timm ModelEmaV3", "library", _timm, rounds_stochastically=True),
    Contender("ema-pytorch EMA", "library", _ema_pytorch),
    Contender("torch_ema", "library", _torch_ema),
)


def fused_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """fused_ema backends that run on ``device``'s type: name -> None, or why not available here."""
    device_type = torch.device(device).type
    result = {}
    for name, reason in registry.status().items():
        device_types = registry.get(name).device_types
        if device_types is None or device_type in device_types:
            result[name] = reason
    return result


# The oracle: per-tensor torch ops, slow by design; timed only when asked for (--backend reference).
NOT_BY_DEFAULT = ("reference",)


def contenders(device: str | torch.device = "cpu", backends: Sequence[str] | None = None) -> list[Contender]:
    """Every contender for ``device``: the limit, fused_ema (per backend) and the other libraries.

    By default ``fused_ema.EMA`` runs once per backend available here (except the reference
    oracle), and ``fused_ema.AveragedModel`` and ``fused_ema.lerp_`` run "auto". ``backends``
    names the fused_ema backends to run instead, for all three.
    """
    if backends:
        for name in backends:
            registry.check_name(name)
        ema_backends, auto_backends = list(dict.fromkeys(backends)), list(dict.fromkeys(backends))
    else:
        ema_backends = [
            name for name, reason in fused_backends(device).items() if reason is None and name not in NOT_BY_DEFAULT
        ]
        auto_backends = ["auto"]
    result = [Contender(LIMIT, "limit", _limit)]
    result += [
        Contender(f"fused_ema.EMA [{name}]", "fused_ema", _fused_ema_wrapper(name), name, True)
        for name in ema_backends
    ]
    for name in auto_backends:
        result.append(Contender(f"fused_ema.AveragedModel [{name}]", "fused_ema", _fused_averaged_model(name), name))
        result.append(Contender(f"fused_ema.lerp_ [{name}]", "fused_ema", _fused_functional(name), name, True))
    return result + list(LIBRARY_CONTENDERS)


def backends_not_run(device: str | torch.device = "cpu", backends: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The fused_ema backends a default run leaves out on ``device``, each with the reason."""
    if backends:
        return []
    left_out = []
    for name, reason in fused_backends(device).items():
        if reason is None and name not in NOT_BY_DEFAULT:
            continue
        if reason is None:
            reason = f"the per-tensor oracle, left out by default: add --backend {name} to time it"
        else:
            reason = f"not available here: {reason}"
        left_out.append({"workload": "all", "contender": f"fused_ema.EMA [{name}]", "reason": reason})
    return left_out


# ---------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """How long to measure.

    After setup and one untimed interleaved round, ``min_rounds`` to ``max_rounds`` timed rounds
    fill about ``seconds_per_workload`` (rounds past ``min_rounds`` are dropped once twice that has
    passed), each sample at least ``min_sample_s`` long. A contender
    whose first call takes more than ``slow_call_s`` is sampled only in the middle and last rounds
    (its first call counting as a third sample), so one pathological row cannot take the whole run.
    """

    seconds_per_workload: float = 4.0
    min_rounds: int = 5
    max_rounds: int = 25
    min_sample_s: float = 2e-3
    slow_call_s: float = 1.0

    @classmethod
    def for_size(cls, size: str) -> Settings:
        if size == "quick":
            return cls(seconds_per_workload=0.2, min_rounds=3, max_rounds=5, min_sample_s=2e-4, slow_call_s=0.5)
        return cls()


@dataclass
class Result:
    """One contender on one workload. Times in seconds per update; ``samples`` are per update too."""

    workload: str
    contender: str
    family: str
    backend: str | None
    resolved_backends: list[str] | None
    numel: int
    tensors: int
    ideal_bytes: int
    samples: list[float]
    calls_per_sample: int
    stochastic_rounding: bool | None  # None where the workload has no stochastic rounding
    median: float = 0.0
    gb_per_s: float = 0.0
    x_of_limit: float | None = None
    speedup_vs_torch: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Everything a run produced: results, skipped contenders, the machine and the settings."""

    results: list[Result]
    skipped: list[dict[str, str]]
    workloads: dict[str, str]
    environment: dict[str, Any]
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "settings": self.settings,
            "workloads": self.workloads,
            "results": [asdict(result) for result in self.results],
            "skipped": self.skipped,
        }


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_calls(update: Update, calls: int, synchronize: Callable[[], None]) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        update()
    synchronize()
    return (time.perf_counter() - start) / calls


@contextlib.contextmanager
def _quiet_timing() -> Iterator[None]:
    # Garbage collection pauses land on whichever contender happens to run; keep them out.
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            yield
    finally:
        if enabled:
            gc.enable()


def _resolved_backends(contender: Contender, workload: Workload) -> list[str] | None:
    if contender.backend != "auto":
        return None
    try:
        from fused_ema.plan import Plan

        # Which backend "auto" resolves to depends on devices, dtypes and layout only: the model
        # tensors stand in for averages of the same kind (the plan is built, never run).
        models = workload.models
        if workload.average_dtype != workload.model_dtype:
            models = [torch.empty_like(t, dtype=workload.average_dtype) for t in models]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the contender's own run already recorded them
            plan = Plan([models], workload.models, backend=contender.backend)
        return sorted(set(plan.backend_names))
    except Exception:  # a contender that cannot run reports its own error when made
        return None


def _make(
    contender: Contender, workload: Workload, synchronize: Callable[[], None]
) -> tuple[Update, list[str], float]:
    """Build one contender and run its first call: the update, the warnings raised, that call's time."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        update = contender.make(workload)
        first = _time_calls(update, 1, synchronize)
    return update, sorted({str(warning.message) for warning in caught}), first


def measure_workload(
    workload: Workload,
    candidates: Sequence[Contender],
    settings: Settings,
    *,
    show_progress: bool = True,
) -> tuple[list[Result], list[dict[str, str]]]:
    """Time every candidate on ``workload``, interleaved, and return results and skips."""
    synchronize = _synchronizer(workload.device)
    label = f"{workload.name:<14}"
    made: list[tuple[Contender, Update, list[str], float]] = []
    skipped: list[dict[str, str]] = []
    with _quiet_timing():
        steps = progress(candidates, label + " setup") if show_progress else candidates
        for contender in steps:
            try:
                made.append((contender, *_make(contender, workload, synchronize)))
            except Skip as skip:
                skipped.append({"workload": workload.name, "contender": contender.name, "reason": str(skip)})
            except Exception as error:
                reason = f"failed: {type(error).__name__}: {error}"
                skipped.append({"workload": workload.name, "contender": contender.name, "reason": reason})

        slow = [first > settings.slow_call_s for _, _, _, first in made]
        # One untimed round: the first calls after allocating pay for page faults and for waking
        # the thread pool, whichever contender comes first.
        for (_, update, _, _), is_slow in zip(made, slow):
            if not is_slow:
                update()
        estimates = [
            first if is_slow else statistics.median(_time_calls(update, 1, synchronize) for _ in range(3))
            for (_, update, _, first), is_slow in zip(made, slow)
        ]
        calls = [
            1 if is_slow else max(1, math.ceil(settings.min_sample_s / max(estimate, 1e-9)))
            for estimate, is_slow in zip(estimates, slow)
        ]
        round_cost = sum(estimate * count for estimate, count, is_slow in zip(estimates, calls, slow) if not is_slow)
        rounds = int(settings.seconds_per_workload / max(round_cost, 1e-9))
        rounds = max(settings.min_rounds, min(settings.max_rounds, rounds))
        slow_rounds = {rounds // 2, rounds - 1}

        samples: list[list[float]] = [[first] if is_slow else [] for (_, _, _, first), is_slow in zip(made, slow)]
        steps = progress(range(rounds), label + " timing") if show_progress else range(rounds)
        deadline = time.perf_counter() + 2 * settings.seconds_per_workload
        for round_index in steps:
            if round_index >= settings.min_rounds and time.perf_counter() > deadline:
                continue  # the machine got busy after the estimate: keep the run's length bounded
            # Rotate the order so no contender always runs right after the same neighbour.
            for offset in range(len(made)):
                index = (round_index + offset) % len(made)
                if slow[index] and round_index not in slow_rounds:
                    continue
                samples[index].append(_time_calls(made[index][1], calls[index], synchronize))

    results = []
    for (contender, _, notes, _), times, count, is_slow in zip(made, samples, calls, slow):
        if is_slow:
            notes.append(
                f"slower than {settings.slow_call_s:g} s in its first call: timed {len(times)} times "
                "(first call, middle and last rounds)"
            )
        stochastic = None
        if workload.stochastic_rounding and contender.family != "limit":
            stochastic = contender.rounds_stochastically
        results.append(Result(
            workload.name, contender.name, contender.family, contender.backend,
            _resolved_backends(contender, workload), workload.numel, len(workload.models),
            workload.ideal_bytes, times, count, stochastic, notes=notes,
        ))
    _derive(results)
    return results, skipped


def _derive(results: list[Result]) -> None:
    limit = next((r for r in results if r.family == "limit"), None)
    baseline = next((r for r in results if r.contender == BASELINE), None)
    for result in results:
        result.median = statistics.median(result.samples)
        result.gb_per_s = result.ideal_bytes / result.median / 1e9
    for result in results:
        if limit is not None:
            result.x_of_limit = result.median / limit.median
        if baseline is not None:
            result.speedup_vs_torch = baseline.median / result.median


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions and machine facts worth printing beside any timing."""
    info: dict[str, Any] = {
        "fused_ema": package_version("fused_ema"),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def package_version(name: str) -> str | None:
    """The installed version of ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "fused_ema":
            return "not installed (running from a source tree)"
        return None


def cpu_name() -> str:
    """The CPU model as the OS reports it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run(
    workloads: Sequence[str] | None = None,
    *,
    size: str = "default",
    device: str | torch.device = "cpu",
    backends: Sequence[str] | None = None,
    settings: Settings | None = None,
    show_progress: bool = True,
) -> Report:
    """Build each workload in turn, measure every contender on it, free it, and report.

    ``backends`` restricts the fused_ema rows (see :func:`contenders`).
    """
    names = list(workloads or ZOO)
    for name in names:
        if name not in ZOO:
            raise ValueError(f"workload must be one of {', '.join(ZOO)}, got {name!r}")
    started, load_before = time.perf_counter(), _load_average()
    settings = settings or Settings.for_size(size)
    device = torch.device(device)
    candidates = contenders(device, backends)
    results: list[Result] = []
    skipped = backends_not_run(device, backends)
    described: dict[str, str] = {}
    for name in names:
        workload = build_workload(name, size, device)
        described[name] = workload.describe()
        workload_results, workload_skipped = measure_workload(
            workload, candidates, settings, show_progress=show_progress
        )
        results += workload_results
        skipped += workload_skipped
        del workload, workload_results
        gc.collect()
    run_settings = {"size": size, **asdict(settings), "seconds": round(time.perf_counter() - started, 1)}
    env = environment(device)
    env["load_average"] = [load_before, _load_average()]  # other processes skew every timing
    return Report(results, skipped, described, env, run_settings)


def _load_average() -> float | None:
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


# ---------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------

HEADER = ("workload", "backend or library", "median ms", "GB/s", "x of limit", "speed-up vs torch AveragedModel")
NO_STOCHASTIC_ROUNDING = "†"


def _row_label(result: Result) -> str:
    label = result.contender
    if result.backend == "auto" and result.resolved_backends:
        label = label.replace("[auto]", f"[auto: {', '.join(result.resolved_backends)}]")
    if result.stochastic_rounding is False:
        label += " " + NO_STOCHASTIC_ROUNDING
    return label


def _milliseconds(seconds: float) -> str:
    milliseconds = seconds * 1e3
    digits = 3 if milliseconds < 1 else 2 if milliseconds < 100 else 1
    return f"{milliseconds:.{digits}f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def table_rows(report: Report) -> list[tuple[str, ...]]:
    """The rows of the results table, as strings, in the order of :data:`HEADER`."""
    rows = []
    for result in report.results:
        rows.append((
            result.workload,
            _row_label(result),
            _milliseconds(result.median),
            f"{result.gb_per_s:.1f}" if result.gb_per_s >= 1 else f"{result.gb_per_s:.2g}",
            "-" if result.x_of_limit is None else _ratio(result.x_of_limit),
            "-" if result.speedup_vs_torch is None else _ratio(result.speedup_vs_torch) + "x",
        ))
    return rows


def format_table(report: Report) -> str:
    """A Markdown table (pastes into a README) followed by the workloads, notes and skipped rows."""
    rows = table_rows(report)
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(HEADER)]
    numeric = [False, False, True, True, True, True]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if right else "-" * (w + 2) for w, right in zip(widths, numeric)) + "|"
    lines = [line(HEADER), rule] + [line(row) for row in rows]
    lines.append("")
    lines.append("Workloads:")
    lines += [f"- {name}: {text}" for name, text in report.workloads.items()]
    lines.append("")
    timer = report.settings.get("timer", "contenders interleaved, rounds rotated")
    lines.append(
        f"median ms: median time per update ({timer}). GB/s: bytes an ideal single pass moves "
        "(read the model once, read and write each average) divided by that time. x of limit: time over "
        "that of one float32 lerp_ on one flat tensor moving the same bytes, in the same run (1.00 is the "
        "memory-bandwidth bound)."
    )
    if any(result.stochastic_rounding is False for result in report.results):
        lines.append(
            f"{NO_STOCHASTIC_ROUNDING} rounds the bfloat16 average to nearest instead of stochastically: "
            "cheaper, but at decay 0.999 such an average stops moving."
        )
    notes = sorted({(r.contender, note) for r in report.results for note in r.notes})
    if notes:
        lines.append("Warnings raised while measuring:")
        lines += [f"- {contender}: {note}" for contender, note in notes]
    if report.skipped:
        lines.append("Not measured:")
        lines += [f"- {s['workload']} / {s['contender']}: {s['reason']}" for s in report.skipped]
    env = report.environment
    lines.append(
        f"Machine: {env['cpu']} ({env['cores']} cores, {env['torch_threads']} torch threads, "
        f"{env['cpu_capability']}), {env.get('gpu', 'no GPU used')}; python {env['python']}, torch {env['torch']}, "
        f"fused_ema {env['fused_ema']}."
        + (f" The run took {report.settings['seconds']:.0f} s." if "seconds" in report.settings else "")
    )
    load = env.get("load_average")
    if load and None not in load:
        # The load after includes this run's own threads; the one before tells whether others were busy.
        busy = load[0] > 0.5 * (env["cores"] or 1)
        lines.append(
            f"1-minute load average before and after the run: {load[0]:.2f} and {load[1]:.2f}"
            + (" (other processes were busy: these timings are less reliable)." if busy else ".")
        )
    return "\n".join(lines)


def plot(report: Report, path: str | os.PathLike) -> None:
    """Draw one panel per workload: each contender's time over the bandwidth limit, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(dict.fromkeys(result.workload for result in report.results))
    panels = [[r for r in report.results if r.workload == name and r.family != "limit"][::-1] for name in names]
    if not any(panels):
        raise ValueError("nothing to plot: no contender was measured")
    colors = {"fused_ema": "#d95f02", "torch": "#7570b3", "library": "#9a9a9a"}
    columns = 1 if len(names) == 1 else 2
    rows = -(-len(names) // columns)
    bars = max(len(panel) for panel in panels)
    figure, axes = plt.subplots(rows, columns, figsize=(8 * columns, rows * (0.28 * bars + 1.3) + 1.0), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    for axis, name, results in zip(axes.flat, names, panels):
        if not results:
            axis.set_visible(False)
            continue
        ratios = [r.x_of_limit or float("nan") for r in results]
        axis.barh(range(len(results)), ratios, color=[colors.get(r.family, "#9a9a9a") for r in results])
        axis.set_xscale("log")
        axis.set_yticks(range(len(results)), [_row_label(r) for r in results], fontsize=8)
        axis.axvline(1.0, color="#1b9e77", linestyle="--", linewidth=1.2)
        for index, result in enumerate(results):
            text = f" {_milliseconds(result.median)} ms"
            if result.speedup_vs_torch is not None and result.contender != BASELINE:
                text += f", {_ratio(result.speedup_vs_torch)}x torch"
            axis.text(ratios[index], index, text, va="center", fontsize=7.5)
        finite = [ratio for ratio in ratios if ratio == ratio]
        axis.set_xlim(min(0.5, min(finite) * 0.7), max(finite) * 12)
        first = results[0]
        axis.set_title(
            f"{name}: {first.numel / 1e6:.2f}M elements in {first.tensors} tensors", fontsize=9.5, loc="left"
        )
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="x", which="major", alpha=0.3)
        axis.set_axisbelow(True)
        axis.set_xlabel("time per update / bandwidth limit (log; shorter is better)", fontsize=8)
    legend = [Patch(color=color, label=label) for label, color in
              (("fused_ema", colors["fused_ema"]), ("torch", colors["torch"]), ("other libraries", colors["library"]))]
    legend.append(plt.Line2D([], [], color="#1b9e77", linestyle="--", label="bandwidth limit (flat lerp_, same bytes)"))
    if any(result.stochastic_rounding is False for result in report.results):
        label = f"{NO_STOCHASTIC_ROUNDING} bfloat16 average rounded to nearest, not stochastically"
        legend.append(Patch(color="none", label=label))
    env = report.environment
    figure.suptitle(
        f"fused-ema bench ({report.settings.get('size')} size): {env['cpu']}, {env['cores']} cores, "
        f"{env['torch_threads']} threads, torch {env['torch']}; labels: median ms per update, speed-up over "
        "torch AveragedModel",
        fontsize=10,
    )
    figure.legend(handles=legend, loc="lower center", ncol=5, fontsize=8.5, frameon=False)
    figure.tight_layout(rect=(0, 0.03, 1, 0.97))
    figure.savefig(path, dpi=110)
    plt.close(figure)
