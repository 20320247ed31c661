"""The "triton" backend: one Triton kernel launch per group walks the group's chunk table.

The kernel and its launcher sit side by side (Liger-Kernel layout). Each program updates one chunk
of one tensor: it loads the model chunk once, then for every average set loads the average,
computes ATen's lerp in float32 (float64 when either side is float64), and stores it rounded once,
to nearest or, for bfloat16 averages with rounding keys, stochastically with exactly the bits of
:mod:`fused_ema.rounding`.

Eager updates launch the kernel directly from the cached table (no tensor lists cross into C++).
Under ``torch.compile`` the update goes through the custom op ``fused_ema::triton_multi_lerp_``,
which declares the averages it mutates and has a fake, so a compiled training step keeps one graph.

``TRITON_INTERPRET=1`` (set before this module is imported) runs the kernel on CPU tensors with
Triton's interpreter; only then does this backend accept CPU tensors, and "auto" never picks it there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from fused_ema.backends import capture, chunk_table
from fused_ema.backends.base import FusedBackend, Group

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the registry reports this message as the reason, with the fix
    raise ImportError(
        f"triton is not installed ({error}); pip install 'fused_ema[triton]' or use backend='foreach'"
    ) from error

# Triton interprets a kernel iff TRITON_INTERPRET was set when the kernel was *defined* (below), so
# this module decides once, at import, with Triton's own parsing of the variable.
INTERPRET = (
    bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1"
)

_TORCH_TO_TRITON = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


@triton.jit
def _fmix32(value):
    # MurmurHash3's finaliser in uint32 arithmetic (products wrap modulo 2**32, shifts are logical).
    value = value ^ (value >> 16)
    value = value * 0x85EBCA6B
    value = value ^ (value >> 13)
    value = value * 0xC2B2AE35
    return value ^ (value >> 16)


@triton.jit
def _load(pointers, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(pointers, mask=mask)
    return tl.load(pointers)


@triton.jit
def _lerp_chunk(
    model_base_ptr, average_base_ptr, row, step_args_ptr, offsets, mask,
    AVERAGE_DTYPE: tl.constexpr, MODEL_DTYPE: tl.constexpr, WIDE: tl.constexpr, SETS: tl.constexpr,
    STOCHASTIC: tl.constexpr, MODEL_ALIGNMENT: tl.constexpr, AVERAGE_ALIGNMENT: tl.constexpr,
    MASKED: tl.constexpr,
):
    # With the base pointer's alignment (Triton specialises pointer arguments on it) the
    # offset hints let the compiler emit 16-byte vector loads.
    model_offset = tl.multiple_of(tl.load(row), MODEL_ALIGNMENT)
    model = _load(model_base_ptr + model_offset + offsets, mask, MASKED)
    if MODEL_DTYPE != tl.float64:
        model = model.to(tl.float32)  # half types widen through float32, as in ATen
    if WIDE:
        model = model.to(tl.float64)

    if STOCHASTIC:
        tensor_index = tl.load(row + SETS + 2).to(tl.uint32)
        element_hash = offsets.to(tl.uint32) * 0x85EBCA77

    for k in tl.static_range(SETS):
        average_offset = tl.multiple_of(tl.load(row + 1 + k), AVERAGE_ALIGNMENT)
        average_ptr = average_base_ptr + average_offset + offsets
        weight = tl.load(step_args_ptr + k).to(tl.float64, bitcast=True)
        average = _load(average_ptr, mask, MASKED)
        if WIDE:
            if AVERAGE_DTYPE != tl.float64:
                average = average.to(tl.float32)
            average = average.to(tl.float64)
        else:
            average = average.to(tl.float32)
            weight = weight.to(tl.float32)  # ATen's opmath weight: the double rounded once
        # ATen's lerp, fused as ATen's CPU kernel does (and nvcc contracts ATen's CUDA one):
        # weight 1 gives exactly the model.
        small = weight < 0.5
        coefficient = tl.where(small, weight, weight - 1.0)
        base = tl.where(small, average, model)
        result = tl.fma(coefficient, model - average, base)
        if WIDE and AVERAGE_DTYPE != tl.float64:
            result = result.to(tl.float32)  # torch narrows float64 to half types through float32
        if AVERAGE_DTYPE == tl.bfloat16:
            # Round on the float32 bits, then narrow exactly: one integer recipe for both modes,
            # independent of how a Triton build rounds its casts (the interpreter truncates).
            bits = result.to(tl.uint32, bitcast=True)
            if STOCHASTIC:
                key = tl.load(step_args_ptr + SETS + k).to(tl.uint32)
                stream = _fmix32(key ^ (tensor_index * 0x9E3779B9))
                increment = _fmix32(stream ^ element_hash) >> 16
            else:
                increment = 0x7FFF + ((bits >> 16) & 1)  # to nearest, ties to even
            rounded = ((bits + increment) & 0xFFFF0000).to(tl.float32, bitcast=True)
            finite = (bits & 0x7F800000) != 0x7F800000
            result = tl.where(finite, rounded, result)
        if MASKED:
            tl.store(average_ptr, result.to(AVERAGE_DTYPE), mask=mask)
        else:
            tl.store(average_ptr, result.to(AVERAGE_DTYPE))


@triton.jit
def _multi_lerp_kernel(
    model_base_ptr,  # the first model tensor: table offsets count elements from here
    average_base_ptr,  # the first average tensor
    tensors_ptr,  # int64 [N, SETS + 3]: model_offset, average_offset[SETS], numel, tensor_index
    chunks_ptr,  # int64 [C, 2]: slot, start
    step_args_ptr,  # int64 [2 * SETS]: float64 bits of the weights, then the rounding keys
    AVERAGE_DTYPE: tl.constexpr,
    MODEL_DTYPE: tl.constexpr,
    WIDE: tl.constexpr,  # compute in float64 (either side is float64), else float32
    SETS: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    MODEL_ALIGNMENT: tl.constexpr,  # elements every model offset is a multiple of (VECTOR_BYTES, or 1)
    AVERAGE_ALIGNMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    slot = tl.load(chunks_ptr + chunk * 2)
    start = tl.multiple_of(tl.load(chunks_ptr + chunk * 2 + 1), BLOCK)  # chunks start at multiples of BLOCK
    row = tensors_ptr + slot * (SETS + 3)
    numel = tl.load(row + SETS + 1)
    offsets = start + tl.arange(0, BLOCK)
    # Full chunks go unmasked: a mask of unknown alignment would forbid vector loads.
    if start + BLOCK <= numel:
        _lerp_chunk(model_base_ptr, average_base_ptr, row, step_args_ptr, offsets, None,
                    AVERAGE_DTYPE, MODEL_DTYPE, WIDE, SETS, STOCHASTIC, MODEL_ALIGNMENT, AVERAGE_ALIGNMENT,
                    MASKED=False)
    else:
        _lerp_chunk(model_base_ptr, average_base_ptr, row, step_args_ptr, offsets, offsets < numel,
                    AVERAGE_DTYPE, MODEL_DTYPE, WIDE, SETS, STOCHASTIC, MODEL_ALIGNMENT, AVERAGE_ALIGNMENT,
                    MASKED=True)


def _on_device(device: torch.device):
    """Make ``device`` current: Triton launches on the current device's current stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_(table: chunk_table.DeviceTables, model_base: torch.Tensor, average_base: torch.Tensor,
            average_dtype: torch.dtype, model_dtype: torch.dtype,
            weights: Sequence[float] | torch.Tensor, rounding_keys: Sequence[int] | None) -> None:
    """Run the kernel over ``table`` with this update's weights: one launch, no sync.

    ``model_base`` and ``average_base`` are the tensors the table's offsets count from.
    ``weights`` are floats, or a 1-d device tensor (capturable updates: no host-to-device copy).
    """
    with _on_device(table.device):
        step_args = capture.step_args(weights) if isinstance(weights, torch.Tensor) else table.step_args(weights, rounding_keys)
        if table.chunk_count == 0:
            return
        table.on_current_stream()
        stochastic = rounding_keys is not None and average_dtype == torch.bfloat16
        _multi_lerp_kernel[(table.chunk_count,)](
            model_base,
            average_base,
            table.tensors,
            table.chunks,
            step_args,
            AVERAGE_DTYPE=_TORCH_TO_TRITON[average_dtype],
            MODEL_DTYPE=_TORCH_TO_TRITON[model_dtype],
            WIDE=torch.float64 in (average_dtype, model_dtype),
            SETS=table.sets,
            STOCHASTIC=stochastic,
            # table.aligned: every pointer is a multiple of VECTOR_BYTES (the builder checked).
            MODEL_ALIGNMENT=chunk_table.VECTOR_BYTES // model_dtype.itemsize if table.aligned else 1,
            AVERAGE_ALIGNMENT=chunk_table.VECTOR_BYTES // average_dtype.itemsize if table.aligned else 1,
            BLOCK=table.chunk_elements,
            # The one fma is explicit; no other contraction, so results do not depend on Triton's default.
            enable_fp_fusion=False,
        )


def _run_group_table(group: Group, weights, rounding_keys) -> None:
    table = chunk_table.table(group)
    launch_(table, table.model_base, table.average_base, group.average_dtype, group.model_dtype, weights,
            rounding_keys)


# The op path's tables, keyed on everything a table encodes or depends on (addresses, dtypes, shapes,
# strides, indices, chunk size). Values hold only the small device tables, never the tensors: a
# cached entry cannot keep a model alive, and reusing one for other tensors with the same key is
# correct by construction (the table is a function of the key).
_op_tables: dict[tuple, chunk_table.DeviceTables] = {}
_OP_TABLE_LIMIT = 8


def _describe(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()


def _op_table(average_sets, models, tensor_indices) -> chunk_table.DeviceTables:
    key = (tuple(map(_describe, models)), tuple(_describe(t) for averages in average_sets for t in averages),
           tuple(tensor_indices), chunk_table.CHUNK_ELEMENTS)
    table = _op_tables.get(key)
    if table is None:
        if len(_op_tables) >= _OP_TABLE_LIMIT:
            _op_tables.pop(next(iter(_op_tables)))
        table = _op_tables[key] = chunk_table.DeviceTables(average_sets, models, tensor_indices)
    return table


def _multi_lerp_impl(averages: list[torch.Tensor], models: list[torch.Tensor], weights: list[float],
                     tensor_indices: list[int], rounding_keys: list[int] | None) -> None:
    if not models:
        return
    sets = len(weights)
    if len(averages) != sets * len(models) or len(tensor_indices) != len(models):
        raise ValueError(
            f"got {len(averages)} averages and {len(tensor_indices)} tensor_indices for {len(models)} models "
            f"and {sets} weights; pass len(weights) * len(models) averages, set-major"
        )
    average_dtype, model_dtype = averages[0].dtype, models[0].dtype
    if any(t.dtype != average_dtype for t in averages) or any(t.dtype != model_dtype for t in models):
        raise ValueError("the triton op updates one (average dtype, model dtype) pair per call; group the "
                         "tensors by dtype (fused_ema.plan.Plan does) or use fused_ema.multi_lerp_")
    average_sets = [averages[k * len(models):(k + 1) * len(models)] for k in range(sets)]
    table = _op_table(average_sets, models, tensor_indices)
    launch_(table, models[0], average_sets[0][0], average_dtype, model_dtype, weights, rounding_keys)


# The interpreted copy of this module (tests) registers its own name, so both can coexist.
_OP_NAME = "fused_ema::triton_interpret_multi_lerp_" if INTERPRET else "fused_ema::triton_multi_lerp_"
# Averages are set-major: averages[k * len(models) + i] is pair i of set k (the C++ op's layout).
# An opaque custom op rather than triton_op: its body reads data pointers, which tracing cannot.
# cudagraph_unsafe: the op copies its tables and weights from host memory, which a graph would freeze.
multi_lerp_op = torch.library.custom_op(_OP_NAME, mutates_args=("averages",),
                                        tags=(torch.Tag.cudagraph_unsafe,))(_multi_lerp_impl)


@multi_lerp_op.register_fake
def _(averages, models, weights, tensor_indices, rounding_keys) -> None:
    return None


def _reason() -> str | None:
    if not INTERPRET and not torch.cuda.is_available():
        return (
            "no CUDA device is visible to torch (it needs an NVIDIA GPU and a CUDA build of torch); "
            "use backend='foreach' or 'cpu', or set TRITON_INTERPRET=1 to run it slowly on CPU tensors"
        )
    return chunk_table.unavailable_reason()


class TritonBackend(FusedBackend):
    name = "triton"
    # Only the interpreter runs on CPU tensors; "auto" never tries triton on CPU (see AUTO_ORDER).
    device_types = ("cuda", "cpu") if INTERPRET else ("cuda",)
    takes_device_weights = True

    def unavailable_reason(self) -> str | None:
        return _reason()

    def table_is_stale(self, group: Group) -> bool:
        return chunk_table.is_stale(group)

    def run_table(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        _run_group_table(group, weights, rounding_keys)

    def run_table_device(self, group: Group, weights: torch.Tensor) -> None:
        """A capturable update: ``weights`` is a 1-d tensor on the group's device (see capture.py)."""
        _run_group_table(group, weights, None)

    def list_op(self, averages, models, weights, tensor_indices, rounding_keys) -> None:
        multi_lerp_op(averages, models, weights, tensor_indices, rounding_keys)


BACKEND = TritonBackend()
