"""The plan cache of EMA and AveragedModel sees only its own two models.

A plan is rebuilt when a parameter, buffer or submodule of the averaged copy or of the live model is
registered, replaced or removed (also behind torch's back: ``_parameters[name] = p``, ``del``,
buffers replaced by ``model.to()``), and never because of a registration elsewhere in the process.
Rebuilds are counted (``_binding.plan_builds``: the private cache is these tests' subject), never timed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.optim import swa_utils

import fused_ema

from helpers import tolerance


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def _nudge(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))


def _expected_after_update(ema_module: nn.Module, model: nn.Module, weight: float) -> dict[str, torch.Tensor]:
    """The average after one more update, computed in float64 from the two models' current values."""
    live = dict(model.named_parameters())
    return {name: average.detach().double() + weight * (live[name].detach().double() - average.detach().double())
            for name, average in ema_module.named_parameters()}


def _assert_averages(ema_module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, average in ema_module.named_parameters():
        torch.testing.assert_close(average.double(), expected[name], **tolerance(average.dtype), msg=name)


def test_foreign_registrations_do_not_rebuild(backend):
    model = _model()
    ema = fused_ema.EMA(model, decay=0.9, backend=backend)
    averaged = fused_ema.AveragedModel(model, backend=backend)
    torch_average = swa_utils.AveragedModel(model)
    for _ in range(3):
        ema.update()
        averaged.update_parameters(model)
        torch_average.update_parameters(model)  # reassigns its n_averaged buffer on every call
        nn.Linear(2, 2)  # registers two parameters in a module nobody averages
        other = nn.Module()
        other.register_buffer("scratch", torch.zeros(1))
        other.child = nn.ReLU()
    assert ema._binding.plan_builds == 1
    assert averaged._binding.plan_builds == 1


def test_no_global_hooks_at_import_or_use():
    code = (
        "import torch\n"
        "from torch.nn.modules import module as m\n"
        "def hooks():\n"
        "    return [len(d) for d in (m._global_parameter_registration_hooks, m._global_buffer_registration_hooks,\n"
        "            m._global_module_registration_hooks, m._global_forward_hooks, m._global_forward_pre_hooks)]\n"
        "before = hooks()\n"
        "import fused_ema\n"
        "model = torch.nn.Linear(3, 3)\n"
        "ema = fused_ema.EMA(model)\n"
        "ema.update()\n"
        "fused_ema.AveragedModel(model).update_parameters(model)\n"
        "assert hooks() == before, (before, hooks())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parameter_replaced_in_the_dict_is_averaged_from_the_new_tensor(backend):
    # HF accelerate's set_module_tensor_to_device assigns module._parameters[name]: no hook runs.
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend)
    ema.update()
    model[0]._parameters["weight"] = nn.Parameter(torch.randn(3, 4) * 10)
    expected = _expected_after_update(ema.module, model, 0.5)
    ema.update()
    _assert_averages(ema.module, expected)
    assert ema._binding.plan_builds == 2


def test_parameter_replaced_in_the_average_is_updated(backend):
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend)
    ema.update()
    ema.module[2]._parameters["bias"] = nn.Parameter(torch.full((2,), 7.0), requires_grad=False)
    expected = _expected_after_update(ema.module, model, 0.5)
    ema.update()
    _assert_averages(ema.module, expected)


@pytest.mark.parametrize("how", ["del", "register_none", "dict_pop"])
def test_removed_parameter_is_named_at_update_swap_and_copy_to(backend, how):
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend)
    ema.update()
    before = {name: tensor.clone() for name, tensor in ema.module.state_dict().items()}
    if how == "del":
        del model[2].bias
    elif how == "register_none":
        model[2].register_parameter("bias", None)
    else:
        model[2]._parameters.pop("bias")
    for call in (ema.update, ema.copy_to, lambda: ema.swap(model).__enter__(), ema.update):
        with pytest.raises(ValueError, match="2.bias"):
            call()
    for name, tensor in ema.module.state_dict().items():  # nothing was written
        assert torch.equal(tensor, before[name]), name


def test_registration_in_the_live_model_is_noticed(backend):
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend)
    ema.update()
    model[0].register_buffer("extra", torch.zeros(2))
    with pytest.raises(ValueError, match="extra"):
        ema.update()


def test_submodule_replaced_is_averaged_from_the_new_one(backend):
    model = _model()
    averaged = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.5), backend=backend)
    averaged.update_parameters(model)
    torch.manual_seed(3)
    model[2] = nn.Linear(3, 2)
    expected = _expected_after_update(averaged.module, model, 0.5)
    averaged.update_parameters(model)
    _assert_averages(averaged.module, expected)
    assert averaged._binding.plan_builds == 2


def test_buffers_replaced_by_model_to_are_followed(backend):
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend, include_buffers=True)
    ema.update()
    running_mean = model[1].running_mean
    model.double()  # replaces every buffer object (and swaps the parameters' storages)
    assert model[1].running_mean is not running_mean
    with torch.no_grad():
        model[1].running_mean.fill_(4.0)
    ema.update()
    # The average's running_mean held BatchNorm's zeros: one update at weight 0.5 towards 4 gives 2.
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((3,), 2.0), rtol=0, atol=0)


def test_plan_reused_while_nothing_changes(backend):
    model = _model()
    ema = fused_ema.EMA(model, decay=0.9, backend=backend)
    for _ in range(5):
        _nudge(model)
        ema.update()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()  # storage swaps are the tables' to follow
    ema.update()
    assert ema._binding.plan_builds == 1


class _Rotary(nn.Module):
    """A layer that reassigns a non-persistent cache in every forward, as some rotary embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("cos_cached", torch.zeros(4), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.cos_cached = torch.cos(torch.arange(inputs.shape[-1], dtype=inputs.dtype))
        return self.linear(inputs) * self.cos_cached


@pytest.mark.parametrize("include_buffers", [False, True])
def test_non_persistent_buffer_reassigned_in_forward_does_not_rebuild(backend, include_buffers):
    model = _Rotary()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend, include_buffers=include_buffers)
    for _ in range(4):
        model(torch.randn(2, 4))
        ema.module(torch.randn(2, 4))  # the averaged copy reassigns its own cache too
        _nudge(model)
        expected = _expected_after_update(ema.module, model, 0.5)
        ema.update()
        _assert_averages(ema.module, expected)
    assert ema._binding.plan_builds == 1


def test_buffer_made_non_persistent_under_its_name_rebuilds(backend):
    """A persistent buffer re-registered as non-persistent leaves the average: that change is noticed."""
    model = _model()
    ema = fused_ema.EMA(model, decay=0.5, backend=backend)
    ema.update()
    model[1].register_buffer("running_mean", torch.ones(3), persistent=False)
    with pytest.raises(ValueError, match="no buffer '1.running_mean'"):  # noticed: the two no longer pair up
        ema.update()
    ema.module[1].register_buffer("running_mean", torch.ones(3), persistent=False)
    ema.update()
    assert ema._binding.plan_builds == 2
