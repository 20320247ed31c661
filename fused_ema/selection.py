"""Which parameters an average keeps: ``include=``, ``exclude=`` and ``trainable_only=``.

A selection is resolved once, when the average is built, to the names of the selected parameters
(in the model's order). The rest follows from those names: :func:`fused_ema.binding.clone_module`
copies only the selected parameters and shares the others with the live model (same tensor
objects, so no second copy and nothing to update), :func:`fused_ema.binding.pair_by_name` pairs
only the selected ones, and :func:`attach` saves the names in the owner's state dict and refuses a
checkpoint made with other ones. Buffers are not selected here: they follow the wrappers' own
switch (``include_buffers`` / ``use_buffers``), and integer buffers are always copied.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

Pattern = str | Callable[[str, torch.Tensor], bool]
"""A parameter name, a glob such as ``"*.lora_*"`` (``fnmatch``), or a predicate on ``(name, tensor)``."""

Patterns = Pattern | Iterable[Pattern] | None

SELECTION_KEY = "selection"
"""State-dict key (under the owner's prefix) of the selected names; absent when every parameter is."""


class SelectionMismatchError(ValueError, RuntimeError):
    """A checkpoint was made with another selection (a ValueError and, like torch's load errors, a RuntimeError)."""


def _patterns(value: Patterns, argument: str) -> list[Pattern]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) or callable(value) else value
    try:
        items = list(items)
    except TypeError:
        items = [value]
    for item in items:
        if not isinstance(item, str) and not callable(item):
            raise TypeError(
                f"{argument} must be a parameter name, a glob pattern, a predicate on (name, tensor) "
                f"or a list of those, got {item!r}"
            )
    return items


def _matches(pattern: Pattern, name: str, tensor: torch.Tensor) -> bool:
    if isinstance(pattern, str):
        return name == pattern or fnmatch.fnmatchcase(name, pattern)
    return bool(pattern(name, tensor))


def select(
    model: nn.Module, include: Patterns = None, exclude: Patterns = None, trainable_only: bool = False
) -> tuple[str, ...] | None:
    """The names of the parameters of ``model`` to average, or ``None`` when that is every one.

    A parameter is selected when it matches ``include`` (any entry; everything when ``None``),
    matches no entry of ``exclude``, and, with ``trainable_only``, has ``requires_grad``. Tied
    parameters (one tensor under several names) must be selected under all their names or none.
    A string pattern that matches no parameter, or a selection of nothing, is a ValueError.

    Example::

        select(model, include="*.lora_*")            # ('blocks.0.lora_A.weight', ...)
        select(model, trainable_only=True)           # what the optimizer trains
        select(model, exclude=lambda name, t: t.ndim == 1)
    """
    if not isinstance(trainable_only, bool):
        raise TypeError(f"trainable_only must be True or False, got {trainable_only!r}")
    includes, excludes = _patterns(include, "include"), _patterns(exclude, "exclude")
    if include is None and not excludes and not trainable_only:
        return None
    aliases: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append((name, parameter))
    names = [name for group in aliases.values() for name, _ in group]
    for argument, patterns in (("include", includes), ("exclude", excludes)):
        for pattern in patterns:
            if isinstance(pattern, str) and not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"{argument} pattern {pattern!r} matches no parameter of the model (parameter names "
                    f"look like {_examples(names)}; buffers are not selected by name, they follow "
                    "include_buffers / use_buffers)"
                )

    def chosen(name: str, tensor: torch.Tensor) -> bool:
        return (
            (include is None or any(_matches(p, name, tensor) for p in includes))
            and not any(_matches(p, name, tensor) for p in excludes)
            and (not trainable_only or tensor.requires_grad)
        )

    selected = []
    for group in aliases.values():
        verdicts = [chosen(name, tensor) for name, tensor in group]
        if any(verdicts) != all(verdicts):
            kept = next(name for (name, _), verdict in zip(group, verdicts) if verdict)
            dropped = next(name for (name, _), verdict in zip(group, verdicts) if not verdict)
            raise ValueError(
                f"parameters {kept!r} and {dropped!r} are one tensor (tied weights), but the selection "
                f"averages {kept!r} and not {dropped!r}: select both names or neither"
            )
        if verdicts[0]:
            selected.append(group[0][0])  # the name named_parameters() reports
    if not selected and names:
        raise ValueError(
            "include=/exclude=/trainable_only= select no parameter of the model, so there is nothing to "
            f"average (parameter names look like {_examples(names)})"
        )
    return None if len(selected) == len(aliases) else tuple(selected)


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:3])
    return shown + (", ..." if len(names) > 3 else "") if names else "(the model has none)"


# -- checkpoints ----------------------------------------------------------------------------------


def attach(
    owner: nn.Module, model: nn.Module, averages: Sequence[nn.Module], selected: tuple[str, ...] | None
) -> None:
    """Save ``selected`` in ``owner``'s state dict and check it on load; remember what is shared.

    With a partial selection the state dict holds the selected parameters of each averaged module
    (the others are the live model's, not the average's) and ``selection``, the list of names.
    With everything selected it is unchanged. Loading a checkpoint of another selection raises
    :class:`SelectionMismatchError` naming the first name that differs, before anything is loaded.
    The owner's ``_apply`` should pass its function through :func:`sparing_shared`.
    """
    owner._selection = selected
    owner._parameter_names = tuple(name for name, _ in averages[0].named_parameters())
    kept = {id(p) for average in averages for name, p in average.named_parameters() if _is_selected(owner, name)}
    live = {id(p) for p in model.parameters()}
    unselected = [(key, p) for key, p in owner.named_parameters(remove_duplicate=False) if id(p) not in kept]
    owner._unselected_keys = tuple(key for key, _ in unselected)
    # Names, not ids: a deep copy or an unpickled owner finds its own shared tensors by them.
    owner._shared_keys = tuple(key for key, p in unselected if id(p) in live)
    owner.register_state_dict_post_hook(_save_selection)
    owner.register_load_state_dict_pre_hook(_check_selection)
    owner.register_load_state_dict_post_hook(_forgive_unselected)


def sparing_shared(owner: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``fn`` for ``owner._apply`` (``.to()``, ``.half()``, ...), leaving the live model's tensors alone.

    The parameters an average shares with the live model are the model's own: moving or casting
    the average must not move or cast the model that is being trained. Move the model itself.
    """
    if not getattr(owner, "_shared_keys", ()):
        return fn
    parameters = dict(owner.named_parameters(remove_duplicate=False))
    shared = [parameters[key] for key in owner._shared_keys if key in parameters]
    spared = {id(tensor) for tensor in (*shared, *(p.grad for p in shared)) if tensor is not None}
    return lambda tensor: tensor if id(tensor) in spared else fn(tensor)


def forget_shared(owner: nn.Module) -> None:
    """After a copy of ``owner`` (deepcopy, pickle): it shares no tensor with the live model any more.

    The copy does not take the live model along, so the unselected tensors it held by reference
    arrive as copies: its own now, which ``.to()`` / ``.half()`` must move with the rest (else the
    copy's frozen and averaged weights end up on different devices or dtypes). Copied in one go
    with the model, they are that model copy's too, and move with it.
    """
    if getattr(owner, "_shared_keys", ()):
        owner._shared_keys = ()


def _is_selected(owner: nn.Module, name: str) -> bool:
    return owner._selection is None or name in owner._selection


def _save_selection(owner: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    for key in owner._unselected_keys:
        state_dict.pop(prefix + key, None)
    if owner._selection is not None:
        state_dict[prefix + SELECTION_KEY] = list(owner._selection)


def _check_selection(owner: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    saved = state_dict.pop(prefix + SELECTION_KEY, None)
    mine = set(owner._parameter_names if owner._selection is None else owner._selection)
    theirs = set(owner._parameter_names if saved is None else saved)
    if mine != theirs:
        order = [*owner._parameter_names, *(n for n in (saved or ()) if n not in owner._parameter_names)]
        name = next(n for n in order if (n in mine) != (n in theirs))
        saved_verb = "averages" if name in theirs else "does not average"
        raise SelectionMismatchError(
            f"the checkpoint was made with another selection: it {saved_verb} parameter {name!r}, this "
            f"{type(owner).__name__} {'does' if name in mine else 'does not'}; build the average with the "
            "include=/exclude=/trainable_only= the checkpoint was saved with"
        )
    owner._loading_prefix = prefix  # for _forgive_unselected, which torch calls without it


def _forgive_unselected(owner: nn.Module, incompatible_keys) -> None:
    # Unselected parameters are the live model's own tensors: the checkpoint rightly lacks them.
    prefix = owner.__dict__.pop("_loading_prefix", None)
    if prefix is not None and owner._unselected_keys:
        unselected = {prefix + key for key in owner._unselected_keys}
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in unselected]
