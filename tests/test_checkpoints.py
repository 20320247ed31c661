"""Other libraries' EMA checkpoints: written by the real library, loaded into fused_ema, exported back.

Each library is optional (``pip install --no-deps timm torch_ema ema-pytorch diffusers``): its tests
skip when it is absent. timm is read from ``timm/utils/model_ema.py`` alone, since importing the
package needs torchvision.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import pytest
import torch
from torch import nn

import fused_ema
from fused_ema import rules

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _floats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items() if t.is_floating_point()}


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, **TOL, msg=name)


def _net(seed: int = 0) -> nn.Module:
    """A small network with parameters, floating buffers and an integer buffer (BatchNorm)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _trainer(model: nn.Module, seed: int = 1):
    """An endless deterministic SGD run on ``model``: next() makes one step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    while True:
        loss = model(torch.randn(6, 4, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield


def _timm_model_ema():
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "utils", "model_ema.py")
    module_spec = importlib.util.spec_from_file_location("timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _trained_ema(steps: int = 2) -> fused_ema.EMA:
    model = _net()
    ema = fused_ema.EMA(model, decay=0.7)
    trainer = _trainer(model)
    for _ in range(steps):
        next(trainer)
        ema.update()
    return ema


def _shadow_dict(module: nn.Module, shadow: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for (name, _), tensor in zip(module.named_parameters(), shadow)}


def _parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------- the rules


def test_fraction_warmup_matches_torch_ema():
    torch_ema = pytest.importorskip("torch_ema")
    model = nn.Linear(3, 2)
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.8)
    rule = rules.FractionWarmupEMA(0.8)
    shadow = model.weight.detach().double().clone()
    ours = shadow.clone()
    generator = torch.Generator().manual_seed(0)
    for step in range(40):
        with torch.no_grad():
            model.weight.add_(torch.randn(model.weight.shape, generator=generator))
        theirs.update()
        ours += rule(step) * (model.weight.double() - ours)
        torch.testing.assert_close(theirs.shadow_params[0].double(), ours, rtol=1e-6, atol=1e-6)
    assert rule.get_decay(39) == 0.8 and rule.get_decay(0) == pytest.approx(2 / 11)


def test_half_life_closed_form():
    rule = rules.HalfLifeEMA(10)
    assert rule.decay == pytest.approx(0.5 ** 0.1)
    assert (1 - rule(0)) ** 10 == pytest.approx(0.5)
    assert rules.from_state_dict(rule.state_dict()) == rule
    assert rules.from_state_dict(rules.FractionWarmupEMA(0.9, min_decay=0.5).state_dict()).min_decay == 0.5
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="half_life"):
            rules.HalfLifeEMA(bad)
    with pytest.raises(ValueError, match="min_decay"):
        rules.FractionWarmupEMA(0.9, min_decay=0.95)


# ------------------------------------------------------------------------------------ attach(optimizer)


def test_attach_updates_once_per_optimizer_step_under_accumulation():
    model = _net()
    reference_model = copy.deepcopy(model)
    ema = fused_ema.EMA(model, decay=0.8)
    reference = fused_ema.EMA(reference_model, decay=0.8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    handle = ema.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        batches = [torch.randn(2, 4, generator=generator) for _ in range(3)]  # 3 micro-batches
        for net, opt in ((model, optimizer), (reference_model, reference_optimizer)):
            opt.zero_grad()
            for batch in batches:
                net(batch).square().mean().backward()
            opt.step()
        reference.update()
    assert ema.step == ema.num_updates == 4
    _assert_same(_floats(ema.module), _floats(reference.module))
    assert ema.state_dict().keys() == reference.state_dict().keys()
    handle.remove()
    optimizer.step()
    assert ema.step == 4
    with pytest.raises(TypeError, match="Optimizer"):
        ema.attach(model)


# ----------------------------------------------------------------------- torch AveragedModel and ours


def _torch_averaged(model, decay=0.9, steps=4):
    averaged = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)
    trainer = _trainer(model)
    for _ in range(steps):
        next(trainer)
        averaged.update_parameters(model)
    return averaged, trainer


def test_torch_averaged_model_into_ema_continues_and_exports_back():
    model = _net()
    theirs, trainer = _torch_averaged(model, decay=0.9)
    ema = fused_ema.EMA(_net(seed=5), decay=0.9)
    ema.load_state_dict(theirs.state_dict())
    _assert_same(_floats(ema.module), _floats(theirs.module))
    assert ema.num_updates == 4
    for _ in range(5):  # the next five updates agree
        next(trainer)
        theirs.update_parameters(model)
        ema.update(model)
        _assert_same(_floats(ema.module), _floats(theirs.module))
    back = torch.optim.swa_utils.AveragedModel(_net(seed=6), use_buffers=True)
    back.load_state_dict(fused_ema.export_average(ema, target="torch"))
    _assert_same(_floats(back.module), _floats(ema.module))
    assert int(back.n_averaged) == 9


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_averaged_model_reads_and_writes_wrapped_model_checkpoints(wrap):
    model = _net()
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    theirs = torch.optim.swa_utils.AveragedModel(wrapped)
    prefix = "module._orig_mod." if wrap == "compile" else "module.module."
    assert any(key.startswith(prefix) for key in theirs.state_dict())
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(1.0)
    theirs.n_averaged.fill_(3)
    ours = fused_ema.AveragedModel(_net(seed=5))
    ours.load_state_dict(theirs.state_dict())
    _assert_same(_floats(ours.module), {k[len(prefix):]: v for k, v in _floats(theirs).items()})
    assert int(ours.n_averaged) == 3
    # and back into torch's AveragedModel of the wrapped model
    again = torch.optim.swa_utils.AveragedModel(torch.compile(_net(seed=7)) if wrap == "compile"
                                                else nn.DataParallel(_net(seed=7)))
    again.load_state_dict(fused_ema.export_average(ours, target="torch", model=again.module))
    _assert_same(_floats(again), _floats(theirs))


def test_ema_and_averaged_model_checkpoints_load_into_each_other():
    ema = _trained_ema(steps=3)
    averaged = fused_ema.AveragedModel(_net(seed=3))
    averaged.load_state_dict(ema.state_dict())
    _assert_same(_floats(averaged.module), _floats(ema.module))
    assert int(averaged.n_averaged) == 3
    with torch.no_grad():
        for parameter in averaged.module.parameters():
            parameter.mul_(0.5)
    averaged.n_averaged.fill_(8)
    ema.load_state_dict(averaged.state_dict())
    _assert_same(_floats(ema.module), _floats(averaged.module))
    assert ema.num_updates == 8 and ema.step == 8


# ------------------------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("version", ["ModelEmaV2", "ModelEmaV3"])
@pytest.mark.parametrize("layout", ["wrapper", "plain", "state_dict_ema"])
def test_timm(version, layout):
    timm_ema = _timm_model_ema()
    model = _net()
    theirs = getattr(timm_ema, version)(model, decay=0.8)
    trainer = _trainer(model)
    for _ in range(3):
        next(trainer)
        theirs.update(model)
    state = {"wrapper": theirs.state_dict(), "plain": theirs.module.state_dict(),
             "state_dict_ema": {"state_dict_ema": theirs.module.state_dict(), "epoch": 3}}[layout]
    ema = fused_ema.EMA(_net(seed=4), decay=0.8)
    if layout == "state_dict_ema":
        assert fused_ema.load_average(ema, state) == "timm"
    else:
        ema.load_state_dict(state)
    _assert_same(_floats(ema.module), _floats(theirs.module))
    back = getattr(timm_ema, version)(_net(seed=6), decay=0.8)
    back.load_state_dict(fused_ema.export_average(ema, target="timm"))
    _assert_same(_floats(back.module), _floats(ema.module))


# -------------------------------------------------------------------------------------------- torch_ema


@pytest.mark.parametrize("use_num_updates", [True, False])
def test_torch_ema(use_num_updates):
    torch_ema = pytest.importorskip("torch_ema")
    model = _net()
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9, use_num_updates=use_num_updates)
    trainer = _trainer(model)
    for _ in range(6):
        next(trainer)
        theirs.update()
    ema = fused_ema.EMA(_net(seed=4), decay=0.5)
    ema_model_view = copy.deepcopy(model)
    assert fused_ema.load_average(ema, theirs.state_dict()) == "torch_ema"
    assert ema.rule == (rules.FractionWarmupEMA(0.9) if use_num_updates else rules.ConstantEMA(0.9))
    assert _parameters(ema.module).keys() == _shadow_dict(ema_model_view, theirs.shadow_params).keys()
    _assert_same(_parameters(ema.module), _shadow_dict(ema_model_view, theirs.shadow_params))
    for _ in range(5):  # torch_ema's next five decays
        next(trainer)
        theirs.update()
        ema.update(model)
        _assert_same(_parameters(ema.module), _shadow_dict(model, theirs.shadow_params))
    back = torch_ema.ExponentialMovingAverage(_net(seed=6).parameters(), decay=0.1)
    back.load_state_dict(fused_ema.export_average(ema, target="torch_ema"))
    assert back.decay == 0.9 and back.num_updates == (11 if use_num_updates else None)
    _assert_same(_shadow_dict(model, back.shadow_params), _parameters(ema.module))
    for _ in range(5):  # the exported state continues the schedule in torch_ema
        next(trainer)
        back.update(model.parameters())
        ema.update(model)
    _assert_same(_shadow_dict(model, back.shadow_params), _parameters(ema.module))


# -------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("warmup", [True, False], ids=["use_ema_warmup", "fraction"])
@pytest.mark.parametrize("update_after_step", [0, 3])
def test_diffusers(warmup, update_after_step):
    training_utils = pytest.importorskip("diffusers.training_utils")
    model = _net()
    theirs = training_utils.EMAModel(model.parameters(), decay=0.95, min_decay=0.1, use_ema_warmup=warmup,
                                     power=0.75, update_after_step=update_after_step)
    trainer = _trainer(model)
    for _ in range(4):
        next(trainer)
        theirs.step(model.parameters())
    ema = fused_ema.EMA(_net(seed=4), decay=0.5)
    assert fused_ema.load_average(ema, theirs.state_dict()) == "diffusers"
    _assert_same(_parameters(ema.module), _shadow_dict(model, theirs.shadow_params))
    for _ in range(5):  # diffusers' next five decays, and the weights they give
        next(trainer)
        theirs.step(model.parameters())
        step = ema.step
        decay = 0.0 if step < ema.update_after_step else ema.rule.get_decay(ema.num_updates)
        assert decay == pytest.approx(theirs.cur_decay_value, abs=1e-12)
        ema.update(model)
        _assert_same(_parameters(ema.module), _shadow_dict(model, theirs.shadow_params))
    back = training_utils.EMAModel(_net(seed=6).parameters(), decay=0.5)
    back.load_state_dict(fused_ema.export_average(ema, target="diffusers"))
    for _ in range(5):
        next(trainer)
        back.step(model.parameters())
        theirs.step(model.parameters())
        ema.update(model)
        assert back.cur_decay_value == pytest.approx(theirs.cur_decay_value, abs=1e-12)
    _assert_same(_shadow_dict(model, back.shadow_params), _parameters(ema.module))


def test_constant_decay_exports_to_diffusers_exactly():
    training_utils = pytest.importorskip("diffusers.training_utils")
    model = _net()
    ema = fused_ema.EMA(model, rule=rules.HalfLifeEMA(4), update_after_step=2)
    theirs = training_utils.EMAModel(_net(seed=3).parameters())
    trainer = _trainer(model)
    next(trainer)
    ema.update()
    theirs.load_state_dict(fused_ema.export_average(ema, target="diffusers"))
    for _ in range(5):
        next(trainer)
        ema.update()
        theirs.step(model.parameters())
    _assert_same(_shadow_dict(model, theirs.shadow_params), _parameters(ema.module))


# ------------------------------------------------------------------------------------------ ema-pytorch


def test_ema_pytorch():
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = _net()
    settings = {"beta": 0.95, "update_after_step": 4, "update_every": 2, "power": 0.75, "inv_gamma": 1.0,
                "min_value": 0.1}
    theirs = ema_pytorch.EMA(model, **settings)
    trainer = _trainer(model)
    for _ in range(9):
        next(trainer)
        theirs.update()
    ema = fused_ema.EMA(_net(seed=4), rule=rules.WarmupEMA(0.95, inv_gamma=1.0 / 2, power=0.75, min_decay=0.1),
                        update_after_step=4, update_every=2)
    assert fused_ema.load_average(ema, theirs.state_dict()) == "ema_pytorch"
    assert ema.step == 9
    _assert_same(_floats(ema.module), _floats(theirs.ema_model))
    for _ in range(5):  # the next updates follow ema-pytorch's step-based schedule
        next(trainer)
        theirs.update()
        ema.update(model)
        _assert_same(_floats(ema.module), _floats(theirs.ema_model))
    back = ema_pytorch.EMA(_net(seed=6), **settings)
    back.load_state_dict(fused_ema.export_average(ema, target="ema_pytorch"))
    assert int(back.step) == 14
    _assert_same(_floats(back.ema_model), _floats(ema.module))
    for _ in range(5):
        next(trainer)
        back.online_model.load_state_dict(model.state_dict())
        back.update()
        ema.update(model)
    _assert_same(_floats(back.ema_model), _floats(ema.module))


# -------------------------------------------------------------------------------------------- Lightning


class _LitNet(nn.Module):
    """Stands in for a LightningModule's names (``net.``): the callback deep-copies whatever it is given."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = _net(seed)

    def forward(self, x):
        return self.net(x)


def _lightning_checkpoint(model, decay=0.9, steps=4):
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    callback = callbacks.EMAWeightAveraging(decay=decay)
    callback._average_model = torch.optim.swa_utils.AveragedModel(
        model, use_buffers=True, avg_fn=torch.optim.swa_utils.get_ema_avg_fn(decay))
    trainer = _trainer(model)
    for _ in range(steps):
        next(trainer)
        callback._average_model.update_parameters(model)
    checkpoint = {"state_dict": model.state_dict(), "epoch": 0}
    callback.on_save_checkpoint(None, model, checkpoint)
    return callback, checkpoint, trainer


def test_lightning_checkpoint_into_ema_and_back():
    model = _LitNet()
    theirs, checkpoint, trainer = _lightning_checkpoint(model)
    assert {"state_dict", "current_model_state", "averaging_state"} <= checkpoint.keys()
    ema = fused_ema.EMA(_LitNet(seed=3).net, decay=0.9)  # the plain network: "net." is matched away
    assert fused_ema.load_average(ema, checkpoint) == "lightning"
    _assert_same(_floats(ema.module), {k[4:]: v for k, v in _floats(theirs._average_model.module).items()})
    assert ema.num_updates == 4
    whole = fused_ema.EMA(_LitNet(seed=3), decay=0.9)
    fused_ema.load_average(whole, checkpoint)
    for _ in range(5):
        next(trainer)
        theirs._average_model.update_parameters(model)
        whole.update(model)
        _assert_same(_floats(whole.module), _floats(theirs._average_model.module))
    # back into Lightning's callback, through its own on_load_checkpoint
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    back = callbacks.EMAWeightAveraging(decay=0.9)
    other = _LitNet(seed=8)
    back._average_model = torch.optim.swa_utils.AveragedModel(other, use_buffers=True)
    exported = fused_ema.export_average(whole, target="lightning", model=model)
    back.on_load_checkpoint(None, other, exported)
    _assert_same(_floats(back._average_model.module), _floats(whole.module))
    _assert_same(_floats(other), _floats(model))
    assert int(back._average_model.n_averaged) == 9


def test_plain_lightning_checkpoint_is_refused():
    ema = fused_ema.EMA(_net(), decay=0.9)
    with pytest.raises(ValueError, match="averaging_state"):
        fused_ema.load_average(ema, {"state_dict": _net().state_dict(), "epoch": 1})


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embedding.weight


def test_tied_weights_stay_tied_through_import_and_export():
    torch_ema = pytest.importorskip("torch_ema")
    model = _Tied()
    theirs = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9)
    with torch.no_grad():
        model.embedding.weight.add_(1.0)
    theirs.update()
    ema = fused_ema.EMA(_Tied(), decay=0.9)
    fused_ema.load_average(ema, theirs.state_dict())
    assert ema.module.head.weight is ema.module.embedding.weight
    torch.testing.assert_close(ema.module.head.weight, theirs.shadow_params[0])
    assert len(fused_ema.export_average(ema, target="torch_ema")["shadow_params"]) == 1
    ema.load_state_dict(model.state_dict())  # a plain state dict names the tied weight twice
    torch.testing.assert_close(ema.module.head.weight, model.embedding.weight)


@pytest.mark.parametrize("shadowed", ["trainable", "all"])
def test_partial_average_takes_only_its_parameters(shadowed):
    torch_ema = pytest.importorskip("torch_ema")
    model = _net()
    model[0].requires_grad_(False)  # frozen: an average of the rest shares it with the live model
    frozen = model[0].weight.detach().clone()
    parameters = [p for p in model.parameters() if p.requires_grad] if shadowed == "trainable" else model.parameters()
    theirs = torch_ema.ExponentialMovingAverage(parameters, decay=0.9)
    theirs.shadow_params = [t + 1.0 for t in theirs.shadow_params]
    ema = fused_ema.EMA(model, decay=0.5, trainable_only=True)
    fused_ema.load_average(ema, theirs.state_dict())
    torch.testing.assert_close(ema.module[3].weight, theirs.shadow_params[-2])
    assert torch.equal(model[0].weight, frozen)  # the live model's frozen layer is not written
    state = fused_ema.export_average(ema, target="torch_ema")
    assert len(state["shadow_params"]) == 6


# ------------------------------------------------------------------------------------------ bad input


def _state(ema):
    return {k: v.clone() for k, v in ema.module.state_dict().items()}, ema.step, ema.num_updates, ema.rule


def _assert_unchanged(ema, before):
    tensors, step, num_updates, rule = before
    for name, tensor in ema.module.state_dict().items():
        assert torch.equal(tensor, tensors[name]), name
    assert (ema.step, ema.num_updates, ema.rule) == (step, num_updates, rule)


def _mismatched_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("case", ["unknown", "shape", "missing", "extra", "shadow_count", "shadow_shape",
                                  "bad_source", "bad_settings"])
def test_bad_input_raises_and_changes_nothing(case):
    ema = _trained_ema()
    before = _state(ema)
    other = _mismatched_model()
    good = _net(seed=9).state_dict()
    checkpoint, match, source = {
        "unknown": ({"weights": [1, 2]}, "recognise", "auto"),
        "shape": ({"module." + k: v for k, v in other.state_dict().items()} | {"n_averaged": torch.tensor(1)},
                  r"'3.weight' has shape \(4, 8\)", "auto"),
        "missing": ({k: v for k, v in good.items() if k != "3.bias"}, "'3.bias' is missing", "auto"),
        "extra": (good | {"4.weight": torch.zeros(1)}, "'4.weight'", "auto"),
        "shadow_count": ({"decay": 0.9, "num_updates": 3, "shadow_params": [torch.zeros(8, 4)],
                          "collected_params": None}, "1 shadow_params", "auto"),
        "shadow_shape": ({"decay": 0.9, "num_updates": 3, "collected_params": None,
                          "shadow_params": [p.detach() for p in other.parameters()]}, r"shadow_params\[4\]", "auto"),
        "bad_source": (good, "source must be", "keras"),
        "bad_settings": ({"decay": 0.5, "min_decay": 0.9, "optimization_step": 3, "use_ema_warmup": True,
                          "shadow_params": [p.detach() for p in _net().parameters()]}, "min_decay", "auto"),
    }[case]
    with pytest.raises(ValueError, match=match):
        fused_ema.load_average(ema, checkpoint, source=source)
    _assert_unchanged(ema, before)
    if case in ("shape", "missing", "extra"):
        with pytest.raises(ValueError, match=match):
            ema.load_state_dict(checkpoint)
        _assert_unchanged(ema, before)


def test_wrong_target_or_format_for_load_state_dict():
    with pytest.raises(TypeError, match="fused_ema.EMA or fused_ema.AveragedModel"):
        fused_ema.load_average(_net(), _net().state_dict())
    ema = _trained_ema()
    before = _state(ema)
    torch_ema_state = {"decay": 0.9, "num_updates": 1, "collected_params": None,
                       "shadow_params": [p.detach() for p in _net().parameters()]}
    with pytest.raises(ValueError, match="load_average"):
        ema.load_state_dict(torch_ema_state)
    _assert_unchanged(ema, before)
    with pytest.raises(ValueError, match="target must be one of"):
        fused_ema.export_average(ema, target="keras")


def test_multi_average_ema_refuses_a_single_average():
    ema = fused_ema.EMA(_net(), decay=[0.9, 0.99])
    with pytest.raises(ValueError, match="keeps 2"):
        ema.load_state_dict({"module." + k: v for k, v in _net(seed=3).state_dict().items()})


def test_unrepresentable_schedule_warns_on_export():
    ema = fused_ema.EMA(_net(), rule=rules.PowerEMA(gamma=3.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = fused_ema.export_average(ema, target="torch_ema")
    assert any("cannot express" in str(w.message) for w in caught)
    assert state["num_updates"] is None
