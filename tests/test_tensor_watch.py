"""TensorWatch (csrc/tensor_watch.h): the staleness check every fused backend's table shares.

refresh() must report MOVED for a storage swap that keeps dtype and layout (the table follows it),
STALE for any change of dtype, shape, strides or device (the table must never run again), and
UNCHANGED otherwise (``_C.WatchState``, the one answer of every table's refresh()). The GPU backends'
ChunkTable and the CPU backend's CpuTable follow it; exercised here on CPU tensors standing in for
device ones.
"""

from __future__ import annotations

import pytest
import torch

from fused_ema import ops
from fused_ema.backends import chunk_table
from fused_ema.plan import Plan

from helpers import DTYPES

pytestmark = pytest.mark.skipif(ops._C is None, reason=f"the C++ extension is not available: {ops.UNAVAILABLE_REASON}")

if ops._C is not None:
    UNCHANGED, MOVED, STALE = ops._C.WatchState.UNCHANGED, ops._C.WatchState.MOVED, ops._C.WatchState.STALE

SHAPES = ((), (0,), (7,), (3, 5), (2, 3, 4, 5, 6, 2))  # the last has more dims than TensorImpl keeps inline


def _watch(tensors):
    return ops._C.TensorWatch(list(tensors))


def _tensors(dtype=torch.float32, shape=(3, 5)):
    return [torch.nn.Parameter(torch.randn(shape).to(dtype)), torch.randn(11).to(dtype), torch.randn(4, 4).t()]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unchanged(dtype, shape):
    tensors = _tensors(dtype, shape)
    watch = _watch(tensors)
    assert len(watch) == len(tensors)
    with torch.no_grad():
        tensors[0].mul_(2)  # values are not watched, only metadata
    assert [watch.refresh(), watch.refresh()] == [UNCHANGED, UNCHANGED]
    assert not watch.stale


@pytest.mark.parametrize("shape", [shape for shape in SHAPES if 0 not in shape])  # empty: no address to move
@pytest.mark.parametrize("dtype", DTYPES)
def test_storage_swap_is_moved_once(dtype, shape):
    tensors = _tensors(dtype, shape)
    watch = _watch(tensors)
    with torch.no_grad():
        tensors[0].data = torch.randn(shape).to(dtype)  # a new storage of the same dtype and layout
    assert watch.refresh() == MOVED
    assert watch.refresh() == UNCHANGED  # the snapshot now holds the new address


def test_resized_storage_is_moved():
    tensor = torch.randn(8)
    watch = _watch([tensor])
    tensor.untyped_storage().resize_(1024)  # same StorageImpl, new allocation (FSDP2 does this)
    assert watch.refresh() == MOVED


def test_same_address_other_offset_is_moved():
    base = torch.randn(16)
    view = base[:8]
    watch = _watch([view])
    view.set_(base.untyped_storage(), 8, (8,), (1,))
    assert watch.refresh() == MOVED


CHANGES = {
    "dtype": lambda t: t.detach().double(),
    "shape": lambda t: torch.randn(t.numel() + 1),
    "rank": lambda t: torch.randn(1, t.numel()),
    "strides": lambda t: torch.randn(tuple(reversed(t.shape))).t(),
}
# A device change (model.to("cuda")) needs a second device type set_data accepts: not on this machine.


@pytest.mark.parametrize("change", list(CHANGES))
def test_change_is_stale_and_sticky(change):
    tensors = [torch.randn(4), torch.nn.Parameter(torch.randn(3, 5)), torch.randn(6)]
    original = tensors[1].data
    watch = _watch(tensors)
    with torch.no_grad():
        tensors[1].data = CHANGES[change](tensors[1])
    assert watch.refresh() == STALE
    assert watch.stale
    with torch.no_grad():
        tensors[1].data = original  # changing it back does not revive a table built before
    assert watch.refresh() == STALE


@pytest.mark.parametrize("count", [1, 5000, 40000])  # below and above the parallel threshold
@pytest.mark.parametrize("position", ["first", "last"])
def test_many_tensors(count, position):
    tensors = [torch.empty(2) for _ in range(count)]
    index = 0 if position == "first" else count - 1
    watch = _watch(tensors)
    assert watch.refresh() == UNCHANGED
    tensors[index].data = torch.empty(2)
    assert watch.refresh() == MOVED
    tensors[index].data = torch.empty(3)
    assert watch.refresh() == STALE


def test_device_tensors_without_data():
    # Meta tensors stand in for device tensors: storage without readable data. The watch reads
    # metadata only, so it works on them (a data read would crash here, a device read would sync).
    tensors = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta", dtype=torch.bfloat16)]
    watch = _watch(tensors)
    assert watch.refresh() == UNCHANGED
    tensors[0].data = torch.empty(3, 4, device="meta")
    assert watch.refresh() in (UNCHANGED, MOVED)  # meta storages all sit at address 0
    tensors[1].data = torch.empty(5, device="meta")
    assert watch.refresh() == STALE


def test_rejects_tensors_without_storage():
    with pytest.raises(ValueError, match="without storage"):
        _watch([torch.randn(3, 3).to_sparse()])


# ChunkTable (the triton and cuda backends' table) follows its watch.


def _group(models, sets=1):
    averages = [[model.detach().clone() for model in models] for _ in range(sets)]
    return Plan(averages, models, backend="reference").groups[0]


def _offsets(tensors, base):
    return [(t.data_ptr() - base.data_ptr()) // t.element_size() for t in tensors]


def test_chunk_table_follows_storage_swap():
    models = [torch.nn.Parameter(torch.randn(300)) for _ in range(4)]
    group = _group(models, sets=2)
    table = chunk_table.table(group)
    assert not chunk_table.is_stale(group)
    with torch.no_grad():
        models[2].data = torch.randn(300)
        group.averages[1][3].data = torch.randn(300)
    assert not chunk_table.is_stale(group)
    assert chunk_table.table(group) is table  # rebuilt in place
    assert table.model_base is models[0]
    assert table.tensors[:, 0].tolist() == _offsets(models, models[0])
    assert table.tensors[:, 2].tolist() == _offsets(group.averages[1], group.averages[0][0])
    assert not chunk_table.is_stale(group)


@pytest.mark.parametrize("change", list(CHANGES))
def test_chunk_table_stale_after_change(change):
    models = [torch.nn.Parameter(torch.randn(3, 5)) for _ in range(3)]
    group = _group(models)
    chunk_table.table(group)
    assert not chunk_table.is_stale(group)
    with torch.no_grad():
        models[1].data = CHANGES[change](models[1])
    assert chunk_table.is_stale(group)
