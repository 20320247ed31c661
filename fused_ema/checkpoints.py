"""Read and write the checkpoints of other EMA libraries, so a run can switch to fused_ema (and back).

Formats, by the name :func:`load_average` reports and :func:`export_average` takes:

==============  ===========================================================================================
``fused_ema``   :class:`fused_ema.EMA`: ``module.<name>``, ``extra_averages.<k>.<name>``, ``_extra_state``
``torch``       ``torch.optim.swa_utils.AveragedModel`` (and ours): ``module.<name>``, ``n_averaged``
``timm``        ModelEmaV2/V3: ``module.<name>`` (``model_ema.state_dict()``), or the plain module state
                dict, also inside ``{"state_dict_ema": ...}`` (timm's train.py checkpoints)
``torch_ema``   ``ExponentialMovingAverage``: ``shadow_params`` (list, in ``parameters()`` order),
                ``decay``, ``num_updates``, ``collected_params``
``diffusers``   ``EMAModel``: ``shadow_params``, ``decay``, ``min_decay``, ``optimization_step``,
                ``update_after_step``, ``use_ema_warmup``, ``inv_gamma``, ``power``
``ema_pytorch`` ema-pytorch ``EMA``: ``ema_model.<name>``, ``online_model.<name>``, ``step``, ``initted``
``lightning``   a Lightning ``.ckpt`` written with ``WeightAveraging`` / ``EMAWeightAveraging`` (or
                :class:`~fused_ema.integrations.lightning.FusedWeightAveraging`): ``state_dict`` (the
                average), ``current_model_state``, ``averaging_state`` (``n_averaged``)
==============  ===========================================================================================

Parameter names are matched after dropping the ``module.`` and ``_orig_mod.`` parts that
DataParallel, DDP and ``torch.compile`` add (wherever they appear) and one common leading prefix
(a LightningModule's ``model.``), and every shape is checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fused_ema import rules as rules_module
from fused_ema.selection import SELECTION_KEY

SOURCES = ("fused_ema", "torch", "timm", "torch_ema", "diffusers", "ema_pytorch", "lightning")
TARGETS = ("torch", "timm", "torch_ema", "diffusers", "ema_pytorch", "lightning")
# What EMA.load_state_dict / AveragedModel.load_state_dict take besides their own format: formats whose
# payload is a module state dict and which carry no schedule (load_average takes the others).
STATE_DICT_SOURCES = ("fused_ema", "torch", "timm")
_WRAPPER_PARTS = ("module", "_orig_mod")


@dataclasses.dataclass
class _Imported:
    """A foreign checkpoint read into one shape: the average's tensors and what is known of its schedule."""

    source: str
    named: dict[str, Tensor] | None = None  # the average by parameter/buffer name
    positional: list[Tensor] | None = None  # the average's parameters in parameters() order
    native: Mapping[str, Any] | None = None  # a fused_ema.EMA state dict, whole
    step: int | None = None  # update calls so far
    num_updates: int | None = None  # averaging updates so far (None: derived from step)
    rule: rules_module.Rule | None = None
    update_after_step: int | None = None
    update_every: int | None = None


# ----------------------------------------------------------------------------------------------- load


def load_average(ema_or_averaged_model: nn.Module, checkpoint: Mapping[str, Any] | str | os.PathLike,
                 source: str = "auto") -> str:
    """Load another library's EMA checkpoint into a :class:`fused_ema.EMA` or :class:`fused_ema.AveragedModel`.

    ``source`` is one of ``"auto"``, ``"fused_ema"``, ``"torch"``, ``"timm"``, ``"torch_ema"``,
    ``"diffusers"``, ``"ema_pytorch"``, ``"lightning"`` (the formats of this module's docstring);
    ``checkpoint`` is the dict (or a path to ``torch.load``). Counters and decay settings are taken
    over where the format holds them, so the run continues its schedule: torch_ema's becomes
    :class:`~fused_ema.rules.FractionWarmupEMA`, diffusers' :class:`~fused_ema.rules.WarmupEMA` or
    ``FractionWarmupEMA`` with its ``update_after_step``, and ``step`` / ``num_updates`` /
    ``n_averaged`` follow. (An :class:`~fused_ema.AveragedModel` keeps its own averaging function.)
    Nothing is written unless every tensor fits: a checkpoint that does not match raises ValueError
    naming the first key or shape that does not fit. Returns the name of the format it read.

    Example::

        ema = fused_ema.EMA(model, decay=0.999)
        found = fused_ema.load_average(ema, torch.load("torch_ema.pt"))   # -> "torch_ema"
        ema.update()   # continues torch_ema's min(decay, (1 + k) / (10 + k)) schedule
    """
    target = _check_target(ema_or_averaged_model)
    checkpoint = _read(checkpoint)
    imported = _parse(checkpoint, _check_source(source, checkpoint))
    own, settings = _to_own_format(target, imported, strict=True)  # checks every name and shape
    target.load_state_dict(own)
    _apply_settings(target, settings)
    return imported.source


def to_own_format(target: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Mapping[str, Any]:
    """``state_dict`` converted to ``target``'s own layout: the hook of ``EMA``/``AveragedModel.load_state_dict``.

    Own-format dicts pass through unchanged; torch AveragedModel, timm and fused_ema checkpoints of
    the other class or of a wrapped (compiled, DataParallel) model are converted. Schedules are
    not changed here (use :func:`load_average` for that and for the other formats).
    """
    if not isinstance(state_dict, Mapping):
        return state_dict  # nn.Module.load_state_dict raises its own TypeError
    own_keys = target.state_dict().keys()
    source = detect(state_dict, strict=False)
    # A selection on either side: fused_ema.selection's load hook checks it and names what differs.
    selective = SELECTION_KEY in state_dict or getattr(target, "_selection", None) is not None
    if source == _own_source(target) and (set(state_dict) == set(own_keys) or not strict or selective):
        return state_dict
    if source is None or source not in STATE_DICT_SOURCES:
        found = f"a {source} checkpoint" if source else "a dict whose format is not recognised"
        raise ValueError(
            f"{type(target).__name__}.load_state_dict got {found} (first keys: {_first_keys(state_dict)}); "
            f"it reads {', '.join(STATE_DICT_SOURCES)} state dicts: use fused_ema.load_average(average, checkpoint) "
            f"for {', '.join(s for s in SOURCES if s not in STATE_DICT_SOURCES)}"
        )
    try:
        own, _ = _to_own_format(target, _parse(state_dict, source), strict=strict)
    except ValueError:
        if source == _own_source(target):
            return state_dict  # its own layout with a misfit: the load's own all-or-nothing check reports it
        raise
    return own


def detect(checkpoint: Mapping[str, Any], strict: bool = True) -> str | None:
    """The format of ``checkpoint`` (one of :data:`SOURCES`), recognised from its keys.

    Raises ValueError when nothing fits (``strict=False``: returns None instead).
    """
    keys = [key for key in checkpoint if isinstance(key, str)]
    if "state_dict_ema" in checkpoint and isinstance(checkpoint["state_dict_ema"], Mapping):
        return "timm"
    if "shadow_params" in checkpoint:
        return "diffusers" if "optimization_step" in checkpoint else "torch_ema"
    if "averaging_state" in checkpoint and "state_dict" in checkpoint:
        return "lightning"
    if any(key.startswith("ema_model.") for key in keys):
        return "ema_pytorch"
    if "_extra_state" in checkpoint and any(key.startswith("module.") for key in keys):
        return "fused_ema"
    if "n_averaged" in checkpoint:
        return "torch"
    if (keys and len(keys) == len(checkpoint) and "state_dict" not in checkpoint
            and all(isinstance(value, Tensor) for value in checkpoint.values())):
        return "timm"
    if not strict:
        return None
    hint = ""
    if "state_dict" in checkpoint:
        hint = (" It looks like a Lightning checkpoint written without WeightAveraging (no 'averaging_state'):"
                " its 'state_dict' holds the training weights, not an average.")
    raise ValueError(
        f"could not recognise the checkpoint format (first keys: {_first_keys(checkpoint)}).{hint} "
        f"Pass source= one of {', '.join(SOURCES)}, or a module state dict"
    )


def _check_target(target: Any) -> nn.Module:
    from fused_ema.averaged_model import AveragedModel
    from fused_ema.ema import EMA

    if not isinstance(target, (EMA, AveragedModel)):
        raise TypeError(
            f"ema_or_averaged_model must be a fused_ema.EMA or fused_ema.AveragedModel, got {type(target).__name__}"
        )
    return target


def _own_source(target: nn.Module) -> str:
    from fused_ema.ema import EMA

    return "fused_ema" if isinstance(target, EMA) else "torch"


def _check_source(source: str, checkpoint: Mapping[str, Any]) -> str:
    if source == "auto":
        return detect(checkpoint)
    if source not in SOURCES:
        raise ValueError(f"source must be 'auto' or one of {', '.join(SOURCES)}, got {source!r}")
    return source


def _read(checkpoint: Any) -> Mapping[str, Any]:
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict (or a path to one), got {type(checkpoint).__name__}")
    return checkpoint


def _first_keys(mapping: Mapping[str, Any], count: int = 5) -> str:
    keys = list(mapping)
    listed = ", ".join(repr(key) for key in keys[:count])
    return listed + (", ..." if len(keys) > count else "") if keys else "none"


def _strip(mapping: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix):]: value for key, value in mapping.items() if key.startswith(prefix)}


def _int(value: Any, name: str, source: str, minimum: int = 0) -> int:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{source} checkpoint: {name} must hold one number, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise ValueError(f"{source} checkpoint: {name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _require(checkpoint: Mapping[str, Any], source: str, *names: str) -> None:
    for name in names:
        if name not in checkpoint:
            raise ValueError(f"not a {source} checkpoint: it has no {name!r} (first keys: {_first_keys(checkpoint)})")


def _tensors(mapping: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    for key, value in mapping.items():
        if not isinstance(value, Tensor):
            # the checkpoint's content is wrong, not the argument's type
            raise ValueError(f"{source} checkpoint: {key!r} holds a {type(value).__name__}, not a tensor")  # noqa: TRY004
    if not mapping:
        raise ValueError(f"{source} checkpoint holds no tensors of the average")
    return dict(mapping)


def _parse(checkpoint: Mapping[str, Any], source: str) -> _Imported:
    """Read ``checkpoint`` as ``source``; ValueError when it is not one."""
    if source == "fused_ema":
        _require(checkpoint, source, "_extra_state")
        _tensors(_strip(checkpoint, "module."), source)
        extra = checkpoint["_extra_state"]
        return _Imported(source, native=checkpoint, step=extra.get("step"), num_updates=extra.get("num_updates"))
    if source == "torch":
        _require(checkpoint, source, "n_averaged")
        averaged = _int(checkpoint["n_averaged"], "n_averaged", source)
        named = _tensors({k: v for k, v in checkpoint.items() if k != "n_averaged"}, source)
        if not all(key.startswith("module.") for key in named):
            raise ValueError(f"torch AveragedModel checkpoint keys start with 'module.'; got {_first_keys(named)}")
        return _Imported(source, named=_strip(named, "module."), step=averaged, num_updates=averaged)
    if source == "timm":
        payload = checkpoint.get("state_dict_ema", checkpoint)
        return _Imported(source, named=_tensors(payload, source))
    if source == "torch_ema":
        _require(checkpoint, source, "shadow_params", "decay", "num_updates")
        decay = float(checkpoint["decay"])
        updates = checkpoint["num_updates"]
        if updates is None:  # use_num_updates=False: a constant decay
            return _Imported(source, positional=_shadow(checkpoint, source), rule=rules_module.ConstantEMA(decay),
                             update_after_step=0, update_every=1)
        updates = _int(updates, "num_updates", source)
        return _Imported(source, positional=_shadow(checkpoint, source), step=updates, num_updates=updates,
                         rule=rules_module.FractionWarmupEMA(decay), update_after_step=0, update_every=1)
    if source == "diffusers":
        _require(checkpoint, source, "shadow_params", "decay", "optimization_step")
        step = _int(checkpoint["optimization_step"], "optimization_step", source)
        after = _int(checkpoint.get("update_after_step", 0), "update_after_step", source, minimum=-1)
        decay, min_decay = float(checkpoint["decay"]), float(checkpoint.get("min_decay", 0.0))
        if checkpoint.get("use_ema_warmup", False):
            # diffusers' decay at its j-th step(): 0 (a copy) while j <= update_after_step + 1, then the
            # warm-up at j - update_after_step - 1: WarmupEMA's copy at n = 0 is that j = after + 1.
            rule = rules_module.WarmupEMA(decay, float(checkpoint.get("inv_gamma", 1.0)),
                                          float(checkpoint.get("power", 2 / 3)), min_decay)
        else:
            # (1 + t) / (10 + t) with t = j - after - 1 >= 1: FractionWarmupEMA(n) after after + 1 copies.
            rule = rules_module.FractionWarmupEMA(decay, min_decay=min_decay)
            after += 1
        return _Imported(source, positional=_shadow(checkpoint, source), step=step,
                         num_updates=max(0, step - after), rule=rule, update_after_step=after, update_every=1)
    if source == "ema_pytorch":
        named = _tensors(_strip(checkpoint, "ema_model."), source)
        _require(checkpoint, source, "step")
        step = _int(checkpoint["step"], "step", source)
        if "initted" in checkpoint and not bool(checkpoint["initted"]):
            step = 0
        # ema-pytorch keeps its beta, update_after_step and update_every out of the state dict: the
        # EMA's own settings (see the README) decide the number of averaging updates.
        return _Imported(source, named=named, step=step)
    if source == "lightning":
        _require(checkpoint, source, "state_dict", "averaging_state")
        average, state = checkpoint["state_dict"], checkpoint["averaging_state"]
        if "_extra_state" in state:  # written by FusedWeightAveraging: a fused_ema.EMA state dict
            native = {**{"module." + key: value for key, value in average.items()}, **state}
            return dataclasses.replace(_parse(native, "fused_ema"), source=source)
        _require(state, "lightning averaging_state", "n_averaged")
        averaged = _int(state["n_averaged"], "n_averaged", source)
        return _Imported(source, named=_tensors(average, source), step=averaged, num_updates=averaged)
    raise ValueError(f"source must be 'auto' or one of {', '.join(SOURCES)}, got {source!r}")


def _shadow(checkpoint: Mapping[str, Any], source: str) -> list[Tensor]:
    shadow = checkpoint["shadow_params"]
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, Tensor) for t in shadow):
        raise ValueError(f"{source} checkpoint: shadow_params must be a list of tensors")
    return list(shadow)


def _normalise(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _suffix_prefix(longer: str, shorter: str) -> str | None:
    """The dotted prefix ``p`` with ``longer == p + shorter``, else None."""
    if longer == shorter:
        return ""
    if longer.endswith("." + shorter):
        return longer[: len(longer) - len(shorter)]
    return None


def align(source: Mapping[str, Tensor], target: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """``source`` tensors renamed to ``target``'s names, shapes checked: ValueError on the first misfit.

    Names match after dropping ``module.`` / ``_orig_mod.`` parts anywhere, and one leading prefix
    present on every name of one side only (a LightningModule's ``model.``).
    """
    by_target = {}
    for name in target:
        by_target.setdefault(_normalise(name), []).append(name)
    by_source = {_normalise(name): value for name, value in source.items()}
    candidates = [("", "")]
    if by_target and by_source:
        first_target, first_source = next(iter(by_target)), next(iter(by_source))
        candidates += [(p, "") for s in by_source if (p := _suffix_prefix(s, first_target))]
        candidates += [("", p) for t in by_target if (p := _suffix_prefix(t, first_source))]
    for strip, add in candidates:
        renamed = {add + name[len(strip):]: value for name, value in by_source.items() if name.startswith(strip)}
        if len(renamed) == len(by_source) and renamed.keys() == by_target.keys():
            break
    else:
        renamed = by_source
        missing = [name for name in by_target if name not in renamed]
        if missing:
            raise ValueError(
                f"the {what} does not fit this model: {by_target[missing[0]][0]!r} is missing from it "
                f"(its first keys: {_first_keys(source)}); load a checkpoint of the same architecture"
            )
        extra = next(name for name in renamed if name not in by_target)
        raise ValueError(f"the {what} does not fit this model: it holds {extra!r}, which the model does not have")
    aligned = {}
    for name, value in renamed.items():
        for target_name in by_target[name]:
            _check_shape(target_name, value, target[target_name], what)
            aligned[target_name] = value
    return aligned


def _check_shape(name: str, value: Tensor, like: Tensor, what: str) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"the {what} holds a {type(value).__name__} under {name!r}, not a tensor")  # noqa: TRY004
    if value.shape != like.shape:
        raise ValueError(
            f"the {what} does not fit this model: {name!r} has shape {tuple(value.shape)} in the checkpoint "
            f"but {tuple(like.shape)} in the average"
        )


def _average_tensors(target: nn.Module, module: nn.Module, imported: _Imported, what: str) -> dict[str, Tensor]:
    """The imported average by ``module``'s names: all of them, or only the selected ones where the
    checkpoint holds only those (an average of part of the model)."""
    selected = getattr(target, "_selection", None)
    if imported.named is None:
        return _positional(imported.positional, module, what, selected)
    state = module.state_dict()
    try:
        return align(imported.named, state, what)
    except ValueError:
        if selected is None:
            raise
        parameters = {name for name, _ in module.named_parameters()}
        kept = {name: t for name, t in state.items() if name in selected or name not in parameters}
        try:
            return align(imported.named, kept, what)
        except ValueError:
            pass
        raise


def _positional(shadow: list[Tensor], module: nn.Module, what: str, selected=None) -> dict[str, Tensor]:
    """torch_ema / diffusers ``shadow_params`` matched to ``module.named_parameters()`` by position.

    With a selection (``EMA(..., trainable_only=True)``) a list of only the selected parameters
    (torch_ema made from ``[p for p in model.parameters() if p.requires_grad]``) matches too.
    """
    named = list(module.named_parameters())
    if selected is not None and len(shadow) == len(selected) != len(named):
        named = [(name, parameter) for name, parameter in named if name in selected]
    if len(shadow) != len(named):
        raise ValueError(
            f"the {what} holds {len(shadow)} shadow_params but the model has {len(named)} parameters; "
            "it was made from model.parameters() of another model (or of a subset of parameters)"
        )
    out = {}
    for index, (tensor, (name, parameter)) in enumerate(zip(shadow, named)):
        if tensor.shape != parameter.shape:
            raise ValueError(
                f"the {what} does not fit this model: shadow_params[{index}] has shape {tuple(tensor.shape)} "
                f"but parameter {name!r} has {tuple(parameter.shape)}"
            )
        out[name] = tensor
    return out


def _averaging_updates(step: int, update_after_step: int, update_every: int) -> int:
    """How many averaging updates an EMA with these settings has made after ``step`` update calls."""
    if step <= update_after_step:
        return 0
    return (step - 1) // update_every - math.ceil(update_after_step / update_every) + 1


def _to_own_format(target: nn.Module, imported: _Imported, strict: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict in ``target``'s own layout, settings to set once it is loaded)."""
    from fused_ema.ema import EMA

    what = f"{imported.source} checkpoint"
    own = dict(target.state_dict(keep_vars=False))
    if isinstance(target, EMA):
        if imported.native is not None:
            for index in range(len(target.averages)):
                prefix = "module." if index == 0 else f"extra_averages.{index - 1}."
                part = _strip(imported.native, prefix)
                if part or strict:
                    own.update({prefix + k: v for k, v in align(part, _strip(own, prefix), what).items()})
            own.update({k: v for k, v in imported.native.items()
                        if not k.startswith(("module.", "extra_averages."))})
            return own, {}
        if len(target.averages) > 1:
            raise ValueError(
                f"a {what} holds one average but this EMA keeps {len(target.averages)}; load it into an EMA with one rule"
            )
        tensors = _average_tensors(target, target.module, imported, what)
        # Only what the average owns: with a selection the others are the live model's tensors.
        own.update({key: value for name, value in tensors.items() if (key := "module." + name) in own})
        settings = {"rule": imported.rule, "update_after_step": imported.update_after_step,
                    "update_every": imported.update_every}
        after = target.update_after_step if imported.update_after_step is None else imported.update_after_step
        every = target.update_every if imported.update_every is None else imported.update_every
        extra = dict(own["_extra_state"])
        if imported.step is not None:
            extra["step"] = imported.step
            extra["num_updates"] = (_averaging_updates(imported.step, after, every)
                                    if imported.num_updates is None else imported.num_updates)
        own["_extra_state"] = extra
        return own, {key: value for key, value in settings.items() if value is not None}
    # AveragedModel
    if imported.native is not None:
        if any(key.startswith("extra_averages.") for key in imported.native):
            warnings.warn(f"the {what} keeps several averages; AveragedModel takes the first", stacklevel=3)
        tensors = align(_strip(imported.native, "module."), _strip(own, "module."), what)
    else:
        tensors = _average_tensors(target, target.module, imported, what)
    own.update({key: value for name, value in tensors.items() if (key := "module." + name) in own})
    averaged = imported.num_updates if imported.num_updates is not None else imported.step
    if averaged is not None:
        own["n_averaged"] = torch.tensor(averaged, dtype=torch.long)
    if imported.rule is not None and imported.rule != getattr(target, "_rule", None):
        warnings.warn(
            f"AveragedModel keeps its own averaging function; the {what}'s schedule {imported.rule!r} is not taken "
            "over (load it into fused_ema.EMA to continue that schedule)", stacklevel=3)
    return own, {}


def _apply_settings(target: nn.Module, settings: dict[str, Any]) -> None:
    if "rule" in settings:
        target.rules[0] = settings["rule"]
    for name in ("update_after_step", "update_every"):
        if name in settings:
            setattr(target, name, settings[name])


# --------------------------------------------------------------------------------------------- export


@dataclasses.dataclass
class _View:
    module: nn.Module
    live: nn.Module | None
    step: int
    num_updates: int
    rule: rules_module.Rule | None
    update_after_step: int
    update_every: int


def _view(average: nn.Module, index: int) -> _View:
    from fused_ema.ema import EMA

    if isinstance(average, EMA):
        if not 0 <= index < len(average.averages):
            raise ValueError(f"index must be in [0, {len(average.averages)}), got {index}")
        return _View(average.averages[index], average._model, average.step, average.num_updates,
                     average.rules[index], average.update_after_step, average.update_every)
    averaged = int(average.n_averaged)  # one read: exporting is not an update
    return _View(average.module, None, averaged, averaged, getattr(average, "_rule", None), 0, 1)


def export_average(ema_or_averaged_model: nn.Module, target: str, *, model: nn.Module | None = None,
                   index: int = 0) -> dict[str, Any]:
    """The average as a checkpoint of another library, for that library's own ``load_state_dict``.

    ``target``: ``"torch"`` (``AveragedModel``), ``"timm"`` (ModelEmaV2/V3), ``"torch_ema"``,
    ``"diffusers"`` (``EMAModel``), ``"ema_pytorch"`` or ``"lightning"`` (the ``.ckpt`` dict of
    ``WeightAveraging``: ``state_dict``, ``averaging_state``, ``current_model_state``). Tensors are
    shared with the average, as in ``state_dict()``. ``model``: the model as the other library
    holds it (compiled, DataParallel, a LightningModule): its names are used, and its weights fill
    ``online_model`` / ``current_model_state`` (default: an EMA's own model). The schedule goes
    along where the target can express it; otherwise a warning says what the target will do.

    Example::

        state = fused_ema.export_average(ema, target="torch_ema")
        torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.999).load_state_dict(state)
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    view = _view(_check_target(ema_or_averaged_model), index)
    live = view.live if model is None else model
    state = view.module.state_dict()
    if model is not None:  # the names of the other library's copy of the model
        state = align(state, model.state_dict(), "average")
    if target in ("torch", "timm"):
        out = {"module." + name: value for name, value in state.items()}
        if target == "torch":
            out["n_averaged"] = torch.tensor(view.num_updates, dtype=torch.long)
        return out
    if target == "lightning":
        out = {"state_dict": dict(state), "averaging_state": {"n_averaged": torch.tensor(view.num_updates)}}
        if live is not None:
            out["current_model_state"] = live.state_dict()
        return out
    if target == "ema_pytorch":
        out = {"ema_model." + name: value for name, value in state.items()}
        if live is not None:
            out.update({"online_model." + name: value for name, value in live.state_dict().items()})
        out["initted"] = torch.tensor(view.step > 0)
        out["step"] = torch.tensor(view.step)
        return out
    shadow = [parameter.detach() for parameter in view.module.parameters()]
    if target == "torch_ema":
        decay, updates = _torch_ema_schedule(view)
        return {"decay": decay, "num_updates": updates, "shadow_params": shadow, "collected_params": None}
    return {**_diffusers_schedule(view), "shadow_params": shadow}


def _constant_decay(rule: rules_module.Rule | None) -> float | None:
    if isinstance(rule, (rules_module.ConstantEMA, rules_module.HalfLifeEMA)):
        return float(rule.decay)
    return None


def _unrepresentable(view: _View, target: str, does: str) -> None:
    warnings.warn(
        f"{target} cannot express this schedule ({view.rule!r}, update_after_step={view.update_after_step}, "
        f"update_every={view.update_every}); the exported checkpoint {does}", stacklevel=4)


def _torch_ema_schedule(view: _View) -> tuple[float, int | None]:
    plain = view.update_after_step == 0 and view.update_every == 1
    rule = view.rule
    if plain and isinstance(rule, rules_module.FractionWarmupEMA) and rule.min_decay == 0.0:
        return float(rule.decay), int(view.num_updates)
    constant = _constant_decay(rule)
    if plain and constant is not None:
        return constant, None
    decay = constant if constant is not None else (1.0 - rule(view.num_updates) if rule else 0.9999)
    _unrepresentable(view, "torch_ema", f"continues with a constant decay {decay}")
    return decay, None


def _diffusers_schedule(view: _View) -> dict[str, Any]:
    rule = view.rule
    settings = {"optimization_step": int(view.step), "inv_gamma": 1.0, "power": 2 / 3}
    if view.update_every == 1:
        if isinstance(rule, rules_module.WarmupEMA):
            return {**settings, "decay": float(rule.decay), "min_decay": float(rule.min_decay),
                    "update_after_step": view.update_after_step, "use_ema_warmup": True,
                    "inv_gamma": rule.inv_gamma, "power": rule.power}
        # diffusers copies while j <= update_after_step + 1, then (1 + t) / (10 + t) clamped to [min_decay, decay]
        fraction = {"update_after_step": view.update_after_step - 1, "use_ema_warmup": False}
        if isinstance(rule, rules_module.FractionWarmupEMA):
            return {**settings, **fraction, "decay": float(rule.decay), "min_decay": float(rule.min_decay)}
        constant = _constant_decay(rule)
        if constant is not None:  # min_decay = decay pins the fraction to decay
            return {**settings, **fraction, "decay": constant, "min_decay": constant}
    decay = 1.0 - rule(view.num_updates) if rule else 0.9999
    _unrepresentable(view, "diffusers", f"continues with a constant decay {decay}")
    return {**settings, "decay": decay, "min_decay": decay, "update_after_step": -1, "use_ema_warmup": False,
            "optimization_step": int(view.step)}
