"""A registry of named specs, in registration order: the one mechanism behind the dataset
layouts (``tfrecords_builder.datasets``) and kerasfrac's architectures
(``kerasfrac.models.registry``). TensorFlow-free."""

from __future__ import annotations

from typing import Generic, TypeVar

Spec = TypeVar("Spec")


class Registry(Generic[Spec]):
    """``{name: spec}``; ``kind`` names what it holds in its errors ("dataset", "model")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._specs: dict[str, Spec] = {}

    def add(self, name: str, spec: Spec, replace: bool = False) -> Spec:
        """Register ``spec`` as ``name``; a taken name is an error unless ``replace``."""
        if name in self._specs and not replace:
            raise ValueError(
                f"{self.kind} {name!r} is registered already; pass replace=True to redefine it"
            )
        self._specs[name] = spec
        return spec

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register one of their own clean up with it)."""
        self._specs.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def specs(self) -> tuple[Spec, ...]:
        return tuple(self._specs.values())

    def get(self, name: str) -> Spec:
        """The spec of ``name``; an unknown name is an error listing the registered ones."""
        if name not in self._specs:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self._specs)}")
        return self._specs[name]
