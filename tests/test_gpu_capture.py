"""CUDA-graph capture: an ordinary update refuses it, a capturable one computes its weights on the device.

On CPU: the device formulas of every built-in rule against the host ones, capturable EMA and
AveragedModel against the ordinary ones (every backend that runs here), the refusal during a
(mocked) capture, the device guard of the Triton launch (mocked current device) and the operators'
tags. On a GPU (skipped without one): a real capture replayed, against the reference.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fused_ema
from fused_ema import backends, rules
from fused_ema.backends import capture

import triton_interpreted
from helpers import cpu_backends, tolerance

RULES = [
    rules.ConstantEMA(0.99), rules.WarmupEMA(0.999, min_decay=0.1), rules.WarmupEMA(0.9, inv_gamma=3.0, power=0.75),
    rules.RampEMA(0.999, tau=10.0), rules.BiasCorrectedEMA(0.9), rules.BiasCorrectedEMA(1.0), rules.SWA(),
    rules.TADEMA(0.99), rules.PowerEMA(gamma=6.94), rules.PowerEMA(sigma_rel=0.05),
]


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_device_weight_equals_the_host_weight(rule):
    steps = list(range(40)) + [99, 1000, 12345, 10**6]
    device_weights = rule.weight_tensor(torch.tensor(steps))
    assert device_weights.dtype == torch.float64
    host_weights = torch.tensor([rule(step) for step in steps], dtype=torch.float64)
    torch.testing.assert_close(device_weights, host_weights, rtol=1e-14, atol=1e-16)
    assert rule.weight_tensor(torch.tensor(5)).shape == ()


class Halving(rules.Rule):
    def weight(self, step: int) -> float:
        return 0.5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _train_step(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model(torch.randn(4, 6))  # moves BatchNorm's running statistics and its integer counter


def _capturable_backends() -> list[str]:
    return [*cpu_backends(), "triton (interpreted)"]


@pytest.fixture(params=_capturable_backends())
def capture_backend(request, monkeypatch) -> str:
    if request.param == "triton (interpreted)":
        interpreted = triton_interpreted.module()
        if interpreted is None:
            pytest.skip("triton is not installed")
        monkeypatch.setitem(backends._loaded, "triton", interpreted.BACKEND)
        return "triton"
    return request.param


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["float32", "float64-average"])
def test_capturable_ema_matches_the_ordinary_one(capture_backend, dtype):
    model = _model()
    chosen = [rules.BiasCorrectedEMA(0.9), rules.PowerEMA(gamma=3.0)]
    ours = fused_ema.EMA(model, rule=chosen, dtype=dtype, backend=capture_backend, capturable=True)
    oracle = fused_ema.EMA(model, rule=[rules.BiasCorrectedEMA(0.9), rules.PowerEMA(gamma=3.0)], dtype=dtype,
                           backend="reference")
    for _ in range(5):
        _train_step(model)
        ours.update()
        oracle.update()
    for mine, expected in zip(ours.state_dict().values(), oracle.state_dict().values()):
        if isinstance(mine, torch.Tensor) and mine.is_floating_point():
            torch.testing.assert_close(mine, expected, **tolerance(mine.dtype))
        elif isinstance(mine, torch.Tensor):
            assert torch.equal(mine, expected)
    assert ours.get_extra_state()["num_updates"] == 5  # read from the device count when capturable


def test_capturable_ema_resumes_its_device_count():
    model = _model()
    ema = fused_ema.EMA(model, rule=rules.SWA(), capturable=True)
    for _ in range(3):
        ema.update()
    resumed = fused_ema.EMA(model, rule=rules.SWA(), capturable=True)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.get_extra_state()["num_updates"] == 3  # read back from the device count


@pytest.mark.parametrize("keyword", [dict(update_after_step=2), dict(update_every=3), dict(skip_nonfinite=True),
                                     dict(stochastic_rounding=True)], ids=str)
def test_capturable_ema_rejects_host_step_options(keyword):
    with pytest.raises(ValueError, match=f"capturable=True needs {next(iter(keyword))}"):
        fused_ema.EMA(_model(), capturable=True, **keyword)


def test_capturable_needs_a_device_formula():
    with pytest.raises(NotImplementedError, match="Halving has no device formula"):
        fused_ema.EMA(_model(), rule=Halving(), capturable=True)
    with pytest.raises(ValueError, match="custom avg_fn runs on the host"):
        fused_ema.AveragedModel(_model(), avg_fn=lambda a, m, n: a, capturable=True)


@pytest.mark.parametrize("multi_avg_fn", [None, fused_ema.get_ema_multi_avg_fn(0.9)], ids=["swa", "ema"])
def test_capturable_averaged_model_matches_the_ordinary_one(capture_backend, multi_avg_fn):
    model = _model()
    ours = fused_ema.AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True, backend=capture_backend,
                                   capturable=True)
    oracle = fused_ema.AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True, backend="reference")
    for _ in range(4):
        _train_step(model)
        ours.update_parameters(model)
        oracle.update_parameters(model)
    for (name, mine), expected in zip(ours.state_dict().items(), oracle.state_dict().values()):
        torch.testing.assert_close(mine, expected, msg=name)


@contextlib.contextmanager
def _capturing(monkeypatch):
    """The current stream "is capturing" (a mock: no CUDA here)."""
    with monkeypatch.context() as patch:
        patch.setattr(capture, "is_capturing", lambda: True)
        yield


def test_an_ordinary_update_during_capture_raises_and_writes_nothing(monkeypatch):
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5)
    swa = fused_ema.AveragedModel(model)
    ema.update()
    swa.update_parameters(model)
    _train_step(model)
    before = [t.clone() for t in (*ema.state_dict().values(), *swa.state_dict().values())
              if isinstance(t, torch.Tensor)]
    with _capturing(monkeypatch):
        with pytest.raises(RuntimeError, match="CUDA-graph capture.*capturable=True"):
            ema.update()
        with pytest.raises(RuntimeError, match="CUDA-graph capture.*capturable=True"):
            swa.update_parameters(model)
        with pytest.raises(RuntimeError, match="CUDA-graph capture.*capturable=True"):
            fused_ema.lerp_(list(ema.module.parameters()), list(model.parameters()), 0.5)
    after = [t for t in (*ema.state_dict().values(), *swa.state_dict().values()) if isinstance(t, torch.Tensor)]
    for old, new in zip(before, after):
        assert torch.equal(old, new)


def test_a_capturable_update_runs_during_capture(capture_backend, monkeypatch):
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend=capture_backend, capturable=True)
    oracle = fused_ema.EMA(model, decay=0.5, backend="reference")
    ema.update()  # warm-up: builds the plan and the tables outside capture
    oracle.update()
    _train_step(model)
    with _capturing(monkeypatch):
        ema.update()
    oracle.update()
    for mine, expected in zip(ema.module.parameters(), oracle.module.parameters()):
        torch.testing.assert_close(mine, expected)


def test_building_a_table_during_capture_raises(monkeypatch):
    interpreted = triton_interpreted.module()
    if interpreted is None:
        pytest.skip("triton is not installed")
    monkeypatch.setitem(backends._loaded, "triton", interpreted.BACKEND)
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend="triton", capturable=True)
    with _capturing(monkeypatch), pytest.raises(RuntimeError, match="warm up|chunk table"):
        ema.update()  # no warm-up: the first update would copy the table from the host


def _tracking_device(current: dict):
    """A stand-in for ``torch.cuda.device`` that keeps the index it makes current in ``current["device"]``."""

    @contextlib.contextmanager
    def fake_device(device):
        previous, current["device"] = current["device"], torch.device(device).index
        try:
            yield
        finally:
            current["device"] = previous

    return fake_device


def test_triton_launch_makes_the_tables_device_current(monkeypatch):
    interpreted = triton_interpreted.module()
    if interpreted is None:
        pytest.skip("triton is not installed")
    current = {"device": 0}
    fake_device = _tracking_device(current)
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(current["device"])

    class Table:  # a table on cuda:1; everything else a launch needs, stubbed
        device, chunk_count, sets, chunk_elements, aligned = torch.device("cuda", 1), 3, 1, 64, True
        model_base = average_base = tensors = chunks = None

        def step_args(self, weights, keys):
            launches.append(("step_args", current["device"]))

        def on_current_stream(self):
            launches.append(("stream", current["device"]))

    monkeypatch.setattr(interpreted.torch.cuda, "device", fake_device)
    monkeypatch.setattr(interpreted, "_multi_lerp_kernel", Kernel())
    interpreted.launch_(Table(), None, None, torch.float32, torch.float32, [0.5], None)
    assert launches == [("step_args", 1), ("stream", 1), 1]
    assert current["device"] == 0


def test_cuda_launch_makes_the_tables_device_current(monkeypatch):
    from fused_ema.backends import cuda as cuda_backend

    current = {"device": 0}
    fake_device = _tracking_device(current)
    launches = []

    class Extension:
        @staticmethod
        def _multi_lerp_table_(*args):
            launches.append(current["device"])

    class Ops:
        _C = Extension

    class Table:
        device, chunk_count, sets, chunk_elements = torch.device("cuda", 1), 3, 1, 64
        model_base = average_base = tensors = chunks = None

        def on_current_stream(self):
            launches.append(("stream", current["device"]))

    monkeypatch.setattr(cuda_backend.torch.cuda, "device", fake_device)
    monkeypatch.setattr(cuda_backend, "_ops", lambda: Ops)
    cuda_backend.CudaBackend._launch(Table(), None, False)
    assert launches == [("stream", 1), 1] and current["device"] == 0


def test_fused_operators_are_tagged_cudagraph_unsafe():
    interpreted = triton_interpreted.module()
    if interpreted is not None:
        assert torch.Tag.cudagraph_unsafe in interpreted.multi_lerp_op._opoverload.tags
    if backends.get("cpu").unavailable_reason() is None:
        assert torch.Tag.cudagraph_unsafe in torch.ops.fused_ema.multi_lerp_.default.tags


# ---------------------------------------------------------------- on a GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_BACKENDS = ("cuda", "triton", "foreach")


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("rule", [rules.BiasCorrectedEMA(0.9), rules.SWA(), rules.PowerEMA(gamma=3.0)], ids=repr)
def test_a_captured_update_replays_with_the_right_weights(backend, rule):
    reason = backends.get(backend).unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.Linear(300, 7)).cuda()
    ema = fused_ema.EMA(model, rule=rule, backend=backend, capturable=True)
    oracle = fused_ema.EMA(model, rule=type(rule)(**{k: v for k, v in rule.state_dict().items() if k != "rule"}),
                           backend="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's capture docs ask
        ema.update()
    torch.cuda.current_stream().wait_stream(side)
    oracle.update()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.update()
    for _ in range(5):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        graph.replay()
        oracle.update()
    torch.cuda.synchronize()
    for mine, expected in zip(ema.module.parameters(), oracle.module.parameters()):
        torch.testing.assert_close(mine, expected)
    assert ema.get_extra_state()["num_updates"] == 7  # the device count: warm-up, capture run, five replays


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_an_ordinary_update_refuses_a_real_capture(backend):
    reason = backends.get(backend).unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    model = nn.Linear(16, 16).cuda()
    ema = fused_ema.EMA(model, backend=backend)
    ema.update()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"), torch.cuda.graph(graph):
        ema.update()
