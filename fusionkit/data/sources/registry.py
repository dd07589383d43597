"""One registered reader per data source; `load_dataset` asks each in turn whether it takes the input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusionkit.data.dataset import MultimodalDataset

Reader = Callable[..., MultimodalDataset]


@dataclass(frozen=True)
class Source:
    name: str
    accepts: Callable[[Any], bool]  # given an object or an existing Path: is it this source's?
    read: Reader


SOURCES: dict[str, Source] = {}


def register_source(name: str, accepts: Callable[[Any], bool]) -> Callable[[Reader], Reader]:
    """Register `read(obj, **reader_options)` for inputs where `accepts(obj)` is true."""

    def wrap(read: Reader) -> Reader:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is already registered")
        SOURCES[name] = Source(name, accepts, read)
        return read

    return wrap


def load_dataset(spec: Any, **options: Any) -> MultimodalDataset:
    """Any supported data as a `MultimodalDataset` with raw labels.

    `spec`: "synthetic" / "synthetic:N"; a path (str or Path) to a .csv/.tsv/.jsonl/.parquet file,
    an MVSA folder or a Hugging Face `save_to_disk` folder; a pandas DataFrame; a `datasets.Dataset`
    / `DatasetDict`; or a `MultimodalDataset`, returned unchanged (the options are then not used).
    `options` are the same for every source: see `fusionkit.data.sources.ReadOptions`.
    """
    from fusionkit.data import sources  # noqa: F401  (registers the built-in sources)

    if isinstance(spec, MultimodalDataset):
        return spec
    source = _find(spec)
    if source is None and isinstance(spec, str | Path):
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"dataset {str(spec)!r} not found: no such file or folder (or use 'synthetic[:N]')"
            )
        spec, source = path, _find(path)
        if source is None:
            raise ValueError(
                f"{path}: not a .csv/.tsv/.jsonl/.parquet table, an MVSA folder or a saved Hugging Face dataset"
            )
    if source is None:
        raise TypeError(
            f"cannot read a {type(spec).__name__}: pass a path, a pandas DataFrame, a datasets.Dataset / "
            "DatasetDict or a MultimodalDataset"
        )
    return source.read(spec, **options)


def source_name(spec: Any) -> str | None:
    """The name of the source that reads `spec` (a path: as given), or None."""
    from fusionkit.data import sources  # noqa: F401  (registers the built-in sources)

    source = _find(Path(spec).expanduser() if isinstance(spec, str) else spec)
    return source.name if source is not None else None


def _find(obj: Any) -> Source | None:
    from fusionkit.registry import load_plugins

    load_plugins()  # a format registered by the user's own module (the command line reads it too)
    return next((s for s in SOURCES.values() if s.accepts(obj)), None)
