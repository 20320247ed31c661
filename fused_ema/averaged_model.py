"""A drop-in replacement for ``torch.optim.swa_utils.AveragedModel`` whose update is fused."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import swa_utils
from torch.optim.swa_utils import SWALR, update_bn  # noqa: F401  (re-exported)

from fused_ema import backends, selection
from fused_ema.backends import capture, offload
from fused_ema.backends.reference import compute_dtype
from fused_ema.binding import Binding, check_loadable, clone_module, unwrap
from fused_ema.plan import without_grad
from fused_ema.rules import SWA, ConstantEMA, Rule


class AveragingFunction:
    """An ``avg_fn`` / ``multi_avg_fn`` backed by a rule.

    Works when passed to torch's own AveragedModel (signature ``(averaged, current, num_averaged)``),
    and :class:`AveragedModel` recognises it and runs its rule through the fused update instead.
    """

    def __init__(self, rule: Rule, multi: bool) -> None:
        self.rule, self.multi = rule, multi

    def __repr__(self) -> str:
        return f"AveragingFunction({self.rule!r}, multi={self.multi})"

    @torch.no_grad()
    def __call__(self, averaged: Any, current: Any, num_averaged: Tensor | int) -> Tensor | None:
        # torch's AveragedModel passes a device tensor: reading it is the sync torch's class makes anyway.
        weight = self.rule(int(num_averaged))
        if not self.multi:
            dtype = compute_dtype(averaged.dtype, current.dtype)
            return averaged.to(dtype).lerp(current.to(dtype), weight).to(averaged.dtype)
        from fused_ema.functional import lerp_

        lerp_(averaged, current, weight)
        return None


def get_ema_multi_avg_fn(decay: float = 0.999) -> AveragingFunction:
    """EMA over lists of tensors, ``w = 1 - decay``; fused in :class:`AveragedModel`, valid in torch's."""
    return AveragingFunction(ConstantEMA(decay), multi=True)


def get_swa_multi_avg_fn() -> AveragingFunction:
    """Equal averaging over lists of tensors, ``w = 1 / (n + 1)``."""
    return AveragingFunction(SWA(), multi=True)


def get_ema_avg_fn(decay: float = 0.999) -> AveragingFunction:
    """EMA of one tensor, ``decay * averaged + (1 - decay) * current``."""
    return AveragingFunction(ConstantEMA(decay), multi=False)


def get_swa_avg_fn() -> AveragingFunction:
    """Equal average of one tensor, ``averaged + (current - averaged) / (n + 1)``."""
    return AveragingFunction(SWA(), multi=False)


def _rule_of(function: Callable | None) -> Rule | None:
    if isinstance(function, AveragingFunction):
        return function.rule
    if isinstance(function, Rule):
        return function
    return None


class AveragedModel(swa_utils.AveragedModel):
    """Keeps an average of a model's weights, like ``torch.optim.swa_utils.AveragedModel``.

    Same constructor, ``update_parameters``, ``forward``, ``n_averaged`` buffer and state_dict keys
    (``n_averaged``, ``module.<name>``), so checkpoints move between the two classes. The
    difference is the update: all tensors in one fused call per device and dtype, no host-device
    sync (``n_averaged`` is mirrored on the host), tensor lists built once, and integer buffers
    copied rather than averaged. ``capturable=True`` computes the weight on the device from
    ``n_averaged`` (kept on the average's device), so an update can be captured in a CUDA graph.
    Rules from ``get_*_avg_fn`` of this module (or any
    :class:`fused_ema.rules.Rule`) take the fused path; other functions run as in torch.

    Keyword-only extras: ``include=`` / ``exclude=`` / ``trainable_only=`` average part of the
    model and share the rest with it (as in :class:`fused_ema.EMA`), and ``averaged_module=`` is
    a copy of the model built by you, used instead of ``copy.deepcopy``.

    Example::

        swa_model = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.999))
        for batch in loader:
            train_step(model, batch)
            swa_model.update_parameters(model)
    """

    def __init__(
        self,
        model: nn.Module,
        device: int | torch.device | str | None = None,
        avg_fn: Callable[[Tensor, Tensor, Tensor | int], Tensor] | None = None,
        multi_avg_fn: Callable[[list[Tensor], list[Tensor], Tensor | int], None] | None = None,
        use_buffers: bool = False,
        *,
        backend: str = "auto",
        include: selection.Patterns = None,
        exclude: selection.Patterns = None,
        trainable_only: bool = False,
        averaged_module: nn.Module | None = None,
        capturable: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        if avg_fn is not None and multi_avg_fn is not None:
            raise ValueError("give only one of avg_fn and multi_avg_fn")
        model = unwrap(model)
        selected = selection.select(model, include, exclude, trainable_only)
        self.module = clone_module(model, device, selected=selected, copy_of_model=averaged_module)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.backend = backends.check_name(backend)
        backends.check_usable(backend, {t.device.type for t in (*self.module.parameters(), *self.module.buffers())})
        self._rule = SWA() if avg_fn is None and multi_avg_fn is None else _rule_of(avg_fn or multi_avg_fn)
        self._binding = Binding([self.module], average_buffers=use_buffers, backend=backend, selected=selected)
        selection.attach(self, model, [self.module], selected)
        self.capturable = bool(capturable)
        if self.capturable:
            if self._rule is None:
                raise ValueError("capturable=True needs a rule (get_*_multi_avg_fn of fused_ema, or a "
                                 "fused_ema.rules.Rule): a custom avg_fn runs on the host")
            self._rule.weight_tensor(self.n_averaged)  # NotImplementedError now, not at the first update
            # The count the weights are computed from must live where the graph runs: the average's device.
            average_device = next((t.device for t in self.module.parameters()), self.n_averaged.device)
            self.n_averaged = self.n_averaged.to(average_device)
        # The host copy of n_averaged: [count, the buffer, its version], valid while the buffer is
        # that object at that version. A list changed in place: nn.Module.__setattr__ costs
        # microseconds, on every update.
        self._n_mirror: list = [0, None, 0]
        self._mirror_n_averaged(0, self.n_averaged)

    def _mirror_n_averaged(self, count: int, n_averaged: Tensor) -> None:
        self._n_mirror[:] = (count, n_averaged, n_averaged._version)

    def _count(self, n_averaged: Tensor) -> int:
        """``n_averaged`` as an int: the host mirror, re-read only after the buffer was edited or replaced."""
        _, seen, version = self._n_mirror
        if n_averaged is not seen or n_averaged._version != version:
            self._mirror_n_averaged(int(n_averaged), n_averaged)  # the user changed it: one read, as torch's class
        return self._n_mirror[0]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        selection.forget_shared(self)  # a copy (deepcopy, pickle) holds copies of the live model's tensors

    def _apply(self, fn: Callable, recurse: bool = True) -> AveragedModel:
        # .to() / .half() on the average must not move or cast the live model's shared parameters.
        return super()._apply(selection.sparing_shared(self, fn), recurse)

    @without_grad
    def update_parameters(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (the first call copies them).

        ``n_averaged`` is the count the next update uses: editing it in place (``zero_()``,
        ``fill_()``, ``copy_()``) or assigning a new tensor is honoured, as in torch's class; an
        update after no such edit reads nothing back from the device.
        """
        plan = self._binding.plan(unwrap(model))
        if self.capturable:  # weights from the device count: capturable in a CUDA graph
            count = self.n_averaged
            capture.lerp_(plan, torch.where(count == 0, 1.0, self._rule.weight_tensor(count)).reshape(1))
            self.n_averaged.add_(1)
            return
        n_averaged = self._buffers["n_averaged"]  # not nn.Module.__getattr__: microseconds, on every update
        count = self._count(n_averaged)
        if self._rule is not None:
            plan.lerp_([1.0 if count == 0 else self._rule(count)])
        else:
            self._update_with_function(plan, count)
        n_averaged.add_(1)  # in place on its device: no sync
        self._mirror_n_averaged(count + 1, n_averaged)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, but all or nothing: a load that raises changes nothing.

        Also reads fused_ema ``EMA`` and timm ModelEmaV2/V3 checkpoints, and torch's of compiled and
        DataParallel models (``module.`` / ``_orig_mod.`` names); other formats: :func:`fused_ema.load_average`.
        """
        from fused_ema import checkpoints

        state_dict = checkpoints.to_own_format(self, state_dict, strict)
        check_loadable(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _update_with_function(self, plan, count: int) -> None:
        """A user's own avg_fn / multi_avg_fn, called as torch's AveragedModel calls it."""
        pairs = [(a, m) for a, m in zip(plan.average_sets[0], plan.models) if a.is_floating_point() or a.is_complex()]
        if count == 0:
            for average, model in pairs:
                average.copy_(model)
        elif self.multi_avg_fn is not None:
            groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
            for average, model in pairs:
                averages, models = groups.setdefault((average.device, average.dtype), ([], []))
                averages.append(average)
                models.append(offload.to_device(model, average.device))
            for (device, _), (averages, models) in groups.items():
                self.multi_avg_fn(averages, models, self.n_averaged.to(device))
        else:
            for average, model in pairs:
                model = offload.to_device(model, average.device)
                average.copy_(self.avg_fn(average, model, self.n_averaged.to(average.device)))
        plan.copy_()

