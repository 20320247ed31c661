"""The tensor tables of one update: (average, model) pairs grouped so each group is one fused call.

A plan is built once per averaged model and reused for every update. It knows how tensors are
grouped and nothing of the math: the weight arrives from the caller, the kernels from the backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from fused_ema import backends
from fused_ema.backends import capture, offload
from fused_ema.backends.base import KERNEL_DTYPES, FusedBackend, Group, StalePlanError, is_dense
from fused_ema.rules import check_unit

__all__ = ["Group", "Plan", "StalePlanError", "check_pairs", "check_weights", "is_dense", "local_tensor",
           "traced_lerp_", "without_grad"]


Function = TypeVar("Function", bound=Callable)


def without_grad(function: Function) -> Function:
    """``torch.no_grad()`` as a decorator, free when grad mode is already off.

    An update nests three such calls (the wrapper's update, ``Plan.lerp_``, ``Plan.copy_``);
    ``torch.no_grad()`` costs microseconds at each, a fifth of a small model's whole update.
    """

    @functools.wraps(function)
    def call(*args, **kwargs):
        if not torch.is_grad_enabled():
            return function(*args, **kwargs)
        with torch.no_grad():
            return function(*args, **kwargs)

    return call  # type: ignore[return-value]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind a parameter: the local shard of a DTensor, else the tensor itself.

    Not a ``detach()``ed view: ``param.data = t`` swaps the storage of the parameter object, and
    only a handle on that object sees the swap.
    """
    local = getattr(tensor, "_local_tensor", None)  # DTensor keeps its shard here; no collective
    return local if local is not None else tensor


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')} on {tensor.device}"


def check_pairs(average_sets: Sequence[Sequence[torch.Tensor]], models: Sequence[torch.Tensor]) -> None:
    """Raise ValueError/TypeError naming the first pair that cannot be averaged."""
    for set_index, averages in enumerate(average_sets):
        name = "averages" if len(average_sets) == 1 else f"averages[{set_index}]"
        if len(averages) != len(models):
            raise ValueError(
                f"{name} has {len(averages)} tensors but models has {len(models)}: "
                "pass one average tensor per model tensor, in the same order"
            )
        for index, (average, model) in enumerate(zip(averages, models)):
            if not isinstance(average, torch.Tensor) or not isinstance(model, torch.Tensor):
                raise TypeError(f"{name}[{index}] and models[{index}] must be tensors")
            if average.shape != model.shape:
                raise ValueError(
                    f"{name}[{index}] is {_describe(average)} but models[{index}] is {_describe(model)}: "
                    "shapes must match"
                )
            if model.is_complex() != average.is_complex():
                raise TypeError(
                    f"{name}[{index}] is {_describe(average)} but models[{index}] is {_describe(model)}: "
                    "a complex tensor needs a complex average, a real one a real average"
                )
            if model.is_floating_point() and not average.is_floating_point():
                raise TypeError(
                    f"{name}[{index}] is {_describe(average)}: an average of a floating-point tensor "
                    "must be floating-point (float32, float64, float16 or bfloat16)"
                )
            if not model.is_floating_point() and average.is_floating_point():
                raise TypeError(
                    f"models[{index}] is {_describe(model)}: a floating-point average needs a "
                    "floating-point model tensor"
                )
            if set_index and average.dtype != average_sets[0][index].dtype:
                raise TypeError(
                    f"{name}[{index}] is {average.dtype} but averages[0][{index}] is "
                    f"{average_sets[0][index].dtype}: every average set must share dtypes"
                )


def is_rounded_stochastically(average_dtype: torch.dtype, model_dtype: torch.dtype,
                              rounding_keys: Sequence[int] | None) -> bool:
    """Whether a pair's result is rounded stochastically, not to nearest (bfloat16 from a wider model)."""
    return rounding_keys is not None and average_dtype == torch.bfloat16 and model_dtype != torch.bfloat16


def check_weights(weights: Sequence[float]) -> list[float]:
    """Each weight as a float in [0, 1] (``rules.check_unit``: one validator for every number)."""
    return [check_unit("weight", weight) for weight in weights]


class Plan:
    """Groups of (average, model) pairs for one averaged model, built once and reused.

    Floating pairs are grouped by (device, average dtype, model dtype); each group is run by the
    backend that ``backend`` resolves to for it. Integer and bool pairs (BatchNorm's
    ``num_batches_tracked``) are copied, never averaged, and so is every pair in ``copies``
    (``(targets, sources)``: buffers kept in sync rather than averaged).
    """

    def __init__(
        self,
        average_sets: Sequence[Sequence[torch.Tensor]],
        models: Sequence[torch.Tensor],
        *,
        backend: str = "auto",
        copies: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] = ((), ()),
    ) -> None:
        if len(copies[0]) != len(copies[1]):
            raise ValueError(f"copies has {len(copies[0])} targets but {len(copies[1])} sources")
        self.backend = backends.check_name(backend)
        self.average_sets = [[local_tensor(t) for t in averages] for averages in average_sets]
        self.models = [local_tensor(t) for t in models]
        self.extra_copies = ([local_tensor(t) for t in copies[0]], [local_tensor(t) for t in copies[1]])
        self.builds = 0  # times the groups were built: 1, plus one per regrouping after a change
        self._build()

    def _build(self) -> None:
        check_pairs(self.average_sets, self.models)  # again on a rebuild: a shape may have changed
        self.builds += 1
        grouped: dict[tuple, Group] = {}
        copy_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for index, model in enumerate(self.models):
            averages = [average_set[index] for average_set in self.average_sets]
            if not (model.is_floating_point() or model.is_complex()):  # complex is averaged, as in torch
                copy_pairs.extend((average, model) for average in averages)
                continue
            first = averages[0]
            fusable = (
                first.device == model.device
                and is_dense(model)
                and all(a.stride() == model.stride() and is_dense(a) for a in averages)
            )
            key = (first.device, model.device, first.dtype, model.dtype, fusable)
            group = grouped.get(key)
            if group is None:
                group = grouped[key] = Group(
                    first.device, model.device, first.dtype, model.dtype,
                    [[] for _ in averages], [], [], fusable,
                )
            for average_list, average in zip(group.averages, averages):
                average_list.append(average)
            group.models.append(model)
            group.tensor_indices.append(index)
        for group in grouped.values():
            group.backend = backends.resolve(self.backend, group)
        self.groups = list(grouped.values())
        self.copy_targets = [average for average, _ in copy_pairs] + self.extra_copies[0]
        self.copy_sources = [model for _, model in copy_pairs] + self.extra_copies[1]

    @property
    def backend_names(self) -> list[str]:
        """The backend each group runs on, e.g. ``['cpu']``."""
        return [group.backend.name for group in self.groups]

    @without_grad
    def lerp_(self, weights: Sequence[float], rounding_keys: Sequence[int] | None = None) -> None:
        """``average_k += weights[k] * (model - average_k)`` for every pair, in one call per group."""
        if len(weights) != len(self.average_sets):
            raise ValueError(f"got {len(weights)} weights for {len(self.average_sets)} average sets")
        weights = check_weights(weights)
        if torch.compiler.is_compiling():
            # Tables of pointers cannot be traced: the compiled graph gets the list operator instead.
            traced_lerp_(self.average_sets, self.models, weights, self.backend, rounding_keys)
            self.copy_()
            return
        capture.check_not_capturing()
        try:
            self._run(weights, rounding_keys)
        except StalePlanError:
            # A tensor changed dtype, device or layout (model.to(...)): regroup, then run from the
            # start. Backends raise before writing anything, so no pair is updated twice.
            self._build()
            self._run(weights, rounding_keys)

    def _run(self, weights: list[float], rounding_keys: Sequence[int] | None) -> None:
        if 1.0 not in weights and len(self.groups) == 1:
            # The usual update: one group, nothing to copy first, so its backend may check and run
            # in one call.
            group = self.groups[0]
            group.backend.checked_lerp_(group, weights, rounding_keys)
            self.copy_()
            return
        # Every group is checked before any writes: a stale group must leave the others unwritten.
        if any(group.backend.is_stale(group) for group in self.groups):
            raise StalePlanError
        # Weight 1 is a copy: lerp's end - (end - average) * 0 keeps a NaN or inf of the average
        # (a fresh to_empty() average, say), where a copy gives exactly the model's values. A
        # stochastically rounded bfloat16 average of a wider model is copied first and then run
        # through the kernel, which rounds the model's value stochastically, as it always did.
        copied = [index for index, weight in enumerate(weights) if weight == 1.0]
        for group in self.groups:
            rounded = is_rounded_stochastically(group.average_dtype, group.model_dtype, rounding_keys)
            if rounded:
                for index in copied:
                    torch._foreach_copy_(group.averages[index], group.models)
            if rounded or len(copied) < len(weights):
                group.backend.lerp_(group, weights, rounding_keys)
            if not rounded:
                for index in copied:
                    torch._foreach_copy_(group.averages[index], group.models)
        self.copy_()

    @without_grad
    def copy_(self) -> None:
        """Copy the pairs that are kept in sync rather than averaged (integer and listed buffers)."""
        if self.copy_targets:
            torch._foreach_copy_(self.copy_targets, self.copy_sources)

    @torch.no_grad()
    def models_finite(self) -> torch.Tensor | bool:
        """Whether every floating model tensor is finite: a bool on the CPU, else a device tensor."""
        # Empty tensors (an FSDP2 rank's share of a short parameter) are finite, and the inf-norm
        # of an empty tensor is an error: leave them out.
        model_lists = [[m for m in group.models if m.numel()] for group in self.groups]
        model_lists.append([s for s in self.copy_sources if (s.is_floating_point() or s.is_complex()) and s.numel()])
        flags = [
            torch.stack(torch._foreach_norm(models, float("inf"))).isfinite().all()
            for models in model_lists
            if models
        ]
        if not flags:
            return True
        devices = {flag.device for flag in flags}
        if len(devices) > 1:
            flags = [offload.to_device(flag, self.groups[0].model_device) for flag in flags]
        finite = torch.stack(flags).all()
        return bool(finite) if finite.device.type == "cpu" else finite


@torch.compiler.assume_constant_result
def _compiled_backend(name: str, device_type: str) -> str:
    """The fused backend whose operator runs pairs on ``device_type`` under torch.compile, or ""."""
    name = backends.requested(name)
    for candidate in backends.AUTO_ORDER.get(device_type, ()) if name == "auto" else (name,):
        backend = backends.get(candidate)
        if (isinstance(backend, FusedBackend) and device_type in (backend.device_types or ())
                and backend.unavailable_reason() is None):
            return candidate
    return ""


def traced_lerp_(
    average_sets: Sequence[Sequence[torch.Tensor]],
    models: Sequence[torch.Tensor],
    weights: list[float],
    backend: str,
    rounding_keys: Sequence[int] | None,
) -> None:
    """The update as torch.compile sees it, for plans and the functional API alike: no table, no cache.

    Every pair a fused kernel takes goes to its backend's ``list_op`` (one ``torch.library`` operator
    node, which inductor runs in place), the rest to the reference's torch ops, which the compiler
    fuses itself; integer pairs are copied. Same results as the eager path.
    """
    from fused_ema.backends.reference import lerp_pair_

    check_pairs(average_sets, models)
    _copy_weight_one_(average_sets, models, weights, rounding_keys, rounded=True)
    fused: dict[str, list[int]] = {}
    per_pair = []
    for index, model in enumerate(models):
        averages = [average_set[index] for average_set in average_sets]
        if not (model.is_floating_point() or model.is_complex()):
            for average in averages:
                average.copy_(model)
            continue
        name = ""
        if (backend not in ("reference", "foreach")
                and all(a.device == model.device and a.dtype in KERNEL_DTYPES for a in averages)
                and model.dtype in KERNEL_DTYPES):
            name = _compiled_backend(backend, model.device.type)
        if name:
            fused.setdefault(name, []).append(index)
        else:
            per_pair.append(index)
    for name, indices in fused.items():
        backends.get(name).list_op(
            [average_set[index] for average_set in average_sets for index in indices],
            [models[index] for index in indices], list(weights), indices,
            None if rounding_keys is None else list(rounding_keys),
        )
    for index in per_pair:
        for set_index, weight in enumerate(weights):
            key = None if rounding_keys is None else rounding_keys[set_index]
            lerp_pair_(average_sets[set_index][index], models[index], weight, key, index)
    _copy_weight_one_(average_sets, models, weights, rounding_keys, rounded=False)


def _copy_weight_one_(average_sets, models, weights, rounding_keys, rounded: bool) -> None:
    """Weight 1 is a copy, as in Plan._run: before the update for stochastically rounded pairs, after for the rest."""
    for set_index, weight in enumerate(weights):
        if weight != 1.0:
            continue
        pairs = [(average, model) for average, model in zip(average_sets[set_index], models)
                 if is_rounded_stochastically(average.dtype, model.dtype, rounding_keys) == rounded]
        if pairs:
            torch._foreach_copy_([average for average, _ in pairs], [model for _, model in pairs])
