"""EMA.swap, store/restore and copy_to: every call inside the block is right or loud; aliased weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_ema

from models import small_cnn, train_steps


def _bits(tensors):
    return [t.detach().clone() for t in tensors]


def _same_bits(left, right):
    return len(left) == len(right) and all(
        a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                                           b.view(-1).view(torch.uint8) if b.numel() else b)
        for a, b in zip(left, right)
    )


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _same_state(left, right):
    return left.keys() == right.keys() and _same_bits(list(left.values()), list(right.values()))


def _trained_pair(dtype=None):
    model = small_cnn()
    ema = fused_ema.EMA(model, decay=0.6, dtype=dtype)
    for _ in train_steps(model, 3):
        ema.update()
    return model, ema


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["same_dtype", "float64_average"])
def test_inside_swap_the_average_is_what_ema_shows(dtype):
    model, ema = _trained_pair(dtype)
    inputs = torch.randn(2, 3, 6, 6, dtype=dtype or torch.float32)
    expected_output, expected_state = ema(inputs), _state(ema)
    training = _state(model)
    with ema.swap(model) as swapped:
        assert swapped is model
        assert _same_state(_state(ema), expected_state)  # what people checkpoint during evaluation
        saved = ema.state_dict()
        assert torch.equal(ema(inputs), expected_output)
        assert torch.equal(ema.module[0].weight, expected_state["module.0.weight"])
        # The model runs the average (cast to its dtype).
        torch.testing.assert_close(model[0].weight, expected_state["module.0.weight"].to(model[0].weight.dtype))
    assert _same_state(_state(model), training)
    assert _same_state({k: v.detach().clone() for k, v in saved.items() if isinstance(v, torch.Tensor)},
                       expected_state)  # what was saved inside stays the average after the block
    assert _same_state(_state(ema), expected_state)


CALLS_INSIDE = {
    "update": lambda ema, model, saved: ema.update(),
    "update_other_model": lambda ema, model, saved: ema.update(copy.deepcopy(model)),
    "copy_to": lambda ema, model, saved: ema.copy_to(model),
    "load_state_dict": lambda ema, model, saved: ema.load_state_dict(saved),
    "store": lambda ema, model, saved: ema.store(),
    "restore": lambda ema, model, saved: ema.restore(),
    "nested_swap": lambda ema, model, saved: ema.swap(model).__enter__(),
}


@pytest.mark.parametrize("call", CALLS_INSIDE)
def test_mutating_calls_inside_swap_raise_and_change_nothing(call):
    model, ema = _trained_pair()
    saved = ema.state_dict()
    ema.store()  # so that restore() would have something to put back
    training, average, counters = _state(model), _state(ema), (ema.step, ema.num_updates)
    with ema.swap(model):
        with pytest.raises(RuntimeError, match=f"{call.split('_other')[0].replace('nested_', '')}\\(\\) cannot run inside"):
            CALLS_INSIDE[call](ema, model, saved)
        assert _same_state(_state(ema), average)
    assert _same_state(_state(model), training)
    assert _same_state(_state(ema), average)
    assert (ema.step, ema.num_updates) == counters
    # Outside the block the same calls work as before.
    ema.update()
    assert ema.num_updates == counters[1] + 1


def test_exception_in_block_restores_training_weights_and_keeps_average():
    model, ema = _trained_pair()
    training, average = _state(model), _state(ema)
    with pytest.raises(KeyError), ema.swap(model):
        raise KeyError("evaluation failed")
    assert _same_state(_state(model), training)
    assert _same_state(_state(ema), average)
    ema.update()  # the EMA is usable again


def test_update_after_swap_equals_update_without_swap():
    model, ema = _trained_pair()
    twin_model, twin = copy.deepcopy(model), None
    twin = fused_ema.EMA(twin_model, decay=0.6)
    twin.load_state_dict(ema.state_dict())
    with ema.swap(model):
        model.eval()
        model(torch.randn(2, 3, 6, 6))
    for _ in train_steps(model, 2, seed=5):
        ema.update()
    for _ in train_steps(twin_model, 2, seed=5):
        twin.update()
    assert _same_state(_state(ema), _state(twin))
    assert _same_state(_state(model), _state(twin_model))


class Aliased(nn.Module):
    """Two Parameters on one memory (tied by hand) and two overlapping views of one storage."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Parameter(torch.randn(6))
        self.b = nn.Parameter(self.a.data)  # s.b = nn.Parameter(s.a.data): another Parameter, same memory
        base = torch.randn(10)
        self.c = nn.Parameter(base[:6])
        self.d = nn.Parameter(base[4:])  # overlaps c in base[4:6]
        self.e = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return x * self.a + x * self.b + x * self.c + x * self.d + x * self.e


def _alias_setup(dtype):
    model = Aliased()
    ema = fused_ema.EMA(model, decay=0.5, dtype=dtype)
    with torch.no_grad():
        for step in range(3):
            for parameter in (model.a, model.c, model.e):
                parameter.mul_(1.5).add_(step)
            ema.update()
        model.d.add_(0.25)  # training values now differ from any average
    assert model.a.data_ptr() == model.b.data_ptr()
    return model, ema


def _memory(model):
    return [model.a.detach().clone(), model.c.detach().clone(), model.d.detach().clone(), model.e.detach().clone()]


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["same_dtype", "float64_average"])
def test_swap_with_aliased_parameters(dtype):
    model, ema = _alias_setup(dtype)
    training, average = _memory(model), _state(ema)
    with ema.swap(model):
        for name in "abcde":
            torch.testing.assert_close(getattr(model, name).detach(), average[f"module.{name}"].to(torch.float32))
    assert _same_bits(_memory(model), training)
    assert model.a.data_ptr() == model.b.data_ptr()  # still tied
    assert _same_state(_state(ema), average)


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["same_dtype", "float64_average"])
def test_store_copy_to_restore_with_aliased_parameters(dtype):
    model, ema = _alias_setup(dtype)
    training, average = _memory(model), _state(ema)
    ema.store()
    ema.copy_to()
    for name in "abcde":
        torch.testing.assert_close(getattr(model, name).detach(), average[f"module.{name}"].to(torch.float32))
    ema.restore()
    assert _same_bits(_memory(model), training)
    assert _same_state(_state(ema), average)


def _dropout_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))


def test_ema_module_stays_in_eval_mode():
    model = _dropout_bn_model().train()
    ema = fused_ema.EMA(model, decay=0.9)
    assert not ema.module.training and not any(m.training for m in ema.module.modules())
    ema.train()
    assert not any(m.training for m in ema.module.modules())
    statistics = ema.module[1].running_mean.clone()
    inputs = torch.randn(16, 4)
    first, second = ema(inputs), ema(inputs)
    assert torch.equal(first, second)  # no dropout
    assert torch.equal(ema.module[1].running_mean, statistics)  # evaluation never changes BatchNorm
    multi = fused_ema.EMA(model, decay=[0.9, 0.99]).train()
    assert not any(m.training for average in multi.averages for m in average.modules())


@pytest.mark.parametrize("mode", [True, False])
def test_swap_keeps_the_model_mode(mode):
    model = _dropout_bn_model().train(mode)
    ema = fused_ema.EMA(model, decay=0.9)
    with ema.swap(model):
        assert all(m.training == mode for m in model.modules())
    assert all(m.training == mode for m in model.modules())


@pytest.mark.parametrize("mode", [True, False])
def test_averaged_model_keeps_torch_mode(mode):
    model = _dropout_bn_model().train(mode)
    assert fused_ema.AveragedModel(model).module.training == mode
    assert torch.optim.swa_utils.AveragedModel(model).module.training == mode
