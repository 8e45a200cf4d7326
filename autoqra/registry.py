r"""One registry type for every plug-in kind: backends, evaluators, searchers and executors.

A :class:`Registry` maps names to classes. ``register(name)`` is a class decorator (later
registrations win, so a user can replace a built-in); ``names()`` lists what is registered; ``get(name)``
returns the class or raises one ``ValueError`` naming the kind, the bad name and the registered ones.
Each kind's module keeps its historical helpers (``register_backend``, ``get_searcher``...) as thin
wrappers over its registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

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
