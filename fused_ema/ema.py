"""The training-loop EMA wrapper: update, evaluate with the average, checkpoint and resume."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fused_ema import backends, distributed, selection
from fused_ema import rules as rules_module
from fused_ema.backends import capture
from fused_ema.binding import Binding, check_loadable, clone_module, pack_, unwrap
from fused_ema.plan import without_grad
from fused_ema.rounding import rounding_key


class EMA(nn.Module):
    """An exponential moving average of a model's weights, updated in one fused call per step.

    ``ema.module`` is the averaged copy (``ema(x)`` runs it). Each ``update()`` applies
    ``average <- average + w * (model - average)`` with ``w = rule(n)``, ``n`` the number of
    averaging updates so far; ``rule`` defaults to ``rules.ConstantEMA(decay)``. The first
    ``update_after_step`` steps copy the model instead, and afterwards only every
    ``update_every``-th step averages. Floating buffers are averaged with ``include_buffers``
    (else copied), integer buffers are always copied. A sequence of rules (or of decays) keeps one
    average per rule, all updated in the same pass over the model (``ema.averages[k]``).

    Averaging part of a model: ``include=`` / ``exclude=`` (parameter names, globs such as
    ``"*.lora_*"``, or predicates on ``(name, tensor)``) and ``trainable_only=True`` (parameters
    with ``requires_grad``) choose the averaged parameters; the others are not copied but shared
    with the live model (``ema(x)`` and ``swap`` still work; see :mod:`fused_ema.selection`).
    ``ema_model=``: a copy of the model built by you (same names and shapes; one per rule), used
    instead of ``copy.deepcopy`` for models that cannot be deep-copied; it gets the model's values.

    bfloat16 averages are rounded stochastically by default (``stochastic_rounding=None``), with
    bits that depend only on ``seed`` and the step. ``skip_nonfinite=True`` skips an update whose
    model holds inf or nan (counted in ``skipped_updates``, with a warning).

    ``capturable=True`` keeps the update count on the device and computes each rule's weight there
    (:meth:`fused_ema.rules.Rule.weight_tensor`), so one ``update()`` can be captured in a CUDA
    graph and replayed with the right weights (warm up with one update before capturing). Without
    it, an update during capture raises RuntimeError.

    Example::

        ema = fused_ema.EMA(model, decay=0.999)
        for step, batch in enumerate(loader):
            train_step(model, batch)
            ema.update()
        with ema.swap(model):   # model now holds the averaged weights
            evaluate(model)
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | Sequence[float] = 0.9999,
        *,
        rule: rules_module.Rule | Sequence[rules_module.Rule] | None = None,
        update_after_step: int = 0,
        update_every: int = 1,
        device: torch.device | str | int | None = None,
        dtype: torch.dtype | None = None,
        include_buffers: bool = True,
        backend: str = "auto",
        stochastic_rounding: bool | None = None,
        seed: int = 0,
        skip_nonfinite: bool = False,
        include: selection.Patterns = None,
        exclude: selection.Patterns = None,
        trainable_only: bool = False,
        ema_model: nn.Module | Sequence[nn.Module] | None = None,
        capturable: bool = False,
    ) -> None:
        super().__init__()
        if rule is None:
            decays = list(decay) if isinstance(decay, (list, tuple)) else [decay]  # a str is one (bad) decay
            rule = [rules_module.ConstantEMA(d) for d in decays]
        rule_list = [rule] if isinstance(rule, rules_module.Rule) else list(rule)
        if not rule_list or not all(isinstance(r, rules_module.Rule) for r in rule_list):
            raise TypeError(f"rule must be a fused_ema.rules.Rule or a non-empty sequence of them, got {rule!r}")
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, int) or update_after_step < 0:
            raise ValueError(f"update_after_step must be an int >= 0, got {update_after_step!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        self.rules = rule_list
        self.update_after_step = update_after_step
        self.update_every = update_every
        self.include_buffers = include_buffers
        self.backend = backends.check_name(backend)
        self.seed = int(seed)
        self.skip_nonfinite = skip_nonfinite
        self.__dict__["_model"] = unwrap(model)  # the live model: kept, never registered as a child
        copies = [None] * len(rule_list) if ema_model is None else _one_per_rule(ema_model, len(rule_list))
        selected = selection.select(self._model, include, exclude, trainable_only)
        # Evaluation mode, for good (see train()): dropout off, BatchNorm statistics never touched.
        clones = [
            clone_module(self._model, device, dtype, selected=selected, copy_of_model=copy, requires_grad=False).eval()
            for copy in copies
        ]
        backends.check_usable(backend, {t.device.type for t in (*clones[0].parameters(), *clones[0].buffers())})
        self.module = clones[0]  # state_dict keys "module.<name>", as in timm's ModelEmaV3
        self.extra_averages = nn.ModuleList(clones[1:])
        if stochastic_rounding is None:
            stochastic_rounding = not capturable and any(p.dtype == torch.bfloat16 for p in self.module.parameters())
        self.stochastic_rounding = bool(stochastic_rounding)
        self.step = 0  # update() calls so far (or the last step given + 1)
        self.num_updates = 0  # averaging updates so far: the rules' n
        self.skipped_updates = 0
        self._binding = Binding(self.averages, average_buffers=include_buffers, backend=backend, selected=selected)
        selection.attach(self, self._model, self.averages, selected)
        self._mesh = distributed.mesh_of(self.module)  # FSDP2: ranks agree on skipping (skip_nonfinite)
        self._stored: list[torch.Tensor] | None = None
        self.__dict__["_swapped"] = None  # the model that holds the average inside swap(); not a child
        self.capturable = bool(capturable)
        if self.capturable:
            self._init_capturable(update_after_step, update_every, skip_nonfinite)

    def _init_capturable(self, update_after_step: int, update_every: int, skip_nonfinite: bool) -> None:
        # Under graph replay no Python runs: whatever depends on the host step cannot be captured.
        for name, value, default in (("update_after_step", update_after_step, 0), ("update_every", update_every, 1),
                                     ("stochastic_rounding", self.stochastic_rounding, False),
                                     ("skip_nonfinite", skip_nonfinite, False)):
            if value != default:
                raise ValueError(f"capturable=True needs {name}={default!r}, got {value!r}: it depends on the host "
                                 "step, which a CUDA-graph replay does not advance")
        device = next((t.device for t in self.module.parameters()), torch.device("cpu"))
        counts = torch.zeros((), dtype=torch.int64, device=device)
        for rule in self.rules:
            rule.weight_tensor(counts)  # NotImplementedError now, not at the first update
        # The rules' n on the device; not persistent (the checkpoint keeps num_updates as before).
        self.register_buffer("_device_updates", counts, persistent=False)

    @property
    def averages(self) -> list[nn.Module]:
        """The averaged copies, one per rule; ``averages[0]`` is ``module``."""
        return [self.module, *self.extra_averages]

    @property
    def rule(self) -> rules_module.Rule:
        return self.rules[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> EMA:
        """Sets the wrapper's mode; the averages stay in evaluation mode, as timm's ModelEmaV3 keeps them."""
        super().train(mode)
        for average in self.averages:
            average.eval()
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> EMA:
        # .to() / .half() on the average must not move or cast the live model's shared parameters.
        return super()._apply(selection.sparing_shared(self, fn), recurse)

    def _live(self, model: nn.Module | None) -> nn.Module:
        if model is not None:
            return unwrap(model)
        if self._model is None:
            raise RuntimeError(
                "this EMA has no model to read: it is a copy (deepcopy, pickle or torch.save keep only "
                "the averages); pass the model, e.g. ema.update(model)"
            )
        return self._model

    def _check_not_swapped(self, method: str) -> None:
        if self._swapped is not None:
            raise RuntimeError(
                f"{method}() cannot run inside `with ema.swap(...)`: the model holds the averaged weights "
                f"there, not the training ones; call {method}() after the block"
            )

    @without_grad
    def update(self, model: nn.Module | None = None, step: int | None = None) -> None:
        """Fold the model's current weights into every average.

        ``step`` (optional) is the training step this update belongs to; by default updates are
        counted. Steps before ``update_after_step`` copy the model; after it, steps that are not
        a multiple of ``update_every`` are skipped.
        """
        self._check_not_swapped("update")
        if self.capturable:
            self._update_capturable(model, step)
            return
        if step is None:
            step = self.step
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        plan = self._binding.plan(self._live(model))
        # Counters are set with object.__setattr__: nn.Module.__setattr__ looks for parameters,
        # buffers and submodules first, microseconds per update for two ints.
        if step < self.update_after_step:
            weights = [1.0] * len(self.rules)
        elif step % self.update_every:
            object.__setattr__(self, "step", step + 1)
            return
        else:
            weights = [rule(self.num_updates) for rule in self.rules]
        if self.skip_nonfinite and not distributed.finite_on_every_rank(plan.models_finite(), self._mesh):
            self.skipped_updates += 1
            warnings.warn(f"EMA update at step {step} skipped: the model has inf or nan values", stacklevel=2)
            object.__setattr__(self, "step", step + 1)
            return
        keys = None
        if self.stochastic_rounding:
            keys = [rounding_key(self.seed, step, index) for index in range(len(self.rules))]
        plan.lerp_(weights, keys)
        object.__setattr__(self, "step", step + 1)
        object.__setattr__(self, "num_updates", 0 if step < self.update_after_step else self.num_updates + 1)

    def _update_capturable(self, model: nn.Module | None, step: int | None) -> None:
        """The update with weights computed on the device from a device count: capturable in a CUDA graph."""
        if step is not None:
            raise ValueError("capturable=True counts updates on the device; call update() without step")
        counts = self._device_updates
        weights = torch.stack([rule.weight_tensor(counts) for rule in self.rules])
        capture.lerp_(self._binding.plan(self._live(model)), weights)
        counts.add_(1)
        # Host mirrors, right in eager mode; get_extra_state reads the device count instead.
        self.step += 1
        self.num_updates += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Update the average once after every ``optimizer.step()``; returns a handle to ``remove()`` it.

        Registers an optimizer step post-hook, so under gradient accumulation the average follows
        optimizer steps, not micro-batches, and a training loop written by a framework needs no
        change. State dicts (the optimizer's and this EMA's) are not affected.

        Example::

            handle = ema.attach(optimizer)
            train(model, optimizer)   # each optimizer.step() also calls ema.update()
            handle.remove()
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")

        def update_after_step(_optimizer, _args, _kwargs) -> None:
            self.update()

        return optimizer.register_step_post_hook(update_after_step)

    def _pairs(self, model: nn.Module | None, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self._binding.pairs(self._live(model), index)

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None, index: int = 0) -> None:
        """Write the averaged weights into ``model`` (default: the model given at construction)."""
        self._check_not_swapped("copy_to")
        averages, live = self._pairs(model, index)
        torch._foreach_copy_(live, averages)

    @torch.no_grad()
    def store(self, model: nn.Module | None = None) -> None:
        """Keep a copy of the model's weights, to put back with :meth:`restore`."""
        self._check_not_swapped("store")
        _, live = self._pairs(model, 0)
        self._stored = [tensor.clone() for tensor in live]

    @torch.no_grad()
    def restore(self, model: nn.Module | None = None) -> None:
        """Put back the weights saved by :meth:`store`."""
        self._check_not_swapped("restore")
        if self._stored is None:
            raise RuntimeError("restore() needs a store() first")
        _, live = self._pairs(model, 0)
        torch._foreach_copy_(live, self._stored)
        self._stored = None

    @contextlib.contextmanager
    def swap(self, model: nn.Module | None = None, index: int = 0) -> Iterator[nn.Module]:
        """Run ``model`` with the averaged weights for the ``with`` body, then put the training ones back.

        A model tensor of the average's dtype, device and strides is pointed at the average's
        memory for the block (``tensor.data = average``): nothing is copied, and the training
        weights come back bit for bit, also when the body raises, also for tied or aliased
        parameters. Other tensors (another dtype or device, FSDP2 shards) get a copy of the average,
        their training values kept aside. Inside the block ``ema.module``, ``ema(x)`` and
        ``ema.state_dict()`` still give the average; ``update``, ``copy_to``, ``store``,
        ``restore``, ``load_state_dict`` and a nested ``swap`` raise RuntimeError. Writes into the
        model during the block (BatchNorm statistics in training mode) reach the shared average.
        The model's train/eval mode is left as it is.

        Example::

            with ema.swap(model):
                accuracy = evaluate(model)
        """
        self._check_not_swapped("swap")
        live_model = self._live(model)
        averages, live = self._pairs(live_model, index)
        pointed, kept = [], []
        with torch.no_grad():
            for average, tensor in zip(averages, live):
                if (average.dtype == tensor.dtype and average.device == tensor.device
                        and average.stride() == tensor.stride()
                        and not distributed.is_dtensor(tensor) and not distributed.is_dtensor(average)):
                    pointed.append((tensor, tensor.data, average))
                else:
                    kept.append((tensor, tensor.clone(), average))  # every clone before any write: aliases
            for tensor, _, average in pointed:
                tensor.data = average.data
            for tensor, _, average in kept:
                tensor.copy_(average)
        self.__dict__["_swapped"] = live_model
        try:
            yield live_model
        finally:
            with torch.no_grad():
                distributed.reshard_(live_model)  # FSDP2: no gathered copy of the average may outlive the body
                for tensor, training, _ in pointed:
                    tensor.data = training
                for tensor, training, _ in kept:
                    tensor.copy_(training)
            self.__dict__["_swapped"] = None

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load averages and counters saved by :meth:`state_dict`; all or nothing.

        Missing or unexpected keys (with ``strict``), a wrong shape or another number of averages
        raise before anything is written, so the EMA is left exactly as it was. Also reads torch
        ``AveragedModel`` (ours or torch's) and timm ModelEmaV2/V3 checkpoints, of compiled and
        DataParallel models too (``module.`` / ``_orig_mod.`` names); other libraries' formats and
        their schedules: :func:`fused_ema.load_average`.
        """
        from fused_ema import checkpoints

        self._check_not_swapped("load_state_dict")
        state_dict = checkpoints.to_own_format(self, state_dict, strict)
        check_loadable(self, state_dict, strict)
        if "_extra_state" in state_dict:
            self._parse_extra_state(state_dict["_extra_state"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self) -> dict[str, Any]:
        # A copy holds the averages and counters, not the live model (item: copying copies the average).
        return {**self.__dict__, "_model": None, "_swapped": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        parameters = dict(self.named_parameters(remove_duplicate=False))
        # Left where they are: copied together with the live model, they are that copy's tensors.
        shared = [parameters[key] for key in getattr(self, "_shared_keys", ()) if key in parameters]
        for average in self.averages:
            pack_(average, skip=shared)  # a copy's tensors arrive as separate allocations: one block again
        selection.forget_shared(self)

    def get_extra_state(self) -> dict[str, Any]:
        if self.capturable:  # replays advanced the device count only; a checkpoint may read it back
            self.num_updates = self.step = int(self._device_updates)
        return {
            "step": self.step,
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "seed": self.seed,
            "rules": [rule.state_dict() for rule in self.rules],
        }

    def _parse_extra_state(self, state: dict[str, Any]) -> tuple[list[rules_module.Rule], dict[str, int]]:
        """The rules and counters ``state`` describes, checked, without changing this EMA."""
        if len(state["rules"]) != len(self.rules):
            raise ValueError(f"checkpoint has {len(state['rules'])} averages, this EMA keeps {len(self.rules)}")
        loaded = copy.deepcopy(self.rules)
        for rule, rule_state in zip(loaded, state["rules"]):
            rule.load_state_dict(rule_state)
        counters = {"step": state["step"], "num_updates": state["num_updates"],
                    "skipped_updates": state.get("skipped_updates", 0), "seed": state["seed"]}
        for name, value in counters.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"checkpoint's {name} must be an int >= 0, got {value!r}")
        return loaded, counters

    def set_extra_state(self, state: dict[str, Any]) -> None:
        loaded, counters = self._parse_extra_state(state)
        for rule, loaded_rule in zip(self.rules, loaded):
            vars(rule).update(vars(loaded_rule))
        for name, value in counters.items():
            setattr(self, name, value)
        if self.capturable:
            self._device_updates.fill_(self.num_updates)


def _one_per_rule(ema_model: nn.Module | Sequence[nn.Module], count: int) -> list[nn.Module]:
    copies = [ema_model] if isinstance(ema_model, nn.Module) else list(ema_model)
    if len(copies) != count or len({id(copy) for copy in copies}) != count:
        raise ValueError(
            f"ema_model must be one separate module per average: this EMA keeps {count} averages "
            f"(one per rule or decay), got {len(copies)} module(s)"
            + ("" if len({id(copy) for copy in copies}) == len(copies) else " with repeats")
        )
    return copies

