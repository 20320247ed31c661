"""The packed layout of an average: one aligned block per device and dtype, each tensor saved alone."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fused_ema
from fused_ema import ops

needs_extension = pytest.mark.skipif(ops._C is None, reason="packing needs the C++ extension")


def _odd_model(dtype=torch.float32):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 7), nn.Conv1d(7, 3, 3), nn.Linear(1, 1),
              nn.BatchNorm1d(3)]
    model = nn.Sequential(*layers).to(dtype)
    head = nn.Linear(512, 10).to(dtype)
    return nn.ModuleDict({"body": model, "head": head})


def _floating(module):
    return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_packed_tensor_is_aligned_and_in_one_block(dtype):
    model = _odd_model(dtype)
    ema = fused_ema.EMA(model, decay=0.9)
    tensors = _floating(ema.module)
    assert all(t.data_ptr() % 16 == 0 for t in tensors)
    # Still one block: the span of the addresses is the bytes plus at most 15 bytes of padding each.
    start = min(t.data_ptr() for t in tensors)
    end = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    assert end - start <= sum(t.numel() * t.element_size() + 15 for t in tensors)
    # And each tensor owns exactly its bytes.
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    for average, source in zip(tensors, _floating(model)):
        assert torch.equal(average, source)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_average_updates_like_the_reference(compared_backend, dtype):
    model = _odd_model(dtype)
    ours = fused_ema.EMA(model, decay=0.75, backend=compared_backend, stochastic_rounding=False)
    oracle = fused_ema.EMA(model, decay=0.75, backend="reference", stochastic_rounding=False)
    for _step in range(3):
        with torch.no_grad():
            for tensor in _floating(model):
                tensor.add_(torch.randn_like(tensor))
        ours.update()
        oracle.update()
    for mine, theirs in zip(_floating(ours.module), _floating(oracle.module)):
        assert torch.equal(mine, theirs)


def _saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def _held_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _within(saved: int, held: int) -> bool:
    return saved <= held * 1.01 + 4096


def test_checkpoint_is_the_size_of_what_it_holds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 5))
    ema = fused_ema.EMA(model, decay=[0.9, 0.99])
    ema.update()
    head = ema.module[3]
    cases = {
        "ema.state_dict()": ema.state_dict(),
        "ema.module.state_dict()": ema.module.state_dict(),
        "submodule": head.state_dict(),
        "one tensor": head.weight,
    }
    for name, obj in cases.items():
        held = _held_bytes(obj.values() if isinstance(obj, dict) else [obj])
        saved = _saved_bytes(obj)
        assert _within(saved, held), f"{name}: {saved} bytes saved for {held} held"
    swa = fused_ema.AveragedModel(model)
    swa.update_parameters(model)
    held = _held_bytes([swa.module[3].bias])
    assert _within(_saved_bytes(swa.module[3].bias), held)
