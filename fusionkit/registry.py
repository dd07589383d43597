"""One small registry of classes by name, shared by fusion strategies and task types.

A decorator registers a class under a name (and stores the name on the class); a lookup of an
unknown name fails with the registered ones listed. It is a dict, so it reads like one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from .config import ConfigError

T = TypeVar("T", bound=type)

PLUGIN_GROUP = "fusionkit.plugins"  # entry points whose modules register fusions, tasks, encoders, sources
PLUGIN_HINT = ("a name your own code registers: import its module first (the command line imports the modules "
               "named in $FUSIONKIT_PLUGINS, comma-separated, and the 'fusionkit.plugins' entry points)")  # fmt: skip
_loaded: list[str] = []


def load_plugins() -> list[str]:
    """Import the modules that register a user's own fusion strategies, task types, encoder backends or dataset
    formats: installed packages' `fusionkit.plugins` entry points and $FUSIONKIT_PLUGINS. Called when a name is
    not found, so the command line and `from_pretrained` of a model built from them find them."""
    sources = {ep.value: f"entry point {ep.name!r} of group {PLUGIN_GROUP!r}"
               for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}  # fmt: skip
    for m in os.environ.get("FUSIONKIT_PLUGINS", "").split(","):
        sources.setdefault(m.strip(), "$FUSIONKIT_PLUGINS") if m.strip() else None
    for name, source in sources.items():
        if name in _loaded:
            continue
        module = name.split(":")[0]
        try:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:  # the `fusionkit` script, unlike `python -m fusionkit`, does not put
                cwd = os.getcwd()  # the working directory on sys.path: a plugin beside the config is found by both
                if e.name != module.split(".")[0] or cwd in sys.path:
                    raise
                sys.path.insert(0, cwd)
                importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"fusionkit plugin {name!r} cannot be imported (it is named in {source}): {e}. A "
                              "plugin is a module that Python can import: install it, or put its folder on "
                              "PYTHONPATH (the working directory is searched too)") from None  # fmt: skip
        except (Exception, SystemExit) as e:  # its own bug (a typo, a clash of names): one line, not a traceback
            raise ConfigError(f"fusionkit plugin {name!r} (from {source}) failed to import: {_where(e)}; fix the "
                              "plugin, or leave it out of " + source) from None  # fmt: skip
        _loaded.append(name)
    return list(_loaded)


def _where(e: BaseException) -> str:
    """`SyntaxError at synerr.py:1: invalid syntax`: the error and the plugin's line that raised it (not
    fusionkit's own, which a name registered twice raises in)."""
    if isinstance(e, SyntaxError):
        file, line, msg = e.filename or "?", e.lineno, e.msg
    else:
        frames = traceback.extract_tb(e.__traceback__)
        own = os.path.dirname(__file__)
        frame = next((f for f in reversed(frames) if not f.filename.startswith((own, "<"))), frames[-1])
        file, line, msg = frame.filename, frame.lineno, str(e)
    return f"{type(e).__name__} at {os.path.basename(file)}:{line}: {msg}"


class Registry(dict[str, T]):
    def __init__(self, kind: str, name_attr: str) -> None:
        super().__init__()
        self.kind, self.name_attr = kind, name_attr

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            held = self.get(name)  # the same class again (a module re-imported, a notebook cell re-run) replaces it
            if held is not None and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"{self.kind} {name!r} is already registered (by {held.__module__}."
                                 f"{held.__qualname__})")  # fmt: skip
            setattr(cls, self.name_attr, name)
            self[name] = cls
            return cls

        return wrap

    def get_class(self, name: str) -> T:
        if name not in self:
            load_plugins()
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {list(self)}. If it is {PLUGIN_HINT}")
        return self[name]
