"""The device-resident chunk table shared by the GPU backends ("triton" and "cuda").

A group's update is one kernel launch over a table built once per group and kept on the device:

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

Only this module reads data pointers. A storage swap (``param.data = t``, ``model.to(dtype)``) keeps
the Python tensor but changes its pointer: :meth:`ChunkTable.refresh` notices it and rebuilds the
table, or reports the group stale when the swap also changed the dtype, device or layout (the plan
then regroups). The check is the C++ ``TensorWatch`` of the extension (csrc/tensor_watch.h: metadata
only, no device sync, microseconds for thousands of tensors), or, when the extension is not built,
a pass over the pointers in Python (about 0.1 us a tensor).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from operator import attrgetter

import torch

from fused_ema.backends import capture
from fused_ema.plan import Group, is_dense

# Elements one program (Triton) or one thread block (CUDA) updates. A multiple of every vector width,
# so a chunk of an aligned tensor starts aligned.
CHUNK_ELEMENTS = 2048
# Chunk starts are multiples of CHUNK_ELEMENTS; data pointers at this alignment (bytes) allow 16-byte
# vector loads throughout (torch's allocators give 512).
VECTOR_BYTES = 16

_data_ptr = torch.Tensor.data_ptr
_dtype = attrgetter("dtype")


def _pointers(group: Group) -> list[int]:
    # The fallback when the extension (and its TensorWatch) is not built: map over a C method is the
    # cheapest read there is from Python, yet about 0.1 us a tensor with the comparison.
    pointers = list(map(_data_ptr, group.models))
    for averages in group.averages:
        pointers += map(_data_ptr, averages)
    return pointers


def _tensor_watch(group: Group):
    """A C++ ``TensorWatch`` over the group's models and averages, or None without the extension."""
    from fused_ema import ops  # loads (or compiles) the extension on first use

    if ops._C is None:
        return None
    return ops._C.TensorWatch([*group.models, *(average for averages in group.averages for average in averages)])


def _element_offset(tensor: torch.Tensor, base: int) -> int:
    offset, remainder = divmod(tensor.data_ptr() - base, tensor.element_size())
    if remainder:
        raise RuntimeError(
            f"a {tuple(tensor.shape)} {tensor.dtype} tensor starts at address {tensor.data_ptr():#x}, "
            f"not a multiple of its element size {tensor.element_size()}; clone it or use backend='foreach'"
        )
    return offset


def tensor_rows(group: Group) -> list[list[int]]:
    """The rows of the ``tensors`` table, on the host (tested without a device).

    Offsets are in elements from ``group.models[0]`` and ``group.averages[0][0]``.
    """
    sets = len(group.averages)
    model_base, average_base = group.models[0].data_ptr(), group.averages[0][0].data_ptr()
    rows = []
    for slot, (model, tensor_index) in enumerate(zip(group.models, group.tensor_indices)):
        average_offsets = [_element_offset(group.averages[k][slot], average_base) for k in range(sets)]
        rows.append([_element_offset(model, model_base), *average_offsets, model.numel(), tensor_index])
    return rows


def chunk_rows(numels: Sequence[int], chunk_elements: int) -> torch.Tensor:
    """``[C, 2]`` int64 rows ``(slot, start)`` covering every element of every tensor exactly once."""
    numels = torch.as_tensor(list(numels), dtype=torch.int64)
    counts = (numels + chunk_elements - 1) // chunk_elements
    slots = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(len(slots), dtype=torch.int64) - first_chunk[slots]) * chunk_elements
    return torch.stack([slots, starts], dim=1)


def _layout_ok(group: Group) -> bool:
    """The swapped tensors still fit the group: dtypes, devices, dense flat memory, matching strides."""
    if not group.unchanged():
        return False
    for index, model in enumerate(group.models):
        if not is_dense(model):
            return False
        for averages in group.averages:
            if averages[index].stride() != model.stride() or averages[index].shape != model.shape:
                return False
    return True


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned memory makes the copy asynchronous; pageable memory would block the host.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class ChunkTable:
    """The tables of one group on its device; see the module docstring for the layout."""

    def __init__(self, group: Group, chunk_elements: int | None = None) -> None:
        self.sets = len(group.averages)
        self.chunk_elements = chunk_elements or CHUNK_ELEMENTS
        self.device = group.device
        # The snapshot the table is built from: taken with it, followed on every refresh.
        self.watch = _tensor_watch(group)
        self._build(group)

    def _build(self, group: Group) -> None:
        capture.check_not_capturing("building the chunk table (first update, or after a storage swap)")
        rows = tensor_rows(group)
        # Held so the launch passes the bases the offsets were computed from (a swap rebuilds).
        self.model_base, self.average_base = group.models[0], group.averages[0][0]
        self.pointers = _pointers(group)
        self.aligned = all(pointer % VECTOR_BYTES == 0 for pointer in self.pointers)
        self.numels = [row[-2] for row in rows]
        host_tensors = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.sets + 3)
        self.tensors = _to_device(host_tensors, self.device)
        self.chunks = _to_device(chunk_rows(self.numels, self.chunk_elements), self.device)
        self.chunk_count = int(self.chunks.shape[0])  # host int from the host copy: no sync
        self._streams = {_current_stream(self.device)}

    def on_current_stream(self) -> None:
        """Before a launch: keep the tables alive for the current stream too (see the module docstring)."""
        stream = _current_stream(self.device)
        if stream not in self._streams:
            self.tensors.record_stream(stream)
            self.chunks.record_stream(stream)
            self._streams.add(stream)

    def refresh(self, group: Group) -> bool:
        """Rebuild after a storage swap; False when the group no longer fits (the plan must regroup).

        The common case, nothing swapped, costs one pass over the tensors' metadata, in C++ when the
        extension is built.
        """
        watch = self.watch
        if watch is not None:
            state = watch.refresh()
            if state == "moved":  # same dtypes, devices and layouts: the table only needs new offsets
                # The watch already holds the new addresses: if the rebuild raises, the Python check
                # below (against the old pointers) takes over, so the old table never runs again.
                self.watch = None
                self._build(group)
                self.watch = watch
            return state != "stale"
        if _pointers(group) == self.pointers:
            # Same storages; a same-address view of another dtype is the one swap left to catch.
            dtypes = set(map(_dtype, group.models))
            for averages in group.averages:
                dtypes.update(map(_dtype, averages))
            return dtypes == {group.model_dtype, group.average_dtype}
        if not _layout_ok(group):
            return False
        self._build(group)
        return True

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


def _current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def table(group: Group) -> ChunkTable:
    """The group's table, built on first use and cached in ``group.cache``."""
    cached = group.cache.get("chunk_table")
    if cached is None or cached.sets != len(group.averages):
        cached = group.cache["chunk_table"] = ChunkTable(group)
    return cached


def is_stale(group: Group) -> bool:
    """The fused backends' ``is_stale``: refresh the table after a storage swap, True if regrouping is needed."""
    cached = group.cache.get("chunk_table")
    if cached is None:
        return not _layout_ok(group)
    return not cached.refresh(group)
