"""Module plumbing shared by the wrappers: unwrap, copy, pair tensors by name, notice changes.

The wrappers pair an averaged copy with the live model by parameter and buffer name, build a
:class:`~fused_ema.plan.Plan` once, and rebuild it only when something changed: a parameter,
buffer or submodule was registered anywhere (counted by torch's global registration hooks), a
buffer object was replaced (``model.to()`` does that without a hook), or another model was passed.
Storage swaps inside the same tensor (``param.data = t``) are the plan's backends' to notice.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from fused_ema import distributed
from fused_ema.plan import Plan, is_dense

_registrations = 0


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


for _register in (
    _module.register_module_parameter_registration_hook,
    _module.register_module_buffer_registration_hook,
    _module.register_module_module_registration_hook,
):
    _register(_count_registration)


def registration_count() -> int:
    """How many parameters, buffers and modules were registered in this process so far."""
    return _registrations


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
        # Real floating tensors only: Module.to(dtype) would drop the imaginary part of complex ones.
        clone = clone._apply(lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor)
    return pack_(clone)


# Every packed tensor starts at a multiple of this many bytes: vector loads (16 bytes in the CUDA
# kernel, Triton's all-or-nothing "aligned") stay on after an odd-sized tensor.
PACK_ALIGNMENT = 16


def _carve():
    """The extension's ``carve`` (csrc/pack.cpp), or None when the extension is not available."""
    from fused_ema import ops  # loads (or compiles once) the extension

    return None if ops._C is None else getattr(ops._C, "carve", None)


@torch.no_grad()
def pack_(module: nn.Module) -> nn.Module:
    """Move the floating parameters and buffers of ``module`` into one block per device and dtype.

    Each tensor keeps its shape and strides and starts at a multiple of ``PACK_ALIGNMENT`` bytes;
    the kernels then stream through one contiguous block instead of thousands of small
    allocations (the many-small-tensors case runs near the speed of one flat lerp_). Each tensor
    owns a storage of exactly its bytes inside the block (``carve`` in csrc/pack.cpp), so saving,
    pickling or copying one tensor writes that tensor only. Without the C++ extension the tensors
    stay as they are (separate allocations).

    Example::

        average = pack_(copy.deepcopy(model))
    """
    carve = _carve()
    if carve is None:
        return module
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
        itemsize = members[0].element_size()
        step = max(1, PACK_ALIGNMENT // itemsize)  # elements per alignment unit
        offsets, end = [], 0
        for tensor in members:
            offsets.append(end)
            end += -(-tensor.numel() // step) * step
        block = torch.empty(end, device=device, dtype=dtype)
        for tensor, offset in zip(members, offsets):
            carved = carve(block, offset * itemsize, list(tensor.shape), list(tensor.stride()))
            carved.copy_(tensor)
            tensor.data = carved
    return module


def _named(module: nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
    if not buffers:
        return dict(module.named_parameters())
    # Non-persistent buffers (rotary caches that grow with the sequence) are no part of the
    # average, as they are no part of state_dict(): neither averaged nor copied (timm's ModelEmaV3).
    persistent = {
        id(buffer)
        for submodule in module.modules()
        for name, buffer in submodule._buffers.items()
        if buffer is not None and name not in submodule._non_persistent_buffers_set
    }
    return {name: buffer for name, buffer in module.named_buffers() if id(buffer) in persistent}


def check_loadable(module: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
    """Raise RuntimeError, before anything is written, where ``module.load_state_dict`` would fail.

    torch's ``load_state_dict`` copies every tensor it can and reports missing keys or a wrong
    shape only at the end; the wrappers check first, so a failed load changes nothing.
    """
    own = module.state_dict(keep_vars=True)
    problems = []
    if strict:
        missing = [key for key in own if key not in state_dict]
        unexpected = [key for key in state_dict if key not in own]
        if missing:
            problems.append("Missing key(s) in state_dict: " + ", ".join(map(repr, missing)))
        if unexpected:
            problems.append("Unexpected key(s) in state_dict: " + ", ".join(map(repr, unexpected)))
    for key, tensor in own.items():
        if key not in state_dict or not isinstance(tensor, torch.Tensor):
            continue
        incoming = state_dict[key]
        if not isinstance(incoming, torch.Tensor):
            problems.append(f"{key!r} is a {type(incoming).__name__} in the checkpoint, a tensor here")
        elif incoming.shape != tensor.shape:
            problems.append(f"size mismatch for {key}: copying a param with shape {tuple(incoming.shape)} "
                            f"from checkpoint, the shape here is {tuple(tensor.shape)}")
    if problems:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__} (nothing was loaded):\n\t"
            + "\n\t".join(problems)
        )


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


def _buffer_slots(modules: Sequence[nn.Module]) -> list[tuple[dict, str, torch.Tensor]]:
    return [
        (submodule._buffers, name, buffer)
        for module in modules
        for submodule in module.modules()
        for name, buffer in submodule._buffers.items()
        if buffer is not None
    ]


class Binding:
    """The plan that updates ``averaged`` modules from one live model, rebuilt only on change.

    ``average_buffers``: floating buffers are averaged like parameters; otherwise every buffer is
    copied from the model on each update (torch's ``use_buffers=False``).
    """

    def __init__(self, averaged: Sequence[nn.Module], *, average_buffers: bool, backend: str) -> None:
        self.averaged = list(averaged)
        self.average_buffers = average_buffers
        self.backend = backend
        self._model: nn.Module | None = None
        self._plan: Plan | None = None

    def plan(self, model: nn.Module) -> Plan:
        """The plan for ``model``: cached while nothing was registered or replaced."""
        if (
            self._plan is None
            or model is not self._model
            or self._registrations != _registrations
            or not all(slots.get(name) is buffer for slots, name, buffer in self._slots)
        ):
            self._plan = self._build(model)
        return self._plan

    def pairs(self, model: nn.Module, index: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(averaged, live) floating tensors that hold the average: for swap and copy_to."""
        averages, models = pair_by_name(self.averaged[index], model, buffers=False)
        if self.average_buffers:
            buffers, model_buffers = pair_by_name(self.averaged[index], model, buffers=True)
            floating = [i for i, b in enumerate(buffers) if b.is_floating_point() or b.is_complex()]
            averages += [buffers[i] for i in floating]
            models += [model_buffers[i] for i in floating]
        return averages, models

    def _build(self, model: nn.Module) -> Plan:
        tensors = self._collect(model)
        if self._plan is None or any(
            len(new) != len(old) or any(a is not b for a, b in zip(new, old))
            for new, old in zip(tensors, self._tensors)
        ):
            average_sets, models, copy_targets, copy_sources = tensors[:-3], tensors[-3], tensors[-2], tensors[-1]
            self._plan = Plan(average_sets, models, backend=self.backend, copies=(copy_targets, copy_sources))
        self._tensors = tensors
        self._model, self._registrations = model, _registrations
        self._slots = _buffer_slots([model, *self.averaged])
        return self._plan

    def _collect(self, model: nn.Module) -> list[list[torch.Tensor]]:
        """[averages of set 0, ..., averages of set K-1, models, copy targets, copy sources]."""
        average_sets, models, copy_targets, copy_sources = [], [], [], []
        for index, averaged in enumerate(self.averaged):
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
        # A copy (deepcopy, pickle) rebuilds its plan on first use: tables hold tensor handles.
        return {**self.__dict__, "_plan": None, "_model": None, "_tensors": None, "_slots": []}
