"""Averages of models trained with DistributedDataParallel and FSDP2, and their checkpoints.

DDP needs nothing from this module: the wrappers unwrap ``model.module``, every rank holds the same
weights, and so every rank computes the same average without any communication.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each parameter as a DTensor. The average of
such a model is built here as a second FSDP2 module of the same structure, whose parameters are
DTensors with the same mesh and placements: each rank then averages only its local shards (the
plan updates ``DTensor._local_tensor``, so no update gathers anything) and ``ema.module`` runs
sharded for evaluation. It cannot be a ``copy.deepcopy``: FSDP2 modules refuse it.

Checkpoints: ``ema.state_dict()`` holds DTensors, which ``torch.distributed.checkpoint`` saves
sharded and loads into any world size (including a single process with plain tensors).
:func:`full_state_dict` gathers plain tensors on rank 0 for a single-process consumer, and
:func:`load_full_state_dict` puts such a state dict back into a sharded average.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

# Hook dictionaries of nn.Module, and their companions keyed by the same hook ids.
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_HOOK_COMPANIONS = {
    "_forward_pre_hooks_with_kwargs": "_forward_pre_hooks",
    "_forward_hooks_with_kwargs": "_forward_hooks",
    "_forward_hooks_always_called": "_forward_hooks",
}
_TENSOR_DICTS = ("_parameters", "_buffers", "_modules")


# Importing torch.distributed.tensor costs over a second; no DTensor or FSDP2 module can exist
# before its module was imported, so look the classes up only where they were.
def _fsdp_module_class() -> type | None:
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules was sharded with FSDP2's ``fully_shard``."""
    fsdp_module = _fsdp_module_class()
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


def reshard_(model: nn.Module) -> nn.Module:
    """Register the sharded parameters of every FSDP2 submodule again (frees gathered ones).

    FSDP2 leaves the root's parameters gathered after a forward without backward (evaluation)
    when ``reshard_after_forward`` is False, its default for the root; the module then holds
    plain tensors under the parameter names, and a later forward reuses them without gathering.
    Call this before reading or writing the sharded weights by name. No communication.
    """
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None:
        for module in model.modules():
            if isinstance(module, fsdp_module):
                module.reshard()
    return model


def _is_fsdp_hook(hook: Any) -> bool:
    """Whether a module hook was installed by FSDP itself (it must not follow into the copy)."""
    hook = getattr(hook, "hook", hook)  # torch's _WrappedHook
    hook = getattr(hook, "func", hook)  # functools.partial
    owner = getattr(hook, "__self__", None)
    modules = (getattr(hook, "__module__", None) or "", type(owner).__module__ if owner is not None else "")
    return any(name.startswith("torch.distributed.fsdp") for name in modules)


def _is_fsdp_attribute(key: str) -> bool:
    # torch's composable APIs (fully_shard, replicate) keep their state in a module's __dict__
    # under generated "__composable_api_state_key_<uuid>" keys; FSDP adds two flags for dynamo.
    flags = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
    return key.startswith("__composable_api_state_key") or key in flags


def _plain_class(module: nn.Module) -> type:
    """The user's class of an FSDP2 module (fully_shard swaps in a subclass ``FSDP<Class>``)."""
    fsdp_module = _fsdp_module_class()
    cls = type(module)
    if fsdp_module is None or not isinstance(module, fsdp_module):
        return cls
    return next(c for c in cls.__mro__ if issubclass(c, nn.Module) and not issubclass(c, fsdp_module))


def _meta_like(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        return torch.empty(tensor.shape, dtype=dtype, device="meta")
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _copy_structure(module: nn.Module, dtype: torch.dtype | None, memo: dict[int, Any]) -> nn.Module:
    """A copy of ``module`` without FSDP, every parameter and buffer on the meta device.

    Attributes are deep-copied as ``copy.deepcopy`` would; hooks that FSDP installed are dropped,
    the user's own hooks are kept (shared, as deepcopy shares plain functions). Tied parameters
    and shared submodules stay tied and shared (``memo``).
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = _plain_class(module)
    clone = cls.__new__(cls)
    memo[id(module)] = clone
    skipped = set(_TENSOR_DICTS) | set(_HOOK_DICTS) | set(_HOOK_COMPANIONS)
    for key, value in module.__dict__.items():
        if key not in skipped and not _is_fsdp_attribute(key):
            clone.__dict__[key] = copy.deepcopy(value, memo)
    for key in _HOOK_DICTS:
        if key in module.__dict__:
            clone.__dict__[key] = type(module.__dict__[key])(
                (hook_id, hook) for hook_id, hook in module.__dict__[key].items() if not _is_fsdp_hook(hook)
            )
    for key, owner in _HOOK_COMPANIONS.items():
        if key in module.__dict__:
            kept = clone.__dict__.get(owner, {})
            clone.__dict__[key] = type(module.__dict__[key])(
                (hook_id, value) for hook_id, value in module.__dict__[key].items() if hook_id in kept
            )

    def meta(tensor: torch.Tensor | None, parameter: bool) -> torch.Tensor | None:
        if tensor is None:
            return None
        if id(tensor) not in memo:
            placeholder = _meta_like(tensor, dtype)
            if parameter:
                placeholder = nn.Parameter(placeholder, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = placeholder
        return memo[id(tensor)]

    # Through __dict__: nn.Module.__setattr__ would look for these very dictionaries.
    clone.__dict__["_parameters"] = {name: meta(p, True) for name, p in module._parameters.items()}
    clone.__dict__["_buffers"] = {name: meta(b, False) for name, b in module._buffers.items()}
    clone.__dict__["_modules"] = {
        name: None if child is None else _copy_structure(child, dtype, memo)
        for name, child in module._modules.items()
    }
    return clone


def _fsdp_arguments(module: nn.Module, placements: dict[int, Any]) -> dict[str, Any]:
    """The fully_shard arguments that reproduce ``module``'s sharding, from its DTensor parameters."""
    from torch.distributed.tensor import Replicate, Shard

    meshes: list[Any] = []
    for parameter in module.parameters():
        if is_dtensor(parameter) and not any(parameter.device_mesh == mesh for mesh in meshes):
            meshes.append(parameter.device_mesh)  # fully_shard may make equal meshes per call
    if len(meshes) != 1:
        raise NotImplementedError(
            f"{type(module).__name__} has parameters on {len(meshes)} device meshes; fused_ema builds "
            "sharded averages for FSDP2 models whose parameters share one mesh (FSDP or HSDP)"
        )
    mesh = meshes[0]
    for parameter in module.parameters():
        if not is_dtensor(parameter):
            continue
        *replicated, sharded = parameter.placements
        if type(sharded) is not Shard or not all(isinstance(p, Replicate) for p in replicated):
            raise NotImplementedError(
                f"a parameter has placements {parameter.placements}; fused_ema builds sharded "
                "averages for FSDP2 (Shard) and HSDP (Replicate, Shard) parameters, not for tensor "
                "parallelism combined with FSDP: average such a model with AveragedModel/EMA on "
                "a module whose parameters are plain tensors, or open an issue"
            )
    state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
    arguments: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": True}
    mp_policy = getattr(state, "_mp_policy", None)
    if mp_policy is not None:
        arguments["mp_policy"] = mp_policy
    arguments["shard_placement_fn"] = lambda parameter: placements.get(id(parameter))
    return arguments


def _shard_device(model: nn.Module) -> torch.device:
    """The device of the local shards of ``model``'s DTensor parameters."""
    devices = {p._local_tensor.device for p in model.parameters() if is_dtensor(p)}
    if len(devices) != 1:
        raise NotImplementedError(
            f"the model's local shards are on {len(devices)} devices ({sorted(map(str, devices))}); "
            "fused_ema builds sharded averages of models sharded on one device type"
        )
    return devices.pop()


@torch.no_grad()
def clone_sharded(
    model: nn.Module, device: torch.device | str | int | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A copy of an FSDP2 model for averaging: same structure, same mesh and placements, copied values.

    Each FSDP2 submodule of ``model`` is sharded again in the copy with ``fully_shard`` on the same
    mesh, with each parameter's shard dimension and the same mixed-precision policy, and
    ``reshard_after_forward=True`` (an average is evaluated, not trained, so nothing is gained by
    keeping it gathered, and a gathered copy would hide later updates from the next forward).
    Parameters FSDP does not manage (``ignored_params``) stay plain tensors in the copy too.
    Everything is made on the meta device first and then allocated shard by shard, so no rank
    ever holds a full copy; each rank then copies its own local shards. No communication.
    Floating tensors are cast to ``dtype`` if given.

    Example::

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        average = clone_sharded(model)          # what EMA(model) does for FSDP2 models
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    reshard_(model)
    local_device = _shard_device(model)
    if any(is_dtensor(p) and p.device_mesh.device_type != local_device.type for p in model.parameters()):
        raise NotImplementedError(
            "the model's shards are offloaded to the CPU (CPUOffloadPolicy); fused_ema keeps a "
            "sharded average on the device of the model's shards: shard the model without offloading"
        )
    if device is not None and torch.device(device).type != local_device.type:
        raise ValueError(
            f"device={device!r}: the average of an FSDP2 model lives where the model's shards live "
            f"({local_device}), so that each rank updates its own shards in place; leave device=None"
        )
    memo: dict[int, Any] = {}
    clone = _copy_structure(model, dtype, memo)
    placements = {id(memo[id(p)]): p.placements[-1] for p in model.parameters() if is_dtensor(p)}
    ignored = {memo[id(p)] for p in model.parameters() if not is_dtensor(p)}
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in reversed(fsdp_modules):  # bottom-up, as fully_shard must be applied
        fully_shard(memo[id(module)], ignored_params=ignored or None, **_fsdp_arguments(module, placements))
    live = dict(model.named_parameters())
    for name, parameter in clone.named_parameters():
        if is_dtensor(parameter) != is_dtensor(live[name]):
            raise NotImplementedError(
                f"parameter {name!r} is a DTensor outside every FSDP2 module (tensor parallelism "
                "without FSDP?); fused_ema builds sharded averages of FSDP2 and HSDP models"
            )
    clone.to_empty(device=local_device)
    _copy_local_(clone, model)
    return clone


def mesh_of(module: nn.Module) -> Any | None:
    """The device mesh of ``module``'s first DTensor parameter; None for an unsharded module."""
    return next((p.device_mesh for p in module.parameters() if is_dtensor(p)), None)


def finite_on_every_rank(finite: torch.Tensor | bool, mesh: Any | None) -> torch.Tensor | bool:
    """Whether the model is finite on every rank of ``mesh``, from this rank's answer.

    Under FSDP2 a rank sees only its own shards, so an inf in one rank's shard would make that
    rank alone skip an update (``EMA(skip_nonfinite=True)``) and the shards of the average would
    drift apart. One all-reduce of one element per mesh dimension makes every rank decide alike.
    ``mesh`` None (DDP, one process) returns ``finite`` unchanged: those ranks see the same weights.
    """
    if mesh is None:
        return finite
    import torch.distributed as dist

    # A bool comes from CPU shards (gloo); accelerator shards give a device tensor (nccl): no sync here.
    flag = torch.as_tensor(finite).to(torch.int32).reshape(1)
    for dimension in range(mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(dimension))
    return bool(flag) if isinstance(finite, bool) else flag.bool().squeeze(0)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _copy_local_(targets: nn.Module, sources: nn.Module) -> None:
    """Copy every parameter and buffer of ``sources`` into ``targets`` by name, shard by shard."""
    from fused_ema.plan import local_tensor

    target_tensors, source_tensors = _named_tensors(targets), _named_tensors(sources)
    for name, target in target_tensors.items():
        local_tensor(target).copy_(local_tensor(source_tensors[name]))


def check_same_sharding(name: str, average: torch.Tensor, model: torch.Tensor) -> None:
    """ValueError unless both tensors are plain, or DTensors with equal mesh and placements."""
    if not is_dtensor(average) and not is_dtensor(model):
        return
    if is_dtensor(average) != is_dtensor(model):
        sharded = "the model's" if is_dtensor(model) else "the average's"
        raise ValueError(
            f"{name!r} is a DTensor only in {sharded} copy: an average of an FSDP2 model must be "
            "built from the sharded model (EMA(model) after fully_shard), not before sharding"
        )
    if average.device_mesh != model.device_mesh or tuple(average.placements) != tuple(model.placements):
        raise ValueError(
            f"{name!r} is sharded as {tuple(average.placements)} on {average.device_mesh} in the average "
            f"but {tuple(model.placements)} on {model.device_mesh} in the model: build the average "
            "from the model as it is sharded now"
        )


def full_state_dict(module: nn.Module, *, rank0_only: bool = True, cpu: bool = True) -> dict[str, Any]:
    """``module.state_dict()`` with every DTensor gathered into a plain tensor, for one process.

    Collective: every rank must call it. With ``rank0_only`` the other ranks get ``{}`` (and free
    each gathered tensor at once). As in ``state_dict()``, plain tensors already on the CPU are
    the module's own, not copies. Non-tensor entries (``_extra_state``) are passed through, so
    ``EMA(plain_model).load_state_dict(result)`` restores the exact average in a single process.

    Example::

        state = full_state_dict(ema)            # on every rank
        if dist.get_rank() == 0:
            torch.save(state, "ema.pt")
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    keep = not rank0_only or rank == 0
    gathered: dict[str, Any] = {}
    for key, value in module.state_dict().items():
        if is_dtensor(value):
            value = value.full_tensor()  # the collective: same order on every rank (state_dict order)
        if not keep:
            continue
        if cpu and isinstance(value, torch.Tensor):
            value = value.detach().cpu()
        gathered[key] = value
    return gathered


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state_dict: dict[str, Any] | None, *, src: int = 0) -> None:
    """Load a full (plain-tensor) state dict, present on rank ``src`` only, into a sharded module.

    Collective: every rank must call it; ranks other than ``src`` pass ``None``. Rank ``src``
    broadcasts the non-tensor entries (``_extra_state``) and checks the keys, then scatters each
    DTensor so that every rank receives only its shard (plain tensors are broadcast whole), and
    every rank loads the result with ``module.load_state_dict``. Works for plain modules too,
    e.g. the average of a DDP model, restored on every rank from rank 0's file.

    Example::

        state = torch.load("ema.pt") if dist.get_rank() == 0 else None
        load_full_state_dict(ema, state)        # on every rank
    """
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    rank = dist.get_rank()
    own = module.state_dict()
    payload = [None]
    if rank == src:
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        payload = [{"missing": missing, "unexpected": unexpected,
                    "objects": {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}}]
    dist.broadcast_object_list(payload, src=src)
    header = payload[0]
    if header["missing"] or header["unexpected"]:
        raise RuntimeError(
            f"the state dict does not fit this module: missing keys {header['missing'][:5]}, "
            f"unexpected keys {header['unexpected'][:5]}"
        )
    loaded: dict[str, Any] = dict(header["objects"])
    for key, target in own.items():
        if not isinstance(target, torch.Tensor):
            continue
        local = target._local_tensor if is_dtensor(target) else target
        full = (
            state_dict[key].to(local.device, local.dtype)
            if rank == src
            else torch.empty(target.shape, dtype=local.dtype, device=local.device)
        )
        if is_dtensor(target):
            # distribute_tensor scatters from src_data_rank: each rank receives only its shard.
            loaded[key] = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=src)
        else:
            dist.broadcast(full, src=src)
            loaded[key] = full
    module.load_state_dict(loaded)
