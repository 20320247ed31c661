"""The fused C++ backend "cpu" against the reference: dtypes, shapes, sets, rounding, threads, staleness."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import fused_ema
from fused_ema import backends, ops
from fused_ema.plan import Plan
from fused_ema.rounding import rounding_key

from helpers import DTYPES

_REASON = backends.get("cpu").unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"backend 'cpu' unavailable: {_REASON}")

# The kernel follows ATen's CPU lerp step for step (same fmadd, same roundings, the stochastic
# rounding spec bit for bit), so it must equal the reference exactly, for every dtype.
TOLERANCES = {dtype: dict(rtol=0.0, atol=0.0) for dtype in DTYPES}

SHAPES = {
    "scalar": (),
    "empty": (0,),
    "one": (1,),
    "odd": (37,),
    "block_plus_one": (65,),
    "matrix": (129, 3),
    "conv": (4, 3, 5, 5),
    "large": (3 * 4096 + 5,),
}
WEIGHTS = ([0.3], [0.7], [0.0], [1.0], [0.5], [0.01, 0.9], [0.001, 0.2, 0.6])


def _tensors(shapes, dtype, seed, sets=None):
    generator = torch.Generator().manual_seed(seed)
    make = lambda: [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]  # noqa: E731
    return make() if sets is None else [make() for _ in range(sets)]


def _assert_equal(ours, theirs):
    for mine, want in zip(itertools.chain.from_iterable(ours), itertools.chain.from_iterable(theirs)):
        assert mine.dtype == want.dtype and mine.shape == want.shape and mine.stride() == want.stride()
        torch.testing.assert_close(mine, want, equal_nan=True, **TOLERANCES[want.dtype])


def _run_both(average_sets, models, weights, keys=None):
    """Update average_sets with "cpu" and a copy with "reference"; return (ours, reference's)."""
    oracle = [[average.clone() for average in averages] for averages in average_sets]
    Plan(oracle, models, backend="reference").lerp_(weights, keys)
    plan = Plan(average_sets, models, backend="cpu")
    assert set(plan.backend_names) == {"cpu"}
    plan.lerp_(weights, keys)
    return average_sets, oracle


@pytest.mark.parametrize("average_dtype,model_dtype", list(itertools.product(DTYPES, DTYPES)))
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_matches_reference_for_every_dtype_pair(average_dtype, model_dtype, stochastic):
    shapes = list(SHAPES.values())
    models = _tensors(shapes, model_dtype, seed=1)
    for index, weights in enumerate(WEIGHTS):
        average_sets = _tensors(shapes, average_dtype, seed=2 + index, sets=len(weights))
        keys = [rounding_key(7, index, k) for k in range(len(weights))] if stochastic else None
        _assert_equal(*_run_both(average_sets, models, weights, keys))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_small_and_a_few_large_tensors(dtype):
    generator = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 300, (600,), generator=generator).tolist() + [200_003, 65_536]
    models = [torch.randn(size, generator=generator).to(dtype) for size in sizes]
    average_sets = [[torch.randn(size, generator=generator).to(dtype) for size in sizes] for _ in range(2)]
    _assert_equal(*_run_both(average_sets, models, [0.001, 0.3], [rounding_key(0, 1, 0), rounding_key(0, 1, 1)]))


def test_channels_last_is_fused_in_memory_order():
    models = [torch.randn(4, 6, 5, 3).contiguous(memory_format=torch.channels_last).bfloat16()]
    averages = [models[0].clone() + 0.5]  # clone keeps the layout
    _assert_equal(*_run_both([averages], models, [0.3], [rounding_key(1, 2)]))


def test_non_fusable_pairs_fall_back_with_a_warning():
    base = torch.randn(6, 8)
    # Both dense, but the model is column-major and the average row-major: not fusable.
    averages, models = [base + 1, torch.randn(5)], [base.t().contiguous().t(), torch.randn(5)]
    expected = [average.clone() for average in averages]
    fused_ema.lerp_(expected, models, 0.25, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cannot fuse" is warned once per process
        plan = Plan([averages], models, backend="cpu")
    assert sorted(plan.backend_names) == ["cpu", "foreach"]
    plan.lerp_([0.25])
    _assert_equal([averages], [expected])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_and_two_threads_give_identical_results(dtype):
    previous = torch.get_num_threads()
    models = _tensors([(300_001,), (70,), (100_000,)], dtype, seed=4)
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            average_sets = _tensors([(300_001,), (70,), (100_000,)], dtype, seed=5, sets=2)
            Plan(average_sets, models, backend="cpu").lerp_([0.001, 0.6], [11, 12])
            results.append(average_sets)
    finally:
        torch.set_num_threads(previous)
    for first, second in zip(itertools.chain(*results[0]), itertools.chain(*results[1])):
        assert torch.equal(first, second)


def test_stochastic_rounding_is_reproducible_and_unbiased():
    count, weight = 200_000, 0.001
    model = torch.full((count,), 1.5, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        average = torch.ones(count, dtype=torch.bfloat16)
        fused_ema.lerp_([average], [model], weight, backend="cpu", stochastic_rounding=True, seed=3, step=9)
        runs.append(average)
    assert torch.equal(*runs)
    exact = 1.0 + weight * 0.5  # far below bfloat16's spacing of 2**-7 at 1.0
    up = (exact - 1.0) / 2**-7  # probability of rounding up
    rounded = runs[0].double()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    sigma = 2**-7 * (up * (1 - up) / count) ** 0.5
    assert abs(rounded.mean().item() - exact) < 5 * sigma
    other_step = torch.ones(count, dtype=torch.bfloat16)
    fused_ema.lerp_([other_step], [model], weight, backend="cpu", stochastic_rounding=True, seed=3, step=10)
    assert not torch.equal(other_step, runs[0])


def test_more_sets_than_one_pass_holds_fall_back():
    models = [torch.randn(10)]
    plan = Plan([[torch.zeros(10)] for _ in range(17)], models, backend="auto")
    assert plan.backend_names == ["foreach"]


class TestPlanSurvivesModelChanges:
    """A plan built once keeps giving the reference's results when the model changes under it."""

    @staticmethod
    def _model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))

    def _check(self, plan, averages, model, weights=(0.1,)):
        expected = [average.detach().clone() for average in averages]
        fused_ema.lerp_(expected, list(model.parameters()), weights[0], backend="reference")
        plan.lerp_(list(weights))
        _assert_equal([averages], [expected])

    def _setup(self, dtype=torch.float32):
        model = self._model()
        averages = [parameter.detach().clone().to(dtype) + 1 for parameter in model.parameters()]
        plan = Plan([averages], list(model.parameters()), backend="cpu")
        self._check(plan, averages, model)
        return model, averages, plan

    def test_model_to_dtype(self):
        model, averages, plan = self._setup()
        model.to(torch.bfloat16)  # swaps every parameter's storage and dtype: the plan regroups
        self._check(plan, averages, model)
        assert plan.backend_names == ["cpu"] and plan.groups[0].model_dtype == torch.bfloat16

    def test_load_state_dict(self):
        model, averages, plan = self._setup()
        model.load_state_dict({name: torch.randn_like(value) for name, value in model.state_dict().items()})
        self._check(plan, averages, model)

    def test_param_data_reassigned(self):
        model, averages, plan = self._setup()
        group = plan.groups[0]
        for parameter in model.parameters():
            parameter.data = torch.randn_like(parameter)  # same dtype and shape, new storage
        self._check(plan, averages, model)
        assert plan.groups == [group] and plan.backend_names == ["cpu"]  # followed in place, not regrouped

    def test_param_data_reassigned_with_new_layout(self):
        model, averages, plan = self._setup()
        first = model[0].weight
        first.data = torch.randn(first.shape[1], first.shape[0]).t()  # same shape, transposed strides
        expected = [average.clone() for average in averages]
        fused_ema.lerp_(expected, list(model.parameters()), 0.1, backend="reference")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "cannot fuse" is warned once per process
            plan.lerp_([0.1])
        assert sorted(plan.backend_names) == ["cpu", "foreach"]
        _assert_equal([averages], [expected])

    def test_parameter_reregistered(self):
        model, averages, plan = self._setup()
        model[0].weight = torch.nn.Parameter(torch.randn_like(model[0].weight))
        # The old plan still holds (and keeps alive) the old parameter; a new plan sees the new one.
        plan.lerp_([0.1])
        self._check(Plan([averages], list(model.parameters()), backend="cpu"), averages, model)


class TestCpuTable:
    """The persistent C++ table: follows moved storages, refuses to run on a changed layout."""

    def _table(self, averages, models):
        return ops._C.CpuTable(averages, models, list(range(len(models))), 1)

    def test_follows_a_moved_storage(self):
        parameter = torch.nn.Parameter(torch.zeros(100))
        average = torch.zeros(100)
        table = self._table([average], [parameter])
        parameter.data = torch.ones(100)
        assert table.refresh() == ops._C.WatchState.MOVED  # followed: the table was rebuilt
        assert table.refresh() == ops._C.WatchState.UNCHANGED
        assert table.lerp_([0.5]) is True
        assert torch.equal(average, torch.full((100,), 0.5))
        parameter.data = torch.zeros(100)  # moved again: lerp_ checks by itself when refresh() was not called
        assert table.lerp_([0.5]) is True
        assert torch.equal(average, torch.full((100,), 0.25))

    @pytest.mark.parametrize("change", ["dtype", "shape", "strides"])
    def test_stale_after_a_layout_change_and_never_runs(self, change):
        parameter = torch.nn.Parameter(torch.zeros(6, 4))
        average = torch.zeros(6, 4)
        table = self._table([average], [parameter])
        if change == "dtype":
            parameter.data = torch.ones(6, 4, dtype=torch.float64)
        elif change == "shape":
            parameter.data = torch.ones(4, 6)
        else:
            parameter.data = torch.ones(4, 6).t()
        assert table.lerp_([0.5]) is False  # checks by itself, writes nothing
        assert table.refresh() == ops._C.WatchState.STALE
        assert table.lerp_([0.5]) is False
        assert torch.equal(average, torch.zeros(6, 4))

    def test_rejects_pairs_it_cannot_fuse(self):
        with pytest.raises(ValueError, match="not dense"):
            self._table([torch.zeros(4, 4)[:, :2]], [torch.zeros(4, 4)[:, :2]])
        with pytest.raises(TypeError, match="one dtype pair"):
            self._table([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], [torch.zeros(2), torch.zeros(2)])
