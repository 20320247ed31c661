"""Binding an averaged copy to a live model: unwrap, copy, pair tensors by name, notice changes.

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
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fused_ema import distributed
from fused_ema.plan import Plan, is_dense


class _PythonDictWatch:
    """The C++ ``DictWatch`` (csrc/tensor_watch.h) when the extension is not built: same answers, slower."""

    def __init__(self, dicts: Sequence[dict], ignored: Sequence[set | None]) -> None:
        self._snapshot = [(d, list(d.items()), keys, {k for k in d if k in keys} if keys else set())
                          for d, keys in zip(dicts, ignored)]

    def changed(self) -> bool:
        return any(
            len(d) != len(items) or any(
                key is not old_key or (value is not old_value and not (key in was_ignored and key in keys))
                for (key, value), (old_key, old_value) in zip(d.items(), items)
            )
            for d, items, keys, was_ignored in self._snapshot
        )


def _watch_registrations(modules: Iterable[nn.Module]):
    """A check that turns True once a parameter, buffer or submodule of ``modules`` is registered,
    replaced or removed (every submodule included; entries compared by identity).

    A non-persistent buffer may be replaced unnoticed (a rotary cache reassigned in each forward):
    it is no part of the average, and rebuilding the plan for it would cost every update.
    """
    seen: set[int] = set()
    dicts, ignored = [], []
    for module in modules:
        for submodule in module.modules():
            if id(submodule) not in seen:
                seen.add(id(submodule))
                dicts += (submodule._parameters, submodule._buffers, submodule._modules)
                ignored += (None, submodule._non_persistent_buffers_set, None)
    # The extension as the cpu backend loaded it; never compiled here just for this check.
    extension = getattr(sys.modules.get("fused_ema.ops"), "_C", None)
    return _PythonDictWatch(dicts, ignored) if extension is None else extension.DictWatch(dicts, ignored)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        # torch.compile's OptimizedModule registers the original as a submodule. Looked up in the
        # dicts: hasattr on a module without it raises and formats an AttributeError, on every update.
        inner = getattr(model, "_modules", {}).get("_orig_mod")
        if isinstance(inner, nn.Module):
            model = inner
        else:
            return model


class CannotCopyError(TypeError, RuntimeError):
    """``copy.deepcopy`` refused the model (a TypeError or RuntimeError, as deepcopy's own errors are)."""


def clone_module(
    model: nn.Module,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
    *,
    selected: Collection[str] | None = None,
    copy_of_model: nn.Module | None = None,
    requires_grad: bool | None = None,
) -> nn.Module:
    """A copy of ``model`` for averaging, on ``device``, its averaged floating tensors cast to ``dtype``.

    ``selected`` (names from :func:`fused_ema.selection.select`; ``None``: every parameter): the
    other parameters are not copied but shared, the copy holds the live model's own parameter
    objects, unless the copy lives on another device (then they are copied once, since a module
    runs on one device). ``copy_of_model``: a module the user built with the same names and
    shapes, used instead of a deep copy; the model's values are copied into it. FSDP2 models
    refuse deepcopy: their copy is sharded like them (``distributed.clone_sharded``).
    ``requires_grad``: set on the copy's own parameters (never on shared ones).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    if copy_of_model is None and distributed.is_fsdp(model):
        # Sharded like the model and not packed; unselected parameters are copied, not shared.
        clone = distributed.clone_sharded(model, device, dtype)
        return clone if requires_grad is None else clone.requires_grad_(requires_grad)
    target = None if device is None else torch.device(device)
    shared = {
        id(parameter): parameter
        for name, parameter in model.named_parameters()
        if selected is not None and name not in selected and _on(target or parameter.device, parameter)
    }
    clone = _deepcopy(model, shared) if copy_of_model is None else _adopt(copy_of_model, model, shared)
    if device is not None or dtype is not None:
        clone._apply(lambda t: t if id(t) in shared else _convert(t, target, dtype))
    if copy_of_model is not None:
        shared = _share_(clone, model, shared)
    if requires_grad is not None:
        for parameter in clone.parameters():
            if id(parameter) not in shared:
                parameter.requires_grad_(requires_grad)
    return pack_(clone, skip=shared.values())


def _on(device: torch.device, tensor: torch.Tensor) -> bool:
    return device.type == tensor.device.type and device.index in (None, tensor.device.index)


def _convert(tensor: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    # What Module.to(device, dtype) does to one tensor: integer tensors keep their dtype.
    return tensor.to(device, dtype if tensor.is_floating_point() else None)


def _deepcopy(model: nn.Module, shared: dict[int, torch.Tensor]) -> nn.Module:
    # The memo makes deepcopy hand back the shared parameters themselves: they are never copied.
    memo: dict[int, object] = dict(shared)
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:
        raise CannotCopyError(
            f"copy.deepcopy(model) failed ({type(error).__name__}: {error}); build a copy of the model "
            "yourself (same class, same parameter and buffer names and shapes) and pass it as "
            "EMA(model, ema_model=copy) or AveragedModel(model, averaged_module=copy)"
        ) from error


# Every packed tensor starts at a multiple of this many bytes: vector loads (16 bytes in the CUDA
# kernel, Triton's all-or-nothing "aligned") stay on after an odd-sized tensor.
PACK_ALIGNMENT = 16


def _carve():
    """The extension's ``carve`` (csrc/pack.cpp), or None when the extension is not available."""
    from fused_ema import ops  # loads (or compiles once) the extension

    return None if ops._C is None else getattr(ops._C, "carve", None)


@torch.no_grad()
def _adopt(copy_of_model: nn.Module, model: nn.Module, shared: dict[int, torch.Tensor]) -> nn.Module:
    """``copy_of_model``, checked against ``model`` name by name, with the model's values (but
    for the tensors that will be ``shared``)."""
    if not isinstance(copy_of_model, nn.Module):
        raise TypeError(f"the copy of the model must be an nn.Module, got {type(copy_of_model).__name__}")
    copy_of_model = unwrap(copy_of_model)
    if copy_of_model is model:
        raise ValueError("the copy of the model is the model itself: pass a separate module to hold the average")
    try:
        for buffers in (False, True):
            averages, models = pair_by_name(copy_of_model, model, buffers=buffers)
            for average, live in zip(averages, models):
                if average is not live and id(live) not in shared:
                    average.copy_(live)
    except ValueError as error:
        raise ValueError(f"the copy of the model does not match the model: {error}") from None
    return copy_of_model


def _share_(clone: nn.Module, model: nn.Module, candidates: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Register the live ``candidates`` in ``clone`` under their names where the devices agree."""
    shared = {}
    clone_parameters = dict(clone.named_parameters(remove_duplicate=False))
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in candidates and _on(clone_parameters[name].device, parameter):
            owner, _, leaf = name.rpartition(".")
            clone.get_submodule(owner)._parameters[leaf] = parameter
            shared[id(parameter)] = parameter
    return shared


@torch.no_grad()
def pack_(module: nn.Module, skip: Iterable[torch.Tensor] = ()) -> nn.Module:
    """Move the floating parameters and buffers of ``module`` into one block per device and dtype.

    Each tensor keeps its shape and strides and starts at a multiple of ``PACK_ALIGNMENT`` bytes;
    the kernels then stream through one contiguous block instead of thousands of small
    allocations (the many-small-tensors case runs near the speed of one flat lerp_). Each tensor
    owns a storage of exactly its bytes inside the block (``carve`` in csrc/pack.cpp), so saving,
    pickling or copying one tensor writes that tensor only. Without the C++ extension the tensors
    stay as they are (separate allocations). Tensors in ``skip`` (the live model's, shared with an
    average of part of it) stay where they are.

    Example::

        average = pack_(copy.deepcopy(model))
    """
    carve = _carve()
    if carve is None:
        return module
    skipped = {id(t) for t in skip}  # shared with the live model: not ours to move
    unique = {id(t): t for t in (*module.parameters(), *module.buffers())}  # tied weights once
    tensors = [t for key, t in unique.items() if key not in skipped]
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
    # The module's own load pre-hooks first, on a copy (a selection check, a format conversion):
    # their errors come first, and what is checked here is what will be loaded.
    state_dict = collections.OrderedDict(state_dict)
    for hook in module._load_state_dict_pre_hooks.values():
        hook(state_dict, "", {}, strict, [], [], [])
    own = {key: value for key, value in module.state_dict(keep_vars=True).items()
           if isinstance(value, torch.Tensor) or key.endswith("_extra_state")}  # not metadata entries
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
    averaged: nn.Module, model: nn.Module, buffers: bool, selected: Collection[str] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tensors of ``averaged`` and ``model`` in matching order; ValueError on the first mismatch.

    Every name is checked; only the ``selected`` parameters (all when ``None``) are returned.
    """
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
    if selected is not None and not buffers:
        names = [name for name in names if name in selected]
    return [averaged_tensors[n] for n in names], [model_tensors[n] for n in names]


class Binding:
    """The plan that updates ``averaged`` modules from one live model, rebuilt only on change.

    ``average_buffers``: floating buffers are averaged like parameters; otherwise every buffer is
    copied from the model on each update (torch's ``use_buffers=False``). ``selected``: the names
    of the averaged parameters (``None``: all); the others are shared, never updated.
    ``plan_builds`` counts the plans built so far: a registration elsewhere in the process leaves
    it as it is.
    """

    def __init__(
        self,
        averaged: Sequence[nn.Module],
        *,
        average_buffers: bool,
        backend: str,
        selected: Collection[str] | None = None,
    ) -> None:
        self.averaged = list(averaged)
        self.selected = None if selected is None else frozenset(selected)
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
        averages, models = pair_by_name(self.averaged[index], model, buffers=False, selected=self.selected)
        if self.average_buffers:
            buffers, model_buffers = pair_by_name(self.averaged[index], model, buffers=True)
            floating = [i for i, b in enumerate(buffers) if b.is_floating_point() or b.is_complex()]
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
            averages, models = pair_by_name(averaged, model, buffers=False, selected=self.selected)
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
