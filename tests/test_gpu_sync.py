"""No host-device synchronisation in the update path.

On a GPU, torch.cuda.set_sync_debug_mode("error") makes every synchronising CUDA call raise; the
updates of each GPU backend run under it (skipped without a GPU). On any machine, a dispatch mode
fails on every read of a tensor value back to Python (``aten._local_scalar_dense``: ``item()``,
``bool(t)``, ``int(t)``), which on a GPU would be a sync; the update path of every backend that
runs here goes through it, the Triton launcher included (interpreted on CPU tensors).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_ema
from fused_ema import backends
from fused_ema.plan import Plan
from fused_ema.rounding import rounding_key

import triton_interpreted
from helpers import compared_backends

READS_BACK = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
              torch.ops.aten.is_nonzero.default}


class NoReadBack(TorchDispatchMode):
    """Raises on any operator that copies a tensor value to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS_BACK:
            raise AssertionError(f"the update path read a tensor value back to Python ({func})")
        return func(*args, **(kwargs or {}))


def _model_pairs(device, average_dtype=torch.float32, model_dtype=torch.float32, sets=2):
    generator = torch.Generator().manual_seed(0)
    shapes = [(300,), (7, 9), (), (2049,)]
    models = [torch.randn(shape, generator=generator).to(device, model_dtype) for shape in shapes]
    average_sets = [[m.to(average_dtype).clone() for m in models] for _ in range(sets)]
    return average_sets, models


CPU_CASES = compared_backends() + ["triton (interpreted)"]


@pytest.mark.parametrize("backend", CPU_CASES)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_update_reads_nothing_back(backend, stochastic, monkeypatch):
    if backend == "triton (interpreted)":
        interpreted = triton_interpreted.module()
        if interpreted is None:
            pytest.skip("triton is not installed")
        monkeypatch.setitem(backends._loaded, "triton", interpreted.BACKEND)
        backend = "triton"
    average_sets, models = _model_pairs("cpu", torch.bfloat16 if stochastic else torch.float32)
    plan = Plan(average_sets, models, backend=backend)
    keys = [rounding_key(0, step, 0) for step in range(2)] if stochastic else None
    plan.lerp_([0.1, 0.01], keys)  # first update builds the tables, outside the check
    with NoReadBack():
        for step, weight in enumerate((0.2, 0.3, 1.0)):
            keys = [rounding_key(0, step, k) for k in range(2)] if stochastic else None
            plan.lerp_([weight, weight / 10], keys)
        models[0].data = models[0].clone()  # a storage swap rebuilds the table, still without reads
        plan.lerp_([0.5, 0.05], keys)


def test_the_check_catches_a_read_back():
    with pytest.raises(AssertionError, match="read a tensor value back"), NoReadBack():
        torch.ones(2).sum().item()


GPU_BACKENDS = ("cuda", "triton", "foreach")
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float64, torch.float64)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("average_dtype,model_dtype", DTYPE_PAIRS, ids=str)
def test_gpu_update_does_not_synchronise(backend, average_dtype, model_dtype):
    reason = backends.get(backend).unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    stochastic = average_dtype == torch.bfloat16 and backend != "foreach"  # foreach's SR is the reference path
    average_sets, models = _model_pairs("cuda", average_dtype, model_dtype)
    plan = Plan(average_sets, models, backend=backend)
    assert plan.backend_names == [backend]
    keys = [rounding_key(1, 0, k) for k in range(2)] if stochastic else None
    plan.lerp_([0.1, 0.01], keys)  # compiles the Triton kernel and builds the tables first
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, weight in enumerate((0.2, 0.3, 0.9, 1.0)):  # new weights: no recompilation, no sync
            keys = [rounding_key(1, step, k) for k in range(2)] if stochastic else None
            plan.lerp_([weight, weight / 10], keys)
        models[1].data = models[1].clone()  # storage swap: the table is rebuilt asynchronously
        plan.lerp_([0.5, 0.05], keys)
        fused_ema.multi_lerp_(average_sets, models, [0.5, 0.05], backend=backend)  # the functional path
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
