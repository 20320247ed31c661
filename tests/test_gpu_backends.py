"""The "cuda" and "triton" backends on CUDA tensors against "reference" (skipped without a GPU).

Without a GPU the same kernels are checked elsewhere: Triton's by its interpreter
(test_triton_backend.py), the CUDA kernel's chunk code by a host emulation (test_cuda_compile.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fused_ema import backends
from fused_ema.plan import Plan
from fused_ema.rounding import rounding_key

from helpers import DTYPES, tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(), (1,), (5,), (2048,), (2051,), (3, 700), (0, 4), (64, 3, 3, 3)]


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request) -> str:
    reason = backends.get(request.param).unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return request.param


def _pairs(average_dtype, model_dtype, sets, seed=0):
    generator = torch.Generator().manual_seed(seed)
    models = [torch.randn(shape, generator=generator, dtype=torch.float64).to("cuda", model_dtype) for shape in SHAPES]
    average_sets = [
        [(m.double() + 0.05 * torch.randn(m.shape, generator=generator, dtype=torch.float64).cuda()).to(average_dtype)
         for m in models]
        for _ in range(sets)
    ]
    return average_sets, models


def _compare(ours, theirs, average_dtype, model_dtype, exact):
    for mine, oracle in zip(itertools.chain(*ours), itertools.chain(*theirs)):
        if exact:  # stochastic rounding: bit-identical by contract (fused_ema/rounding.py)
            assert torch.equal(mine, oracle)
        else:
            torch.testing.assert_close(mine, oracle, **tolerance(average_dtype, model_dtype))


@pytest.mark.parametrize("average_dtype,model_dtype", list(itertools.product(DTYPES, DTYPES)), ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_matches_reference(gpu_backend, average_dtype, model_dtype, stochastic):
    weights = [0.3, 0.999]
    keys = [rounding_key(3, 4, k) for k in range(2)] if stochastic else None
    average_sets, models = _pairs(average_dtype, model_dtype, sets=2)
    expected = [[a.clone() for a in averages] for averages in average_sets]
    plan = Plan(average_sets, models, backend=gpu_backend)
    assert plan.backend_names == [gpu_backend]
    plan.lerp_(weights, keys)
    Plan(expected, models, backend="reference").lerp_(weights, keys)
    _compare(average_sets, expected, average_dtype, model_dtype, exact=stochastic and average_dtype == torch.bfloat16)


def test_storage_swap_rebuilds_the_table(gpu_backend):
    average_sets, models = _pairs(torch.float32, torch.float32, sets=1)
    expected = [[a.clone() for a in averages] for averages in average_sets]
    plan, reference = Plan(average_sets, models, backend=gpu_backend), Plan(expected, models, backend="reference")
    plan.lerp_([0.5])
    reference.lerp_([0.5])
    models[3].data = torch.randn_like(models[3])
    plan.lerp_([0.25])
    reference.lerp_([0.25])
    _compare(average_sets, expected, torch.float32, torch.float32, exact=False)


def test_list_operator_with_mixed_dtypes():
    reason = backends.get("cuda").unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    models = [torch.randn(300, device="cuda"), torch.randn(7, 9, device="cuda").bfloat16()]
    averages = [torch.randn(300, device="cuda").bfloat16(), torch.randn(7, 9, device="cuda")]
    expected = [a.clone() for a in averages]
    keys = [rounding_key(0, 0)]
    torch.ops.fused_ema.multi_lerp_(averages, models, [0.1], [0, 1], keys)
    Plan([expected], models, backend="reference").lerp_([0.1], keys)
    assert torch.equal(averages[0], expected[0])
    torch.testing.assert_close(averages[1], expected[1], **tolerance(torch.float32))


def test_new_weights_do_not_recompile_the_triton_kernel():
    reason = backends.get("triton").unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from fused_ema.backends import triton as triton_backend

    average_sets, models = _pairs(torch.float32, torch.bfloat16, sets=1)
    plan = Plan(average_sets, models, backend="triton")
    plan.lerp_([0.1])
    # The subject is Triton's private compile cache: a new weight must not add a specialisation.
    kernel_cache = triton_backend._multi_lerp_kernel.device_caches[torch.cuda.current_device()][0]
    compiled = len(kernel_cache)
    for weight in (0.2, 0.5, 0.75, 1.0, 0.0):  # ints equal to 1 would specialise; weights are not args
        plan.lerp_([weight])
    assert len(kernel_cache) == compiled


def test_cuda_operators_pass_opcheck():
    reason = backends.get("cuda").unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    models = [torch.randn(300, device="cuda"), torch.randn(7, 9, device="cuda")]
    averages = [m.clone() for _ in range(2) for m in models]  # set-major, no aliasing
    torch.library.opcheck(torch.ops.fused_ema.multi_lerp_.default, (averages, models, [0.1, 0.2], [0, 1], None))
