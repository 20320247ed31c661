"""The task: scikit-learn's 8x8 handwritten digits (no download), a small CNN, and its accuracy.

Example::

    from fused_ema.examples.digits import SmallCNN, evaluate, load_data
    data = load_data()
    evaluate(SmallCNN(), data.test_images, data.test_labels)  # {"accuracy": ~10.0, "loss": ~2.3}
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}  # import name -> pip name


def missing_package(module: str) -> str:
    """The error message for a missing optional dependency, with the command that installs it."""
    package = PACKAGES.get(module.split(".")[0], module)
    return (
        f"the digits example needs {package}, which is not installed: pip install {package} "
        "(or pip install 'fused_ema[examples]' for everything the examples use)"
    )


def setup_error(error: ValueError | ImportError) -> int:
    """Print an example's set-up error (a bad option, or a missing package with its install command);
    return the exit code: 2 for a bad option, 1 for a missing package."""
    if isinstance(error, ImportError):
        print(f"error: {missing_package(error.name or 'sklearn')}", file=sys.stderr)
        return 1
    print(f"error: {error}", file=sys.stderr)
    return 2


@dataclass
class Data:
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_data(train_limit: int | None = None) -> Data:
    """The 1797 digits, scaled to [0, 1], split 2/3 train and 1/3 test (stratified, fixed split)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(missing_package("sklearn"), name="sklearn") from error
    images, labels = load_digits(return_X_y=True)
    # The split stays fixed whatever --seed says, so runs with other seeds face the same test set.
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=1 / 3, stratify=labels, random_state=0
    )
    if train_limit is not None:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]

    def to_images(array) -> Tensor:
        return torch.as_tensor(array, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    def to_labels(array) -> Tensor:
        return torch.as_tensor(array, dtype=torch.long)

    return Data(to_images(train_x), to_labels(train_y), to_images(test_x), to_labels(test_y))


class SmallCNN(nn.Sequential):
    """Three 3x3 conv + BatchNorm + ReLU blocks and a linear classifier, for 1x8x8 inputs."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(16 * width, classes),
        )


def shift_(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image moved by up to one pixel in each direction (zeros come in): fresh every epoch."""
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (len(images), 2), generator=generator)
    for dy in range(3):
        for dx in range(3):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            images[chosen] = padded[chosen, :, dy : dy + 8, dx : dx + 8]
    return images


def batches(images: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Mini-batches of (images, labels), shuffled with ``generator`` when one is given."""
    order = torch.randperm(len(images), generator=generator) if generator is not None else torch.arange(len(images))
    for start in range(0, len(images), batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy (%) and mean cross-entropy of ``model`` in eval mode; restores its mode after."""
    was_training = model.training
    model.eval()
    try:
        logits = model(images)
    finally:
        model.train(was_training)
    return {
        "accuracy": 100.0 * (logits.argmax(dim=1) == labels).double().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }
