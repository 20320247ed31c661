"""The contenders: each turns a workload of the zoo into a zero-argument update.

The bandwidth limit (one flat float32 ``lerp_`` moving the bytes an ideal single pass moves), the
fused_ema entry points per backend, torch's own ways, and the libraries users would otherwise use
(timm, ema-pytorch, torch_ema: each skipped with the install command when missing).

Example::

    from fused_ema.bench import build_workload, contenders
    workload = build_workload("small-tensors", size="quick")
    updates = {c.name: c.make(workload) for c in contenders("cpu", ["foreach"])}
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fused_ema import backends as registry
from fused_ema.bench.timer import Update
from fused_ema.bench.zoo import Workload


class Skip(Exception):
    """A contender that cannot run this workload here (library missing, dtype unsupported)."""


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

