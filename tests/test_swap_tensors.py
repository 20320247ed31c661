"""Under torch.__future__.set_swap_module_params_on_conversion(True), torch exchanges TensorImpls
(torch.utils.swap_tensors) in load_state_dict and Module.to()/.double()/.half(), and refuses tensors
that anything else holds a strong C++ handle on. Plans and tables hold none: every call below works
after updates on every backend, and the next update averages the tensors as they are now.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_ema
from fused_ema import ops


@pytest.fixture(autouse=True)
def swap_on_conversion():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(previous)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def _perturbed_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: (tensor + torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
            if tensor.is_floating_point() else tensor.clone()
            for name, tensor in model.state_dict().items()}


def _run_ema(backend: str) -> tuple[nn.Module, fused_ema.EMA]:
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend)
    ema.update()
    ema.update()
    model.load_state_dict(_perturbed_state(model, 1))
    ema.update()
    model.double()
    ema.update()
    ema.load_state_dict(ema.state_dict())
    ema.update()
    ema.module.half()
    model.load_state_dict(_perturbed_state(model, 2))
    ema.update()
    return model, ema


def test_ema_survives_swapping_conversions(compared_backend):
    _, ema = _run_ema(compared_backend)
    _, expected = _run_ema("reference")
    assert ema.module[0].weight.dtype == torch.float16
    for (name, mine), want in zip(ema.module.state_dict().items(), expected.module.state_dict().values()):
        torch.testing.assert_close(mine, want, rtol=2e-3, atol=1e-3, msg=name)


def test_averaged_model_survives_swapping_conversions(compared_backend):
    results = {}
    for name in (compared_backend, "reference"):
        model = _model()
        averaged = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.5),
                                           use_buffers=True, backend=name)
        averaged.update_parameters(model)
        averaged.update_parameters(model)
        averaged.load_state_dict(averaged.state_dict())
        model.load_state_dict(_perturbed_state(model, 3))
        averaged.update_parameters(model)
        model.double()
        averaged.module.double()
        averaged.update_parameters(model)
        results[name] = averaged.state_dict()
    for key, want in results["reference"].items():
        torch.testing.assert_close(results[compared_backend][key], want, rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.skipif(ops._C is None, reason="the C++ extension is not available")
def test_watched_tensors_can_be_swapped_and_the_watch_notices():
    parameter = nn.Parameter(torch.zeros(5))
    average = torch.zeros(5)
    table = ops._C.CpuTable([average], [parameter], [0], 1)
    watch = ops._C.TensorWatch([parameter])
    torch.utils.swap_tensors(parameter, nn.Parameter(torch.ones(5)))
    assert watch.refresh() == ops._C.WatchState.STALE
    assert table.refresh() == ops._C.WatchState.STALE  # never runs on the TensorImpl it was built from


def test_interpreted_triton_survives_swapping_conversions(monkeypatch):
    """The triton backend's tables (run by Triton's interpreter on CPU tensors) hold no TensorImpl either."""
    from fused_ema import backends

    import triton_interpreted

    interpreted = triton_interpreted.module()
    if interpreted is None or interpreted.BACKEND.unavailable_reason() is not None:
        pytest.skip("triton (interpreted) is not available here")
    monkeypatch.setitem(backends._loaded, "triton", interpreted.BACKEND)
    _, ema = _run_ema("triton")
    _, expected = _run_ema("reference")
    for (name, mine), want in zip(ema.module.state_dict().items(), expected.module.state_dict().values()):
        torch.testing.assert_close(mine, want, rtol=2e-3, atol=1e-3, msg=name)
