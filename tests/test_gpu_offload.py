"""An average on the CPU of a model on a GPU: staged copies, waited on before they are read.

The race (a non-blocking device-to-host copy read before it lands) cannot be shown with CPU
tensors, whose copies are synchronous. So the CPU tests swap in a fake device runtime whose copies
land only when their event is waited on: until then the staging buffer holds NaN, so any read
before the wait poisons the average and the comparison with the reference fails. The GPU tests at
the end run the real thing (skipped without a CUDA device).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fused_ema
from fused_ema import backends
from fused_ema.backends import foreach, offload
from fused_ema.plan import Group, Plan

from helpers import tolerance

FAKE_DEVICE = torch.device("cuda", 0)  # only a label: the fake below never touches CUDA


class DelayedCopies:
    """A device whose copies land only when their event is waited on (a busy GPU, exaggerated)."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.log: list[tuple[str, int]] = []

    def start(self, destinations, sources, device):
        assert device == FAKE_DEVICE
        event = len(self.log)
        for destination in destinations:
            destination.fill_(math.nan)  # not arrived yet
        # The stream runs after the optimizer step, so the copy reads the sources as they are now.
        self.pending[event] = (destinations, [source.clone() for source in sources])
        self.log.append(("start", event))
        return event

    def wait(self, event) -> None:
        if event in self.pending:
            destinations, sources = self.pending.pop(event)
            torch._foreach_copy_(destinations, sources)
        self.log.append(("wait", event))

    def pinned(self) -> bool:
        return False


@pytest.fixture
def delayed(monkeypatch) -> DelayedCopies:
    copies = DelayedCopies()
    monkeypatch.setitem(offload._copies, "cuda", copies)
    return copies


def _offload_group(average_dtype, model_dtype, sets=2, shapes=((300,), (7, 9), (), (2049,), (5, 5))):
    """A group as the plan builds it for CPU averages of a model on a GPU (here: labelled so)."""
    generator = torch.Generator().manual_seed(0)
    models = [torch.randn(shape, generator=generator, dtype=torch.float64).to(model_dtype) for shape in shapes]
    average_sets = [[(m.double() + 0.1).to(average_dtype) for m in models] for _ in range(sets)]
    group = Group(torch.device("cpu"), FAKE_DEVICE, average_dtype, model_dtype, average_sets, models,
                  list(range(len(models))), fusable=False)
    return group, average_sets, models


@pytest.mark.parametrize("average_dtype,model_dtype", [(torch.float32, torch.float32),
                                                       (torch.float32, torch.bfloat16),
                                                       (torch.float64, torch.float32)], ids=str)
def test_cpu_average_of_a_gpu_model_waits_for_every_copy(delayed, monkeypatch, average_dtype, model_dtype):
    monkeypatch.setattr(foreach, "UPCAST_BATCH_ELEMENTS", 500)  # several batches: copies overlap updates
    group, average_sets, models = _offload_group(average_dtype, model_dtype)
    expected = [[a.clone() for a in averages] for averages in average_sets]
    weights = [0.25, 0.01]
    for _ in range(3):
        backends.get("foreach").lerp_(group, weights, None)
        Plan(expected, models, backend="reference").lerp_(weights)
        for mine, oracle in zip(sum(average_sets, []), sum(expected, [])):
            assert not mine.isnan().any()
            torch.testing.assert_close(mine, oracle, **tolerance(average_dtype, model_dtype))
        models[1].add_(1.0)  # the "training step": the next update must see it
    starts = [event for kind, event in delayed.log if kind == "start"]
    batches = len(foreach._batches(models))
    assert batches > 1 and len(starts) == 3 * batches, "expected one staged copy per batch and update"


def test_every_copy_of_an_update_is_enqueued_before_the_first_wait(delayed, monkeypatch):
    # Batch i is averaged on the CPU while batch i + 1 is still copying.
    monkeypatch.setattr(foreach, "UPCAST_BATCH_ELEMENTS", 500)
    group, _, _ = _offload_group(torch.float32, torch.float32)
    backends.get("foreach").lerp_(group, [0.5, 0.5], None)
    kinds = [kind for kind, _ in delayed.log]
    first_wait = kinds.index("wait")
    assert kinds[:first_wait] == ["start"] * first_wait and first_wait > 1
    assert kinds[first_wait:] == ["wait"] * (len(kinds) - first_wait)


def test_staging_buffers_are_persistent(delayed):
    # The subject is the backend's private staging cache: its buffers are reused, not reallocated.
    group, _, _ = _offload_group(torch.float32, torch.float32)
    backends.get("foreach").lerp_(group, [0.5, 0.5], None)
    staging = group.cache["staging"]
    pointers = [buffer.data_ptr() for buffer in staging._buffers]
    backends.get("foreach").lerp_(group, [0.5, 0.5], None)
    assert group.cache["staging"] is staging
    assert [buffer.data_ptr() for buffer in staging._buffers] == pointers


def test_an_abandoned_update_still_waits_for_its_copies(delayed, monkeypatch):
    monkeypatch.setattr(foreach, "UPCAST_BATCH_ELEMENTS", 500)
    group, _, _ = _offload_group(torch.float32, torch.float32)
    staging = offload.staged(group, foreach._batches)
    for _ in staging:
        break  # the caller stops after the first batch (an exception, say)
    assert not delayed.pending, "copies still in flight after the update returned"


def test_only_the_local_shard_is_staged(delayed):
    # FSDP2: the plan holds each parameter's local shard (a DTensor's _local_tensor).
    local = torch.randn(3, 4)
    sharded = nn.Parameter(torch.randn(6, 4))
    sharded._local_tensor = local
    plan = Plan([[torch.zeros(3, 4)]], [sharded], backend="foreach")
    group = plan.groups[0]
    group.model_device = FAKE_DEVICE  # pretend the shard lives on a GPU
    backends.get("foreach").lerp_(group, [1.0], None)
    # Private on purpose: what the offload path stages (the shard, not the full parameter) is the subject.
    assert [buffer.shape for buffer in group.cache["staging"]._buffers] == [local.shape]
    torch.testing.assert_close(plan.average_sets[0][0], local)


def test_to_device_blocks_only_towards_the_cpu():
    calls = []

    class Recorder:
        def to(self, device, non_blocking):
            calls.append((str(device), non_blocking))

    offload.to_device(Recorder(), torch.device("cpu"))
    offload.to_device(Recorder(), torch.device("cuda", 1))
    assert calls == [("cpu", False), ("cuda:1", True)]


def test_an_unsupported_device_type_says_what_to_do():
    with pytest.raises(RuntimeError, match="keep the average on the model's device"):
        offload.copies_for(torch.device("xpu"))


# ---------------------------------------------------------------- on a GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _busy_gpu() -> None:
    """Queue seconds of work on the current stream, so an unwaited copy would read too early."""
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        x = x @ x
        x = x / x.norm()


@gpu
@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["same-dtype", "fp32-average"])
def test_ema_on_the_cpu_of_a_busy_gpu_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 300)).cuda()
    if dtype is not None:
        model = model.to(torch.bfloat16)
    ema = fused_ema.EMA(model, decay=0.9, device="cpu", dtype=dtype, stochastic_rounding=False)
    expected = [p.detach().cpu().to(dtype or p.dtype).clone() for p in model.parameters()]
    for _ in range(4):
        with torch.no_grad():
            _busy_gpu()
            for parameter in model.parameters():  # a training step queued behind the busy work
                parameter.add_(torch.randn_like(parameter))
        ema.update()
        for average, parameter in zip(expected, model.parameters()):
            average.lerp_(parameter.detach().cpu().to(average.dtype), 0.1)
    for average, mine in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(mine, average, **tolerance(average.dtype))


@gpu
def test_averaged_model_on_the_cpu_of_a_busy_gpu_model():
    model = nn.Linear(1024, 1024).cuda()
    swa = fused_ema.AveragedModel(model, device="cpu")
    total = [torch.zeros_like(p, device="cpu") for p in model.parameters()]
    for _step in range(3):
        with torch.no_grad():
            _busy_gpu()
            for parameter in model.parameters():
                parameter.add_(1.0)
        swa.update_parameters(model)
        for accumulated, parameter in zip(total, model.parameters()):
            accumulated += parameter.detach().cpu()
    for accumulated, mine in zip(total, swa.module.parameters()):
        torch.testing.assert_close(mine, accumulated / 3)
