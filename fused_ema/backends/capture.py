"""CUDA-graph capture: refuse an ordinary update during capture, and run a capturable one.

An ordinary update takes its weight as a Python float (computed on the host from the update
count). A CUDA graph captures that value, and the host-to-device copies of the tables, as
constants: every replay would repeat the captured weight and write through the pointers of the
captured tables. :func:`check_not_capturing` turns that into a clear error.

A capturable update (``EMA(..., capturable=True)``, ``AveragedModel(..., capturable=True)``) keeps
the update count in a device tensor and computes the weights there with torch ops
(:meth:`fused_ema.rules.Rule.weight_tensor`), so a replay reads the current count, computes the
right weight and advances the count. :func:`lerp_` runs such an update: the "triton" and "cuda"
backends read the weights from a device buffer written by a device-side copy; every other
backend's group goes through ``torch._foreach_lerp_`` with 0-d tensor weights.
"""

from __future__ import annotations

import torch

from fused_ema.backends.offload import to_device


def is_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False, cheaply, when CUDA is unused)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def check_not_capturing(what: str = "this update") -> None:
    """RuntimeError when called during CUDA-graph capture: a float weight would be frozen in the graph."""
    if is_capturing():
        raise RuntimeError(
            f"fused_ema: {what} runs during CUDA-graph capture, which would freeze its weight and tables "
            "in the graph (every replay would repeat them); construct the EMA or AveragedModel with "
            "capturable=True, or update outside the captured region"
        )


def step_args(weights: torch.Tensor) -> torch.Tensor:
    """The fused kernels' ``step_args`` (float64 bits of each weight, then zero rounding keys), on device.

    A fresh buffer each update from the caching allocator: no buffer is rewritten under a kernel
    that may still read it on another stream.
    """
    bits = weights.to(torch.float64).view(torch.int64)
    return torch.cat([bits, torch.zeros_like(bits)])


@torch.no_grad()
def lerp_(plan, weights: torch.Tensor) -> None:
    """``average_k <- lerp(average_k, model, weights[k])`` for every pair of ``plan``; weights on device.

    No host reads and no host-to-device copies: the whole update can be captured in a CUDA graph
    (after one warm-up update outside capture has built the tables).
    """
    if weights.dim() != 1 or weights.numel() != len(plan.average_sets):
        raise ValueError(f"expected a 1-d tensor of {len(plan.average_sets)} weights, got shape {tuple(weights.shape)}")
    for group in plan.groups:
        if group.backend.is_stale(group):
            if is_capturing():
                raise RuntimeError("fused_ema: a tensor changed dtype, device or layout during CUDA-graph capture; "
                                   "warm up (one update) after the change and capture again")
            plan._build()
            return lerp_(plan, weights)
    for group in plan.groups:
        group_weights = to_device(weights, group.device)
        if group.backend.takes_device_weights and group.fusable:
            group.backend.run_table_device(group, group_weights)
        else:
            _foreach_lerp_(group, group_weights)
    plan.copy_()


def _foreach_lerp_(group, weights: torch.Tensor) -> None:
    from fused_ema.backends.reference import compute_dtype

    dtype = compute_dtype(group.average_dtype, group.model_dtype)
    models = group.models
    if group.model_device != group.device:
        models = [to_device(model, group.device) for model in models]
    if group.model_dtype != dtype:
        models = [model.to(dtype) for model in models]
    for set_index, averages in enumerate(group.averages):
        weight = weights[set_index].to(dtype)  # ATen's opmath weight: the double rounded once
        wide = averages if group.average_dtype == dtype else [average.to(dtype) for average in averages]
        torch._foreach_lerp_(wide, models, [weight] * len(models))
        if wide is not averages:
            torch._foreach_copy_(averages, wide)
