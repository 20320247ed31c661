"""Lightning: :class:`FusedWeightAveraging`, Lightning's ``WeightAveraging`` on fused_ema's engine and rules.

Needs Lightning (``pip install 'fused_ema[lightning]'``); works with ``lightning.pytorch`` and, when
only that is installed, ``pytorch_lightning``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fused_ema import rules as rules_module
from fused_ema.checkpoints import load_average
from fused_ema.ema import EMA
from fused_ema.integrations import ema_keywords

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
        from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
    except ImportError as error:
        raise ImportError(
            "fused_ema.integrations.lightning needs Lightning: pip install 'fused_ema[lightning]' "
            "(or pip install lightning)"
        ) from error


class FusedWeightAveraging(Callback):
    """Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` callback, updated by :class:`fused_ema.EMA`.

    After every optimizer step (``trainer.global_step`` advanced, so gradient accumulation counts
    optimizer steps) the average is updated in one fused call; during validation the average is
    swapped into the model, and at the end of ``fit`` it is copied into the model. Checkpoints
    have Lightning's layout: ``state_dict`` holds the average, ``current_model_state`` the training
    weights and ``averaging_state`` the rest of the EMA's state; a checkpoint written by
    Lightning's own callback resumes too. Unlike Lightning's callback it never swaps in an average
    that has not been updated yet (the sanity check, a validation before the first step).

    Keywords are :class:`fused_ema.EMA`'s; ``update_after_step=1`` (the default) makes the first
    update a copy that counts as the first averaged model, exactly as torch's ``AveragedModel``
    under Lightning counts ``n_averaged``, so ``FusedWeightAveraging(decay=d)`` reproduces
    ``EMAWeightAveraging(decay=d)``. Override :meth:`should_update` as in Lightning.

    Example::

        from fused_ema.integrations.lightning import FusedWeightAveraging
        trainer = lightning.pytorch.Trainer(callbacks=[FusedWeightAveraging(decay=0.999)])
        trainer.fit(model, loader)   # the model ends up holding the average
    """

    def __init__(
        self, decay: float = 0.999, *, rule: rules_module.Rule | None = None, update_after_step: int = 1,
        **ema_kwargs: Any,
    ) -> None:
        self._ema_kwargs = ema_keywords(decay=decay, rule=rule, update_after_step=update_after_step, **ema_kwargs)
        self._ema: EMA | None = None
        self._latest_update_step = 0  # trainer.global_step at the last update, as in Lightning
        self._latest_update_epoch = -1
        self._swap: contextlib.ExitStack | None = None

    @property
    def ema(self) -> EMA | None:
        """The :class:`fused_ema.EMA` (built when ``fit`` starts)."""
        return self._ema

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Lightning's hook: update after this optimizer step (``step_idx``) or epoch? Default: every step."""
        return step_idx is not None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if _overrides_configure_model(pl_module):
            rank_zero_warn("FusedWeightAveraging calls configure_model() itself to see every layer; it does not shard.")
            pl_module.configure_model()
        self._ema = EMA(pl_module, **self._ema_kwargs)

    def _update(self, pl_module: Any, step: int | None) -> None:
        self._ema.update(pl_module, step=step)
        if self._ema.step <= self._ema.update_after_step:
            # A copy is the first model of the average (torch's n_averaged after its copying update).
            self._ema.num_updates = 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module, step_idx)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self._update(pl_module, None)
            self._latest_update_epoch = trainer.current_epoch

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._ema is not None and self._ema.step > 0:
            self._ema.copy_to(pl_module)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._ema is not None and self._ema.step > 0 and self._swap is None:
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(self._ema.swap(pl_module))

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_swap()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end_swap()  # an interrupted validation must not leave the average in the model

    def _end_swap(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()

    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": self._latest_update_step, "latest_update_epoch": self._latest_update_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]
        self._latest_update_epoch = state_dict.get("latest_update_epoch", -1)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._ema is None:
            rank_zero_info("FusedWeightAveraging: a checkpoint saved outside fit holds no average.")
            return
        if self._swap is not None:
            raise RuntimeError(
                "FusedWeightAveraging: a checkpoint was requested while the average is swapped in for "
                "validation; save it after on_validation_epoch_end (ModelCheckpoint does)"
            )
        average = self._ema.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {name[7:]: value for name, value in average.items() if name.startswith("module.")}
        checkpoint["averaging_state"] = {name: value for name, value in average.items()
                                         if not name.startswith("module.")}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._ema is None:
            rank_zero_warn("FusedWeightAveraging: a checkpoint loaded outside fit; the average is not restored.")
        elif "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            load_average(self._ema, checkpoint, source="lightning")  # ours, or Lightning's own callback's
            pl_module.load_state_dict(checkpoint["current_model_state"])
        else:
            rank_zero_warn("FusedWeightAveraging: the checkpoint was not written with weight averaging; the average "
                           "starts from its state_dict.")
            self._ema.module.load_state_dict(checkpoint["state_dict"], strict=False)


def _overrides_configure_model(pl_module: Any) -> bool:
    # By class, not through lightning's is_overridden: the module may come from either package.
    for base in type(pl_module).__mro__:
        if base.__name__ == "LightningModule":
            return getattr(type(pl_module), "configure_model", None) is not getattr(base, "configure_model", None)
    return False
