"""Averaging part of a model: include=/exclude=/trainable_only=, shared tensors, ema_model=/averaged_module=."""

from __future__ import annotations

import copy
import inspect
import io
import threading

import pytest
import torch
from torch import nn
from torch.optim import swa_utils

import fused_ema
from fused_ema.selection import SelectionMismatchError

from models import small_cnn, train_steps


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B @ A`` (names as in peft)."""

    def __init__(self, features: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(features, features)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(features, rank, bias=False)
        self.lora_B = nn.Linear(rank, features, bias=False)
        nn.init.normal_(self.lora_B.weight)  # nonzero, so both adapters get gradients

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.base(inputs) + self.lora_B(self.lora_A(inputs))


def lora_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(LoRALinear(6), nn.BatchNorm1d(6), nn.ReLU(), LoRALinear(6), nn.Linear(6, 3))


def train(model: nn.Module, steps: int, *averages, seed: int = 1) -> None:
    """SGD steps on the trainable parameters; every average is updated after each step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(8, 6, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for average in averages:
            if isinstance(average, fused_ema.EMA):
                average.update()
            else:
                average.update_parameters(model)


ADAPTERS = ["0.lora_A.weight", "0.lora_B.weight", "3.lora_A.weight", "3.lora_B.weight"]
BATCHNORM = ["1.weight", "1.bias"]
TRAINABLE = [*ADAPTERS[:2], *BATCHNORM, *ADAPTERS[2:], "4.weight", "4.bias"]


def _shares(average: nn.Module, model: nn.Module, name: str) -> bool:
    mine, theirs = average.get_parameter(name), model.get_parameter(name)
    return mine is theirs and mine.data_ptr() == theirs.data_ptr()


@pytest.mark.parametrize(
    "kwargs, selected",
    [
        ({"include": "*.lora_*"}, ADAPTERS),
        ({"include": ["0.lora_A.weight", "4.bias"]}, ["0.lora_A.weight", "4.bias"]),
        ({"include": lambda name, tensor: tensor.ndim == 1 and tensor.requires_grad}, [*BATCHNORM, "4.bias"]),
        ({"trainable_only": True}, TRAINABLE),
        ({"trainable_only": True, "exclude": ["4.*", "3.lora_B.weight", "1.*"]}, ADAPTERS[:3]),
        ({"exclude": lambda name, tensor: not tensor.requires_grad}, TRAINABLE),
    ],
    ids=["glob", "names", "predicate", "trainable_only", "trainable_minus_globs", "exclude_predicate"],
)
def test_selection_averages_exactly_the_selected_parameters(kwargs, selected, backend):
    model = lora_model()
    oracle_model = copy.deepcopy(model)
    oracle = fused_ema.EMA(oracle_model, decay=0.7, backend="reference")  # everything, reference path
    ema = fused_ema.EMA(model, decay=0.7, backend=backend, **kwargs)
    names = [name for name, _ in model.named_parameters()]
    versions = {name: model.get_parameter(name)._version for name in names if name not in selected}
    before = {name: model.get_parameter(name).detach().clone() for name in names}

    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    oracle_optimizer = torch.optim.SGD([p for p in oracle_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(4):
        inputs = torch.randn(8, 6, generator=generator)
        for net, opt, average in ((model, optimizer, ema), (oracle_model, oracle_optimizer, oracle)):
            opt.zero_grad()
            net(inputs).square().mean().backward()
            opt.step()
            average.update()

    for name in names:
        mine = ema.module.get_parameter(name)
        if name in selected:
            assert not _shares(ema.module, model, name), name
            torch.testing.assert_close(mine, oracle.module.get_parameter(name), rtol=3e-6, atol=1e-6, msg=name)
        else:
            assert _shares(ema.module, model, name), name  # the live tensor itself: no copy
    for name, version in versions.items():
        if not model.get_parameter(name).requires_grad:  # frozen: nobody may have written it
            assert model.get_parameter(name)._version == version, name
            assert torch.equal(model.get_parameter(name), before[name]), name


def test_selection_keywords_are_keyword_only_and_the_drop_in_constructor_is_unchanged():
    ours = inspect.signature(fused_ema.AveragedModel.__init__).parameters
    torch_positional = [
        name for name, p in inspect.signature(swa_utils.AveragedModel.__init__).parameters.items()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert [name for name, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == torch_positional
    for name in ("include", "exclude", "trainable_only", "averaged_module"):
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY
    for name in ("include", "exclude", "trainable_only", "ema_model"):
        assert inspect.signature(fused_ema.EMA.__init__).parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_unselected_parameters_share_storage_and_only_selected_bytes_are_allocated():
    model = lora_model()
    live_pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    ema = fused_ema.EMA(model, include="*.lora_*")
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == live_pointers  # the model was not moved
    live = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ema.module.state_dict().values()
           if t.untyped_storage().data_ptr() not in live}
    floating_buffers = [b for b in model.buffers() if b.is_floating_point()]
    integer_buffers = [b for b in model.buffers() if not b.is_floating_point()]
    # The four adapters and BatchNorm's statistics (each with a storage of its own bytes, inside one
    # packed block), plus the step count: nothing else is allocated.
    assert sum(own.values()) == (sum(t.nbytes for t in floating_buffers)
                                 + sum(model.get_parameter(n).nbytes for n in ADAPTERS)
                                 + sum(b.nbytes for b in integer_buffers))


def test_buffers_follow_their_own_switch_and_integer_buffers_are_copied():
    model = lora_model()
    averaged = fused_ema.EMA(model, decay=0.5, trainable_only=True, include_buffers=True)
    copied = fused_ema.EMA(model, decay=0.5, trainable_only=True, include_buffers=False)
    batchnorm = model[1]
    for ema in (averaged, copied):
        for name, buffer in ema.module[1].named_buffers():
            assert buffer.data_ptr() != getattr(batchnorm, name).data_ptr(), name  # owned, not shared
    before = batchnorm.running_mean.clone()
    train(model, 3, averaged, copied)
    assert int(averaged.module[1].num_batches_tracked) == int(copied.module[1].num_batches_tracked) == 3
    torch.testing.assert_close(copied.module[1].running_mean, batchnorm.running_mean)
    # Averaged: strictly between the start and the model's statistics.
    assert not torch.equal(averaged.module[1].running_mean, batchnorm.running_mean)
    assert not torch.equal(averaged.module[1].running_mean, before)


def test_swap_exchanges_only_the_selected_tensors_and_survives_an_exception():
    model = lora_model()
    ema = fused_ema.EMA(model, decay=0.5, include="*.lora_*", include_buffers=False)
    train(model, 3, ema)
    training = {name: p.detach().clone() for name, p in model.named_parameters()}
    averages = {name: ema.module.get_parameter(name).detach().clone() for name in ADAPTERS}
    frozen_versions = {name: model.get_parameter(name)._version for name in training if name not in ADAPTERS}
    with pytest.raises(KeyError), ema.swap(model) as swapped:
        assert swapped is model
        for name, tensor in training.items():
            if name in ADAPTERS:
                assert torch.equal(model.get_parameter(name), averages[name])
                assert not torch.equal(model.get_parameter(name), tensor)
            else:
                assert torch.equal(model.get_parameter(name), tensor)
        raise KeyError("inside the block")
    for name, tensor in training.items():
        assert torch.equal(model.get_parameter(name), tensor), name
    for name, version in frozen_versions.items():
        assert model.get_parameter(name)._version == version, name  # swap never touched them


def test_store_copy_to_restore_touch_only_the_selected_tensors():
    model = lora_model()
    ema = fused_ema.EMA(model, decay=0.5, include="*.lora_*", include_buffers=False)
    train(model, 2, ema)
    training = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen = {name: model.get_parameter(name)._version for name in training if name not in ADAPTERS}
    ema.store()
    ema.copy_to()
    for name in ADAPTERS:
        assert torch.equal(model.get_parameter(name), ema.module.get_parameter(name))
    ema.restore()
    for name, tensor in training.items():
        assert torch.equal(model.get_parameter(name), tensor), name
    assert {name: model.get_parameter(name)._version for name in frozen} == frozen


def test_a_frozen_tensor_changed_later_is_seen_by_the_average():
    model = lora_model()
    ema = fused_ema.EMA(model, decay=0.5, include="*.lora_*")
    model.eval(), ema.eval()
    with torch.no_grad():
        model[0].base.weight.add_(1.0)  # the user edits (or unfreezes and trains) a shared tensor
    inputs = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(ema(inputs), model(inputs))  # adapters still equal: same function
        assert torch.equal(ema.module[0].base.weight, model[0].base.weight)


def test_default_selection_keeps_the_checkpoint_layout():
    model = lora_model()
    everything = fused_ema.EMA(model)
    selected_all = fused_ema.EMA(model, exclude=lambda name, tensor: False)  # selects every parameter
    expected = ["_extra_state", *(f"module.{key}" for key in model.state_dict())]
    assert list(everything.state_dict()) == list(selected_all.state_dict()) == expected
    averaged = fused_ema.AveragedModel(model)
    assert list(averaged.state_dict()) == list(swa_utils.AveragedModel(model).state_dict())
    for name, _ in model.named_parameters():
        assert not _shares(everything.module, model, name)


@pytest.mark.parametrize("wrapper", ["EMA", "AveragedModel"])
def test_checkpoint_round_trip_and_a_different_selection_is_refused(wrapper):
    def make(model, **kwargs):
        if wrapper == "EMA":
            return fused_ema.EMA(model, decay=0.6, **kwargs)
        return fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.6), **kwargs)

    model = lora_model()
    saved = make(model, trainable_only=True)
    train(model, 3, saved)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["selection"] == TRAINABLE
    assert "module.0.base.weight" not in state and "module.3.base.bias" not in state

    # Resume in a "new process": the same architecture with the frozen weights it was trained with.
    resumed_model = lora_model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = make(resumed_model, trainable_only=True)
    frozen_before = resumed_model[0].base.weight._version
    assert not resumed.load_state_dict(state).missing_keys
    assert resumed_model[0].base.weight._version == frozen_before  # loading wrote no live tensor
    for name, tensor in saved.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], tensor), name
    train(model, 2, saved, seed=5)
    train(resumed_model, 2, resumed, seed=5)
    for name, tensor in saved.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], tensor), name

    other = make(lora_model(), include="*.lora_*")
    kept = {k: v.clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    # The first name that differs, in the model's order: BatchNorm's weight, trainable but no adapter.
    with pytest.raises(SelectionMismatchError, match="it averages parameter '1.weight', this .* does not") as error:
        other.load_state_dict(state)
    assert isinstance(error.value, ValueError) and isinstance(error.value, RuntimeError)
    for key, tensor in other.state_dict().items():  # refused before anything was loaded
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, kept[key]), key
    full = make(lora_model())
    with pytest.raises(SelectionMismatchError, match="does not average parameter '0.base.weight'"):
        full.load_state_dict(state)
    with pytest.raises(SelectionMismatchError, match="averages parameter '0.base.weight', this .* does not"):
        make(lora_model(), trainable_only=True).load_state_dict(full.state_dict())


def test_checkpoint_of_a_nested_average_forgives_only_its_own_unselected_keys():
    model = lora_model()
    holder = nn.Module()
    holder.ema = fused_ema.EMA(model, include="*.lora_*")
    holder.head = nn.Linear(2, 2)
    state = holder.state_dict()
    assert "ema.selection" in state and "ema.module.0.base.weight" not in state
    del state["head.weight"]
    with pytest.raises(RuntimeError, match="Missing key.*head.weight"):
        holder.load_state_dict(state)


class Unpicklable(nn.Module):
    """A module that refuses copy.deepcopy (it holds a lock), as modules holding file handles do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = lora_model()
        self.lock = threading.Lock()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.body(inputs)


def test_ema_model_for_a_model_that_cannot_be_deep_copied():
    model = Unpicklable()
    with pytest.raises(TypeError, match="deepcopy.*ema_model=copy.*averaged_module=copy"):
        fused_ema.EMA(model)
    with pytest.raises(RuntimeError, match="averaged_module=copy"):
        fused_ema.AveragedModel(model)

    mine = Unpicklable()  # other random values: the model's are copied in
    ema = fused_ema.EMA(model, decay=0.5, ema_model=mine, trainable_only=True)
    assert ema.module is mine
    for name, tensor in model.named_parameters():
        if tensor.requires_grad:
            assert torch.equal(mine.get_parameter(name), tensor) and not _shares(mine, model, name)
            assert not mine.get_parameter(name).requires_grad
        else:
            assert _shares(mine, model, name)  # the copy's own frozen tensors are let go
    averaged = fused_ema.AveragedModel(model, averaged_module=Unpicklable(), use_buffers=True)
    assert torch.equal(averaged.module.body[4].weight, model.body[4].weight)
    assert torch.equal(averaged.module.body[1].running_var, model.body[1].running_var)


def test_ema_model_matches_the_reference_update():
    model = Unpicklable()
    ema = fused_ema.EMA(model, decay=0.5, ema_model=Unpicklable(), trainable_only=True)
    oracle_model = copy.deepcopy(model.body)
    oracle = fused_ema.EMA(oracle_model, decay=0.5, backend="reference", trainable_only=True)
    oracle_model.load_state_dict(model.body.state_dict())
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        inputs = torch.randn(8, 6, generator=generator)
        for net, average in ((model.body, ema), (oracle_model, oracle)):
            net.zero_grad()
            net(inputs).square().mean().backward()
            with torch.no_grad():
                for p in net.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
            average.update()
    for name, tensor in oracle.module.state_dict().items():
        torch.testing.assert_close(ema.module.body.state_dict()[name], tensor, rtol=3e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda copy_: copy_.body.__setitem__(4, nn.Linear(6, 4)),
            r"parameter 'body.4.weight' has shape \(3, 6\) in the model but \(4, 6\)",
        ),
        (lambda copy_: copy_.body[4].register_parameter("extra", nn.Parameter(torch.zeros(1))), "body.4.extra"),
        (lambda copy_: delattr(copy_.body[1], "running_var"), "buffer 'body.1.running_var'"),
    ],
    ids=["shape", "extra_name", "missing_buffer"],
)
def test_ema_model_that_does_not_match_names_the_first_mismatch(change, message):
    model, mine = Unpicklable(), Unpicklable()
    change(mine)
    with pytest.raises(ValueError, match=message):
        fused_ema.EMA(model, ema_model=mine)
    with pytest.raises(ValueError, match=message):
        fused_ema.AveragedModel(model, averaged_module=mine)


def test_ema_model_bad_arguments():
    model = lora_model()
    with pytest.raises(ValueError, match="model itself"):
        fused_ema.EMA(model, ema_model=model)
    with pytest.raises(ValueError, match="one separate module per average.*2 averages"):
        fused_ema.EMA(model, decay=[0.9, 0.99], ema_model=lora_model())
    with pytest.raises(TypeError, match="must be an nn.Module"):
        fused_ema.AveragedModel(model, averaged_module="copy")
    ema = fused_ema.EMA(model, decay=[0.9, 0.99], ema_model=[lora_model(1), lora_model(2)])
    assert ema.averages[1] is not ema.averages[0]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"include": "*.lora_C*"}, ValueError, "include pattern '\\*.lora_C\\*' matches no parameter"),
        ({"exclude": ["4.weight", "nope"]}, ValueError, "exclude pattern 'nope' matches no parameter"),
        ({"include": "1.running_mean"}, ValueError, "buffers are not selected by name"),
        ({"include": 3}, TypeError, "include must be a parameter name, a glob pattern"),
        ({"trainable_only": "yes"}, TypeError, "trainable_only must be True or False"),
        ({"include": lambda name, tensor: False}, ValueError, "select no parameter"),
    ],
)
def test_bad_selections(kwargs, error, message):
    with pytest.raises(error, match=message):
        fused_ema.EMA(lora_model(), **kwargs)
    with pytest.raises(error, match=message):
        fused_ema.AveragedModel(lora_model(), **kwargs)


def test_tied_weights_are_selected_under_all_their_names_or_none():
    def tied_model():
        model = lora_model()
        model[0].tied = model[4].weight  # one tensor, two names: '0.tied' and '4.weight'
        return model

    with pytest.raises(ValueError, match="'4.weight' and '0.tied' are one tensor .*select both names or neither"):
        fused_ema.EMA(tied_model(), include="4.*")
    model = tied_model()
    both = fused_ema.EMA(model, decay=0.5, include=["4.*", "0.tied"])
    assert both.module[4].weight is both.module[0].tied and not _shares(both.module, model, "4.weight")
    neither = fused_ema.EMA(model, decay=0.5, include="*.lora_*")
    assert neither.module[4].weight is neither.module[0].tied is model[4].weight
    state = neither.state_dict()
    assert "module.4.weight" not in state and "module.0.tied" not in state
    train(model, 2, both, neither)
    fused_ema.EMA(tied_model(), decay=0.5, include="*.lora_*").load_state_dict(state)


def test_model_to_after_construction_and_ema_to_never_moves_the_live_model():
    model = lora_model()
    ema = fused_ema.EMA(model, decay=0.5, trainable_only=True, backend="reference")
    model.to(torch.float64)  # param.data = ... on the shared objects: the average follows
    assert ema.module[0].base.weight.dtype == torch.float64 and _shares(ema.module, model, "0.base.weight")
    assert ema.module[0].lora_A.weight.dtype == torch.float32  # the average keeps its own dtype
    expected = ema.module[0].lora_A.weight.double().lerp(model[0].lora_A.weight, 0.5)
    ema.update()
    torch.testing.assert_close(ema.module[0].lora_A.weight.double(), expected, rtol=3e-6, atol=1e-6)

    ema.to(torch.float16)  # the average's own tensors only
    assert model[0].base.weight.dtype == torch.float64 and _shares(ema.module, model, "0.base.weight")
    assert ema.module[0].lora_A.weight.dtype == torch.float16
    ema.update()

    clone = copy.deepcopy(ema)  # a copy holds the average, not the live model (issue 11 item 16): it shares nothing with ours
    assert clone._model is None  # private on purpose: that the copy let go of the live model is the subject
    assert clone.module[0].base.weight is not model[0].base.weight
    assert torch.equal(clone.module[0].base.weight, model[0].base.weight)
    clone.to(torch.float32)  # the copy's frozen weights are its own: cast with the rest, the live model untouched
    assert {p.dtype for p in clone.module.parameters()} == {torch.float32}
    assert model[0].base.weight.dtype == torch.float64
    clone.module(torch.randn(2, 6))  # one dtype throughout


@pytest.mark.parametrize("wrapper", ["EMA", "AveragedModel"])
def test_a_pickled_average_of_part_of_a_model_moves_as_a_whole(wrapper):
    model = lora_model()
    if wrapper == "EMA":
        average = fused_ema.EMA(model, decay=0.5, trainable_only=True)
    else:
        average = fused_ema.AveragedModel(model, trainable_only=True)
    buffer = io.BytesIO()
    torch.save(average, buffer)
    buffer.seek(0)
    copy_ = torch.load(buffer, weights_only=False)
    copy_.double()
    module = copy_.module
    assert {p.dtype for p in module.parameters()} == {torch.float64}  # frozen and averaged weights alike
    assert model[0].base.weight.dtype == torch.float32
    average.double()  # the original still spares the live model's tensors
    assert model[0].base.weight.dtype == torch.float32 and average.module[0].lora_A.weight.dtype == torch.float64


def test_dtype_casts_the_average_and_leaves_shared_tensors_in_the_models_dtype():
    model = lora_model()
    ema = fused_ema.EMA(model, decay=0.5, dtype=torch.float64, include="*.lora_*")
    assert all(ema.module.get_parameter(name).dtype == torch.float64 for name in ADAPTERS)
    assert _shares(ema.module, model, "0.base.weight") and model[0].base.weight.dtype == torch.float32


def test_several_averages_share_the_same_live_tensors():
    model = lora_model()
    ema = fused_ema.EMA(model, decay=[0.5, 0.9], include="*.lora_*")
    singles = [fused_ema.EMA(model, decay=d, include="*.lora_*") for d in (0.5, 0.9)]
    train(model, 3, ema, *singles)
    for average, single in zip(ema.averages, singles):
        assert average[0].base.weight is model[0].base.weight
        for name in ADAPTERS:
            torch.testing.assert_close(average.get_parameter(name), single.module.get_parameter(name))
    assert "extra_averages.0.0.base.weight" not in ema.state_dict()


def test_averaged_model_with_selection_matches_torchs_on_the_selected_parameters():
    model = small_cnn()
    ours = fused_ema.AveragedModel(model, include=["0.*", "8.*"])
    theirs = swa_utils.AveragedModel(model)
    for _ in train_steps(model, 4):
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for name, tensor in theirs.module.named_parameters():
        if name.split(".")[0] in ("0", "8"):
            torch.testing.assert_close(ours.module.get_parameter(name), tensor, rtol=3e-6, atol=1e-6)
        else:
            assert _shares(ours.module, model, name)
