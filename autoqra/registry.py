r"""One registry type for every plug-in kind: backends, evaluators, searchers and executors.

A :class:`Registry` maps names to classes. ``register(name)`` is a class decorator (later
registrations win, so a user can replace a built-in); ``names()`` lists what is registered; ``get(name)``
returns the class or raises one ``ValueError`` naming the kind, the bad name and the registered ones.
Each kind's module keeps its historical helpers (``register_backend``, ``get_searcher``...) as thin
wrappers over its registry.

A registered class is built with two kinds of keyword arguments (:func:`constructor_kwargs`): *options*
the user chose, every one of which the constructor must take (else one ``ValueError`` naming the plug-in
and the options it takes), and *offered* settings of the run, passed only where the constructor takes
them, so that a small plug-in need not accept settings it has no use for.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named classes of one kind.

    Args:
        kind: what is registered, for messages (``"backend"``, ``"searcher"``...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering ``cls`` under ``name`` and setting ``cls.name = name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def deco(cls: type[T]) -> type[T]:
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``.

        Raises:
            ValueError: ``name`` is not registered (the message lists the registered names).
        """
        if not isinstance(name, str) or name not in self._classes:
            raise ValueError(f"{self.kind}={name!r} is not registered; registered {self.kind}s: {self.names()}")
        return self._classes[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def values(self) -> list[type[T]]:
        """Registered classes, in registration order."""
        return list(self._classes.values())

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def accepted_names(cls: type, skip: int = 0) -> set[str] | None:
    """Keyword parameters of ``cls``'s constructor after its first ``skip`` positional ones (those its
    builder passes positionally); ``None`` when it takes ``**kwargs`` (then every name is accepted)."""
    init = cls.__init__  # type: ignore[misc]
    if init is object.__init__:
        return set()
    params = list(inspect.signature(init).parameters.values())[1:]  # without self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    skipped = {p.name for p in positional[:skip]}
    return {p.name for p in params if p.name not in skipped and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def check_options(cls: type, what: str, options: Mapping[str, Any], skip: int = 0) -> None:
    """Raise ``ValueError`` naming ``what`` (e.g. ``"searcher 'mine'"``) and the options it takes when
    ``cls``'s constructor does not take every key of ``options``."""
    takes = accepted_names(cls, skip)
    bad = [] if takes is None else sorted(set(options) - takes)
    if bad:
        raise ValueError(f"{what} does not take the option(s) {bad}; the options it takes: {sorted(takes or ())}")


def constructor_kwargs(cls: type, what: str, options: Mapping[str, Any] | None = None,
                       offered: Mapping[str, Any] | None = None, skip: int = 0) -> dict[str, Any]:
    """Keyword arguments to build ``cls`` with: every one of ``options`` (:func:`check_options`) and those of
    ``offered`` its constructor takes (an option wins over an offered setting of the same name)."""
    options = dict(options or {})
    check_options(cls, what, options, skip)
    takes = accepted_names(cls, skip)
    kept = {k: v for k, v in (offered or {}).items() if takes is None or k in takes}
    return {**kept, **options}
