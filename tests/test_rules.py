"""Each rule against its closed form in float64, and the averages they produce over many steps."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_ema
from fused_ema import rules

# Each formula written out again here, independently of fused_ema.rules: decay at step n
# (n = updates already applied).
CLOSED_FORMS = {
    "ema": (rules.ConstantEMA(0.99), lambda n: 0.99),
    "warmup": (
        rules.WarmupEMA(decay=0.999, inv_gamma=2.0, power=0.75, min_decay=0.1),
        lambda n: 0.0 if n == 0 else min(max(1 - (1 + n / 2.0) ** -0.75, 0.1), 0.999),
    ),
    "ramp": (rules.RampEMA(decay=0.9999, tau=50.0), lambda n: 0.9999 * (1 - math.exp(-(n + 1) / 50.0))),
    "swa": (rules.SWA(), lambda n: n / (n + 1)),
    "t_adema": (rules.TADEMA(alpha=0.98), lambda n: 0.98 * math.tanh(n)),
    "power": (rules.PowerEMA(gamma=6.94), lambda n: (1 - 1 / (n + 1)) ** 7.94),
}


@pytest.mark.parametrize("name", CLOSED_FORMS)
@pytest.mark.parametrize("step", [0, 1, 2, 5, 17, 1000, 123456])
def test_weight_is_one_minus_closed_form_decay(name, step):
    rule, decay = CLOSED_FORMS[name]
    assert rule(step) == pytest.approx(1 - decay(step), rel=1e-12, abs=1e-15)
    assert rule.weight(step) == rule(step)
    assert rule.get_decay(step) == pytest.approx(decay(step), rel=1e-12, abs=1e-15)


def _average_after(rule, values):
    average = values[0]
    for step, value in enumerate(values):
        average = average + rule(step) * (value - average)
    return average


def test_swa_is_the_arithmetic_mean():
    values = [math.sin(i) * 3 + i for i in range(40)]
    assert _average_after(rules.SWA(), values) == pytest.approx(sum(values) / len(values), rel=1e-12)


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.999])
def test_bias_corrected_ema_is_the_debiased_sum(beta):
    values = [math.cos(i) + 0.1 * i for i in range(30)]
    t = len(values)
    debiased = sum(beta ** (t - i) * (1 - beta) * w for i, w in enumerate(values, start=1)) / (1 - beta**t)
    assert _average_after(rules.BiasCorrectedEMA(beta), values) == pytest.approx(debiased, rel=1e-12)


def test_power_ema_weighs_by_the_product_form():
    gamma, values = 3.0, [float(i % 7) for i in range(25)]
    # Contribution of value i: its weight times the decays of every later update.
    weights = [1 - (1 - 1 / (i + 1)) ** (gamma + 1) for i in range(len(values))]
    contributions = [
        weights[i] * math.prod(1 - weights[j] for j in range(i + 1, len(values))) for i in range(len(values))
    ]
    assert sum(contributions) == pytest.approx(1.0, rel=1e-12)
    expected = sum(c * v for c, v in zip(contributions, values))
    assert _average_after(rules.PowerEMA(gamma=gamma), values) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("sigma_rel,gamma", [(0.05, 16.97), (0.10, 6.94)])  # EDM2's published pairs
def test_sigma_rel_to_gamma(sigma_rel, gamma):
    solved = rules.sigma_rel_to_gamma(sigma_rel)
    assert solved == pytest.approx(gamma, abs=5e-3)
    # And the forward relation of EDM2 eq. 3 holds to float precision.
    assert math.sqrt((solved + 1) / ((solved + 2) ** 2 * (solved + 3))) == pytest.approx(sigma_rel, rel=1e-12)
    assert rules.PowerEMA(sigma_rel=sigma_rel).gamma == pytest.approx(solved, rel=1e-15)


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_state_dict_round_trip(name):
    rule = CLOSED_FORMS[name][0]
    rebuilt = rules.from_state_dict(rule.state_dict())
    assert rebuilt == rule and type(rebuilt) is type(rule)
    assert [rebuilt(n) for n in range(10)] == [rule(n) for n in range(10)]


def test_load_state_dict_into_existing_rule():
    rule = rules.ConstantEMA(0.5)
    rule.load_state_dict(rules.ConstantEMA(0.75).state_dict())
    assert rule(3) == 0.25
    with pytest.raises(ValueError, match="belongs to rule SWA"):
        rule.load_state_dict(rules.SWA().state_dict())


def test_the_old_name_of_the_constant_decay_rule_warns_and_is_the_same_class():
    with pytest.warns(DeprecationWarning, match="rules.EMA is deprecated: it is fused_ema.rules.ConstantEMA"):
        old = rules.EMA
    assert old is rules.ConstantEMA
    assert rules.ConstantEMA is not fused_ema.EMA  # the rule and the wrapper no longer share a name
    assert fused_ema.EMA.__module__ == "fused_ema.ema"
    assert "EMA" not in rules.RULES and rules.RULES["ConstantEMA"] is rules.ConstantEMA
    with pytest.raises(AttributeError, match="no attribute 'NoSuchRule'"):
        rules.NoSuchRule  # noqa: B018


def test_rule_states_saved_under_the_old_name_still_load():
    saved = {"rule": "EMA", "decay": 0.75}  # what rules.EMA(0.75).state_dict() wrote before the rename
    assert rules.from_state_dict(saved) == rules.ConstantEMA(0.75)
    rule = rules.ConstantEMA(0.5)
    rule.load_state_dict(saved)
    assert rule(3) == 0.25
    assert rule.state_dict() == {"rule": "ConstantEMA", "decay": 0.75}  # a new save writes the new name
    with pytest.raises(ValueError, match="belongs to rule EMA, not SWA"):
        rules.SWA().load_state_dict(saved)


def test_a_rule_pickled_under_the_old_name_unpickles():
    old = pickle.dumps(rules.ConstantEMA(0.75), protocol=0).replace(b"\nConstantEMA\n", b"\nEMA\n")
    assert b"fused_ema.rules\nEMA\n" in old  # the class by its old name, as a pickle made before the rename
    with pytest.warns(DeprecationWarning, match="rules.EMA is deprecated"):
        rule = pickle.loads(old)
    assert type(rule) is rules.ConstantEMA and rule(0) == 0.25


def test_an_ema_checkpoint_saved_with_the_old_rule_name_loads():
    model = torch.nn.Linear(3, 2)
    ema = fused_ema.EMA(model, decay=0.5, backend="reference")
    state = ema.state_dict()
    extra = next(key for key in state if key.endswith("_extra_state"))
    assert state[extra]["rules"] == [{"rule": "ConstantEMA", "decay": 0.5}]
    state[extra] = {**state[extra], "rules": [{"rule": "EMA", "decay": 0.25}]}  # an older checkpoint
    ema.load_state_dict(state)
    assert ema.rule == rules.ConstantEMA(0.25)


def test_user_defined_rule_needs_one_method():
    class Halving(rules.Rule):
        def weight(self, step: int) -> float:
            return 0.5

    assert _average_after(Halving(), [0.0, 4.0]) == 2.0


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: rules.ConstantEMA(1.5), "decay must be in \\[0, 1\\], got 1.5"),
        (lambda: rules.ConstantEMA(-0.1), "decay must be in"),
        (lambda: rules.ConstantEMA(float("nan")), "decay must be in"),
        (lambda: rules.WarmupEMA(inv_gamma=0), "inv_gamma must be > 0"),
        (lambda: rules.WarmupEMA(decay=0.9, min_decay=0.95), "min_decay"),
        (lambda: rules.RampEMA(tau=-1), "tau must be > 0"),
        (lambda: rules.TADEMA(alpha=2), "alpha must be in"),
        (lambda: rules.PowerEMA(), "exactly one of gamma or sigma_rel"),
        (lambda: rules.PowerEMA(gamma=1, sigma_rel=0.1), "exactly one"),
        (lambda: rules.PowerEMA(gamma=-2), "gamma must be > -1"),
        (lambda: rules.PowerEMA(sigma_rel=0.5), "sigma_rel must be <"),
    ],
)
def test_bad_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", CLOSED_FORMS)
@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_bad_step(name, step):
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        CLOSED_FORMS[name][0](step)


def test_user_rule_returning_out_of_range_weight_is_caught():
    class Broken(rules.Rule):
        def weight(self, step):
            return 1.5

    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        Broken()(0)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(CLOSED_FORMS)),
    step=st.integers(0, 10**9),
)
def test_property_weights_in_unit_interval_and_match_closed_form(name, step):
    rule, decay = CLOSED_FORMS[name]
    weight = rule(step)
    assert 0.0 <= weight <= 1.0
    assert weight == pytest.approx(1 - decay(step), rel=1e-9, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(decay=st.floats(0.0, 1.0), steps=st.integers(1, 50))
def test_property_ema_average_is_geometric(decay, steps):
    # EMA from a copy of 0 towards a constant 1: closed form 1 - decay ** steps.
    average = 0.0
    rule = rules.ConstantEMA(decay)
    for step in range(steps):
        average += rule(step) * (1.0 - average)
    assert average == pytest.approx(1 - decay**steps, abs=1e-12)
