"""Bad input to the functional API: a clear error, and the averages untouched."""

from __future__ import annotations

import pytest
import torch

import fused_ema
from fused_ema import backends
from conftest import cpu_backends


def _lists(count=6):
    averages = [torch.randn(4, 3) for _ in range(count)]
    models = [torch.randn(4, 3) for _ in range(count)]
    return averages, models


BAD_CALLS = {
    "weight_above_one": (lambda a, m: fused_ema.lerp_(a, m, 1.5), ValueError, "weight must be in \\[0, 1\\], got 1.5"),
    "weight_negative": (lambda a, m: fused_ema.lerp_(a, m, -0.1), ValueError, "weight must be in"),
    "weight_nan": (lambda a, m: fused_ema.lerp_(a, m, float("nan")), ValueError, "weight must be in"),
    "weight_device_tensor": (lambda a, m: fused_ema.lerp_(a, m, torch.tensor(0.5, device="meta")), TypeError,
                             "weight must be a Python float or a 0-d real CPU tensor.+on meta"),
    "weight_string": (lambda a, m: fused_ema.lerp_(a, m, "0.5"), TypeError, "weight must be a real number"),
    "lengths": (lambda a, m: fused_ema.lerp_(a, m[:-1], 0.5), ValueError, "averages has 6 tensors but models has 5"),
    "shape": (lambda a, m: fused_ema.lerp_(a, m[:5] + [torch.randn(3, 4)], 0.5), ValueError,
              "averages\\[5\\] is \\(4, 3\\) float32 on cpu but models\\[5\\] is \\(3, 4\\)"),
    "integer_average": (lambda a, m: fused_ema.lerp_(a[:5] + [torch.zeros(4, 3, dtype=torch.int64)], m, 0.5),
                        TypeError, "averages\\[5\\] is \\(4, 3\\) int64 on cpu: an average of a floating-point"),
    "integer_model": (lambda a, m: fused_ema.lerp_(a, m[:5] + [torch.zeros(4, 3, dtype=torch.int64)], 0.5),
                      TypeError, "models\\[5\\] is \\(4, 3\\) int64 on cpu: a floating-point average needs"),
    "not_a_tensor": (lambda a, m: fused_ema.lerp_(a, m[:5] + [[1.0]], 0.5), TypeError, "must be tensors"),
    "weights_count": (lambda a, m: fused_ema.multi_lerp_([a, a], m, [0.5]), ValueError, "got 1 weights for 2 average sets"),
    "set_dtypes": (lambda a, m: fused_ema.multi_lerp_([a, [t.double() for t in a]], m, [0.5, 0.5]), TypeError,
                   "every average set must share dtypes"),
    "unknown_backend": (lambda a, m: fused_ema.lerp_(a, m, 0.5, backend="fast"), ValueError, "backend must be one of"),
    "negative_step": (lambda a, m: fused_ema.lerp_(a, m, 0.5, stochastic_rounding=True, step=-1), ValueError,
                      "step must be >= 0"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_raises_and_changes_nothing(name):
    call, error, message = BAD_CALLS[name]
    averages, models = _lists()
    before = [a.clone() for a in averages]
    with pytest.raises(error, match=message):
        call(averages, models)
    for average, saved in zip(averages, before):
        assert torch.equal(average, saved)


@pytest.mark.parametrize("name", [n for n, reason in backends.status().items() if reason is not None])
def test_unavailable_backend_says_why(name):
    averages, models = _lists()
    with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: .+"):
        fused_ema.lerp_(averages, models, 0.5, backend=name)


def test_every_backend_has_a_status_and_auto_never_raises():
    status = backends.status()
    assert set(status) == {"reference", "foreach", "cpu", "triton", "cuda"}
    assert status["reference"] is None and status["foreach"] is None
    assert set(cpu_backends()) <= set(fused_ema.available_backends())
    averages, models = _lists()
    expected = [torch.lerp(a, m, 0.25) for a, m in zip(averages, models)]
    fused_ema.lerp_(averages, models, 0.25)
    for average, want in zip(averages, expected):
        torch.testing.assert_close(average, want)


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.ENVIRONMENT_VARIABLE, "reference")
    from fused_ema.plan import Plan

    averages, models = _lists()
    assert Plan([averages], models).backend_names == ["reference"]
    monkeypatch.setenv(backends.ENVIRONMENT_VARIABLE, "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        Plan([averages], models)


@pytest.mark.parametrize("backend", cpu_backends())
def test_shape_change_after_planning_raises_before_writing(backend):
    from fused_ema.plan import Plan

    averages, models = _lists()
    plan = Plan([averages], models, backend=backend)
    before = [a.clone() for a in averages]
    models[3].data = torch.randn(3, 4)  # same object, new shape
    with pytest.raises(ValueError, match="averages\\[3\\] is \\(4, 3\\) float32 on cpu but models\\[3\\] is \\(3, 4\\)"):
        plan.lerp_([0.5])
    for average, saved in zip(averages, before):
        assert torch.equal(average, saved)
