"""The "triton" backend against "reference": Triton's interpreter on CPU tensors, no GPU needed.

The interpreted copy of the backend comes from tests/triton_interpreted.py (why a copy: there).
The kernel is also compiled (not run) for sm_80 and sm_90 with Triton's bundled ptxas, which needs
no GPU: a kernel that only the interpreter accepts cannot land.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("triton")

import fused_ema  # noqa: E402
from fused_ema import backends  # noqa: E402
from fused_ema.backends import chunk_table  # noqa: E402
from fused_ema.plan import Plan  # noqa: E402
from fused_ema.rounding import rounding_key  # noqa: E402

import triton_interpreted  # noqa: E402
from helpers import DTYPES, assert_within_ulps

GPU_CHUNK_ELEMENTS = chunk_table.CHUNK_ELEMENTS  # before the fixture below shrinks it

interpreted = triton_interpreted.module()


@pytest.fixture(autouse=True)
def interpreted_triton(monkeypatch):
    """backend='triton' resolves to the interpreted copy for the duration of one test."""
    monkeypatch.setitem(backends._loaded, "triton", interpreted.BACKEND)
    # Small chunks: tensors of a few hundred elements then span several chunks and a masked tail.
    monkeypatch.setattr(chunk_table, "CHUNK_ELEMENTS", 64)
    yield


SHAPES = [(), (1,), (5,), (64,), (3, 70), (0, 4), (2, 3, 40)]


def _pairs(average_dtype, model_dtype, sets, shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    models = [torch.randn(shape, generator=generator, dtype=torch.float64).to(model_dtype) for shape in shapes]
    average_sets = [
        [(m.double() + 0.05 * torch.randn(m.shape, generator=generator, dtype=torch.float64)).to(average_dtype)
         for m in models]
        for _ in range(sets)
    ]
    return average_sets, models


def _clone(average_sets):
    return [[a.clone() for a in averages] for averages in average_sets]


# What the interpreted kernel is held to (README, Numerics): INTERPRETER_ULPS units in the last
# place of the average's dtype at the operands' magnitude, against "reference" on the same CPU.
# It computes the reference's formula with one fma and one rounding, and matched bit for bit under
# triton 3.9.0; triton 3.8.0's interpreter rounds the product w * (m - a) once more, which moves a
# result that cancels (|a + w (m - a)| much smaller than |a|) by up to an ulp of the operands, and
# a stochastically rounded bfloat16 then may land on its neighbour. Bit-identity across triton
# versions is not promised; the ends (weight 0 and 1) stay exact, checked below.
INTERPRETER_ULPS = 2


def _assert_matches_reference(actual_sets, expected_sets, models=None):
    for k, (actual, expected) in enumerate(zip(actual_sets, expected_sets)):
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert a.dtype == e.dtype and a.shape == e.shape
            # The operands' magnitude, per tensor (finite values): the averages start near the model.
            operands = [e.double().abs()] + ([] if models is None else [models[i].detach().double().abs()])
            finite = torch.cat([t[t.isfinite()].flatten() for t in operands])
            scale = float(finite.max()) if finite.numel() else 0.0
            assert_within_ulps(a, e, INTERPRETER_ULPS, f"set {k} tensor {i}", scale=scale)


def _update(average_sets, models, weights, backend, keys):
    plan = Plan(average_sets, models, backend=backend)
    plan.lerp_(weights, keys)
    return plan


def test_available_under_the_interpreter_only_for_cpu_tensors():
    assert interpreted.BACKEND.unavailable_reason() is None
    assert interpreted.BACKEND.device_types == ("cuda", "cpu")
    assert "triton" not in backends.AUTO_ORDER["cpu"]
    average_sets, models = _pairs(torch.float32, torch.float32, 1)
    assert "triton" not in Plan(average_sets, models, backend="auto").backend_names


@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_matches_reference(average_dtype, model_dtype, stochastic):
    average_sets, models = _pairs(average_dtype, model_dtype, sets=1)
    expected = _clone(average_sets)
    keys = [rounding_key(7, 3)] if stochastic else None
    plan = _update(average_sets, models, [0.3], "triton", keys)
    assert plan.backend_names == ["triton"]
    _update(expected, models, [0.3], "reference", keys)
    _assert_matches_reference(average_sets, expected, models)


@pytest.mark.parametrize("average_dtype,model_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float64),
], ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_several_sets_in_one_launch(average_dtype, model_dtype, stochastic):
    weights = [0.0, 0.25, 0.5, 0.999, 1.0]  # both branches of ATen's formula, and the ends
    average_sets, models = _pairs(average_dtype, model_dtype, sets=len(weights))
    expected, expected_original = _clone(average_sets), _clone(average_sets)
    keys = [rounding_key(1, 2, k) for k in range(len(weights))] if stochastic else None
    _update(average_sets, models, weights, "triton", keys)
    _update(expected, models, weights, "reference", keys)
    _assert_matches_reference(average_sets, expected, models)
    for average, before in zip(average_sets[0], expected_original[0]):  # weight 0 keeps it exactly
        assert torch.equal(average, before)
    if average_dtype == model_dtype and not stochastic:
        for average, model in zip(average_sets[-1], models):  # weight 1 copies the model exactly
            assert torch.equal(average, model)


def test_stochastic_rounding_follows_memory_order_of_transposed_tensors():
    generator = torch.Generator().manual_seed(3)
    models = [torch.randn(40, 30, generator=generator).t(), torch.randn(3, 50, generator=generator)]
    averages = [m.to(torch.bfloat16) for m in models]  # .to keeps the transposed strides
    assert averages[0].stride() == models[0].stride() == (1, 30)
    expected = _clone([averages])
    _update([averages], models, [0.01], "triton", [rounding_key(5, 9)])
    _update(expected, models, [0.01], "reference", [rounding_key(5, 9)])
    _assert_matches_reference([averages], expected, models)


def test_non_finite_values():
    models = [torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0, 3.0e38, -3.0e38] * 20)]
    averages = [torch.tensor([0.0, 1.0, 2.0, float("nan"), 3.0e38, -3.0e38] * 20, dtype=torch.bfloat16)]
    expected = _clone([averages])
    _update([averages], models, [0.5], "triton", [rounding_key(0, 1)])
    _update(expected, models, [0.5], "reference", [rounding_key(0, 1)])
    _assert_matches_reference([averages], expected, models)


def test_weights_change_between_updates():
    average_sets, models = _pairs(torch.float32, torch.float32, sets=1)
    expected = _clone(average_sets)
    plan = Plan(average_sets, models, backend="triton")
    reference = Plan(expected, models, backend="reference")
    for weight in (0.1, 0.7, 0.0, 1.0, 0.31):
        plan.lerp_([weight])
        reference.lerp_([weight])
        _assert_matches_reference(average_sets, expected, models)


def test_table_rebuilt_after_storage_swap():
    model = torch.nn.Sequential(torch.nn.Linear(8, 30), torch.nn.Linear(30, 3))
    averages = [p.detach().clone() for p in model.parameters()]
    expected = _clone([averages])
    parameters = list(model.parameters())
    plan = Plan([averages], parameters, backend="triton")
    reference = Plan(expected, parameters, backend="reference")
    plan.lerp_([0.5])
    reference.lerp_([0.5])
    # The subject is the private table itself: rebuilt with new offsets, in its group's cache.
    table = plan.groups[0].cache["chunk_table"]
    with torch.no_grad():
        parameters[0].data = torch.randn_like(parameters[0])  # new storage, same tensor object
        averages[1].data = averages[1].clone()  # the average side can be swapped too
        expected[0][1].data = expected[0][1].clone()
    plan.lerp_([0.25])
    reference.lerp_([0.25])
    assert plan.groups[0].cache["chunk_table"] is table  # rebuilt in place, not regrouped
    assert table.tensors[:, 0].tolist() == [(p.data_ptr() - parameters[0].data_ptr()) // 4 for p in parameters]
    _assert_matches_reference([averages], expected, parameters)


def test_dtype_swap_regroups():
    model = torch.nn.Linear(8, 30)
    averages = [p.detach().clone() for p in model.parameters()]
    expected = _clone([averages])
    parameters = list(model.parameters())
    plan = Plan([averages], parameters, backend="triton")
    plan.lerp_([0.5])
    Plan(expected, parameters, backend="reference").lerp_([0.5])
    model.to(torch.bfloat16)  # swaps every storage for one of another dtype
    assert interpreted.BACKEND.is_stale(plan.groups[0])
    plan.lerp_([0.5])
    Plan(expected, parameters, backend="reference").lerp_([0.5])
    assert [g.model_dtype for g in plan.groups] == [torch.bfloat16]
    _assert_matches_reference([averages], expected, parameters)


def test_layout_swap_is_stale():
    model = torch.randn(6, 8)
    averages = [model.clone()]
    plan = Plan([averages], [model], backend="triton")
    plan.lerp_([0.5])
    model.data = torch.randn(8, 6).t()  # dense but strides no longer match the average's
    assert interpreted.BACKEND.is_stale(plan.groups[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the regrouped pair is not fusable: foreach, with a warning
        plan.lerp_([0.5])
    assert plan.backend_names == ["foreach"]


def test_functional_api():
    average_sets, models = _pairs(torch.bfloat16, torch.float32, sets=2)
    expected = _clone(average_sets)
    fused_ema.multi_lerp_(average_sets, models, [0.1, 0.01], backend="triton", stochastic_rounding=True,
                          seed=4, step=11)
    fused_ema.multi_lerp_(expected, models, [0.1, 0.01], backend="reference", stochastic_rounding=True,
                          seed=4, step=11)
    _assert_matches_reference(average_sets, expected, models)


def test_custom_op_matches_reference():
    """The list-taking op that torch.compile traces (averages set-major, like the C++ op)."""
    average_sets, models = _pairs(torch.bfloat16, torch.float32, sets=2)
    expected = _clone(average_sets)
    keys = [rounding_key(1, 1, 0), rounding_key(1, 1, 1)]
    flat = [a for averages in average_sets for a in averages]
    interpreted.multi_lerp_op(flat, models, [0.2, 0.02], list(range(len(models))), keys)
    _update(expected, models, [0.2, 0.02], "reference", keys)
    _assert_matches_reference(average_sets, expected, models)


def test_compiled_update_is_one_in_place_op():
    """torch.compile keeps one graph, and Inductor calls the op in place: no copy, no copy-back."""
    from torch._inductor.utils import run_and_get_code

    average_sets, models = _pairs(torch.float32, torch.bfloat16, sets=1, shapes=[(5,), (3, 70)])
    expected = _clone(average_sets)
    plan = Plan(average_sets, models, backend="triton")

    @torch.compile(fullgraph=True)  # fullgraph: a graph break raises
    def step(weight):
        plan.lerp_([weight])

    torch._dynamo.reset()
    _, codes = run_and_get_code(step, 0.3)
    Plan(expected, models, backend="reference").lerp_([0.3])
    _assert_matches_reference(average_sets, expected, models)
    code = "\n".join(codes)
    namespace, name = interpreted._OP_NAME.split("::")
    assert code.count(f"torch.ops.{namespace}.{name}.default(") == 1, code
    assert "copy_" not in code and "clone" not in code, code


# --- compiled for real GPUs (no GPU needed: Triton ships ptxas) --------------------------------

COMPILE_CASES = [
    # average, model, sets, stochastic, aligned
    (torch.float32, torch.float32, 1, False, True),
    (torch.bfloat16, torch.float32, 2, True, True),
    (torch.float32, torch.bfloat16, 1, False, True),
    (torch.float64, torch.float16, 1, False, True),
    (torch.float16, torch.float64, 3, False, True),
    (torch.bfloat16, torch.bfloat16, 1, True, False),
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs the compiled kernel")
@pytest.mark.parametrize("capability", [80, 90])
def test_kernel_compiles_for_gpus(capability):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from fused_ema.backends import triton as compiled

    kernel = compiled._multi_lerp_kernel
    names = kernel.arg_names
    for average_dtype, model_dtype, sets, stochastic, aligned in COMPILE_CASES:
        type_names = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
        signature = {name: "constexpr" for name in names}
        signature.update(model_base_ptr=f"*{type_names[model_dtype]}",
                         average_base_ptr=f"*{type_names[average_dtype]}",
                         tensors_ptr="*i64", chunks_ptr="*i64", step_args_ptr="*i64")
        constants = dict(
            AVERAGE_DTYPE=compiled._TORCH_TO_TRITON[average_dtype],
            MODEL_DTYPE=compiled._TORCH_TO_TRITON[model_dtype],
            WIDE=torch.float64 in (average_dtype, model_dtype), SETS=sets, STOCHASTIC=stochastic,
            MODEL_ALIGNMENT=16 // model_dtype.itemsize if aligned else 1,
            AVERAGE_ALIGNMENT=16 // average_dtype.itemsize if aligned else 1,
            BLOCK=GPU_CHUNK_ELEMENTS,
        )
        pointers = ("model_base_ptr", "average_base_ptr", "tensors_ptr", "chunks_ptr", "step_args_ptr")
        source = ASTSource(
            fn=kernel, signature=signature,
            constexprs={(names.index(name),): value for name, value in constants.items()},
            attrs={
                (names.index(name),): [["tt.divisibility", 16]]
                for name in pointers if aligned or "base" not in name
            },
        )
        binary = compile(source, target=GPUTarget("cuda", capability, 32), options={"enable_fp_fusion": False})
        ptx = binary.asm["ptx"]
        assert "fma.rn.f" in ptx
        if aligned:  # full chunks use 16-byte accesses: the point of the base-plus-offset table
            assert "ld.global.v4" in ptx or "ld.global.v2.b64" in ptx, (average_dtype, model_dtype)


def test_custom_op_passes_opcheck():
    average_sets, models = _pairs(torch.float32, torch.bfloat16, sets=2, shapes=[(5,), (3, 70)])
    flat = [a for averages in average_sets for a in averages]
    torch.library.opcheck(interpreted.multi_lerp_op, (flat, models, [0.2, 0.02], [0, 1], None))
    torch.library.opcheck(interpreted.multi_lerp_op, (flat, models, [0.2, 0.02], [0, 1], [5, 6]))
