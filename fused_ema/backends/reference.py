"""The oracle: one pair at a time with plain torch ops. Every other backend is tested against it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fused_ema.backends import offload
from fused_ema.backends.base import Backend, Group
from fused_ema.rounding import memory_order_index, stochastic_round_to_bfloat16


def compute_dtype(average_dtype: torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """float64 when either side is float64, else float32: ATen's opmath type for lerp."""
    if average_dtype.is_complex or model_dtype.is_complex:
        return torch.promote_types(average_dtype, model_dtype)
    return torch.float64 if torch.float64 in (average_dtype, model_dtype) else torch.float32


@torch.no_grad()
def lerp_pair_(
    average: torch.Tensor,
    model: torch.Tensor,
    weight: float,
    rounding_key: int | None = None,
    tensor_index: int = 0,
) -> None:
    """``average <- lerp(average, model, weight)``, computed wide and rounded once on store."""
    model = offload.to_device(model, average.device)
    stochastic = rounding_key is not None and average.dtype == torch.bfloat16
    if average.dtype == model.dtype and not stochastic:
        average.lerp_(model, weight)  # ATen already upcasts half types and rounds once
        return
    dtype = compute_dtype(average.dtype, model.dtype)
    result = average.to(dtype).lerp_(model.to(dtype), weight)
    if stochastic:
        result = stochastic_round_to_bfloat16(
            result.float(), rounding_key, tensor_index, memory_order_index(average)
        )
    average.copy_(result)


class ReferenceBackend(Backend):
    name = "reference"

    def lerp_(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        for set_index, (averages, weight) in enumerate(zip(group.averages, weights)):
            key = None if rounding_keys is None else rounding_keys[set_index]
            for average, model, tensor_index in zip(averages, group.models, group.tensor_indices):
                lerp_pair_(average, model, weight, key, tensor_index)


BACKEND = ReferenceBackend()
