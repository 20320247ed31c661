"""torch._foreach_lerp_ per group, the way torch.optim's foreach path works."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from fused_ema.backends import offload
from fused_ema.backends.base import Backend, Group
from fused_ema.backends.reference import ReferenceBackend, compute_dtype

# Mixed-dtype groups are upcast this many elements at a time, so the temporaries stay small.
UPCAST_BATCH_ELEMENTS = 1 << 22


def _batches(tensors: Sequence[torch.Tensor]) -> list[slice]:
    batches, start, size = [], 0, 0
    for index, tensor in enumerate(tensors):
        size += tensor.numel()
        if size >= UPCAST_BATCH_ELEMENTS:
            batches.append(slice(start, index + 1))
            start, size = index + 1, 0
    if start < len(tensors):
        batches.append(slice(start, len(tensors)))
    return batches


class ForeachBackend(Backend):
    name = "foreach"
    _warned_rounding = False

    def lerp_(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        if rounding_keys is not None and group.average_dtype == torch.bfloat16:
            self._warn_rounding_once()
            ReferenceBackend().lerp_(group, weights, rounding_keys)
            return
        if offload.needs_staging(group.model_device, group.device):
            # A GPU model into a CPU average: each batch arrives in pinned host memory and is
            # averaged while the next one is still copying.
            for batch, models in offload.staged(group, _batches):
                self._lerp_batch(group, batch, models, weights)
            return
        models = group.models
        if group.model_device != group.device:  # to a GPU: the stream orders the copy before the lerp
            models = [offload.to_device(model, group.device) for model in models]
        if group.average_dtype == group.model_dtype:
            for averages, weight in zip(group.averages, weights):
                torch._foreach_lerp_(averages, models, weight)
            return
        for batch in group.cache.setdefault("upcast_batches", _batches(models)):
            self._lerp_batch(group, batch, models[batch], weights)

    @staticmethod
    def _lerp_batch(group, batch: slice, models: list[torch.Tensor], weights: Sequence[float]) -> None:
        """``group.averages[k][batch]`` towards ``models`` (already on the averages' device)."""
        dtype = compute_dtype(group.average_dtype, group.model_dtype)
        for averages, weight in zip(group.averages, weights):
            if group.average_dtype == group.model_dtype:
                torch._foreach_lerp_(averages[batch], models, weight)
                continue
            wide_averages = [a.to(dtype) for a in averages[batch]]
            torch._foreach_lerp_(wide_averages, [m.to(dtype) for m in models], weight)
            if group.average_dtype != dtype:
                torch._foreach_copy_(averages[batch], wide_averages)

    def _warn_rounding_once(self) -> None:
        if not ForeachBackend._warned_rounding:
            ForeachBackend._warned_rounding = True
            warnings.warn(
                "backend 'foreach' has no stochastic rounding: bfloat16 averages are rounded with "
                "the reference path (same result, slower); use backend 'cpu', 'triton' or 'cuda'",
                stacklevel=5,
            )


BACKEND = ForeachBackend()
