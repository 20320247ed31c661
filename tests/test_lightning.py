"""FusedWeightAveraging against Lightning's own EMAWeightAveraging, in a real Trainer on CPU."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from fused_ema.integrations.lightning import FusedWeightAveraging


class Net(pl.LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.validated_with: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.validated_with.append(self.net[0].weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)  # 4 optimizer steps per epoch


def _fit(callback, root, epochs=3, ckpt_path=None, model=None, validate=False, **trainer_kwargs):
    model = model or Net()
    checkpoint = ModelCheckpoint(dirpath=str(root), every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root), callbacks=[callback, checkpoint],
        num_sanity_val_steps=2 if validate else 0, limit_val_batches=1 if validate else 0, **trainer_kwargs,
    )
    trainer.fit(model, _loader(), _loader() if validate else None, ckpt_path=ckpt_path)
    return model


def _floats(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def _assert_same(actual, expected):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_same_weights_as_lightning_ema(tmp_path):
    ours = FusedWeightAveraging(decay=0.8)
    theirs = EMAWeightAveraging(decay=0.8)
    our_model = _fit(ours, tmp_path / "ours", validate=True)
    their_model = _fit(theirs, tmp_path / "theirs", validate=True)
    _assert_same(_floats(ours.ema.module), _floats(theirs._average_model.module))
    _assert_same(_floats(our_model), _floats(their_model))  # the average copied into the model at the end
    assert ours.ema.num_updates == int(theirs._average_model.n_averaged) == 12
    # The sanity check ran before any update: no swap then; later validations saw the average.
    assert len(our_model.validated_with) == len(their_model.validated_with) == 4  # sanity check + 3 epochs
    torch.testing.assert_close(our_model.validated_with[0], Net().net[0].weight.detach())
    for ours_seen, theirs_seen in zip(our_model.validated_with[1:], their_model.validated_with[1:]):
        torch.testing.assert_close(ours_seen, theirs_seen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_model.validated_with[-1], ours.ema.module.net[0].weight)


@pytest.mark.parametrize("writer", ["ours", "lightning"])
def test_resume_mid_training_equals_uninterrupted_run(tmp_path, writer):
    uninterrupted = FusedWeightAveraging(decay=0.8)
    whole = _fit(uninterrupted, tmp_path / "whole")
    first = FusedWeightAveraging(decay=0.8) if writer == "ours" else EMAWeightAveraging(decay=0.8)
    _fit(first, tmp_path / "first", epochs=2)
    checkpoint = min(glob.glob(os.path.join(tmp_path / "first", "epoch=0-*.ckpt")))
    stored = torch.load(checkpoint, weights_only=False)
    assert {"state_dict", "current_model_state", "averaging_state"} <= stored.keys()
    resumed_callback = FusedWeightAveraging(decay=0.8)
    resumed = _fit(resumed_callback, tmp_path / "resumed", ckpt_path=checkpoint, model=Net(seed=7))
    _assert_same(_floats(resumed_callback.ema.module), _floats(uninterrupted.ema.module))
    _assert_same(_floats(resumed), _floats(whole))
    assert resumed_callback.ema.num_updates == uninterrupted.ema.num_updates == 12


def test_gradient_accumulation_updates_per_optimizer_step(tmp_path):
    ours = FusedWeightAveraging(decay=0.8)
    theirs = EMAWeightAveraging(decay=0.8)
    _fit(ours, tmp_path / "ours", epochs=2, accumulate_grad_batches=2)
    _fit(theirs, tmp_path / "theirs", epochs=2, accumulate_grad_batches=2)
    assert ours.ema.num_updates == int(theirs._average_model.n_averaged) == 4
    _assert_same(_floats(ours.ema.module), _floats(theirs._average_model.module))


def test_no_swap_before_the_first_update():
    model = Net()
    callback = FusedWeightAveraging(decay=0.8)
    callback.setup(None, model, "fit")
    with torch.no_grad():
        model.net[0].weight.add_(1.0)  # e.g. weights loaded after the average was made
    before = _floats(model)
    callback.on_validation_epoch_start(None, model)
    _assert_same(_floats(model), before)
    callback.on_validation_epoch_end(None, model)
    _assert_same(_floats(model), before)


def test_under_the_standalone_pytorch_lightning_package(tmp_path):
    standalone = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.callbacks import EMAWeightAveraging as StandaloneEMA

    class Standalone(standalone.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    averages = []
    for callback in (FusedWeightAveraging(decay=0.5), StandaloneEMA(decay=0.5)):
        model = Standalone()
        standalone.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                           enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                           callbacks=[callback]).fit(model, _loader())
        averages.append(_floats(model))
    _assert_same(*averages)


def test_a_misspelt_keyword_fails_at_construction():
    with pytest.raises(TypeError, match="update_evry"):
        FusedWeightAveraging(decay=0.9, update_evry=2)
