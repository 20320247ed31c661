"""EMACallback in a real transformers.Trainer, on a tiny randomly initialised model (no download), CPU."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_ema.integrations.transformers import AVERAGE_FILE, EMACallback

DECAY = 0.7


def _model(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return transformers.BertForSequenceClassification(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self, size=16):
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, 32, (size, 6), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class _Recorder(transformers.TrainerCallback):
    """Snapshots the model after each optimizer step, and what evaluation ran with."""

    def __init__(self, ema_callback):
        self.ema_callback = ema_callback
        self.snapshots, self.evaluated_with, self.training_weights_back = [], [], []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.snapshots.append({k: v.detach().double().clone() for k, v in model.state_dict().items()
                               if v.is_floating_point()})

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.evaluated_with.append((len(self.snapshots), model.classifier.weight.detach().double().clone()))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.evaluated_with:
            self.training_weights_back.append(self.snapshots[-1]["classifier.weight"].equal(
                model.classifier.weight.detach().double()))


def _train(tmp_path, callbacks, model=None, resume=None, **overrides):
    settings = {"output_dir": str(tmp_path), "max_steps": 6, "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2, "learning_rate": 0.05, "report_to": [], "use_cpu": True,
                "save_strategy": "steps", "save_steps": 3, "logging_strategy": "no", "seed": 0,
                "disable_tqdm": True, "dataloader_num_workers": 0, **overrides}
    trainer = transformers.Trainer(model=model or _model(), args=transformers.TrainingArguments(**settings),
                                   train_dataset=_Data(), eval_dataset=_Data(4), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_one_update_per_optimizer_step_and_evaluation_with_the_average(tmp_path):
    callback = EMACallback(decay=DECAY, evaluate_with_average=True)
    recorder = _Recorder(callback)
    trainer = _train(tmp_path, [recorder, callback], eval_strategy="steps", eval_steps=3,
                     per_device_eval_batch_size=4)
    assert callback.ema.step == callback.ema.num_updates == 6 == len(recorder.snapshots)  # 12 micro-batches
    # float64 closed form from the initial weights and the model after each optimizer step
    expected = {k: v.detach().double() for k, v in _model().state_dict().items() if v.is_floating_point()}
    classifier_after = {}
    for step, snapshot in enumerate(recorder.snapshots, start=1):
        for name in expected:
            expected[name] = expected[name] + (1 - DECAY) * (snapshot[name] - expected[name])
        classifier_after[step] = expected["classifier.weight"]
    averaged = callback.ema.module.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(averaged[name].double(), tensor, rtol=1e-5, atol=1e-6, msg=name)
    # evaluations at steps 3 and 6 ran with the average of that moment in the model
    assert [step for step, _ in recorder.evaluated_with] == [3, 6]
    for step, weight in recorder.evaluated_with:
        torch.testing.assert_close(weight, classifier_after[step], rtol=1e-5, atol=1e-6)
    assert recorder.training_weights_back == [True, True, True]  # steps 4-6 trained on the training weights
    assert os.path.isfile(os.path.join(tmp_path, "checkpoint-3", AVERAGE_FILE))
    assert not torch.equal(trainer.model.classifier.weight, callback.ema.module.classifier.weight)


def test_resume_from_checkpoint_restores_the_average(tmp_path):
    whole = EMACallback(decay=DECAY)
    _train(tmp_path, [whole])  # writes checkpoint-3 on the way
    expected = {name: tensor.clone() for name, tensor in whole.ema.module.state_dict().items()}
    resumed = EMACallback(decay=DECAY)
    _train(tmp_path, [resumed], model=_model(seed=5), resume=str(tmp_path / "checkpoint-3"))
    assert resumed.ema.step == resumed.ema.num_updates == 6
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed.ema.module.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_without_a_saved_average_warns(tmp_path):
    _train(tmp_path, [], max_steps=3, save_steps=3)
    with pytest.warns(UserWarning, match="does not exist"):
        _train(tmp_path, [EMACallback(decay=DECAY)], resume=str(tmp_path / "checkpoint-3"))


def test_a_misspelt_keyword_fails_at_construction():
    with pytest.raises(TypeError, match="include_bufers"):
        EMACallback(decay=0.9, include_bufers=False)
