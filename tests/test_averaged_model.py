"""fused_ema.AveragedModel side by side with torch.optim.swa_utils.AveragedModel."""

from __future__ import annotations

import io

import pytest
import torch
from torch.optim import swa_utils

import fused_ema

from helpers import cpu_backends
from models import ScalarReadCounter, small_cnn, train_steps

# (fused_ema kwargs, torch kwargs): the same averaging, spelled for each class.
CONFIGURATIONS = {
    "swa_default": (dict(), dict()),
    "ema_multi_ours": (dict(multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.9)),
                       dict(multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))),
    "ema_multi_torch_fn": (dict(multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9)),
                           dict(multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))),
    "ema_single": (dict(avg_fn=fused_ema.get_ema_avg_fn(0.8)), dict(avg_fn=swa_utils.get_ema_avg_fn(0.8))),
    "swa_multi": (dict(multi_avg_fn=fused_ema.get_swa_multi_avg_fn()), dict(multi_avg_fn=swa_utils.get_swa_multi_avg_fn())),
    "swa_single_torch_fn": (dict(avg_fn=swa_utils.get_swa_avg_fn()), dict(avg_fn=swa_utils.get_swa_avg_fn())),
    "user_lambda": (dict(avg_fn=lambda a, m, n: 0.7 * a + 0.3 * m), dict(avg_fn=lambda a, m, n: 0.7 * a + 0.3 * m)),
}


def _run_side_by_side(configuration, use_buffers, backend="auto", steps=6):
    ours_kwargs, torch_kwargs = CONFIGURATIONS[configuration]
    model = small_cnn()
    ours = fused_ema.AveragedModel(model, use_buffers=use_buffers, backend=backend, **ours_kwargs)
    theirs = swa_utils.AveragedModel(model, use_buffers=use_buffers, **torch_kwargs)
    for _ in train_steps(model, steps):
        ours.update_parameters(model)
        theirs.update_parameters(model)
    return model, ours, theirs


# torch's own swa multi_avg_fn crashes on integer buffers (addcdiv on num_batches_tracked).
SIDE_BY_SIDE = [(c, b) for c in CONFIGURATIONS for b in (False, True) if (c, b) != ("swa_multi", True)]


@pytest.mark.parametrize("configuration,use_buffers", SIDE_BY_SIDE)
def test_matches_torch(configuration, use_buffers):
    model, ours, theirs = _run_side_by_side(configuration, use_buffers)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for (name, mine), their in zip(ours.state_dict().items(), theirs.state_dict().values()):
        if name.endswith("num_batches_tracked") and use_buffers:
            # Integer buffers are copied from the model; torch averages and truncates them.
            assert mine.item() == 6 and dict(model.named_buffers())[name[len("module."):]].item() == 6
            continue
        torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-6, msg=name)
    assert ours.n_averaged.item() == theirs.n_averaged.item() == 6


def test_swa_multi_with_buffers_where_torchs_function_fails():
    model = small_cnn()
    ours = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_swa_multi_avg_fn(), use_buffers=True)
    theirs = swa_utils.AveragedModel(model, use_buffers=True)  # torch's per-tensor SWA path
    for _ in train_steps(model, 4):
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for (name, mine), their in zip(ours.state_dict().items(), theirs.state_dict().values()):
        if their.is_floating_point():
            torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_backend_matches_torch(backend):
    _, ours, theirs = _run_side_by_side("ema_multi_ours", use_buffers=True, backend=backend)
    for mine, their in zip(ours.module.parameters(), theirs.module.parameters()):
        torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-6)


def test_forward_runs_the_average():
    model, ours, theirs = _run_side_by_side("swa_default", use_buffers=True)
    inputs = torch.randn(2, 3, 6, 6)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(inputs), theirs(inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_checkpoints_load_both_ways(direction):
    model, ours, theirs = _run_side_by_side("ema_multi_ours", use_buffers=True, steps=3)
    source, target = (theirs, fused_ema.AveragedModel(small_cnn(5))) if direction == "torch_to_ours" else (
        ours, swa_utils.AveragedModel(small_cnn(5)))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    for (name, loaded), saved in zip(target.state_dict().items(), source.state_dict().values()):
        assert torch.equal(loaded, saved), name
    if isinstance(target, fused_ema.AveragedModel):
        # The host mirror of n_averaged follows the load: the next update is an average, not a copy.
        before = [p.clone() for p in target.parameters()]
        target.update_parameters(model)
        expected = [torch.lerp(b, m, 1 / 4) for b, m in zip(before, model.parameters())]
        for after, want in zip(target.parameters(), expected):
            torch.testing.assert_close(after, want)
        assert target.n_averaged.item() == 4


def test_our_functions_work_inside_torchs_class():
    model = small_cnn()
    theirs_with_ours = swa_utils.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.9))
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    single = swa_utils.AveragedModel(model, avg_fn=fused_ema.get_swa_avg_fn())
    reference = swa_utils.AveragedModel(model, avg_fn=swa_utils.get_swa_avg_fn())
    for _ in train_steps(model, 5):
        for averaged in (theirs_with_ours, theirs, single, reference):
            averaged.update_parameters(model)
    for mine, their in zip(theirs_with_ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-6)
    for mine, their in zip(single.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, their, rtol=1e-5, atol=1e-6)


def test_update_reads_nothing_back_from_the_device():
    model = small_cnn()
    ours = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.9), use_buffers=True)
    theirs = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    ours.update_parameters(model)
    theirs.update_parameters(model)
    with ScalarReadCounter() as ours_reads:
        for _ in range(3):
            ours.update_parameters(model)
    with ScalarReadCounter() as torch_reads:
        theirs.update_parameters(model)
    assert ours_reads.reads == 0
    assert torch_reads.reads >= 1  # the counter does see torch's n_averaged reads


def test_is_a_torch_averaged_model_and_works_with_update_bn_and_swalr():
    model = small_cnn()
    ours = fused_ema.AveragedModel(model)
    assert isinstance(ours, swa_utils.AveragedModel)
    loader = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    ours.update_parameters(model)
    fused_ema.update_bn(loader, ours)
    reference = swa_utils.AveragedModel(model)
    reference.update_parameters(model)
    swa_utils.update_bn(loader, reference)
    for mine, their in zip(ours.buffers(), reference.buffers()):
        torch.testing.assert_close(mine, their)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = fused_ema.SWALR(optimizer, swa_lr=0.05, anneal_epochs=2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_notices_reregistered_parameters_and_replaced_buffers():
    model = small_cnn()
    ours = fused_ema.AveragedModel(model, use_buffers=True)
    ours.update_parameters(model)
    copied_mean = ours.module[1].running_mean.clone()
    model[8].weight = torch.nn.Parameter(torch.full_like(model[8].weight, 3.0))  # a new tensor object
    model[1].register_buffer("running_mean", torch.full((8,), 2.0))
    ours.update_parameters(model)  # n = 1: equal average of the copy and the new values
    torch.testing.assert_close(ours.module[1].running_mean, (copied_mean + 2.0) / 2)
    first_copy = small_cnn()[8].weight  # the seed-0 initial weights
    torch.testing.assert_close(ours.module[8].weight, (first_copy + 3.0) / 2)
    model.to(torch.float64)  # buffers replaced and parameters re-typed, no registration hook fires
    ours.update_parameters(model)
    torch.testing.assert_close(ours.module[8].weight, ((first_copy + 3.0) / 2 * 2 + 3.0) / 3)


def test_shape_mismatch_names_the_tensor():
    ours = fused_ema.AveragedModel(small_cnn())
    other = small_cnn()
    other[8] = torch.nn.Linear(8, 6)
    before = [p.clone() for p in ours.parameters()]
    with pytest.raises(ValueError, match="'8.weight' has shape \\(6, 8\\) in the model but \\(5, 8\\)"):
        ours.update_parameters(other)
    assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters()))
    assert ours.n_averaged.item() == 0


def test_only_one_function():
    with pytest.raises(ValueError, match="only one of avg_fn and multi_avg_fn"):
        fused_ema.AveragedModel(small_cnn(), avg_fn=fused_ema.get_swa_avg_fn(), multi_avg_fn=fused_ema.get_swa_multi_avg_fn())


@pytest.mark.parametrize("wrap", [torch.compile, lambda m: torch.nn.DataParallel(torch.compile(m))],
                         ids=["compiled", "data-parallel-of-compiled"])
def test_unwraps_compiled_models(wrap):
    model = small_cnn()
    ours = fused_ema.AveragedModel(wrap(model))  # torch.compile compiles at the first call: none here
    assert set(ours.state_dict()) == set(swa_utils.AveragedModel(model).state_dict())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    ours.update_parameters(wrap(model))
    for mine, theirs in zip(ours.module.parameters(), model.parameters()):
        assert torch.equal(mine, theirs)


def test_unwraps_data_parallel():
    model = small_cnn()
    ours = fused_ema.AveragedModel(torch.nn.DataParallel(model))
    assert set(ours.state_dict()) == set(swa_utils.AveragedModel(model).state_dict())
    ours.update_parameters(torch.nn.DataParallel(model))
    for mine, theirs in zip(ours.module.parameters(), model.parameters()):
        assert torch.equal(mine, theirs)
