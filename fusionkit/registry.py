"""One small registry of classes by name, shared by fusion strategies and task types.

A decorator registers a class under a name (and stores the name on the class); a lookup of an
unknown name fails with the registered ones listed. It is a dict, so it reads like one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .config import ConfigError

T = TypeVar("T", bound=type)


class Registry(dict[str, T]):
    def __init__(self, kind: str, name_attr: str) -> None:
        super().__init__()
        self.kind, self.name_attr = kind, name_attr

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            setattr(cls, self.name_attr, name)
            self[name] = cls
            return cls

        return wrap

    def get_class(self, name: str) -> T:
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {list(self)}")
        return self[name]
