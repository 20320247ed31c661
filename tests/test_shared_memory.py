"""Averages that share memory with another tensor of the same update: a tensor listed twice (as
``state_dict()`` lists a tied weight), an average that is another pair's model, overlapping views.

A fused table updates its pairs in parallel, so such pairs would race: the CPU table runs them in
turn on one thread and gives the reference's results (which updates pairs one after another), with
one warning; the GPU tables refuse them before writing anything. Each tensor here spans many
worker-thread chunks, where a race would show.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fused_ema
from fused_ema import ops
from fused_ema.plan import Plan

import triton_interpreted

pytestmark = pytest.mark.skipif(ops._C is None, reason=f"the C++ extension is not available: {ops.UNAVAILABLE_REASON}")

LENGTH = 2_000_000  # long enough that both worker threads run while the other writes
WEIGHT = 0.3


def _listed_twice(generator):
    average = torch.randn(LENGTH, generator=generator)
    return [average, average], [torch.randn(LENGTH, generator=generator), torch.randn(LENGTH, generator=generator)]


def _each_others_model(generator):
    first, second = torch.randn(LENGTH, generator=generator), torch.randn(LENGTH, generator=generator)
    return [first, second], [second, first]


def _overlapping_views(generator):
    base = torch.randn(2 * LENGTH, generator=generator)
    averages = [base[: LENGTH + 1000], base[LENGTH - 1000:]]
    return averages, [torch.randn(a.shape, generator=generator) for a in averages]


CASES = {"listed twice": _listed_twice, "each other's model": _each_others_model,
         "overlapping views": _overlapping_views}


def _pairs(case):
    return CASES[case](torch.Generator().manual_seed(sorted(CASES).index(case)))


def _reference(case):
    averages, models = _pairs(case)
    fused_ema.lerp_(averages, models, WEIGHT, backend="reference")  # pair after pair
    return averages


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["functional", "plan"])
def test_the_cpu_kernel_updates_pairs_that_share_memory_in_turn(case, path):
    averages, models = _pairs(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # once per process: tested in a fresh one below
        if path == "functional":
            fused_ema.lerp_(averages, models, WEIGHT, backend="cpu")
        else:
            plan = Plan([averages], models, backend="cpu")
            plan.lerp_([WEIGHT])
            assert plan.backend_names == ["cpu"]
    for mine, expected in zip(averages, _reference(case)):
        assert torch.equal(mine, expected)


@pytest.mark.parametrize("backend", ["cpu", "foreach"])
def test_the_same_averages_in_two_sets_get_both_updates_in_turn(backend):
    generator = torch.Generator().manual_seed(7)
    first, second = torch.randn(LENGTH, generator=generator), torch.randn(LENGTH, generator=generator)
    models = [torch.randn(LENGTH, generator=generator), torch.randn(LENGTH, generator=generator)]
    results = {}
    for name in ("reference", backend):
        averages = [first.clone(), second.clone()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused_ema.multi_lerp_([averages, averages], models, [0.3, 0.6], backend=name)
        results[name] = averages
    for mine, expected in zip(results[backend], results["reference"]):
        assert torch.equal(mine, expected)


def test_pairs_that_share_memory_warn_once_and_an_average_that_is_its_own_model_does_not():
    script = """
import warnings, torch, fused_ema
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    same = torch.randn(100_000)
    fused_ema.lerp_([same], [same], 0.5)  # its own model: allowed, nothing shared with another pair
    assert not caught, [str(w.message) for w in caught]
    average, first, second = torch.randn(100_000), torch.randn(100_000), torch.randn(100_000)
    for _ in range(3):
        fused_ema.lerp_([average, average], [first, second], 0.5)
messages = [str(w.message) for w in caught]
assert len(messages) == 1 and "averages[0] and averages[1] share memory" in messages[0], messages
assert "in turn on one thread" in messages[0] and issubclass(caught[0].category, UserWarning)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_average_of_a_model_with_buffers_that_are_views_of_one_another():
    # deepcopy keeps buffer views as views: averaged (use_buffers=True), they share memory.
    model = nn.Module()
    base = torch.randn(2 * LENGTH)
    model.register_buffer("head", base[: LENGTH + 10])
    model.register_buffer("tail", base[LENGTH - 10:])
    fused = fused_ema.AveragedModel(model, use_buffers=True, backend="cpu")
    reference = fused_ema.AveragedModel(model, use_buffers=True, backend="reference")
    assert fused.module.tail.data_ptr() == fused.module.head.data_ptr() + (LENGTH - 10) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            model.head.add_(1.0 + step)
            fused.update_parameters(model)
            reference.update_parameters(model)
    assert torch.equal(fused.module.head, reference.module.head)
    assert torch.equal(fused.module.tail, reference.module.tail)


@pytest.mark.parametrize("case", CASES)
def test_the_gpu_tables_refuse_pairs_that_share_memory(case):
    averages, models = _pairs(case)
    match = "shares memory with models" if case == "each other's model" else r"averages\[0\] and averages\[1\] share"
    with pytest.raises(ValueError, match=match + ".*use backend='reference'"):
        ops._C.build_chunk_table(averages, models, [0, 1], 1, 2048)


def test_the_triton_backend_refuses_them_before_writing(monkeypatch):
    from fused_ema import backends

    monkeypatch.setitem(backends._loaded, "triton", triton_interpreted.module().BACKEND)
    averages, models = _pairs("listed twice")
    before = averages[0].clone()
    with pytest.raises(ValueError, match="share memory"):
        fused_ema.lerp_(averages, models, WEIGHT, backend="triton")
    assert torch.equal(averages[0], before)


def test_a_part_of_its_own_model_is_named():
    base = torch.randn(LENGTH + 10)
    with pytest.raises(ValueError, match=r"averages\[0\] shares memory with models\[0\]"):
        ops._C.build_chunk_table([base[:LENGTH]], [base[10:]], [0], 1, 2048)
