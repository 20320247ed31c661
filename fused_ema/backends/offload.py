"""Model tensors brought to the device of their average: the one place that copies across devices.

An average kept on the CPU of a model on a GPU (``EMA(model, device="cpu")``) needs the model's
values on the host. A device-to-host copy with ``non_blocking=True`` returns before the data has
arrived, so reading its result at once reads a stale or unfilled buffer. :func:`staged` does it
the way NeMo's and torchtitan's EMA do:

- the copies go into **persistent pinned staging buffers** (allocated once per group, reused by
  every update), on a **side stream** that first waits for the current stream (so they see the
  finished optimizer step) and never makes the training stream wait;
- they are split into batches, each with its own **event**; the host waits on a batch's event
  before it hands that batch out, so the CPU update of batch ``i`` overlaps the copy of batch
  ``i + 1``, and no caller can ever see a buffer whose copy has not landed (the buffers are not
  reachable any other way);
- before :func:`staged` returns (or is abandoned), every copy has landed, so the next update's
  copies cannot overwrite bytes the host still reads, nor outlive the model tensors they read.

Under FSDP2 the plan holds each parameter's local shard (``plan.local_tensor``), so only the
local shard is staged and pinned (a DTensor has no ``pin_memory``).

Host-to-device and device-to-device copies need none of this: the stream orders them before any
kernel that reads the result. :func:`to_device` is the single-tensor form used by the reference
backend and the wrappers' custom-function path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, safe to read on return from the host as well as on the device.

    Non-blocking only where the destination's stream orders the copy before any reader (a GPU);
    a copy to the CPU blocks until the data has arrived.
    """
    return tensor.to(device, non_blocking=torch.device(device).type != "cpu")


def needs_staging(model_device: torch.device, average_device: torch.device) -> bool:
    """Whether models on ``model_device`` reach averages on ``average_device`` through the host staging."""
    return average_device.type == "cpu" and model_device.type != "cpu"


class Copies(Protocol):
    """What staging needs from a device runtime (the CUDA one below; tests pass a fake)."""

    def start(self, destinations: list[torch.Tensor], sources: list[torch.Tensor], device: torch.device) -> Any:
        """Enqueue ``destinations[i].copy_(sources[i])`` after the device's current work; return an event."""

    def wait(self, event: Any) -> None:
        """Block the host until the copies behind ``event`` have landed."""

    def pinned(self) -> bool:
        """Whether staging buffers should be page-locked (needed for asynchronous copies)."""


class CudaCopies:
    """Copies on one side stream per device, ordered after the device's current stream."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def start(self, destinations, sources, device):
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        # The side stream waits for the training stream (the optimizer step that wrote the model);
        # the training stream never waits for it.
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            torch._foreach_copy_(destinations, sources, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def wait(self, event) -> None:
        event.synchronize()

    def pinned(self) -> bool:
        return True


_copies: dict[str, Copies] = {}


def copies_for(device: torch.device) -> Copies:
    """The runtime that copies from ``device`` (one per device type, created on first use)."""
    if device.type not in _copies:
        if device.type != "cuda":
            raise RuntimeError(
                f"fused_ema cannot stage copies from {device} to the host yet; keep the average on "
                f"the model's device, or use backend='reference'"
            )
        _copies[device.type] = CudaCopies()
    return _copies[device.type]


class Staging:
    """Persistent host buffers for ``models`` (one group's model tensors on one device), in batches."""

    def __init__(self, models: Sequence[torch.Tensor], device: torch.device, batches: Sequence[slice],
                 copies: Copies) -> None:
        self.models, self.device, self.batches, self.copies = list(models), device, list(batches), copies
        self.shapes = [model.shape for model in self.models]
        dtype = self.models[0].dtype if self.models else torch.float32
        flat = torch.empty(sum(model.numel() for model in self.models), dtype=dtype, pin_memory=copies.pinned())
        self._buffers, offset = [], 0
        for model in self.models:
            self._buffers.append(flat[offset:offset + model.numel()].view(model.shape))
            offset += model.numel()

    def fits(self, models: Sequence[torch.Tensor]) -> bool:
        return len(models) == len(self.models) and all(
            model.shape == shape and model.dtype == buffer.dtype
            for model, shape, buffer in zip(models, self.shapes, self._buffers)
        )

    def __iter__(self) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        """``(batch, host copies of models[batch])``, each handed out only after its copy has landed."""
        if not self.models:
            return
        events = [self.copies.start(self._buffers[batch], self.models[batch], self.device) for batch in self.batches]
        waited = 0
        try:
            for batch, event in zip(self.batches, events):
                self.copies.wait(event)
                waited += 1
                yield batch, self._buffers[batch]
        finally:
            # Abandoned halfway (an exception in the caller): let every copy land before the buffers
            # are reused and before the model tensors they read can be freed.
            for event in events[waited:]:
                self.copies.wait(event)


def staged(group: Any, batches: Callable[[Sequence[torch.Tensor]], list[slice]]) -> Staging:
    """The group's staging (cached in ``group.cache``): iterate it for ``(batch, host models)``."""
    staging = group.cache.get("staging")
    if staging is None or not staging.fits(group.models):
        staging = group.cache["staging"] = Staging(group.models, group.model_device, batches(group.models),
                                                   copies_for(group.model_device))
    return staging
