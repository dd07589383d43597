"""One registered reader per data source; `load_dataset` asks each in turn whether it takes the input."""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusionkit.config import ConfigError
from fusionkit.data.dataset import MultimodalDataset
from fusionkit.registry import PLUGIN_HINT, check_free, check_name, load_plugins

Reader = Callable[..., MultimodalDataset]


@dataclass(frozen=True)
class Source:
    name: str
    accepts: Callable[[Any], bool]  # see register_source: what it is given
    read: Reader


SOURCES: dict[str, Source] = {}


def register_source(name: str, accepts: Callable[[Any], bool]) -> Callable[[Reader], Reader]:
    """Register `read(obj, **reader_options)` for inputs where `accepts(obj)` is true.

    `accepts` is given the input as written (a str: a path or a spec such as "synthetic:100"; a DataFrame, a
    `datasets.Dataset`, ...) and then, for a str or Path naming an existing file or folder that no source took as
    written, that file or folder as a `pathlib.Path` (`~` expanded). So it meets any type: test it first
    (`isinstance(obj, Path) and obj.suffix == ".kv"`) and answer False for what it does not read. A str it
    accepts is a spec, not a path: configs keep it as written and no command looks for such a file.
    Registering the same function again (a re-run notebook cell) replaces it; another one under a taken name is
    an error."""
    check_name("data source", name)
    if not callable(accepts):
        raise TypeError(f"data source {name!r}: accepts must be a function obj -> bool, got {accepts!r}")

    def wrap(read: Reader) -> Reader:
        if not callable(read):
            raise TypeError(f"data source {name!r}: expected a function read(obj, **options), got {read!r}")
        held = SOURCES.get(name)
        check_free("data source", name, held.read if held else None, read)
        SOURCES[name] = Source(name, accepts, read)
        return read

    return wrap


def load_dataset(spec: Any, **options: Any) -> MultimodalDataset:
    """Any supported data as a `MultimodalDataset` with raw labels.

    `spec`: "synthetic" / "synthetic:N"; a path (str or Path) to a .csv/.tsv/.jsonl/.parquet file,
    an MVSA folder or a Hugging Face `save_to_disk` folder; a pandas DataFrame; a `datasets.Dataset`
    / `DatasetDict`; a `MultimodalDataset`, returned unchanged (the options are then not used); or
    what a registered source of your own accepts (`register_source`).
    `options` are the same for every source: see `fusionkit.data.sources.ReadOptions`.
    """
    if isinstance(spec, MultimodalDataset):
        return spec
    found = _find(spec)
    if found is not None:
        return found[1].read(found[0], **options)
    if isinstance(spec, str | Path):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset {str(spec)!r} not found: no such file or folder, and no registered "
                                    f"source reads it as written (like 'synthetic[:N]'). If it is {PLUGIN_HINT}")  # fmt: skip
        raise ValueError(
            f"{path}: not a .csv/.tsv/.jsonl/.parquet table, an MVSA folder or a saved Hugging Face dataset"
        )
    raise TypeError(
        f"cannot read a {type(spec).__name__}: pass a path, a pandas DataFrame, a datasets.Dataset / "
        "DatasetDict or a MultimodalDataset"
    )


def source_name(spec: Any) -> str | None:
    """The name of the source that reads `spec`, or None."""
    found = _find(spec)
    return found[1].name if found is not None else None


def is_spec(value: Any, base: Path | None = None) -> bool:
    """True for a str that a registered source reads as written ("synthetic:100", a plugin's "mydb:tweets"):
    it names data that is no file, so it is kept as written, never resolved or looked for as a path.

    Plugins are imported only for a str that is no existing file or folder either (relative to `base`, default
    the working directory): a spec no source knows yet."""
    if not isinstance(value, str):
        return False
    if _match([value]) is not None:
        return True
    path = Path(value).expanduser()
    if (base or Path.cwd()).joinpath(path).exists():
        return False
    load_plugins()
    return _match([value]) is not None


def data_gone(source: str) -> str:
    """Why a run's saved data.dataset cannot be read again, as a phrase; "" when it can be (a spec a registered
    source reads, or an existing path)."""
    path = Path(source).expanduser()
    if is_spec(source) or path.exists():
        return ""
    if path.is_absolute():
        return "is not there any more"
    return f"is no file in {Path.cwd()} and no registered source reads it as written (if it is {PLUGIN_HINT})"


def _find(spec: Any) -> tuple[Any, Source] | None:
    """(what the reader gets, its source): the input as written first, then an existing path as a `Path`;
    plugins are imported only when no registered source takes either."""
    forms = [spec] if not isinstance(spec, Path) else []
    if isinstance(spec, str | Path) and Path(spec).expanduser().exists():
        forms.append(Path(spec).expanduser())
    found = _match(forms)
    if found is None:
        load_plugins()  # a format registered by the user's own module
        found = _match(forms)
    return found


def _match(forms: Iterable[Any]) -> tuple[Any, Source] | None:
    from fusionkit.data import sources  # noqa: F401  (registers the built-in sources)

    for obj in forms:
        for source in list(SOURCES.values()):
            try:
                taken = source.accepts(obj)
            except Exception as e:
                read, given = f"{source.read.__module__}.{source.read.__qualname__}", reprlib.repr(obj)
                raise ConfigError(f"data source {source.name!r} (registered by {read}): its accepts raised "
                                  f"{type(e).__name__}: {e}, given {given} (a {type(obj).__name__}). accepts meets every input (a str as written, a pathlib.Path of an existing file "
                                  "or folder, a DataFrame, ...): make it answer False for what it does not read, "
                                  "e.g. isinstance(obj, Path) and ...") from e  # fmt: skip
            if taken:
                return obj, source
    return None
