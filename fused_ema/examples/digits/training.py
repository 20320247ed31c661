"""The training loop of the digits run: SGD on the small CNN, every average updated each step.

Example::

    from fused_ema.examples.digits import Config, run
    result = run(Config(epochs=2, train_limit=200), show_progress=False)
    result.records[-1]["averages"]  # {"ema 0.99": {"accuracy": ..., "loss": ...}, ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import fused_ema
from fused_ema.examples.digits.averaging import evaluate_averages
from fused_ema.examples.digits.config import SCHEDULES, Config, check_config, ema_averages
from fused_ema.examples.digits.data import Data, SmallCNN, batches, evaluate, load_data, shift_
from fused_ema.progress import progress


@dataclass
class Result:
    """What :func:`run` produced: the per-epoch records and the final state of every model."""

    config: Config
    labels: list[str]  # one per average, in table order
    records: list[dict[str, Any]]
    model: nn.Module
    ema: fused_ema.EMA | None
    ema_labels: list[str]  # ema.averages[k] is labels' ema_labels[k]
    swa_model: fused_ema.AveragedModel | None
    data: Data
    seconds: float


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer):
    """(main scheduler, SWALR or None); stepped once per epoch."""
    if config.schedule == "step":
        # Two drops by 10x, at 1/2 and 3/4 of the run.
        milestones = [config.epochs // 2, (3 * config.epochs) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1), None
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs), None
    if config.schedule == "swa":
        # torch's SWA recipe: cosine until SWA starts, then SWALR anneals to a constant swa_lr.
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        anneal_epochs = max(1, min(3, config.epochs - config.first_swa_epoch()))
        return main, fused_ema.SWALR(optimizer, swa_lr=config.swa_lr, anneal_epochs=anneal_epochs)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")


def run(config: Config, on_epoch: Callable[[dict[str, Any]], None] | None = None, show_progress: bool = True) -> Result:
    """Train, evaluating the plain model and every average after each epoch.

    ``on_epoch(record)`` is called after each epoch with ``{"epoch", "step", "lr", "plain",
    "averages": {label: {"accuracy", "loss"}}}`` (accuracy in %).
    """
    check_config(config)
    threads = torch.get_num_threads()
    if config.threads is not None:
        # 8x8 images in batches of 16: intra-op threads have little to split, and on a busy
        # machine they wait on descheduled peers (the default run took 619 s with 2 threads
        # against 38 s with 1 on a shared 2-core VM at load 8).
        torch.set_num_threads(config.threads)
    try:
        return _train(config, on_epoch, show_progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: Config, on_epoch: Callable[[dict[str, Any]], None] | None, show_progress: bool) -> Result:
    started = time.monotonic()
    data = load_data(config.train_limit)
    torch.manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    model = SmallCNN(config.width)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    scheduler, swa_scheduler = make_scheduler(config, optimizer)

    named_rules = ema_averages(config)
    ema_labels = [label for label, _ in named_rules]
    # One EMA keeps all the EMA-style averages: every step updates all of them in one fused pass.
    ema = fused_ema.EMA(model, rule=[rule for _, rule in named_rules], include_buffers=True) if named_rules else None
    swa_model = fused_ema.AveragedModel(model) if "swa" in config.rules else None
    labels = ema_labels + (["swa"] if swa_model is not None else [])

    records = []
    step = 0
    swa_updates = 0
    epochs = range(config.epochs)
    for epoch in progress(epochs, "training") if show_progress else epochs:
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        train_images = shift_(data.train_images.clone(), shuffle) if config.augment else data.train_images
        for images, targets in batches(train_images, data.train_labels, config.batch_size, shuffle):
            loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update()
            step += 1
        swa_phase = epoch >= config.first_swa_epoch()
        if swa_model is not None and swa_phase:
            swa_model.update_parameters(model)  # once per epoch, as in torch's SWA recipe
            swa_updates += 1
        if swa_scheduler is not None and swa_phase:
            swa_scheduler.step()
        else:
            scheduler.step()

        averages = evaluate_averages(
            model, ema, ema_labels, swa_model if swa_updates else None, data, config.batch_size
        )
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "plain": evaluate(model, data.test_images, data.test_labels),
            "averages": averages,
        }
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return Result(
        config, labels, records, model, ema, ema_labels, swa_model, data, time.monotonic() - started
    )
