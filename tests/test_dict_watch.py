"""DictWatch (csrc/tensor_watch.h): the check that a module's _parameters/_buffers/_modules changed.

changed() skips a dict whose version tag (PEP 509) is as recorded, so every way of changing a dict
must still be seen, and a dict changed and changed back must read as unchanged (entries compared by
identity, not tags). The oracle is a snapshot of the items taken in the test.
"""

from __future__ import annotations

import pytest
import torch

from fused_ema import ops

pytestmark = pytest.mark.skipif(ops._C is None, reason=f"the C++ extension is not available: {ops.UNAVAILABLE_REASON}")

A, B, C = object(), object(), object()

MUTATIONS = {
    "set a new key": lambda d: d.__setitem__("c", C),
    "replace a value": lambda d: d.__setitem__("a", C),
    "delete": lambda d: d.__delitem__("a"),
    "pop": lambda d: d.pop("b"),
    "popitem": lambda d: d.popitem(),
    "clear": lambda d: d.clear(),
    "update": lambda d: d.update(a=C),
    "setdefault": lambda d: d.setdefault("c", C),
    "delete and put back another key": lambda d: (d.__delitem__("b"), d.__setitem__("c", B)),
}


def _differs(d: dict, snapshot: list) -> bool:
    items = list(d.items())
    return len(items) != len(snapshot) or any(k is not k0 or v is not v0 for (k, v), (k0, v0) in zip(items, snapshot))


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_every_change_is_seen(mutation):
    watched, other = {"a": A, "b": B}, {"x": A}
    watch = ops._C.DictWatch([other, watched])
    assert not watch.changed()
    assert not watch.changed()  # the second check takes the version-tag shortcut
    snapshot = list(watched.items())
    MUTATIONS[mutation](watched)
    assert _differs(watched, snapshot)
    assert watch.changed()
    assert watch.changed()  # stays changed


@pytest.mark.parametrize("value", [A, B], ids=["same object", "changed and changed back"])
def test_same_entries_under_a_new_tag_are_unchanged(value):
    watched = {"a": A, "b": B}
    watch = ops._C.DictWatch([watched])
    assert not watch.changed()
    if value is B:
        watched["a"] = B
    watched["a"] = A
    assert not _differs(watched, [("a", A), ("b", B)])
    assert not watch.changed()
    assert not watch.changed()
    watched["b"] = C  # and a change after the new tag was taken is still seen
    assert watch.changed()


def test_module_registration_is_seen_after_many_checks():
    module = torch.nn.Linear(2, 2)
    watch = ops._C.DictWatch([module._parameters, module._buffers, module._modules])
    for _ in range(3):
        assert not watch.changed()
    torch.nn.Linear(3, 3)  # a registration elsewhere changes nothing here
    assert not watch.changed()
    module.register_buffer("scale", torch.ones(1))
    assert watch.changed()


def _watches(dicts, ignored):
    """The C++ watch and the pure-Python one the package uses without the extension: same answers."""
    from fused_ema.binding import _PythonDictWatch

    return [ops._C.DictWatch(dicts, ignored), _PythonDictWatch(dicts, ignored)]


def test_a_value_of_an_ignored_key_may_change():
    watched, keys = {"a": A, "cache": B}, {"cache"}
    for watch in _watches([watched], [keys]):
        watched["cache"] = C
        assert not watch.changed()
        watched["cache"] = A
        assert not watch.changed()
        watched["a"] = B  # a key that is not ignored still counts
        assert watch.changed()
        watched["a"] = A


@pytest.mark.parametrize("change", ["key added", "key removed", "key no longer ignored", "key ignored later"])
def test_ignored_keys_still_count_when_added_removed_or_not_ignored_at_both_ends(change):
    for make in (0, 1):
        watched, keys = {"a": A, "cache": B}, {"cache"}
        watch = _watches([watched], [keys])[make]
        if change == "key added":
            keys.add("extra")
            watched["extra"] = C
        elif change == "key removed":
            del watched["cache"]
        elif change == "key no longer ignored":  # register_buffer(name, t, persistent=True)
            keys.discard("cache")
            watched["cache"] = C
        else:  # register_buffer(name, t, persistent=False) over a persistent buffer
            keys.add("a")
            watched["a"] = C
        assert watch.changed()


def test_ignored_sets_are_checked():
    with pytest.raises(ValueError, match="one \\(a set or None\\) per dict"):
        ops._C.DictWatch([{}, {}], [None])
    with pytest.raises(TypeError, match="pass a set or None"):
        ops._C.DictWatch([{}], [["a"]])
