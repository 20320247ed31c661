"""The EMA wrapper: update semantics against a float64 simulation, swap, store/restore, resume."""

from __future__ import annotations

import io

import pytest
import torch

import fused_ema
from fused_ema import ops, rules

from models import ScalarReadCounter, small_cnn, train_steps


def _snapshot(model):
    return {name: tensor.detach().double().clone() for name, tensor in model.state_dict().items()
            if tensor.is_floating_point()}


def _simulate(snapshots, initial, weight_of_step):
    """float64 average: weight_of_step(step) -> weight (None to skip), applied to each snapshot."""
    average = {name: tensor.clone() for name, tensor in initial.items()}
    for step, snapshot in enumerate(snapshots):
        weight = weight_of_step(step)
        if weight is None:
            continue
        for name in average:
            average[name] += weight * (snapshot[name] - average[name])
    return average


def _assert_matches(module, expected, rtol=1e-5, atol=1e-6):
    state = module.state_dict()
    for name, want in expected.items():
        torch.testing.assert_close(state[name].double(), want, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(
    "rule",
    [rules.ConstantEMA(0.8), rules.WarmupEMA(0.99, power=0.75), rules.RampEMA(0.99, tau=3), rules.BiasCorrectedEMA(0.9),
     rules.SWA(), rules.TADEMA(0.9), rules.PowerEMA(gamma=2.0)],
    ids=lambda rule: type(rule).__name__,
)
def test_update_matches_float64_simulation(rule):
    model = small_cnn()
    initial = _snapshot(model)
    ema = fused_ema.EMA(model, rule=rule)
    snapshots = []
    for _ in train_steps(model, 7):
        ema.update()
        snapshots.append(_snapshot(model))
    expected = _simulate(snapshots, initial, lambda step: 1 - _decay(rule, step))
    _assert_matches(ema.module, expected)
    assert ema.num_updates == ema.step == 7


def _decay(rule, n):
    """Each rule's decay written out independently of fused_ema.rules."""
    import math

    if isinstance(rule, rules.WarmupEMA):
        return 0.0 if n == 0 else min(max(1 - (1 + n / rule.inv_gamma) ** -rule.power, rule.min_decay), rule.decay)
    if isinstance(rule, rules.RampEMA):
        return rule.decay * (1 - math.exp(-(n + 1) / rule.tau))
    if isinstance(rule, rules.BiasCorrectedEMA):
        return 1 - (1 - rule.decay) / (1 - rule.decay ** (n + 1))
    if isinstance(rule, rules.SWA):
        return n / (n + 1)
    if isinstance(rule, rules.TADEMA):
        return rule.alpha * math.tanh(n)
    if isinstance(rule, rules.PowerEMA):
        return (1 - 1 / (n + 1)) ** (rule.gamma + 1)
    return rule.decay


def test_update_after_step_and_update_every():
    model = small_cnn()
    initial = _snapshot(model)
    ema = fused_ema.EMA(model, decay=0.7, update_after_step=3, update_every=2)
    snapshots = []
    for _ in train_steps(model, 10):
        ema.update()
        snapshots.append(_snapshot(model))

    def weight(step):
        if step < 3:
            return 1.0  # copy
        return 0.3 if step % 2 == 0 else None

    _assert_matches(ema.module, _simulate(snapshots, initial, weight))
    assert ema.num_updates == 3  # steps 4, 6 and 8 averaged


def test_explicit_steps():
    model = small_cnn()
    initial = _snapshot(model)
    ema = fused_ema.EMA(model, rule=rules.WarmupEMA(0.9), update_every=5)
    snapshots = []
    for step in train_steps(model, 11):
        ema.update(model, step=step * 5)  # the caller counts optimizer steps, 5 per call
        snapshots.append(_snapshot(model))
    expected = _simulate(snapshots, initial, lambda step: 1 - _decay(rules.WarmupEMA(0.9), step))
    _assert_matches(ema.module, expected)


def test_buffers_averaged_or_copied():
    model = small_cnn()
    averaged = fused_ema.EMA(model, decay=0.5)
    copied = fused_ema.EMA(model, decay=0.5, include_buffers=False)
    initial = _snapshot(model)
    snapshots = []
    for _ in train_steps(model, 3):
        averaged.update()
        copied.update()
        snapshots.append(_snapshot(model))
    expected = _simulate(snapshots, initial, lambda step: 0.5)
    _assert_matches(averaged.module, expected)
    assert torch.equal(copied.module[1].running_mean, model[1].running_mean)
    torch.testing.assert_close(copied.module[0].weight.double(), expected["0.weight"])
    for ema in (averaged, copied):  # integer buffers are always copied
        assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 3


def test_several_rules_in_one_pass_equal_separate_emas():
    model = small_cnn()
    both = fused_ema.EMA(model, decay=[0.5, 0.9])
    fast, slow = fused_ema.EMA(model, decay=0.5), fused_ema.EMA(model, decay=0.9)
    for _ in train_steps(model, 4):
        for ema in (both, fast, slow):
            ema.update()
    assert len(both.averages) == 2 and both.averages[0] is both.module
    for mine, theirs in ((both.averages[0], fast.module), (both.averages[1], slow.module)):
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b)


class TestSwap:
    def _trained(self, dtype=None):
        model = small_cnn()
        ema = fused_ema.EMA(model, decay=0.5, dtype=dtype)
        for _ in train_steps(model, 3):
            ema.update()
        return model, ema

    @pytest.mark.parametrize("dtype", [None, torch.float64])
    def test_swap_puts_average_in_and_training_weights_back_exactly(self, dtype):
        model, ema = self._trained(dtype)
        training = {k: v.clone() for k, v in model.state_dict().items()}
        average = {k: v.clone() for k, v in ema.module.state_dict().items() if v.is_floating_point()}
        with ema.swap(model) as swapped:
            assert swapped is model
            for name, tensor in average.items():
                torch.testing.assert_close(model.state_dict()[name], tensor.to(training[name].dtype), rtol=0, atol=0)
        for name, tensor in average.items():
            assert torch.equal(ema.module.state_dict()[name], tensor), name  # the average is back too
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, training[name]), name
            assert tensor.dtype == training[name].dtype

    def test_swap_restores_on_exception_and_keeps_the_average(self):
        model, ema = self._trained()
        training = {k: v.clone() for k, v in model.state_dict().items()}
        average = {k: v.clone() for k, v in ema.module.state_dict().items()}
        with pytest.raises(KeyError), ema.swap():
            raise KeyError("evaluation failed")
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, training[name]), name
        for name, tensor in ema.module.state_dict().items():
            assert torch.equal(tensor, average[name]), name

    def test_swap_evaluates_the_averaged_weights(self):
        model, ema = self._trained()
        inputs = torch.randn(2, 3, 6, 6)
        model.eval(), ema.eval()
        with ema.swap(model):
            swapped = model(inputs)
        torch.testing.assert_close(swapped, ema(inputs))

    def test_store_copy_to_restore(self):
        model, ema = self._trained()
        training = {k: v.clone() for k, v in model.state_dict().items()}
        ema.store()
        ema.copy_to()
        for name, tensor in ema.module.named_parameters():
            assert torch.equal(dict(model.named_parameters())[name], tensor)
        ema.restore()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, training[name]), name
        with pytest.raises(RuntimeError, match="store"):
            ema.restore()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_resume_from_checkpoint_is_bit_identical(dtype):
    def run(stop_at=None):
        model = small_cnn()
        ema = fused_ema.EMA(model, rule=rules.WarmupEMA(0.95), dtype=dtype, update_after_step=1, seed=11)
        for step in train_steps(model, 8):
            ema.update()
            if step == stop_at:
                buffer = io.BytesIO()
                torch.save(ema.state_dict(), buffer)
                buffer.seek(0)
                resumed = fused_ema.EMA(model, rule=rules.WarmupEMA(0.5), dtype=dtype, seed=0, update_after_step=1)
                resumed.load_state_dict(torch.load(buffer))
                ema = resumed
        return ema

    uninterrupted, resumed = run(), run(stop_at=3)
    assert resumed.rule == rules.WarmupEMA(0.95) and resumed.seed == 11 and resumed.step == 8
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_bfloat16_average_rounds_stochastically_by_default():
    model = torch.nn.Linear(256, 256)
    with torch.no_grad():
        model.weight.fill_(1.0)  # exact in bfloat16, where the spacing is 2 ** -7
    default = fused_ema.EMA(model, decay=0.999, dtype=torch.bfloat16)
    nearest = fused_ema.EMA(model, decay=0.999, dtype=torch.bfloat16, stochastic_rounding=False)
    assert default.stochastic_rounding and not nearest.stochastic_rounding
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(0.5)
    for _ in range(100):
        default.update()
        nearest.update()
    expected = start.double() + 0.5 * (1 - 0.999**100)  # float64 EMA of a constant target
    error_stochastic = (default.module.weight.double() - expected).mean().abs().item()
    error_nearest = (nearest.module.weight.double() - expected).mean().abs().item()
    assert error_stochastic < 2e-3 < error_nearest


def test_skip_nonfinite():
    model = torch.nn.Linear(3, 2)
    ema = fused_ema.EMA(model, decay=0.5, skip_nonfinite=True)
    propagating = fused_ema.EMA(model, decay=0.5)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="skipped"):
        ema.update()
    propagating.update()
    assert torch.equal(ema.module.weight, before) and ema.skipped_updates == 1 and ema.num_updates == 0
    assert propagating.module.weight[0, 0].isnan()
    with torch.no_grad():
        model.weight[0, 0] = 1.0
    ema.update()
    torch.testing.assert_close(ema.module.weight, (before + model.weight) / 2)


def test_update_reads_nothing_back():
    model = small_cnn()
    ema = fused_ema.EMA(model, rule=rules.WarmupEMA(), update_every=2, dtype=torch.bfloat16)
    ema.update()
    with ScalarReadCounter() as counter:
        for _ in range(4):
            ema.update()
    assert counter.reads == 0


def test_unwraps_data_parallel_and_uses_the_construction_model_by_default():
    model = small_cnn()
    ema = fused_ema.EMA(torch.nn.DataParallel(model), decay=0.0)
    assert not any(name.startswith("module.module") for name in ema.state_dict())
    for _ in train_steps(model, 1):
        ema.update()
    for a, b in zip(ema.module.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(decay=1.5), ValueError, "decay must be in \\[0, 1\\], got 1.5"),
        (dict(decay=[0.9, -1.0]), ValueError, "decay must be in"),
        (dict(update_every=0), ValueError, "update_every must be an int >= 1"),
        (dict(update_after_step=-3), ValueError, "update_after_step must be an int >= 0"),
        (dict(rule="ema"), TypeError, "rule must be a fused_ema.rules.Rule"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating-point dtype"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fused_ema.EMA(small_cnn(), **kwargs)


def test_mismatched_model_leaves_average_untouched():
    ema = fused_ema.EMA(small_cnn(), decay=0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items() if isinstance(v, torch.Tensor)}
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="parameter '0.weight' has shape \\(3, 3\\) in the model but \\(8, 3, 3, 3\\)"):
        ema.update(other)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        ema.update(step=-1)
    for name, tensor in ema.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, before[name])
    assert ema.step == 0 and ema.num_updates == 0


def test_averages_are_packed_into_one_buffer_without_changing_anything_visible():
    model = small_cnn().to(memory_format=torch.channels_last)
    model.tied = torch.nn.Linear(5, 5)
    model.tied_again = model.tied  # a module registered twice: its weights stay one tensor
    ema = fused_ema.EMA(model, decay=0.5)
    parameters = list(ema.module.parameters())
    if ops._C is not None:  # every float32 parameter lives in one block (16-byte aligned starts)
        start = min(p.data_ptr() for p in parameters)
        end = max(p.data_ptr() + p.numel() * p.element_size() for p in parameters)
        assert end - start <= sum(p.numel() * p.element_size() + 15 for p in parameters)
    for (name, mine), theirs in zip(ema.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(mine, theirs) and mine.stride() == theirs.stride(), name
    assert ema.module.tied.weight is ema.module.tied_again.weight
    for _ in train_steps(model, 2):
        ema.update()
    for name, tensor in model.state_dict().items():  # the model itself is left as it was
        assert tensor.untyped_storage().data_ptr() != ema.module.state_dict()[name].untyped_storage().data_ptr()
