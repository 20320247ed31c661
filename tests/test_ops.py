"""torch.ops.fused_ema.*: schema and fake kernels (opcheck), the list op's own paths, torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fused_ema
from fused_ema import backends
from fused_ema.backends.reference import lerp_pair_
from fused_ema.rounding import rounding_key

import triton_interpreted
from helpers import DTYPES

_REASON = backends.get("cpu").unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"the C++ extension is unavailable: {_REASON}")

if _REASON is None:
    from fused_ema import ops


def _reference(average_sets, models, weights, tensor_indices, keys=None):
    """What the op must compute, pair by pair, with the reference backend's torch ops."""
    for set_index, (averages, weight) in enumerate(zip(average_sets, weights)):
        key = None if keys is None else keys[set_index]
        for average, model, tensor_index in zip(averages, models, tensor_indices):
            lerp_pair_(average, model, weight, key, tensor_index)


def _samples():
    """(averages, models, weights, tensor_indices, rounding_keys) argument tuples for the op."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(), (0,), (17,), (4, 33)]
    for average_dtype, model_dtype, sets, stochastic in [
        (torch.float32, torch.float32, 1, False),
        (torch.bfloat16, torch.bfloat16, 2, True),
        (torch.float32, torch.bfloat16, 1, False),
        (torch.float64, torch.float16, 3, False),
    ]:
        models = [torch.randn(shape, generator=generator).to(model_dtype) for shape in shapes]
        averages = [torch.randn(shape, generator=generator).to(average_dtype) for _ in range(sets) for shape in shapes]
        weights = [0.1 * (k + 1) for k in range(sets)]
        keys = [rounding_key(0, 1, k) for k in range(sets)] if stochastic else None
        yield averages, models, weights, list(range(len(shapes))), keys


@pytest.mark.parametrize("sample", list(_samples()) if _REASON is None else [], ids=lambda _: "")
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.fused_ema.multi_lerp_.default, sample)


# Every operator of the fused_ema namespace, and the test that opchecks it. The triton ones exist
# once fused_ema.backends.triton is imported (the interpreted copy registers its own name).
OPCHECKED = {
    "fused_ema::multi_lerp_": "tests/test_ops.py::test_opcheck",
    "fused_ema::triton_multi_lerp_": "tests/test_triton_backend.py::test_custom_op_passes_opcheck (same code)",
    "fused_ema::triton_interpret_multi_lerp_": "tests/test_triton_backend.py::test_custom_op_passes_opcheck",
}


def test_every_operator_declares_what_it_writes_has_a_fake_and_is_opchecked():
    triton_interpreted.module()  # registers the interpreted triton operator, when triton is installed
    names = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fused_ema::")}
    assert "fused_ema::multi_lerp_" in names
    assert names <= set(OPCHECKED), f"operators no test opchecks (or that are not for torch.compile): {names - set(OPCHECKED)}"
    for name in names:
        packet = getattr(torch.ops.fused_ema, name.split("::")[1])
        arguments = {argument.name: argument for argument in packet.default._schema.arguments}
        # The averages are written; nothing else is.
        written = {n for n, a in arguments.items() if a.alias_info is not None and a.alias_info.is_write}
        assert written == {"averages"}, (name, written)
        assert torch._library.simple_registry.singleton.find(name).fake_impl.kernel is not None, f"{name} has no fake"


def test_list_op_matches_reference_on_strided_and_mixed_pairs():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(8, 6, generator=generator)
    models = [
        base.t(),                                            # transposed view
        torch.randn(6, 9, generator=generator)[:, ::2],      # strided slice, bf16 average
        torch.randn(3, 4, 5, 2, generator=generator).contiguous(memory_format=torch.channels_last),
        torch.randn(50, generator=generator).half(),         # another dtype pair in the same call
    ]
    averages = [
        torch.randn(6, 8, generator=generator),
        torch.randn(6, 5, generator=generator).bfloat16(),
        torch.randn(3, 4, 5, 2, generator=generator),       # contiguous average of a channels_last model
        torch.randn(50, generator=generator),
    ]
    second = [average.clone() * 2 for average in averages]
    second[2] = second[2].contiguous(memory_format=torch.channels_last)  # each set its own layout
    sets = [averages, second]
    expected = [[average.clone() for average in averages] for averages in sets]
    keys = [rounding_key(5, 6, 0), rounding_key(5, 6, 1)]
    _reference(expected, models, [0.3, 0.8], [0, 1, 2, 3], keys)
    ops.multi_lerp_([a for averages in sets for a in averages], models, [0.3, 0.8], [0, 1, 2, 3], keys)
    for mine, want in zip(itertools.chain(*sets), itertools.chain(*expected)):
        assert mine.stride() == want.stride()
        assert torch.equal(mine, want)


@pytest.mark.parametrize("average_dtype,model_dtype", [(a, m) for a in DTYPES for m in DTYPES][::3])
def test_list_op_matches_reference_per_dtype_pair(average_dtype, model_dtype):
    generator = torch.Generator().manual_seed(2)
    models = [torch.randn(size, generator=generator).to(model_dtype) for size in (1, 100, 1000)]
    averages = [torch.randn(size, generator=generator).to(average_dtype) for size in (1, 100, 1000)]
    expected = [average.clone() for average in averages]
    _reference([expected], models, [0.7], [3, 4, 5], [9])
    ops.multi_lerp_(averages, models, [0.7], [3, 4, 5], [9])
    for mine, want in zip(averages, expected):
        assert torch.equal(mine, want)


def test_list_op_explains_bad_arguments():
    with pytest.raises(ValueError, match="pass len\\(weights\\) \\* len\\(models\\) averages"):
        ops.multi_lerp_([torch.zeros(2)], [torch.zeros(2)], [0.1, 0.2], [0])
    with pytest.raises(ValueError, match="has shape"):
        ops.multi_lerp_([torch.zeros(2)], [torch.zeros(3)], [0.1], [0])
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        ops.multi_lerp_([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], [0.1], [0])


def _compiled_code(function, *args):
    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True)  # fullgraph: a graph break is an error
    _, code = run_and_get_code(compiled, *args)
    return "\n".join(code)


def _assert_in_place(code):
    # Functionalisation turns a mutating op into a copy plus a copy-back unless inductor
    # re-inplaces it (pytorch#127660): the compiled code must call the op on its inputs directly.
    body = code[code.index("def call("):]
    body = body[: body.index("return ")]
    assert body.count("torch.ops.fused_ema.multi_lerp_.default(") == 1
    for sign_of_a_copy in ("copy_", "clone", "empty_strided", "cpp_fused"):
        assert sign_of_a_copy not in body


def test_op_compiles_in_place_without_graph_break():
    averages, models = [torch.zeros(10), torch.zeros(3, 4)], [torch.ones(10), torch.ones(3, 4)]

    def update(averages, models, weight):
        ops.multi_lerp_(averages, models, [weight], [0, 1])

    code = _compiled_code(update, averages, models, 0.25)
    _assert_in_place(code)
    assert all(torch.equal(average, torch.full_like(average, 0.25)) for average in averages)


def test_functional_lerp_compiles_to_the_op():
    averages = [torch.zeros(10, dtype=torch.bfloat16), torch.zeros(3, 4)]
    models = [torch.ones(10, dtype=torch.bfloat16), torch.ones(3, 4)]
    expected = [average.clone() for average in averages]
    fused_ema.lerp_(expected, models, 0.3, backend="reference", stochastic_rounding=True, seed=1, step=2)

    def update(averages, models):
        fused_ema.lerp_(averages, models, 0.3, backend="cpu", stochastic_rounding=True, seed=1, step=2)

    code = _compiled_code(update, averages, models)
    _assert_in_place(code)
    for mine, want in zip(averages, expected):
        assert torch.equal(mine, want)
