"""Hugging Face `datasets`: a `Dataset` or `DatasetDict`, in memory or a `save_to_disk` folder."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fusionkit.data.dataset import SPLITS, MultimodalDataset
from fusionkit.data.errors import DataError
from fusionkit.data.sources.registry import register_source
from fusionkit.data.sources.rows import ReadOptions, RowReader, prune_splits, require_sides

SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def _is_hf(obj: Any) -> bool:
    if isinstance(obj, Path):
        return (obj / "dataset_info.json").is_file() or (obj / "dataset_dict.json").is_file()
    hf = sys.modules.get("datasets")
    return hf is not None and isinstance(obj, hf.Dataset | hf.DatasetDict)


def _splits(dd: Any, name: str) -> dict[str, Any]:
    """A `DatasetDict`'s splits under fusionkit's names. A split no name fits (IMDB's `unsupervised`, MNLI's
    `validation_matched`), or two that read as one (`dev` and `validation`), is refused: its rows would be
    left out, or one split would overwrite the other, without a word."""
    parts: dict[str, Any] = {}
    named: dict[str, str] = {}  # fusionkit's split -> the DatasetDict's
    for key, part in dd.items():
        split = SPLIT_ALIASES.get(key, key)
        if split in named:
            raise DataError(f"its splits {named[split]!r} and {key!r} both read as the {split} split", source=name,
                            hint=f"keep one (del dd[{key!r}]), or join them (dd[{named[split]!r}] = "
                            f"datasets.concatenate_datasets([dd[{named[split]!r}], dd.pop({key!r})]))")  # fmt: skip
        named[split] = key
        parts[split] = part
    unknown = [k for k in dd if SPLIT_ALIASES.get(k, k) not in SPLITS]
    if unknown:
        rows = sum(len(dd[k]) for k in unknown)
        raise DataError(
            f"split(s) {unknown} ({rows} rows) are none of those read: train, validation (or val, valid, dev) and "
            "test", source=name,
            hint=f"rename the split to use (dd['validation'] = dd.pop({unknown[0]!r})) or drop it (del "
            f"dd[{unknown[0]!r}]), or pass one Dataset (dd['train']) to split it by data.split_ratios; a "
            "save_to_disk folder: load_from_disk it, do so and save it again",
        )  # fmt: skip
    return parts


def _class_names(feature: Any) -> list[str] | None:
    """The declared class names of a `ClassLabel` column or of a list of them, else None."""
    import datasets as hf

    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", feature)
    return list(inner.names) if isinstance(inner, hf.ClassLabel) else None


def _decode_class(value: Any, names: list[str]) -> Any:
    """ClassLabel ints -> their names; -1 (HF's "no label") -> None; lists (or arrays) element-wise; another int
    outside the names stays an int (an error where labels are bound, not a silently missing label)."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # a numpy array or int (Parquet via pandas)
        value = value.tolist()
    if isinstance(value, list):
        return [_decode_class(v, names) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        if value == -1:
            return None
        # a number past the names is kept as it is: binding then refuses it as a label outside the declared classes
        return names[value] if 0 <= value < len(names) else value
    return value


def class_label_names(features: Mapping[str, Any], columns: Iterable[str]) -> dict[str, list[str]]:
    """The declared names of the `ClassLabel` columns (or lists of them) among `columns`: their ints are
    read as these names, in this order, -1 as missing. One rule for an HF dataset and for the Parquet file
    `Dataset.to_parquet` wrote (its schema keeps the features), so both train the same classes."""
    return {c: names for c in columns if c in features and (names := _class_names(features[c])) is not None}


def decode_class_labels(row: dict[str, Any], names_of: Mapping[str, list[str]]) -> dict[str, Any]:
    """`row` with its `ClassLabel` cells (see `class_label_names`) replaced by their names, in place."""
    for c, names in names_of.items():
        if c in row:
            row[c] = _decode_class(row[c], names)
    return row


@register_source("hf", _is_hf)
def from_hf(dataset_or_path: Any, **options: Any) -> MultimodalDataset:
    """A `datasets.Dataset` / `DatasetDict` (or a `save_to_disk` folder) with a caption and an image column.

    The image column may be an `Image` feature (kept encoded: decoding happens once, in the cache) or
    paths, relative to `image_root` (default: the working directory). Labels are kept raw, except
    that `ClassLabel` ints become their names (-1: missing) and the names are declared in order in
    `label_names`. A `DatasetDict`'s train/validation/test become the dataset's predefined splits (any
    other split is refused, not left out); a split without a label column (an unlabelled test split) has
    None labels there.
    Options: see `ReadOptions`. Locations in errors: `name[row]`, or `name/split[row]` (0-based); a
    missing id becomes the row number counted over all splits.
    """
    import datasets as hf

    opts = ReadOptions.from_kwargs(options)
    name = "hf-dataset"
    if isinstance(dataset_or_path, str | Path):
        if not Path(dataset_or_path).exists():
            raise FileNotFoundError(f"dataset folder {dataset_or_path} does not exist")
        name = Path(dataset_or_path).name
        dataset_or_path = hf.load_from_disk(str(dataset_or_path))
    is_dict = isinstance(dataset_or_path, hf.DatasetDict)
    parts = _splits(dataset_or_path, name) if is_dict else {"": dataset_or_path}
    for split, part in parts.items():
        where = f"{name}/{split}" if split else name
        require_sides(opts, part.column_names, where)
    columns = list(dict.fromkeys(c for part in parts.values() for c in part.column_names))
    label_columns = opts.label_columns_of(columns, name)
    declared: dict[str, list[str] | None] = dict.fromkeys(label_columns)
    rr = RowReader(opts, f"from_hf({name})")
    examples, ids, n = [], {k: [] for k in parts}, 0
    for split, part in parts.items():  # split by split: a test split may lack the label columns
        # a split (or the whole set, `--image-column ''`) may lack the image column: `require_sides` allowed it
        if isinstance(part.features.get(opts.image_column), hf.Image):
            part = part.cast_column(opts.image_column, hf.Image(decode=False))
        names_of = class_label_names(part.features, label_columns)
        for c, names in names_of.items():
            declared[c] = declared[c] or names
        for i, row in enumerate(part):
            decode_class_labels(row, names_of)
            where = f"{name}/{split}[{i}]" if split else f"{name}[{i}]"
            ex = rr.example(row, where=where, row_number=n, label_columns=label_columns)
            n += 1
            if ex is not None:
                examples.append(ex)
                ids[split].append(ex.id)
    examples, report = rr.finish(examples, n)
    splits = prune_splits(ids, examples) if is_dict else None
    label_names = {c: names or [] for c, names in declared.items()}
    return MultimodalDataset(examples, label_names, splits=splits, name=name, skip_report=report)
