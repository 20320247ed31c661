"""Module plumbing shared by the wrappers: unwrap, copy, pair tensors by name, notice changes.

The wrappers pair an averaged copy with the live model by parameter and buffer name, build a
:class:`~fused_ema.plan.Plan` once, and rebuild it only when one of those two models changed: a
parameter, buffer or submodule registered, replaced or removed in either of them (including
``module._parameters[name] = p`` and the buffers ``model.to()`` replaces, which no registration
hook reports), or another live model passed. Nothing here is process-wide: a registration in any
other module of the process costs nothing and rebuilds nothing. Storage swaps inside the same
tensor (``param.data = t``) are the plan's backends' to notice.
"""

from __future__ import annotations

import collections
import copy
import sys
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fused_ema import distributed
from fused_ema.plan import Plan, is_dense


class _PythonDictWatch:
    """The C++ ``DictWatch`` (csrc/tensor_watch.h) when the extension is not built: same answers, slower."""

    def __init__(self, dicts: Sequence[dict]) -> None:
        self._snapshot = [(d, list(d.items())) for d in dicts]

    def changed(self) -> bool:
        return any(
            len(d) != len(items) or any(
                key is not old_key or value is not old_value
                for (key, value), (old_key, old_value) in zip(d.items(), items)
            )
            for d, items in self._snapshot
        )


def _watch_registrations(modules: Iterable[nn.Module]):
    """A check that turns True once a parameter, buffer or submodule of ``modules`` is registered,
    replaced or removed (every submodule included; entries compared by identity)."""
    seen: set[int] = set()
    dicts = []
    for module in modules:
        for submodule in module.modules():
            if id(submodule) not in seen:
                seen.add(id(submodule))
                dicts += (submodule._parameters, submodule._buffers, submodule._modules)
    # The extension as the cpu backend loaded it; never compiled here just for this check.
    extension = getattr(sys.modules.get("fused_ema.ops"), "_C", None)
    return _PythonDictWatch(dicts) if extension is None else extension.DictWatch(dicts)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def clone_module(
    model: nn.Module, device: torch.device | str | int | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A deep copy of ``model`` for averaging, on ``device``, floating tensors cast to ``dtype``.

    FSDP2 models refuse deepcopy: their copy is sharded like them (``distributed.clone_sharded``).
    """
    if distributed.is_fsdp(model):
        return distributed.clone_sharded(model, device, dtype)
    clone = copy.deepcopy(model)
    if device is not None:
        clone = clone.to(device)
    if dtype is not None:
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        clone = clone.to(dtype)  # Module.to(dtype) leaves integer buffers alone
    return pack_(clone)


@torch.no_grad()
def pack_(module: nn.Module) -> nn.Module:
    """Move the floating parameters and buffers of ``module`` into one flat buffer per device and dtype.

    Each tensor becomes a view of its buffer with its own shape and strides, so nothing else
    changes; the kernels then stream through one contiguous block instead of thousands of small
    allocations (the many-small-tensors case runs near the speed of one flat lerp_).
    """
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()  # tied weights once
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in tensors)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        # Only a tensor that is alone on its whole storage: packing must not untie views of each other.
        alone = storages[tensor.untyped_storage().data_ptr()] == 1 and (
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
        if tensor.is_floating_point() and is_dense(tensor) and alone and tensor.numel():
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for (device, dtype), members in groups.items():
        flat = torch.empty(sum(t.numel() for t in members), device=device, dtype=dtype)
        offset = 0
        for tensor in members:
            view = flat.as_strided(tensor.shape, tensor.stride(), offset)
            view.copy_(tensor)
            tensor.data = view
            offset += tensor.numel()
    return module


def _named(module: nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
    named = module.named_buffers() if buffers else module.named_parameters()
    return dict(named)


def pair_by_name(
    averaged: nn.Module, model: nn.Module, buffers: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tensors of ``averaged`` and ``model`` in matching order; ValueError on the first mismatch."""
    kind = "buffer" if buffers else "parameter"
    for module in (averaged, model):
        distributed.reshard_(module)  # FSDP2: the sharded tensors, not ones gathered for a forward
    averaged_tensors, model_tensors = _named(averaged, buffers), _named(model, buffers)
    for name, tensor in averaged_tensors.items():
        if name not in model_tensors:
            raise ValueError(
                f"the model has no {kind} {name!r} that the average has; pass the model the "
                "average was made from (or one with the same architecture)"
            )
        if model_tensors[name].shape != tensor.shape:
            raise ValueError(
                f"{kind} {name!r} has shape {tuple(model_tensors[name].shape)} in the model but "
                f"{tuple(tensor.shape)} in the average"
            )
        distributed.check_same_sharding(name, tensor, model_tensors[name])
    for name in model_tensors:
        if name not in averaged_tensors:
            raise ValueError(f"the model has a {kind} {name!r} that the average lacks")
    names = list(averaged_tensors)
    return [averaged_tensors[n] for n in names], [model_tensors[n] for n in names]


class Binding:
    """The plan that updates ``averaged`` modules from one live model, rebuilt only on change.

    ``average_buffers``: floating buffers are averaged like parameters; otherwise every buffer is
    copied from the model on each update (torch's ``use_buffers=False``). ``plan_builds`` counts the
    plans built so far: a registration elsewhere in the process leaves it as it is.
    """

    def __init__(self, averaged: Sequence[nn.Module], *, average_buffers: bool, backend: str) -> None:
        self.averaged = list(averaged)
        self.average_buffers = average_buffers
        self.backend = backend
        self.plan_builds = 0
        self._model: nn.Module | None = None
        self._plan: Plan | None = None
        self._tensors: list[list[torch.Tensor]] | None = None
        self._watch = None

    def plan(self, model: nn.Module) -> Plan:
        """The plan for ``model``: cached while neither model registered, replaced or removed anything.

        Raises ValueError naming the tensor when the two models no longer pair up (a parameter
        removed from one of them, say), at every call until they do again.
        """
        if self._plan is None or model is not self._model or self._watch.changed():
            self._build(model)
        return self._plan

    def pairs(self, model: nn.Module, index: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(averaged, live) floating tensors that hold the average: for swap and copy_to."""
        averages, models = pair_by_name(self.averaged[index], model, buffers=False)
        if self.average_buffers:
            buffers, model_buffers = pair_by_name(self.averaged[index], model, buffers=True)
            floating = [i for i, b in enumerate(buffers) if b.is_floating_point()]
            averages += [buffers[i] for i in floating]
            models += [model_buffers[i] for i in floating]
        return averages, models

    def _build(self, model: nn.Module) -> None:
        tensors = self._collect(model)  # raises, leaving the cache stale, when the models do not pair up
        if self._plan is None or any(
            len(new) != len(old) or any(a is not b for a, b in zip(new, old))
            for new, old in zip(tensors, self._tensors)
        ):
            average_sets, models, copy_targets, copy_sources = tensors[:-3], tensors[-3], tensors[-2], tensors[-1]
            self._plan = Plan(average_sets, models, backend=self.backend, copies=(copy_targets, copy_sources))
            self.plan_builds += 1
        self._tensors = tensors
        self._model = model
        # After pairing: pair_by_name reshards FSDP2 modules, which re-registers their parameters.
        self._watch = _watch_registrations([model, *self.averaged])

    def _collect(self, model: nn.Module) -> list[list[torch.Tensor]]:
        """[averages of set 0, ..., averages of set K-1, models, copy targets, copy sources]."""
        average_sets, models, copy_targets, copy_sources = [], [], [], []
        for averaged in self.averaged:
            averages, models = pair_by_name(averaged, model, buffers=False)
            buffers, model_buffers = pair_by_name(averaged, model, buffers=True)
            if self.average_buffers:
                averages, models = averages + buffers, models + model_buffers
            else:
                copy_targets += buffers
                copy_sources += model_buffers
            average_sets.append(averages)
        return [*average_sets, models, copy_targets, copy_sources]

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) rebuilds its plan on first use: tables and watches hold handles.
        return {**self.__dict__, "_plan": None, "_model": None, "_tensors": None, "_watch": None}
