"""Named registries and the did-you-mean messages every lookup by name gives.

This module owns the one way pellucid turns a mistyped name into a helpful error: :func:`close_matches`
finds the nearest known names, :func:`did_you_mean` phrases them as a hint, and
:func:`unknown_name_error` builds the ``KeyError`` a failed registry lookup raises. :class:`Registry`
is a small name → object table (backbones, explainers, model-folder kinds...) with registration by
call or decorator, lookup with that error, and a sorted listing.

It sits at the bottom of the import graph: it imports nothing from pellucid, so datasets, core,
explain, apps and ui can all use it.
"""
from __future__ import annotations

import difflib
from typing import Generic, Iterable, Iterator, TypeVar

__all__ = ["Registry", "close_matches", "did_you_mean", "unknown_name_error"]

T = TypeVar("T")


def close_matches(name: str, choices: Iterable[str], *, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``choices`` closest to ``name`` (best first), each at least ``cutoff`` similar."""
    return difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=cutoff)


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6,
                 clause: bool = False) -> str:
    """A hint naming the choices closest to ``name``, or ``""`` when none is close.

    Args:
        name: the name that was not found.
        choices: the names that exist.
        n, cutoff: as for :func:`close_matches`.
        clause: ``False`` → a sentence to append after a full stop: ``" Did you mean 'a', 'b'?"``;
            ``True`` → a clause to append to a message: ``"; did you mean 'a'?"``.
    """
    close = close_matches(name, choices, n=n, cutoff=cutoff)
    if not close:
        return ""
    names = ", ".join(repr(c) for c in close)
    return f"; did you mean {names}?" if clause else f" Did you mean {names}?"


def unknown_name_error(kind: str, name: str, choices: Iterable[str]) -> KeyError:
    """The ``KeyError`` for an unknown ``name`` of ``kind``: did-you-mean and the sorted choices.

    Example message: ``unknown backbone 'resnt18'. Did you mean 'resnet18'? Available: resnet18, ...``
    """
    choices = [str(c) for c in choices]
    hint = did_you_mean(name, choices, n=3, cutoff=0.5)
    return KeyError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(choices))}")


def _label(obj: object) -> str:
    return getattr(obj, "__name__", None) or repr(obj)


class Registry(Generic[T]):
    """A name → object table for one ``kind`` of thing (used in messages: "backbone", "explainer").

    Register with ``registry.register("name", obj)`` or as a decorator, ``@registry.register("name")``
    (or bare ``@registry.register`` for objects with a ``name`` attribute). Registering a second,
    different object under a taken name raises ``ValueError``; registering the same object again is
    a no-op, so re-importing a module is harmless. :meth:`get` raises :func:`unknown_name_error`.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name_or_obj=None, obj=None, *, replace: bool = False):
        """Add an object under a name; see the class docstring for the three call forms.

        ``replace=True`` lets a new object take over a registered name.
        """
        if obj is not None:
            return self._add(str(name_or_obj), obj, replace)
        if isinstance(name_or_obj, str):
            return lambda o: self._add(name_or_obj, o, replace)
        if name_or_obj is None:
            return lambda o: self._add(self._name_of(o), o, replace)
        return self._add(self._name_of(name_or_obj), name_or_obj, replace)

    def _name_of(self, obj) -> str:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{getattr(obj, '__name__', obj)!r} has no name; set the attribute `name` "
                             f"or register it as {type(self).__name__}.register('name', obj)")
        return name

    def _add(self, name: str, obj: T, replace: bool) -> T:
        if not name:
            raise ValueError(f"a {self.kind} needs a non-empty name")
        old = self._items.get(name)
        if old is not None and old is not obj and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({_label(old)}, {_label(obj)})")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered under ``name``; ``KeyError`` with did-you-mean otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise unknown_name_error(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs, sorted by name."""
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

