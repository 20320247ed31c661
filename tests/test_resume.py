"""Checkpoints and copies of the wrappers: custom rules resume, loads are all or nothing, copies hold the average."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fused_ema
from fused_ema import rules

from models import small_cnn, train_steps


class Window(rules.Rule):
    """A user's rule with a derived attribute, as people write them."""

    def __init__(self, start: int = 2, end: int = 10, decay: float = 0.9) -> None:
        self.start, self.end, self.decay = start, end, decay
        self.span = end - start

    def weight(self, step: int) -> float:
        return 1.0 if step < self.start else 1 - self.decay * min(1.0, (step - self.start) / self.span)


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _same_state(left, right):
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_custom_rule_with_derived_attributes_resumes_through_weights_only_load():
    model = small_cnn()
    ema = fused_ema.EMA(model, rule=Window(start=1, end=7, decay=0.8))
    for _ in train_steps(model, 3):
        ema.update()
    loaded = torch.load(_saved(ema.state_dict()), weights_only=True)
    resumed = fused_ema.EMA(model, rule=Window())
    resumed.load_state_dict(loaded)
    assert vars(resumed.rule) == vars(ema.rule) == {"start": 1, "end": 7, "decay": 0.8, "span": 6}
    assert _same_state(_state(resumed), _state(ema))
    for _ in train_steps(model, 2, seed=3):
        ema.update()
        resumed.update()
    assert _same_state(_state(resumed), _state(ema))


def _trained_ema(**kwargs):
    model = small_cnn()
    ema = fused_ema.EMA(model, **kwargs)
    for _ in train_steps(model, 2):
        ema.update()
    return model, ema


def _bad_checkpoints(good):
    missing = {k: v for k, v in good.items() if k != "module.8.bias"}
    unexpected = {**good, "module.99.weight": torch.zeros(2)}
    shape = {**good, "module.8.weight": torch.zeros(3, 3)}
    extra = dict(good["_extra_state"])
    averages = {**good, "_extra_state": {**extra, "rules": extra["rules"] * 2}}
    rule = {**good, "_extra_state": {**extra, "rules": [{"rule": "SWA"}]}}
    return {"missing": missing, "unexpected": unexpected, "shape": shape, "averages": averages, "rule": rule}


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape", "averages", "rule"])
def test_failed_ema_load_changes_nothing(kind):
    _, source = _trained_ema(decay=0.5)
    model, ema = _trained_ema(decay=0.75)
    for _ in train_steps(model, 1, seed=9):
        ema.update()
    checkpoint = _bad_checkpoints(source.state_dict())[kind]
    before, counters, rule = _state(ema), (ema.step, ema.num_updates), ema.rule.state_dict()
    with pytest.raises((RuntimeError, ValueError)):
        ema.load_state_dict(checkpoint)
    assert _same_state(_state(ema), before)
    assert (ema.step, ema.num_updates) == counters and ema.rule.state_dict() == rule


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_failed_averaged_model_load_changes_nothing(kind):
    model = small_cnn()
    source, target = fused_ema.AveragedModel(model), fused_ema.AveragedModel(model)
    for swa in (source, target):
        swa.update_parameters(model)
    for _ in train_steps(model, 1):
        source.update_parameters(model)
    good = source.state_dict()
    checkpoint = {"missing": {k: v for k, v in good.items() if k != "module.8.bias"},
                  "unexpected": {**good, "extra": torch.zeros(1)},
                  "shape": {**good, "module.0.weight": torch.zeros(1)}}[kind]
    before = _state(target)
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        target.load_state_dict(checkpoint)
    assert _same_state(_state(target), before)
    target.update_parameters(model)
    assert int(target.n_averaged) == 2


def _averages_bytes(ema):
    return sum(t.numel() * t.element_size() for average in ema.averages
               for t in (*average.parameters(), *average.buffers()))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copy_of_ema_holds_the_average_not_the_model(how):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    ema = fused_ema.EMA(model, decay=[0.5, 0.9])
    ema.update()
    for parameter in model.parameters():
        parameter.data.add_(1.0)
    ema.update()
    if how == "deepcopy":
        twin = copy.deepcopy(ema)
    elif how == "pickle":
        data = pickle.dumps(ema)
        assert len(data) <= 1.1 * _averages_bytes(ema)
        twin = pickle.loads(data)
    else:
        buffer = _saved(ema)
        assert buffer.getbuffer().nbytes <= 1.1 * _averages_bytes(ema)
        twin = torch.load(buffer, weights_only=False)
    assert twin._model is None  # private on purpose: that the copy let go of the live model is the subject
    assert _same_state(_state(twin), _state(ema))
    with pytest.raises(RuntimeError, match="pass the model"):
        twin.update()
    twin.update(model)
    ema.update()
    assert _same_state(_state(twin), _state(ema))
    assert twin.num_updates == ema.num_updates == 3
