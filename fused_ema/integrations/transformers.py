"""Hugging Face ``transformers.Trainer``: :class:`EMACallback` keeps a fused EMA of the model being trained.

Needs transformers (``pip install 'fused_ema[transformers]'``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch

from fused_ema import rules as rules_module
from fused_ema.ema import EMA
from fused_ema.integrations import ema_keywords

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise ImportError(
        "fused_ema.integrations.transformers needs transformers: pip install 'fused_ema[transformers]'"
    ) from error

AVERAGE_FILE = "fused_ema_average.pt"


class EMACallback(TrainerCallback):
    """An exponential moving average of the Trainer's model, updated after each optimizer step.

    The average (a :class:`fused_ema.EMA`, ``callback.ema``) is made when training begins and
    updated once per optimizer step (so ``gradient_accumulation_steps`` micro-batches make one
    update), with ``step = state.global_step``. With ``evaluate_with_average=True`` the Trainer's
    evaluations during training run with the average swapped into the model (the training
    weights come back afterwards). Each checkpoint gets the average beside it
    (``checkpoint-<step>/fused_ema_average.pt``), and ``trainer.train(resume_from_checkpoint=...)``
    restores it from ``<output_dir>/checkpoint-<step>``. Other keywords are :class:`fused_ema.EMA`'s.

    Example::

        ema_callback = EMACallback(decay=0.999, evaluate_with_average=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[ema_callback])
        trainer.train()
        ema_callback.ema.copy_to(model)   # or: with ema_callback.ema.swap(model): ...
    """

    def __init__(
        self, decay: float = 0.999, *, rule: rules_module.Rule | None = None, evaluate_with_average: bool = False,
        **ema_kwargs: Any,
    ) -> None:
        self._ema_kwargs = ema_keywords(decay=decay, rule=rule, **ema_kwargs)
        self.evaluate_with_average = bool(evaluate_with_average)
        self.ema: EMA | None = None
        self._swap: contextlib.ExitStack | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("EMACallback needs the Trainer's model (it is passed to on_train_begin by Trainer)")
        if self.ema is None or self.ema._model is not model:
            self.ema = EMA(model, **self._ema_kwargs)
        if state.global_step > 0:  # resumed: the Trainer restored model, optimizer and state from a checkpoint
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", AVERAGE_FILE)
            if os.path.isfile(path):
                self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                warnings.warn(
                    f"EMACallback: training resumed at step {state.global_step} but {path} does not exist; the "
                    "average starts again from the current model (load one with callback.ema.load_state_dict)",
                    stacklevel=2,
                )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ema.update(step=state.global_step)  # global_step counts optimizer steps; it advances after this

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_swap_in(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_swap_in(control)

    def _maybe_swap_in(self, control: Any) -> None:
        # The Trainer evaluates right after these events when control.should_evaluate is set.
        if self.evaluate_with_average and control.should_evaluate and self._swap is None and self.ema.step > 0:
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(self.ema.swap())

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_swap()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_swap()

    def _end_swap(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ema is None or not args.should_save:
            return
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(directory):
            torch.save(self.ema.state_dict(), os.path.join(directory, AVERAGE_FILE))
