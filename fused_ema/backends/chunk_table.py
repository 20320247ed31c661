"""The device-resident chunk table shared by the GPU backends ("triton" and "cuda").

A group's update is one kernel launch over a table built once per group and kept on the device.
The table is built by the extension's one C++ builder (``fused_ema._C.build_chunk_table``,
csrc/chunk_table.cpp), the same code the CUDA list operator uses; this module only moves it to the
device and keeps it current:

- ``tensors``: int64 ``[N, SETS + 3]``, one row per pair: ``model_offset, average_offset[0..SETS-1],
  numel, tensor_index``. Offsets count elements from a base tensor passed at launch (``model_base``,
  ``average_base``: the first model and the first average), so a kernel computes typed pointers from
  a pointer argument whose alignment the compiler knows, and may vectorise. ``tensor_index`` seeds
  stochastic rounding.
- ``chunks``: int64 ``[C, 2]``, one row per chunk of at most ``chunk_elements`` elements: ``slot`` (row
  of ``tensors``) and ``start`` (offset of the chunk in the tensor's flat memory).
- ``step_args``: int64 ``[2 * SETS]``, a fresh device buffer each update (from the caching
  allocator, on the launching stream): the float64 bits of each set's weight, then each set's
  rounding key. The weights live in device memory so a new weight needs neither a recompilation
  nor a sync, and no buffer is ever rewritten under a kernel that may still read it.

Stream safety: the tables are built on the current stream; a launch on another stream records that
stream on them (``record_stream``), so a rebuild that drops them cannot hand their memory to a new
allocation while that stream's kernel still reads it. Building a table copies it from the host,
which a CUDA graph would freeze: it refuses to run during capture (warm up before capturing).

A storage swap (``param.data = t``, ``model.to(dtype)``) keeps the Python tensor but changes its
pointer: :meth:`ChunkTable.refresh` notices it through the C++ ``TensorWatch`` (csrc/tensor_watch.h:
metadata only, no device sync, microseconds for thousands of tensors) and rebuilds the table, or
reports the group stale when the swap also changed the dtype, device or layout (the plan then
regroups).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from fused_ema import ops
from fused_ema.backends import capture
from fused_ema.backends.base import Group, is_dense

# Defined once, in csrc/chunk_table.h, and exported by the extension; None without it (then the GPU
# backends are unavailable, see unavailable_reason, and no table is built).
CHUNK_ELEMENTS: int | None = getattr(ops._C, "CHUNK_ELEMENTS", None)
MAX_SETS: int | None = getattr(ops._C, "MAX_SETS", None)
VECTOR_BYTES: int | None = getattr(ops._C, "VECTOR_BYTES", None)


def unavailable_reason() -> str | None:
    """Why no chunk table can be built here (the C++ extension did not load), or None."""
    if ops._C is None:
        return f"its chunk table is built by the C++ extension, which did not load ({ops.UNAVAILABLE_REASON})"
    return None


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned memory makes the copy asynchronous; pageable memory would block the host.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


class DeviceTables:
    """The ``tensors`` and ``chunks`` tables of some pairs, on their device; no handle on the pairs.

    ``average_sets[k][i]`` pairs with ``models[i]``; every pair dense with matching strides, one
    device, one dtype per side (the builder raises ValueError naming the first pair that is not).
    """

    def __init__(self, average_sets: Sequence[Sequence[torch.Tensor]], models: Sequence[torch.Tensor],
                 tensor_indices: Sequence[int], chunk_elements: int | None = None) -> None:
        capture.check_not_capturing("building the chunk table (first update, or after a storage swap)")
        self.sets = len(average_sets)
        self.chunk_elements = chunk_elements or CHUNK_ELEMENTS
        self.device = models[0].device if models else torch.device("cpu")
        averages = [average for averages in average_sets for average in averages]
        tensors, chunks, self.aligned = ops._C.build_chunk_table(averages, list(models), list(tensor_indices),
                                                                 self.sets, self.chunk_elements)
        self.tensors = _to_device(tensors, self.device)
        self.chunks = _to_device(chunks, self.device)
        self.chunk_count = int(chunks.shape[0])  # host int from the host table: no sync
        self._streams = {_current_stream(self.device)}

    def on_current_stream(self) -> None:
        """Before a launch: keep the tables alive for the current stream too (see the module docstring)."""
        stream = _current_stream(self.device)
        if stream not in self._streams:
            self.tensors.record_stream(stream)
            self.chunks.record_stream(stream)
            self._streams.add(stream)

    def step_args(self, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> torch.Tensor:
        """This update's weights and keys in a fresh device buffer, copied without waiting."""
        keys = list(rounding_keys) if rounding_keys is not None else [0] * self.sets
        if len(weights) != self.sets or len(keys) != self.sets:
            raise ValueError(f"expected {self.sets} weights and rounding keys, got {len(weights)} and {len(keys)}")
        weight_bits = struct.unpack(f"<{self.sets}q", struct.pack(f"<{self.sets}d", *weights))
        # The pinned source is kept alive by the caching host allocator until the copy has run; the
        # device buffer returns to the allocator of this stream once the launch has been enqueued.
        host = torch.tensor([*weight_bits, *keys], dtype=torch.int64, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)


class ChunkTable(DeviceTables):
    """The tables of one plan group, kept current across storage swaps; see the module docstring."""

    def __init__(self, group: Group, chunk_elements: int | None = None) -> None:
        # The snapshot the table is built from: taken with it, followed on every check.
        self.watch = ops._C.TensorWatch([*group.models, *(a for averages in group.averages for a in averages)])
        self._build(group, chunk_elements)

    def _build(self, group: Group, chunk_elements: int | None) -> None:
        super().__init__(group.averages, group.models, group.tensor_indices, chunk_elements)
        # Held so the launch passes the bases the offsets were computed from (a swap rebuilds).
        self.model_base, self.average_base = group.models[0], group.averages[0][0]

    def refresh(self, group: Group):
        """The watch's ``_C.WatchState`` (as ``TensorWatch.refresh`` and ``CpuTable.refresh`` answer):
        STALE when the group no longer fits a table (the plan must regroup), MOVED after rebuilding
        the table for swapped storages, UNCHANGED otherwise.

        The common case, nothing swapped, costs one pass over the tensors' metadata in C++.
        """
        state = self.watch.refresh()
        if state == ops._C.WatchState.MOVED:  # same dtypes, devices and layouts: the table only needs new offsets
            try:
                self._build(group, self.chunk_elements)
            except ValueError:  # e.g. a swapped-in tensor at an odd address: let the plan regroup
                return ops._C.WatchState.STALE
        return state


def table(group: Group) -> ChunkTable:
    """The group's table, built on first use and cached in ``group.cache``."""
    cached = group.cache.get("chunk_table")
    if cached is None or cached.sets != len(group.averages):
        cached = group.cache["chunk_table"] = ChunkTable(group)
    return cached


def _layout_ok(group: Group) -> bool:
    """The tensors still fit the group: dtypes, devices, dense flat memory, matching strides."""
    if not group.unchanged():
        return False
    for index, model in enumerate(group.models):
        if not is_dense(model):
            return False
        for averages in group.averages:
            if averages[index].stride() != model.stride():
                return False
    return True


def is_stale(group: Group) -> bool:
    """The fused backends' ``table_is_stale``: refresh the table after a storage swap, True if regrouping is needed."""
    cached = group.cache.get("chunk_table")
    if cached is None:
        return not _layout_ok(group)
    return cached.refresh(group) == ops._C.WatchState.STALE
