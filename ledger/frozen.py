"""Read-only JSON values, for what the ledger hands out and also keeps.

A state the fold engine caches (``SessionState.metadata``) and an event the
memory store keeps are the very objects every later reader gets. A dict or
list in them that one caller changed would change them for everyone: the next
reads, and the snapshots written from them, which fresh processes then trust.
So their JSON containers are ``FrozenDict`` and ``FrozenList``: instances of,
equal to and encoded as ``dict`` and ``list`` (the same canonical bytes, so the
same digests and checksums), with every method that would change them raising
``TypeError``. ``dict(value)`` or ``list(value)`` is a copy to change.
"""

from __future__ import annotations

from typing import Any, NoReturn

import msgspec

from ledger.events import Event

__all__ = ["FrozenDict", "FrozenList", "freeze", "freeze_event"]


def _refuse(self: FrozenDict | FrozenList, *args: Any, **kwargs: Any) -> NoReturn:
    kind = "dict" if isinstance(self, dict) else "list"
    raise TypeError(
        f"This {kind} belongs to the ledger and is read-only (events and states are "
        f"shared, and never change); {kind}(value) is a copy you may change"
    )


class FrozenDict(dict[str, Any]):
    """A read-only ``dict`` (see the module)."""

    __slots__ = ()

    def copy(self) -> dict[str, Any]:
        return dict(self)

    def __copy__(self) -> FrozenDict:
        return self  # nothing in it can change: no copy is needed

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return FrozenDict, (dict(self),)


class FrozenList(list[Any]):
    """A read-only ``list`` (see the module)."""

    __slots__ = ()

    def copy(self) -> list[Any]:
        return list(self)

    def __copy__(self) -> FrozenList:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenList:
        return self

    def __reduce__(self) -> tuple[type[FrozenList], tuple[list[Any]]]:
        return FrozenList, (list(self),)


# Every method of dict and list that changes it in place.
for _name in (
    "__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault", "update",
):  # fmt: skip
    setattr(FrozenDict, _name, _refuse)
for _name in (
    "__setitem__", "__delitem__", "__iadd__", "__imul__",
    "append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort",
):  # fmt: skip
    setattr(FrozenList, _name, _refuse)

_EMPTY_DICT: FrozenDict = FrozenDict()
_EMPTY_LIST: FrozenList = FrozenList()


def freeze(value: Any) -> Any:
    """``value`` with every dict and list in it, at any depth, read-only.

    A copy of each container (``value`` itself is left as it is); a scalar, or a
    container frozen already, is returned as it is. Tuples stay tuples.
    """
    kind = type(value)
    if kind is dict:
        return FrozenDict({k: freeze(v) for k, v in value.items()}) if value else _EMPTY_DICT
    if kind is list:
        return FrozenList([freeze(v) for v in value]) if value else _EMPTY_LIST
    if kind is tuple:
        return tuple(freeze(v) for v in value)
    return value


def freeze_event(event: Event) -> Event:
    """``event`` with the dicts and lists of its body read-only (the same event when
    its body holds none).

    An empty one stays as it is: the canonical encoding leaves out a field at its
    default, an empty ``dict`` or ``list`` but not a subclass, and the body's digest
    must not change. ``verify`` names an event whose body was changed there.
    """
    body = event.body
    changes = {}
    for name in body.__struct_fields__:
        value = getattr(body, name)
        if value and type(value) in (dict, list, tuple):
            changes[name] = freeze(value)
    if not changes:
        return event
    return msgspec.structs.replace(event, body=msgspec.structs.replace(body, **changes))
