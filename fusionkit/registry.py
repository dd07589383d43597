"""One small registry of classes by name, shared by fusion strategies, task types and image backends.

A decorator registers a class under a name (and stores the name on the class); a lookup of an unknown name
imports the user's plugins, then fails with the registered ones listed. It is a dict, so it reads like one.
Data sources (`fusionkit.data.sources.registry`) follow the same naming rules (`check_name`, `check_free`).
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
    formats: installed packages' `fusionkit.plugins` entry points and $FUSIONKIT_PLUGINS (comma-separated
    `module` or `module:attr`). Called only when a name is not found, so the command line and `from_pretrained`
    of a model built from them find them, and runs that use only registered names never import them.

    Each is loaded as `importlib.metadata` loads an entry point: the module is imported, and an `:attr` is looked
    up (not called): registering happens at import, by the module's decorators."""
    plugins = {ep.value: (ep, f"entry point {ep.name!r} of group {PLUGIN_GROUP!r}")
               for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}  # fmt: skip
    for value in filter(None, (m.strip() for m in os.environ.get("FUSIONKIT_PLUGINS", "").split(","))):
        plugins.setdefault(value, (importlib.metadata.EntryPoint(value, value, PLUGIN_GROUP), "$FUSIONKIT_PLUGINS"))
    for name, (ep, source) in plugins.items():
        if name in _loaded:
            continue
        if ep.pattern.match(name) is None:
            raise ConfigError(f"fusionkit plugin {name!r} (named in {source}) is not a module name: write "
                              "'package.module' or 'package.module:attribute'")  # fmt: skip
        _import(ep.module, name, source)
        try:
            ep.load()  # the module is imported by now: this looks up its `:attr`
        except AttributeError as e:
            raise ConfigError(f"fusionkit plugin {name!r} (named in {source}): {e}") from None
        _loaded.append(name)
    return list(_loaded)


def _import(module: str, name: str, source: str) -> None:
    """Import a plugin's module; its failure is one line naming the plugin and where it was named."""
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


def check_name(kind: str, name: object) -> str:
    """A registered name is a non-empty str: `@register_fusion(3)`, or a bare `@register_fusion` over the class,
    is refused where it is written, not found missing when a config names it."""
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"{kind} name: expected a non-empty str, got {name!r}; the decorator takes the name first: "
                        '@register_...("my_name")')  # fmt: skip
    return name


def check_free(kind: str, name: str, held: object | None, new: object) -> None:
    """A name is taken once. The same definition again (a re-imported module, a re-run notebook cell, a script
    that is also imported as a plugin) replaces it; another one is refused, naming the one that has it."""
    if held is not None and _origin(held) != _origin(new):
        raise ValueError(f"{kind} {name!r} is already registered (by {held.__module__}.{held.__qualname__}); "
                         "choose another name")  # fmt: skip


def _origin(obj: object) -> tuple[str, str]:
    """(qualified name, source file or else module) of a class or function: `__main__` and the module of
    the same file are one definition."""
    module = sys.modules.get(obj.__module__)
    return obj.__qualname__, os.path.realpath(module.__file__) if getattr(module, "__file__", None) else obj.__module__


class Registry(dict[str, T]):
    """Classes by name for one kind of plugin (fusion strategy, task type, image backend), each a subclass of
    `base`. A dict: `name in registry`, `list(registry)`."""

    def __init__(self, kind: str, name_attr: str, base: type | None = None) -> None:
        super().__init__()
        self.kind, self.name_attr, self.base = kind, name_attr, base

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: `@register_fusion("my_fusion")` over a `FusionStrategy` subclass, `@register_task(...)`
        over a `Task` subclass, `@IMAGE_BACKENDS.register(...)` over an `ImageEncoder` subclass. Configs then name
        it; the class gets the name as an attribute. Registering the same class again is allowed (a re-run cell)."""
        check_name(self.kind, name)

        def wrap(cls: T) -> T:
            base = self.base or object
            if not isinstance(cls, type) or not issubclass(cls, base) or cls is base or cls.__module__ == "builtins":
                expected = f"a subclass of {base.__module__}.{base.__qualname__}" if self.base else "a class of yours"
                raise TypeError(f"{self.kind} {name!r}: expected {expected}, got {cls!r}; decorate the class "
                                "that implements it")  # fmt: skip
            check_free(self.kind, name, self.get(name), cls)
            setattr(cls, self.name_attr, name)
            self[name] = cls
            return cls

        return wrap

    def get_class(self, name: str) -> T:
        """The class registered as `name`; an unknown name imports the plugins first (`load_plugins`), then
        fails listing the registered names."""
        if name not in self:
            load_plugins()
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {list(self)}. If it is {PLUGIN_HINT}")
        return self[name]
