"""Small models shared by the wrapper tests."""

from __future__ import annotations

import torch
from torch import nn


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def train_steps(model: nn.Module, steps: int, seed: int = 1):
    """Deterministic SGD steps; yields after each so a caller can update its averages."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(steps):
        inputs = torch.randn(4, 3, 6, 6, generator=generator)
        loss = model(inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step


class ScalarReadCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of tensor values back to Python (aten._local_scalar_dense: .item(), bool(), int())."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))
