"""Hugging Face `datasets`: a `Dataset` or `DatasetDict`, in memory or a `save_to_disk` folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fusionkit.data.dataset import MultimodalDataset
from fusionkit.data.sources.registry import register_source
from fusionkit.data.sources.rows import ReadOptions, RowReader, prune_splits, require_column

SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def _is_hf(obj: Any) -> bool:
    if isinstance(obj, Path):
        return (obj / "dataset_info.json").is_file() or (obj / "dataset_dict.json").is_file()
    hf = sys.modules.get("datasets")
    return hf is not None and isinstance(obj, hf.Dataset | hf.DatasetDict)


def _class_names(feature: Any) -> list[str] | None:
    """The declared class names of a `ClassLabel` column or of a list of them, else None."""
    import datasets as hf

    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", feature)
    return list(inner.names) if isinstance(inner, hf.ClassLabel) else None


def _decode_class(value: Any, names: list[str]) -> Any:
    """ClassLabel ints -> their names; -1 (HF's "no label") -> None; lists element-wise."""
    if isinstance(value, list):
        return [_decode_class(v, names) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return names[value] if 0 <= value < len(names) else None
    return value


@register_source("hf", _is_hf)
def from_hf(dataset_or_path: Any, **options: Any) -> MultimodalDataset:
    """A `datasets.Dataset` / `DatasetDict` (or a `save_to_disk` folder) with a caption and an image column.

    The image column may be an `Image` feature (kept encoded: decoding happens once, in the cache) or
    paths, relative to `image_root` (default: the working directory). Labels are kept raw, except
    that `ClassLabel` ints become their names (-1: missing) and the names are declared in order in
    `label_names`. A `DatasetDict`'s train/validation/test become the dataset's predefined splits.
    Options: see `ReadOptions`; locations in errors are `name[row]` (0-based, over all splits).
    """
    import datasets as hf

    opts = ReadOptions.from_kwargs(options)
    name = "hf-dataset"
    if isinstance(dataset_or_path, str | Path):
        if not Path(dataset_or_path).exists():
            raise FileNotFoundError(f"dataset folder {dataset_or_path} does not exist")
        name = Path(dataset_or_path).name
        dataset_or_path = hf.load_from_disk(str(dataset_or_path))
    offsets: dict[str, tuple[int, int]] = {}
    if isinstance(dataset_or_path, hf.DatasetDict):
        parts = {SPLIT_ALIASES.get(k, k): v for k, v in dataset_or_path.items()}
        ds = hf.concatenate_datasets(list(parts.values()))
        start = 0
        for k, v in parts.items():
            offsets[k] = (start, start + len(v))
            start += len(v)
    else:
        ds = dataset_or_path
    columns = list(ds.column_names)
    require_column(opts.text_column, "text_column", columns, name)
    require_column(opts.image_column, "image_column", columns, name)
    label_columns = opts.label_columns_of(columns, name)
    if isinstance(ds.features[opts.image_column], hf.Image):
        ds = ds.cast_column(opts.image_column, hf.Image(decode=False))
    declared = {c: _class_names(ds.features[c]) for c in label_columns}
    rr = RowReader(opts, f"from_hf({name})")
    examples, ids_by_row = [], []
    for n, row in enumerate(ds):
        for c, names in declared.items():
            if names is not None:
                row[c] = _decode_class(row[c], names)
        ex = rr.example(row, where=f"{name}[{n}]", row_number=n, label_columns=label_columns)
        ids_by_row.append(None if ex is None else ex.id)
        if ex is not None:
            examples.append(ex)
    examples, report = rr.finish(examples, len(ds))
    splits = None
    if offsets:
        by_part = {k: [i for i in ids_by_row[a:b] if i is not None] for k, (a, b) in offsets.items()}
        splits = prune_splits(by_part, examples)
    label_names = {c: names or [] for c, names in declared.items()}
    return MultimodalDataset(examples, label_names, splits=splits, name=name, skip_report=report)
