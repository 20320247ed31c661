"""The LoRA worked example: an EMA of adapters only computes what a full-model EMA does, in less memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_ema import cli
from fused_ema.examples import lora

pytest.importorskip("sklearn")  # the digits ship with it; the imports above do not need it

QUICK = lora.Settings(pretrain_epochs=1, epochs=2, train_limit=96, batch_size=16)


@pytest.fixture(scope="module")
def result():
    return lora.run(QUICK, show_progress=False)


def test_a_new_adapter_computes_exactly_what_its_base_did():
    torch.manual_seed(0)
    cases = [(nn.Linear(5, 3), torch.randn(4, 5)), (nn.Conv2d(2, 3, 3, padding=1), torch.randn(1, 2, 6, 6))]
    for base, inputs in cases:
        expected = base(inputs)
        layer = lora.LoRA(base, rank=2)
        assert torch.equal(layer(inputs), expected)
        assert not base.weight.requires_grad and layer.lora_A.weight.requires_grad
    with pytest.raises(TypeError, match="LoRA wraps nn.Linear or nn.Conv2d, got BatchNorm1d"):
        lora.LoRA(nn.BatchNorm1d(3), rank=2)


def test_adapters_only_average_is_the_full_average_in_less_memory(result):
    model, ema, full = result["model"], result["ema"], result["full"]
    for name, parameter in model.named_parameters():
        mine = ema.module.get_parameter(name)
        if parameter.requires_grad:
            assert "lora_" in name and mine is not parameter
        else:
            assert mine is parameter  # frozen weights: shared, not copied
    images = lora.rotate(lora.load_data(QUICK.train_limit).test_images)
    ema.eval(), full.eval()
    with torch.no_grad():
        torch.testing.assert_close(ema(images), full(images), rtol=1e-5, atol=1e-5)
    for record in result["history"]:
        assert record["adapters EMA"] == record["full EMA"]
    adapters = result["parameters"]["adapters"] * 4
    buffers = sum(b.nbytes for b in model.buffers())
    assert result["bytes"]["adapters EMA"] == adapters + buffers  # the adapters and BatchNorm statistics
    assert result["bytes"]["full EMA"] == sum(p.nbytes for p in model.parameters()) + buffers


def test_demo_lora_prints_accuracies_and_memory(capsys):
    argv = ["demo", "--lora", "--quiet", "--pretrain-epochs", "1", "--epochs", "1", "--train-limit", "64"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for line in ("plain adapters", "averaged adapters", "full-model EMA", "less memory than a full-model EMA"):
        assert line in out


def test_bad_options_are_named(capsys):
    assert lora.main(["--rank", "0"]) == 2
    assert "rank must be >= 1, got 0" in capsys.readouterr().err
    assert lora.main(["--decay", "1.5"]) == 2
    assert "decay must be in [0, 1), got 1.5" in capsys.readouterr().err
