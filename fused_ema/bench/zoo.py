"""The benchmark's model zoo: torch.nn models of the shapes users average, nothing downloaded.

A workload is a built model plus what every contender must do with it on each update (the tensors
to average, their dtypes, the decays). ``"quick"`` sizes build in milliseconds for smoke tests.

Example::

    from fused_ema.bench import build_workload
    workload = build_workload("transformer", size="quick")
    print(workload.describe())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

SIZES = ("default", "quick")

class ManySmallTensors(nn.Module):
    """``count`` parameters of ``length`` floats each: per-tensor overhead dominates the update."""

    def __init__(self, count: int, length: int) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(length)) for _ in range(count))


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1, 3x3 (strided), 1x1 convolutions, each followed by BatchNorm."""

    expansion = 4

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        outputs = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(inputs, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, outputs, 1, bias=False), nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(inputs)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (inputs if self.downsample is None else self.downsample(inputs)))


def resnet50_shaped(width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3), classes: int = 1000) -> nn.Module:
    """A ResNet-50 (25.6M parameters, 161 parameter tensors, 53 BatchNorms) without torchvision."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ]
    inputs = width
    for stage, count in enumerate(blocks):
        stage_width = width * 2**stage
        for index in range(count):
            layers.append(Bottleneck(inputs, stage_width, 2 if index == 0 and stage > 0 else 1))
            inputs = stage_width * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, classes)]
    return nn.Sequential(*layers)


def transformer_encoder(width: int = 768, layers: int = 12, heads: int = 12) -> nn.Module:
    """nn.TransformerEncoder, BERT-base shaped by default (85.1M parameters in 144 tensors)."""
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def linear_stack(width: int = 2048, depth: int = 12) -> nn.Module:
    """``depth`` square Linear layers (50.4M parameters at the default size)."""
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))


@dataclass
class WorkloadSpec:
    """How to build one workload: the model, the dtypes and the number of averages."""

    name: str
    summary: str
    build: Callable[[str], nn.Module]  # size -> model (float32, on the current default device)
    model_dtype: torch.dtype = torch.float32
    average_dtype: torch.dtype | None = None  # None: the model's dtype
    decays: tuple[float, ...] = (0.999,)
    stochastic_rounding: bool = False


def _sized(default: Callable[[], nn.Module], quick: Callable[[], nn.Module]) -> Callable[[str], nn.Module]:
    return lambda size: quick() if size == "quick" else default()


ZOO: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in (
        WorkloadSpec(
            "small-tensors", "many small tensors (default: 4000 of 256)",
            _sized(lambda: ManySmallTensors(4000, 256), lambda: ManySmallTensors(200, 64)),
        ),
        WorkloadSpec(
            "transformer", "nn.TransformerEncoder (default: 12 layers, d=768)",
            _sized(transformer_encoder, lambda: transformer_encoder(64, 2, 4)),
        ),
        WorkloadSpec(
            "resnet50", "ResNet-50-shaped conv net, BatchNorm buffers averaged too",
            _sized(resnet50_shaped, lambda: resnet50_shaped(8, (1, 1, 1, 1), 10)),
        ),
        WorkloadSpec(
            "bf16-model", "bfloat16 Linear stack (default: 12 of 2048x2048), float32 average",
            _sized(linear_stack, lambda: linear_stack(64, 2)),
            model_dtype=torch.bfloat16, average_dtype=torch.float32,
        ),
        WorkloadSpec(
            "bf16-sr", "bfloat16 Linear stack, bfloat16 average with stochastic rounding",
            _sized(linear_stack, lambda: linear_stack(64, 2)),
            model_dtype=torch.bfloat16, stochastic_rounding=True,
        ),
        WorkloadSpec(
            "two-averages",
            "two averages (decays 0.999 and 0.9999) of one ResNet-50-shaped net; fused_ema.EMA and "
            "fused_ema.lerp_ (as multi_lerp_) update both in one pass, the others keep two instances",
            _sized(resnet50_shaped, lambda: resnet50_shaped(8, (1, 1, 1, 1), 10)),
            decays=(0.999, 0.9999),
        ),
    )
}


@dataclass(eq=False)
class Workload:
    """A built model and what every contender must do with it on each update."""

    name: str
    summary: str
    model: nn.Module
    average_dtype: torch.dtype
    decays: tuple[float, ...]
    stochastic_rounding: bool
    device: torch.device
    models: list[torch.Tensor]  # parameters and floating buffers: what every contender averages

    @property
    def weights(self) -> list[float]:
        return [1.0 - decay for decay in self.decays]

    @property
    def numel(self) -> int:
        return sum(tensor.numel() for tensor in self.models)

    @property
    def model_dtype(self) -> torch.dtype:
        return self.models[0].dtype

    @property
    def ideal_bytes(self) -> int:
        """Bytes one ideal pass moves: read each model tensor once, read and write every average."""
        average_size = self.average_dtype.itemsize
        return sum(t.numel() * (t.element_size() + 2 * average_size * len(self.decays)) for t in self.models)

    def new_averages(self) -> list[torch.Tensor]:
        """A fresh average of every model tensor, in the workload's average dtype."""
        return [tensor.detach().to(self.average_dtype, copy=True) for tensor in self.models]

    def describe(self) -> str:
        dtypes = _dtype_name(self.model_dtype)
        if self.average_dtype != self.model_dtype:
            dtypes += f" model, {_dtype_name(self.average_dtype)} average"
        return f"{self.summary}: {self.numel / 1e6:.2f}M elements in {len(self.models)} tensors, {dtypes}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_workload(name: str, size: str = "default", device: str | torch.device = "cpu") -> Workload:
    """Build workload ``name`` of the zoo (see :data:`ZOO`) at ``size`` ("default" or "quick")."""
    if name not in ZOO:
        raise ValueError(f"workload must be one of {', '.join(ZOO)}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    spec, device = ZOO[name], torch.device(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = spec.build(size)
    model = model.to(dtype=spec.model_dtype)
    models = [t.detach() for t in model.parameters()] + [t.detach() for t in model.buffers() if t.is_floating_point()]
    return Workload(
        name, spec.summary, model, spec.average_dtype or spec.model_dtype, spec.decays,
        spec.stochastic_rounding, device, models,
    )

