"""Everyday paths that used to give a wrong average with no error (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fused_ema
from fused_ema import backends, rules

from models import ScalarReadCounter, small_cnn


def _poison_(module, value):
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.fill_(value)


def _floating_state(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


# --- A copy is a copy ------------------------------------------------------------------------

@pytest.mark.parametrize("poison", [float("nan"), float("inf"), "empty"])
def test_first_averaged_model_update_is_a_copy(backend, poison):
    model = small_cnn()
    swa = fused_ema.AveragedModel(model, use_buffers=True, backend=backend)
    if poison == "empty":
        swa.module.to_empty(device="cpu")  # uninitialised memory
    else:
        _poison_(swa.module, poison)
    swa.update_parameters(model)
    for name, tensor in _floating_state(model).items():
        assert torch.equal(swa.module.state_dict()[name], tensor), name


@pytest.mark.parametrize("dtype", [None, torch.float64, torch.bfloat16])
def test_update_after_step_copies_exactly(backend, dtype):
    model = small_cnn()
    ema = fused_ema.EMA(model, decay=0.9, update_after_step=2, backend=backend, dtype=dtype,
                        stochastic_rounding=False)
    _poison_(ema.module, float("nan"))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("inf")  # a model value the copy must keep as it is
    ema.update()
    for name, tensor in _floating_state(model).items():
        assert torch.equal(ema.module.state_dict()[name], tensor.to(ema.module.state_dict()[name].dtype)), name


def test_weight_one_through_lerp_and_rules(backend):
    averages = [torch.full((5, 7), float("nan")), torch.full((300,), float("inf"))]
    models = [torch.randn(5, 7), torch.randn(300)]
    fused_ema.lerp_(averages, models, 1, backend=backend)
    assert all(torch.equal(a, m) for a, m in zip(averages, models))
    # Two averages, one of them at weight 1 (a rule's first step), in the same pass.
    fast, slow = [torch.full((64,), float("nan"))], [torch.zeros(64)]
    target = [torch.randn(64)]
    fused_ema.multi_lerp_([fast, slow], target, [1.0, 0.25], backend=backend)
    assert torch.equal(fast[0], target[0])
    torch.testing.assert_close(slow[0], 0.25 * target[0])
    model = small_cnn()
    ema = fused_ema.EMA(model, rule=[rules.WarmupEMA(0.99), rules.ConstantEMA(0.5)], backend=backend)
    _poison_(ema.module, float("nan"))
    ema.update()  # WarmupEMA's first weight is 1
    for name, tensor in _floating_state(model).items():
        assert torch.equal(ema.module.state_dict()[name], tensor), name


# --- n_averaged is the truth ------------------------------------------------------------------

def _swa_pair():
    model = nn.Linear(3, 2)
    return model, fused_ema.AveragedModel(model), torch.optim.swa_utils.AveragedModel(model)


@pytest.mark.parametrize("edit", ["zero_", "fill_", "copy_", "assign"])
def test_n_averaged_edits_are_honoured_like_torch(edit):
    model, ours, theirs = _swa_pair()
    for step in range(6):
        with torch.no_grad():
            model.weight.add_(step)
        if step == 3:
            for swa in (ours, theirs):
                if edit == "zero_":
                    swa.n_averaged.zero_()
                elif edit == "fill_":
                    swa.n_averaged.fill_(10)
                elif edit == "copy_":
                    swa.n_averaged.copy_(torch.tensor(1))
                else:
                    swa.n_averaged = torch.tensor(7)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    assert int(ours.n_averaged) == int(theirs.n_averaged)
    torch.testing.assert_close(ours.module.weight, theirs.module.weight, rtol=1e-6, atol=1e-7)


def test_update_without_edit_reads_nothing_back():
    model, ours, _ = _swa_pair()
    ours.update_parameters(model)
    with ScalarReadCounter() as counter:
        for _ in range(3):
            ours.update_parameters(model)
    assert counter.reads == 0
    ours.n_averaged.zero_()
    with ScalarReadCounter() as counter:
        ours.update_parameters(model)  # one read of the edited count
        ours.update_parameters(model)
    assert counter.reads == 1


# --- complex tensors are averaged --------------------------------------------------------------

class ComplexModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
        self.real = nn.Parameter(torch.randn(5))
        self.register_buffer("phase", torch.randn(3, dtype=torch.complex128))


def test_complex_parameters_and_buffers_are_averaged(backend):
    model = ComplexModel()
    ours = fused_ema.EMA(model, decay=0.75, backend=backend)
    swa = fused_ema.AveragedModel(model, use_buffers=True, backend=backend)
    theirs = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.mul_(1.5).add_(step + 1)
        ours.update()
        swa.update_parameters(model)
        theirs.update_parameters(model)
        for name, tensor in model.state_dict().items():
            expected[name] = torch.lerp(expected[name], tensor, 0.25)
    for name, want in expected.items():
        torch.testing.assert_close(ours.module.state_dict()[name], want, msg=name)
        torch.testing.assert_close(swa.module.state_dict()[name], theirs.module.state_dict()[name], msg=name)
    assert not torch.equal(ours.module.weight, model.weight)  # averaged, not copied


# --- skip_nonfinite covers copied tensors --------------------------------------------------------

def test_skip_nonfinite_covers_copied_buffers():
    model = small_cnn()
    ema = fused_ema.EMA(model, decay=0.5, include_buffers=False, skip_nonfinite=True)
    before = {k: v.clone() for k, v in ema.module.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        model[1].running_var[0] = float("nan")  # a copied buffer
    with pytest.warns(UserWarning, match="skipped"):
        ema.update()
    assert ema.skipped_updates == 1
    for name, tensor in ema.module.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# --- non-persistent buffers ----------------------------------------------------------------------

class WithCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("rotary", torch.randn(8, 4), persistent=False)


def test_non_persistent_buffers_are_left_alone(backend):
    model = WithCache()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend)
    swa = fused_ema.AveragedModel(model, use_buffers=True, backend=backend)
    own_cache = ema.module.rotary.clone()
    model.rotary = torch.randn(16, 4)  # the cache grew with the sequence length
    ema.update()
    swa.update_parameters(model)
    assert torch.equal(ema.module.rotary, own_cache)  # neither averaged nor copied
    assert "module.rotary" not in ema.state_dict()
    with ema.swap(model):
        assert model.rotary.shape == (16, 4)
    ema.copy_to(model)


# --- backend choice fails at construction ---------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, reason in backends.status().items() if reason is not None])
def test_unavailable_backend_raises_at_construction(name):
    model = small_cnn()
    with pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
        fused_ema.EMA(model, backend=name)
    with pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
        fused_ema.AveragedModel(model, backend=name)


def test_invalid_environment_variable_raises_at_construction(monkeypatch):
    monkeypatch.setenv(backends.ENVIRONMENT_VARIABLE, "fastest")
    model = small_cnn()
    with pytest.raises(ValueError, match="FUSED_EMA_BACKEND='fastest'"):
        fused_ema.EMA(model)
    with pytest.raises(ValueError, match="FUSED_EMA_BACKEND='fastest'"):
        fused_ema.AveragedModel(model)


@pytest.mark.skipif("cpu" not in fused_ema.available_backends(), reason="needs the cpu backend")
def test_backend_for_another_device_raises_at_construction():
    model = small_cnn().to("meta")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot update these tensors: .*on meta"):
        fused_ema.EMA(model, backend="cpu")


# --- numbers are numbers ---------------------------------------------------------------------------

GOOD_NUMBERS = [0.999, 1, 0, np.float32(0.999), np.float64(0.5), np.float16(0.25), np.int64(1),
                torch.tensor(0.999), torch.tensor(0.5, dtype=torch.float64), torch.tensor(1)]
BAD_NUMBERS = [("1", TypeError), (True, TypeError), (None, TypeError), (float("nan"), ValueError),
               (1.5, ValueError), (-0.1, ValueError), (np.bool_(True), TypeError),
               (torch.tensor([0.5]), TypeError), (torch.tensor(True), TypeError),
               (torch.tensor(0.5, device="meta"), TypeError), (torch.tensor(np.nan), ValueError)]

DECAY_TAKERS = {
    "EMA(decay=)": lambda value: fused_ema.EMA(nn.Linear(2, 2), decay=value),
    "EMA(decay=[...])": lambda value: fused_ema.EMA(nn.Linear(2, 2), decay=[0.5, value]),
    "rules.ConstantEMA": lambda value: rules.ConstantEMA(value),
    "rules.WarmupEMA": lambda value: rules.WarmupEMA(decay=value),
    "rules.BiasCorrectedEMA": lambda value: rules.BiasCorrectedEMA(value),
    "rules.RampEMA": lambda value: rules.RampEMA(value),
    "get_ema_multi_avg_fn": lambda value: fused_ema.get_ema_multi_avg_fn(value),
    "get_ema_avg_fn": lambda value: fused_ema.get_ema_avg_fn(value),
}


def _weight_of(taken):
    if isinstance(taken, fused_ema.EMA):
        return taken.rules[-1].decay
    if isinstance(taken, rules.Rule):
        return taken.decay
    return taken.rule.decay


@pytest.mark.parametrize("taker", DECAY_TAKERS)
@pytest.mark.parametrize("value", GOOD_NUMBERS, ids=repr)
def test_numbers_accepted(taker, value):
    decay = _weight_of(DECAY_TAKERS[taker](value))
    assert type(decay) is float and decay == float(value)


@pytest.mark.parametrize("taker", DECAY_TAKERS)
@pytest.mark.parametrize("value,error", BAD_NUMBERS, ids=repr)
def test_non_numbers_rejected_naming_the_argument(taker, value, error):
    with pytest.raises(error, match="decay must"):
        DECAY_TAKERS[taker](value)


@pytest.mark.parametrize("value", GOOD_NUMBERS, ids=repr)
def test_lerp_weight_accepts_numbers(value):
    average, model = torch.zeros(8), torch.ones(8)
    fused_ema.lerp_([average], [model], value)
    torch.testing.assert_close(average, torch.full((8,), float(value)))


@pytest.mark.parametrize("value,error", BAD_NUMBERS, ids=repr)
def test_lerp_weight_rejects_non_numbers(value, error):
    average = torch.zeros(8)
    with pytest.raises(error, match="weight must"):
        fused_ema.lerp_([average], [torch.ones(8)], value)
    assert torch.equal(average, torch.zeros(8))


@pytest.mark.parametrize("make,name", [
    (lambda v: rules.WarmupEMA(inv_gamma=v), "inv_gamma"), (lambda v: rules.WarmupEMA(power=v), "power"),
    (lambda v: rules.WarmupEMA(min_decay=v), "min_decay"), (lambda v: rules.RampEMA(tau=v), "tau"),
    (lambda v: rules.TADEMA(alpha=v), "alpha"), (lambda v: rules.PowerEMA(gamma=v), "gamma"),
    (lambda v: rules.PowerEMA(sigma_rel=v), "sigma_rel"),
])
def test_rule_hyperparameters_are_numbers(make, name):
    for bad in ("0.1", True) if name in ("gamma", "sigma_rel") else ("0.1", True, None):  # None: not given
        with pytest.raises(TypeError, match=f"{name} must be a real number"):
            make(bad)
    assert make(np.float32(0.0625)) is not None
