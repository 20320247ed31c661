"""The update contract, every CPU backend against the reference and the reference against float64."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_ema
from conftest import DTYPES, REFERENCE_ULPS, assert_within_ulps, cpu_backends, tolerance
from fused_ema.plan import Plan

SHAPES = {
    "scalar": (),
    "empty": (0,),
    "vector": (37,),
    "matrix": (5, 13),
    "conv": (4, 3, 5, 5),
    "large": (1 << 18,) ,
}
WEIGHTS = (0.0, 0.3, 0.5, 0.7, 1.0)


def _pair(shape, average_dtype, model_dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    average = torch.randn(shape, generator=generator, dtype=torch.float64)
    model = average + torch.randn(shape, generator=generator, dtype=torch.float64)
    return average.to(average_dtype), model.to(model_dtype)


def _closed_form(average, model, weight):
    """float64 lerp of the stored values."""
    average64, model64 = average.double(), model.double()
    return average64 + weight * (model64 - average64)


@pytest.mark.parametrize("average_dtype,model_dtype", list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("weight", WEIGHTS)
def test_every_dtype_pair_matches_float64(backend, average_dtype, model_dtype, weight):
    averages, models = zip(*(_pair(shape, average_dtype, model_dtype, seed) for seed, shape in enumerate(SHAPES.values())))
    expected = [_closed_form(a, m, weight) for a, m in zip(averages, models)]
    fused_ema.lerp_(list(averages), list(models), weight, backend=backend)
    for average, want, model in zip(averages, expected, models):
        assert average.dtype == average_dtype
        torch.testing.assert_close(average.double(), want, **tolerance(average_dtype, model_dtype))
        if weight == 1.0:  # ATen's formula gives exactly the model at weight 1
            assert torch.equal(average, model.to(average_dtype))


@pytest.mark.parametrize("average_dtype,model_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                       (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("weight", (0.001, 0.3, 0.7))
def test_backends_agree_with_reference(backend, average_dtype, model_dtype, weight):
    pairs = [_pair(shape, average_dtype, model_dtype, seed) for seed, shape in enumerate(SHAPES.values())]
    ours = [a.clone() for a, _ in pairs]
    oracle = [a.clone() for a, _ in pairs]
    models = [m for _, m in pairs]
    fused_ema.lerp_(ours, models, weight, backend=backend)
    fused_ema.lerp_(oracle, models, weight, backend="reference")
    for mine, theirs in zip(ours, oracle):
        # Same formula, same fma, one rounding: what REFERENCE_ULPS says (0: bit-identical).
        assert_within_ulps(mine, theirs, REFERENCE_ULPS[backend], f"{backend} against reference")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded_model", "mixed_strides"])
def test_strided_tensors(backend, layout):
    base_average, base_model = _pair((6, 4, 5, 3), torch.float32, torch.float32)
    if layout == "transposed":
        average, model = base_average.transpose(0, 3), base_model.transpose(0, 3)
    elif layout == "sliced":
        average, model = base_average[::2, :, 1:], base_model[::2, :, 1:]
    elif layout == "channels_last":
        average = base_average.contiguous(memory_format=torch.channels_last)
        model = base_model.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded_model":
        average, model = base_average, base_model[:1].expand_as(base_average)
    else:
        average, model = base_average, base_model.contiguous(memory_format=torch.channels_last)
    expected, stride = _closed_form(average, model, 0.25), average.stride()
    fused_ema.lerp_([average], [model], 0.25, backend=backend)
    torch.testing.assert_close(average.double(), expected, **tolerance(torch.float32))
    assert average.stride() == stride  # updated in place, layout kept


def test_many_small_and_few_large(backend):
    shapes = [(int(n),) for n in torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(3))]
    shapes += [(1 << 20,), (257, 1031)]
    pairs = [_pair(shape, torch.float32, torch.float32, seed) for seed, shape in enumerate(shapes)]
    averages = [a for a, _ in pairs]
    expected = [_closed_form(a, m, 0.1) for a, m in pairs]
    fused_ema.lerp_(averages, [m for _, m in pairs], 0.1, backend=backend)
    for average, want in zip(averages, expected):
        torch.testing.assert_close(average.double(), want, **tolerance(torch.float32))


@pytest.mark.parametrize("average_dtype", DTYPES)
def test_multi_lerp_equals_separate_updates(backend, average_dtype):
    pairs = [_pair(shape, average_dtype, torch.float32, seed) for seed, shape in enumerate(SHAPES.values())]
    models = [m for _, m in pairs]
    fast, slow = [a.clone() for a, _ in pairs], [a.clone() for a, _ in pairs]
    fused_ema.multi_lerp_([fast, slow], models, [0.1, 0.001], backend=backend)
    for set_, weight in ((fast, 0.1), (slow, 0.001)):
        for average, (start, model) in zip(set_, pairs):
            expected = start.clone()
            fused_ema.lerp_([expected], [model], weight, backend="reference")
            torch.testing.assert_close(average, expected, rtol=tolerance(average_dtype)["rtol"] / 2, atol=0)


def test_integer_and_bool_tensors_are_copied(backend):
    counts, flags = torch.tensor(1), torch.zeros(3, dtype=torch.bool)
    average = torch.zeros(4)
    fused_ema.lerp_([counts, flags, average], [torch.tensor(6), torch.ones(3, dtype=torch.bool), torch.ones(4)], 0.5,
                    backend=backend)
    assert counts.item() == 6 and flags.all()
    torch.testing.assert_close(average, torch.full((4,), 0.5))


def test_plan_reused_after_in_place_changes_and_storage_swaps(backend):
    model = torch.nn.Linear(8, 4)
    average = torch.nn.Linear(8, 4)
    averages, models = list(average.parameters()), list(model.parameters())
    plan = Plan([averages], models, backend=backend)
    with torch.no_grad():
        model.weight.data = torch.randn(4, 8)  # a new storage under the same parameter
        model.bias.copy_(torch.randn(4))  # in place, as load_state_dict does
    expected = [_closed_form(a, m, 0.5) for a, m in zip(averages, models)]
    plan.lerp_([0.5])
    for a, want in zip(averages, expected):
        torch.testing.assert_close(a.double(), want, **tolerance(torch.float32))
    model.to(torch.bfloat16)  # dtype change: the plan regroups
    expected = [_closed_form(a, m, 0.5) for a, m in zip(averages, models)]
    plan.lerp_([0.5])
    for a, want in zip(averages, expected):
        torch.testing.assert_close(a.double(), want, **tolerance(torch.float32, torch.bfloat16))


class TestStochasticRounding:
    def _run(self, backend, seed, step, value=1.0 + 1 / 512, count=4096):
        average = torch.ones(count, dtype=torch.bfloat16)
        model = torch.full((count,), value, dtype=torch.float32)
        fused_ema.lerp_([average], [model], 1.0, backend=backend, stochastic_rounding=True, seed=seed, step=step)
        return average

    def test_bit_identical_to_reference(self, backend):
        pairs = [_pair(shape, torch.bfloat16, torch.float32, seed) for seed, shape in enumerate(SHAPES.values())]
        ours, oracle = [a.clone() for a, _ in pairs], [a.clone() for a, _ in pairs]
        models = [m for _, m in pairs]
        for target, name in ((ours, backend), (oracle, "reference")):
            fused_ema.lerp_(target, models, 0.01, backend=name, stochastic_rounding=True, seed=7, step=3)
        for mine, theirs in zip(ours, oracle):
            assert torch.equal(mine.view(torch.int16), theirs.view(torch.int16))

    def test_reproducible_and_seed_dependent(self, backend):
        first, again = self._run(backend, 1, 5), self._run(backend, 1, 5)
        assert torch.equal(first, again)
        assert not torch.equal(first, self._run(backend, 2, 5))
        assert not torch.equal(first, self._run(backend, 1, 6))

    def test_unbiased(self, backend):
        # 1 + 1/512 lies a quarter of the way from 1 to the next bfloat16 (1 + 1/128).
        value = 1.0 + 1 / 512
        rounded = torch.cat([self._run(backend, seed, 0, value).double() for seed in range(8)])
        assert set(rounded.unique().tolist()) == {1.0, 1.0 + 1 / 128}
        share_up = (rounded > 1.0).double().mean().item()
        n = rounded.numel()
        assert abs(share_up - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5  # 5 standard deviations
        nearest = torch.tensor(value).to(torch.bfloat16).double().item()
        assert nearest == 1.0  # round-to-nearest would lose the update entirely

    def test_small_ema_steps_keep_moving(self, backend):
        average = torch.zeros(20000, dtype=torch.bfloat16) + 1.0
        target = torch.full((20000,), 2.0)
        for step in range(200):
            fused_ema.lerp_([average], [target], 1e-3, backend=backend, stochastic_rounding=True, step=step)
        expected = 2.0 - (1 - 1e-3) ** 200  # float64 closed form of 200 EMA steps from 1 towards 2
        assert abs(average.double().mean().item() - expected) < 2e-3
        plain = torch.ones(20000, dtype=torch.bfloat16)
        for _ in range(200):
            plain.lerp_(target.to(torch.bfloat16), 1e-3)
        assert plain.double().mean().item() == 1.0  # the problem stochastic rounding solves

    def test_other_dtypes_round_to_nearest(self, backend):
        average, model = _pair((100,), torch.float16, torch.float32)
        oracle = average.clone()
        fused_ema.lerp_([average], [model], 0.3, backend=backend, stochastic_rounding=True, seed=3)
        fused_ema.lerp_([oracle], [model], 0.3, backend="reference")
        torch.testing.assert_close(average, oracle, rtol=1e-3, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=3),
    weight=st.floats(0.0, 1.0),
    average_dtype=st.sampled_from(DTYPES),
    model_dtype=st.sampled_from(DTYPES),
    backend=st.sampled_from(cpu_backends()),
)
def test_property_update_matches_closed_form(shape, weight, average_dtype, model_dtype, backend):
    average, model = _pair(tuple(shape), average_dtype, model_dtype)
    expected = _closed_form(average, model, weight)
    fused_ema.lerp_([average], [model], weight, backend=backend)
    torch.testing.assert_close(average.double(), expected, **tolerance(average_dtype, model_dtype))
