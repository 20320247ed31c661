"""Stochastic rounding of bfloat16 averages: the one definition every backend implements.

A bfloat16 average at decay 0.999 stops moving under round-to-nearest: each step's change is far
below bfloat16's spacing, so it is rounded away. Rounding up with probability equal to the
discarded fraction keeps the expected value of the average equal to the float32 update.

The random bits are counter-based, so a result depends only on (seed, step, set, tensor, element)
and never on thread count, chunking or backend. Every kernel computes, in uint32 arithmetic:

    stream = fmix32(key ^ (tensor_index * 0x9E3779B9))
    bits   = fmix32(stream ^ (element_index * 0x85EBCA77)) >> 16        # 16 random bits
    out    = bfloat16_bits((float32_bits(x) + bits) & 0xFFFF0000)        # x finite
    out    = round_to_nearest(x)                                         # x inf or nan

where ``key = rounding_key(seed, step, set_index)`` is computed once per update on the host,
``tensor_index`` is the position of the tensor in the caller's list and ``element_index`` its
offset in the tensor's memory (row-major for a contiguous tensor).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
TENSOR_MULTIPLIER = 0x9E3779B9
ELEMENT_MULTIPLIER = 0x85EBCA77


def fmix32(value: int) -> int:
    """MurmurHash3's 32-bit finaliser on a Python int: a bijection that mixes every input bit."""
    value &= MASK32
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & MASK32
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & MASK32
    value ^= value >> 16
    return value


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


def rounding_key(seed: int, step: int, set_index: int = 0) -> int:
    """The uint32 key of one update of one average set (host side, no tensors)."""
    mixed = _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ set_index)
    return (mixed ^ (mixed >> 32)) & MASK32


def _fmix32_tensor(value: torch.Tensor) -> torch.Tensor:
    # int64 holds every uint32 product's low 32 bits after masking, so this matches uint32 math.
    value = value ^ (value >> 16)
    value = (value * 0x85EBCA6B) & MASK32
    value = value ^ (value >> 13)
    value = (value * 0xC2B2AE35) & MASK32
    return value ^ (value >> 16)


def random_bits(key: int, tensor_index: int, element_index: torch.Tensor) -> torch.Tensor:
    """The 16 random bits of each element (int64 tensor of values in [0, 65536))."""
    stream = fmix32(key ^ ((tensor_index * TENSOR_MULTIPLIER) & MASK32))
    return _fmix32_tensor(stream ^ ((element_index * ELEMENT_MULTIPLIER) & MASK32)) >> 16


def memory_order_index(tensor: torch.Tensor) -> torch.Tensor:
    """Each element's offset in the tensor's memory (row-major where it is not dense)."""
    count = tensor.numel()
    index = torch.arange(count, dtype=torch.int64, device=tensor.device)
    if tensor.dim() and torch._prims_common.is_non_overlapping_and_dense_or_false(tensor):
        return index.as_strided(tensor.shape, tensor.stride())
    return index.view(tensor.shape)


def stochastic_round_to_bfloat16(
    values: torch.Tensor, key: int, tensor_index: int, element_index: torch.Tensor
) -> torch.Tensor:
    """Round float32 ``values`` to bfloat16 with the counter-based bits above (reference path)."""
    bits = values.view(torch.int32).to(torch.int64) & MASK32
    rounded = (bits + random_bits(key, tensor_index, element_index)) & 0xFFFF0000
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    result = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(torch.isfinite(values), result, values.to(torch.bfloat16))
