"""fused_ema.lerp_ / multi_lerp_ on lists passed per call: CPU lists go to C++ in one call, no plan.

The fast path must give the reference's results, keep nothing alive between calls, and decline
(writing nothing) whatever it does not take as it is, which the general path then handles or explains.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import fused_ema
from fused_ema import functional, ops

from helpers import tolerance

pytestmark = pytest.mark.skipif(ops._C is None, reason=f"the C++ extension is not available: {ops.UNAVAILABLE_REASON}")


def _lists(count=6, dtype=torch.float32, model_dtype=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 5), (), (0,), (7, 1, 2), (300,)]
    averages = [torch.randn(shapes[i % len(shapes)], generator=generator).to(dtype) for i in range(count)]
    models = [torch.randn(a.shape, generator=generator).to(model_dtype or dtype) for a in averages]
    return averages, models


def _reference(average_sets, models, weights, **kwargs):
    expected = [[a.clone() for a in averages] for averages in average_sets]
    fused_ema.multi_lerp_(expected, models, weights, backend="reference", **kwargs)
    return expected


@pytest.fixture
def no_plan(monkeypatch):
    """Call it to make any later plan construction in fused_ema.functional fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the fast path should not build a plan")

    return lambda: monkeypatch.setattr(functional, "Plan", refuse)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_plain_lists_take_the_fast_path(no_plan, backend, model_dtype):
    averages, models = _lists(model_dtype=model_dtype)
    averages[1] = averages[1].t().contiguous().t()  # strided like no model: a temporary inside C++
    expected = _reference([averages], models, [0.3])
    no_plan()
    fused_ema.lerp_(averages, models, 0.3, backend=backend)
    for mine, want in zip(averages, expected[0]):
        torch.testing.assert_close(mine, want, **tolerance(mine.dtype, model_dtype))


def test_stochastic_rounding_matches_the_reference_bit_for_bit(no_plan):
    averages, models = _lists(dtype=torch.bfloat16, model_dtype=torch.float32)
    sets = [averages, [a.clone() for a in averages]]
    expected = _reference(sets, models, [0.01, 0.001], stochastic_rounding=True, seed=5, step=9)
    no_plan()
    fused_ema.multi_lerp_(sets, models, [0.01, 0.001], stochastic_rounding=True, seed=5, step=9)
    for mine, want in zip(sets, expected):
        for a, b in zip(mine, want):
            assert torch.equal(a, b)


def test_more_sets_than_one_pass_takes(no_plan):
    averages, models = _lists()
    sets = [[a.clone() for a in averages] for _ in range(19)]
    weights = [0.05 * (k + 1) for k in range(19)]
    expected = _reference(sets, models, weights)
    no_plan()
    fused_ema.multi_lerp_(sets, models, weights)
    for mine, want in zip(sets, expected):
        for a, b in zip(mine, want):
            torch.testing.assert_close(a, b, **tolerance(a.dtype))


def test_declined_lists_are_handled_by_the_plan():
    averages, models = _lists()
    averages.append(torch.tensor([1, 2, 3]))  # integer pairs are copied, which only the plan does
    models.append(torch.tensor([4, 5, 6]))
    expected = _reference([averages], models, [0.5])
    fused_ema.lerp_(averages, models, 0.5)
    assert torch.equal(averages[-1], models[-1])
    for mine, want in zip(averages[:-1], expected[0]):
        torch.testing.assert_close(mine, want, **tolerance(mine.dtype))


def test_iterators_are_read_once():
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    averages = [torch.zeros_like(p) for p in module.parameters()]
    fused_ema.lerp_(averages, module.parameters(), 1.0)
    for average, parameter in zip(averages, module.parameters()):
        assert torch.equal(average, parameter.detach())


def test_bad_pairs_raise_and_write_nothing():
    averages, models = _lists()
    models[2] = torch.randn(4)
    before = [a.clone() for a in averages]
    with pytest.raises(ValueError, match=r"averages\[2\].*shapes must match"):
        fused_ema.lerp_(averages, models, 0.5)
    for a, b in zip(averages, before):
        assert torch.equal(a, b)


def test_nothing_is_kept_alive_between_calls():
    averages, models = _lists()
    fused_ema.lerp_(averages, models, 0.5)
    alive = weakref.ref(models[0])
    del models
    gc.collect()
    assert alive() is None


def test_environment_variable_still_chooses_the_backend(monkeypatch, no_plan):
    monkeypatch.setenv("FUSED_EMA_BACKEND", "foreach")
    averages, models = _lists()
    no_plan()
    with pytest.raises(AssertionError, match="should not build a plan"):
        fused_ema.lerp_(averages, models, 0.5)  # foreach asked for: the plan path, not C++
