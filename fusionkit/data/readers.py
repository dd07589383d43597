"""Readers for MVSA (raw release and CLMLF-split layouts), CSV/JSONL tables and HF datasets."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from fusionkit.data.dataset import Example, MultimodalDataset, clean_text, decode_text
from fusionkit.data.errors import DataError, OnError, SkipLog, check_policy

log = logging.getLogger("fusionkit.data")

SENTIMENT = ["positive", "neutral", "negative"]


def _finish(
    examples: list[Example], skips: SkipLog, report_path: str | Path | None, total: int, truncated: int
) -> tuple[list[Example], Path | None]:
    """Drop duplicate ids (first wins; an error under "raise"), log truncations, write the skip report."""
    seen: set[str] = set()
    kept = []
    for ex in examples:
        if ex.id in seen:
            skips(
                DataError(f"duplicate id {ex.id!r}", source=skips.what, item=ex.id, hint="ids must be unique")
            )
            continue
        seen.add(ex.id)
        kept.append(ex)
    if truncated:
        log.warning("%s: %d captions longer than the cap were truncated", skips.what, truncated)
    return kept, skips.finish(report_path, total)


# ------------------------------------------------------------------------------------------------
# MVSA


def _combine(text: str, image: str) -> str | None:
    """MVSA-Single rule (Xu & Mao 2017; CLMLF): equal -> it; one neutral -> the other; pos vs neg -> None."""
    if text == image:
        return text
    if "neutral" in (text, image):
        return image if text == "neutral" else text
    return None


def _majority(votes: Sequence[str]) -> str | None:
    """MVSA-Multiple: a modality's label is the one at least 2 of its 3 annotators gave, else None."""
    label, n = Counter(votes).most_common(1)[0]
    return label if n * 2 > len(votes) else None


def _read_caption(path: Path, *, item: str, allow_empty: bool, encodings: Counter[str]) -> tuple[str, bool]:
    if not path.is_file():
        raise DataError("caption file not found", source=str(path), item=item)
    text, enc = decode_text(path.read_bytes(), source=str(path))
    encodings[enc] += 1
    return clean_text(text, source=str(path), item=item, allow_empty=allow_empty)


def read_mvsa(
    root: str | Path,
    variant: Literal["single", "multiple"] = "single",
    on_error: OnError = "raise",
    *,
    keep_conflicts: bool = False,
    allow_empty_text: bool = False,
    report_path: str | Path | None = None,
) -> MultimodalDataset:
    """MVSA-Single / -Multiple (Niu et al., MMM 2016) as released, or in the CLMLF split layout.

    Raw layout (`labelResultAll.txt`): tasks `sentiment` (merged by the literature's protocol, see
    data_cards/mvsa_*.md), `text_sentiment` and `image_sentiment`. Pairs whose text and image labels
    conflict are dropped (counted in the log) unless `keep_conflicts`, which keeps them with
    `sentiment=None`. CLMLF layout (`splits/{train,dev,test}.json`): its splits; test labels are None.
    """
    root = Path(root)
    policy = check_policy(on_error)
    if variant not in ("single", "multiple"):
        raise ValueError(f"variant must be 'single' or 'multiple', got {variant!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"MVSA folder {root} does not exist")
    skips = SkipLog(policy, f"read_mvsa({root})")
    encodings: Counter[str] = Counter()
    examples: list[Example] = []
    truncated = 0
    splits: dict[str, list[str]] | None = None
    label_file = root / "labelResultAll.txt"

    def make(item: str, label: dict[str, int | None], meta: dict[str, Any]) -> Example | None:
        nonlocal truncated
        try:
            text, cut = _read_caption(
                root / "data" / f"{item}.txt", item=item, allow_empty=allow_empty_text, encodings=encodings
            )
            image = root / "data" / f"{item}.jpg"
            if not image.is_file():
                raise DataError("image file not found", source=str(image), item=item)
        except DataError as e:
            skips(e)
            return None
        truncated += cut
        return Example(item, text, str(image), label, meta)

    if label_file.is_file():
        tasks = ["sentiment", "text_sentiment", "image_sentiment"]
        conflicts = 0
        lines = label_file.read_text(encoding="utf-8").splitlines()
        annotators = 1 if variant == "single" else 3
        for lineno, line in enumerate(lines, start=1):
            if not line.strip() or (lineno == 1 and line.upper().startswith("ID")):  # header "ID\ttext,image"
                continue
            where = f"{label_file}:{lineno}"
            fields = line.split("\t")
            item = fields[0].strip()
            try:
                if len(fields) != 1 + annotators:
                    raise DataError(
                        f"expected {annotators} 'text,image' annotation(s), found {len(fields) - 1}",
                        source=where,
                        item=item,
                        hint=f"if this is MVSA-{'Multiple' if annotators == 1 else 'Single'}, pass variant="
                        f"{'multiple' if annotators == 1 else 'single'!r}",
                    )
                pairs = [tuple(p.strip().lower() for p in f.split(",")) for f in fields[1:]]
                for p in pairs:
                    if len(p) != 2 or any(v not in SENTIMENT for v in p):
                        raise DataError(
                            f"unknown label value {','.join(p)!r}; expected two of {SENTIMENT}",
                            source=where,
                            item=item,
                        )
            except DataError as e:
                skips(e)
                continue
            text_l = _majority([p[0] for p in pairs])
            image_l = _majority([p[1] for p in pairs])
            merged = _combine(text_l, image_l) if text_l and image_l else None
            if merged is None:
                conflicts += 1
                if not keep_conflicts:
                    continue
            label = {
                t: None if v is None else SENTIMENT.index(v) for t, v in zip(tasks, (merged, text_l, image_l))
            }
            ex = make(item, label, {"annotations": [",".join(p) for p in pairs]})
            if ex is not None:
                examples.append(ex)
        log.info(
            "read_mvsa(%s, %s): %s %d pairs with conflicting or no-majority text/image labels (protocol)",
            root,
            variant,
            "kept (sentiment=None)" if keep_conflicts else "dropped",
            conflicts,
        )
        total = len(lines) - 1
    elif (root / "splits" / "train.json").is_file():
        tasks = ["sentiment"]
        splits = {}
        total = 0
        for split, fname in (("train", "train.json"), ("val", "dev.json"), ("test", "test.json")):
            path = root / "splits" / fname
            rows = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
            splits[split] = []
            total += len(rows)
            for n, row in enumerate(rows):
                item = str(row["id"])
                raw = row.get("emotion_label")
                if raw is not None and raw not in (0, 1, 2):
                    skips(
                        DataError(
                            f"unknown emotion_label {raw!r}; expected 0, 1 or 2",
                            source=f"{path}[{n}]",
                            item=item,
                        )
                    )
                    continue
                ex = make(item, {"sentiment": raw}, {})
                if ex is not None:
                    examples.append(ex)
                    splits[split].append(item)
    else:
        raise FileNotFoundError(
            f"{root} has neither labelResultAll.txt nor splits/train.json: not an MVSA folder"
        )
    if encodings.get("gb18030"):
        log.info(
            "read_mvsa(%s): %d captions were GB18030, not UTF-8, and were decoded as such",
            root,
            encodings["gb18030"],
        )
    examples, report = _finish(examples, skips, report_path, total, truncated)
    if splits is not None:
        kept = {ex.id for ex in examples}
        seen: set[str] = set()
        for k, v in splits.items():  # an id in two splits would leak: keep its first split only
            splits[k] = [i for i in v if i in kept and not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]
    label_names = {t: list(SENTIMENT) for t in tasks}
    return MultimodalDataset(examples, label_names, splits=splits, name=f"mvsa-{variant}", skip_report=report)


# ------------------------------------------------------------------------------------------------
# CSV / JSONL tables


LabelSpec = Sequence[str] | Mapping[str, Sequence[str] | str] | None


def _normalize_label_columns(label_columns: LabelSpec) -> dict[str, Sequence[str] | str | None]:
    if label_columns is None:
        return {}
    if isinstance(label_columns, str):
        return {label_columns: None}
    if isinstance(label_columns, Mapping):
        return dict(label_columns)
    return {c: None for c in label_columns}


def _parse_label(value: Any, kind: str, names: list[str], where: str, item: str) -> Any:
    """Cell -> label: class name or index (classification), list or '|'-joined names (multilabel), float."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if kind == "regression":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"label {value!r} is not a number", source=where, item=item) from None

    def one(v: Any) -> int:
        s = str(v).strip()
        if s in names:
            return names.index(s)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
            return v
        raise DataError(f"unknown label value {v!r}; expected one of {names}", source=where, item=item)

    if kind == "multilabel":
        values = value if isinstance(value, list) else str(value).split("|")
        return sorted({one(v) for v in values if str(v).strip()})
    return one(value)


def read_table(
    path: str | Path,
    text_column: str = "text",
    image_column: str = "image",
    label_columns: LabelSpec = None,
    *,
    id_column: str | None = "id",
    task_types: Mapping[str, str] | None = None,
    on_error: OnError = "raise",
    allow_empty_text: bool = False,
    report_path: str | Path | None = None,
) -> MultimodalDataset:
    """A CSV or JSONL file: one row per pair, image paths relative to the file.

    `label_columns`: column names (class names are then the sorted distinct values) or a mapping
    column -> class names (values may be names or indices) or -> "regression". `task_types` marks a
    column "multilabel" (cells: JSON lists or '|'-joined names). Empty cells are missing labels.
    Rows without an `id_column` value get their 1-based row number as id.
    """
    path = Path(path)
    policy = check_policy(on_error)
    if not path.is_file():
        raise FileNotFoundError(f"table {path} does not exist")
    skips = SkipLog(policy, f"read_table({path})")
    raw = path.read_bytes()
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    suffix = path.suffix.lower()
    rows: list[tuple[str, Any]] = []
    if suffix == ".csv":
        # csv's default 128 KiB field limit would reject a whole file for one huge caption; captions
        # are capped to MAX_TEXT_CHARS below instead. (The limit is process-wide; we only raise it.)
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [(f"{path}:{n + 2}", row) for n, row in enumerate(reader)]
        columns = reader.fieldnames or []
    elif suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    skips(DataError(f"invalid JSON ({e.msg})", source=f"{path}:{n}"))
        columns = sorted({k for _, r in rows if isinstance(r, dict) for k in r})
    else:
        raise ValueError(f"{path}: unsupported table format {suffix!r}; use .csv or .jsonl")
    specs = _normalize_label_columns(label_columns)
    required = [text_column, image_column, *specs]
    missing = [c for c in required if c not in columns]
    if missing and rows:
        raise DataError(f"missing column(s) {missing}; found {columns}", source=str(path))
    kinds = {
        c: (task_types or {}).get(c, "regression" if s == "regression" else "classification")
        for c, s in specs.items()
    }
    label_names: dict[str, list[str]] = {}
    for c, spec in specs.items():
        if kinds[c] == "regression":
            label_names[c] = []
        elif spec is not None and not isinstance(spec, str):
            label_names[c] = [str(s) for s in spec]
        else:  # infer class names from the data
            values: set[str] = set()
            for _, r in rows:
                v = r.get(c)
                vs = (
                    v if isinstance(v, list) else str(v).split("|") if kinds[c] == "multilabel" and v else [v]
                )
                values.update(str(x).strip() for x in vs if x is not None and str(x).strip())
            label_names[c] = sorted(values)

    examples: list[Example] = []
    truncated = 0
    for n, (where, row) in enumerate(rows, start=1):
        item = str(row.get(id_column) or n) if id_column else str(n)
        try:
            caption = row.get(text_column)
            caption = "" if caption is None else str(caption)
            if any("\udc80" <= ch <= "\udcff" for ch in caption):
                raise DataError(
                    "caption is not valid UTF-8", source=where, item=item, hint="re-encode the file as UTF-8"
                )
            caption, cut = clean_text(caption, source=where, item=item, allow_empty=allow_empty_text)
            image_ref = str(row.get(image_column) or "")
            image = (path.parent / image_ref).resolve() if image_ref else None
            if image is None or not image.is_file():
                raise DataError(f"image file not found: {image_ref!r}", source=where, item=item)
            labels = {c: _parse_label(row.get(c), kinds[c], label_names[c], where, item) for c in specs}
        except DataError as e:
            skips(e)
            continue
        truncated += cut
        examples.append(Example(item, caption, str(image), labels))
    examples, report = _finish(examples, skips, report_path, len(rows), truncated)
    return MultimodalDataset(examples, label_names, kinds, name=path.stem, skip_report=report)


# ------------------------------------------------------------------------------------------------
# Hugging Face datasets


def from_hf(
    dataset_or_path: Any,
    text_column: str = "text",
    image_column: str = "image",
    label_columns: Iterable[str] | None = None,
    *,
    id_column: str | None = "id",
    on_error: OnError = "raise",
    allow_empty_text: bool = False,
    report_path: str | Path | None = None,
) -> MultimodalDataset:
    """A `datasets.Dataset` (or a `DatasetDict`, or a `save_to_disk` folder) with an `Image` column.

    Images are kept encoded (bytes or path): decoding happens once, in `build_cache`. Label types
    come from the features: `ClassLabel` (classification), a sequence of `ClassLabel` (multilabel),
    floats (regression), other values (classification over their sorted distinct values).
    A `DatasetDict`'s train/validation/test become the dataset's predefined splits.
    """
    import datasets as hf

    policy = check_policy(on_error)
    name = "hf-dataset"
    if isinstance(dataset_or_path, str | Path):
        if not Path(dataset_or_path).exists():
            raise FileNotFoundError(f"dataset folder {dataset_or_path} does not exist")
        name = Path(dataset_or_path).name
        dataset_or_path = hf.load_from_disk(str(dataset_or_path))
    splits: dict[str, list[str]] | None = None
    if isinstance(dataset_or_path, hf.DatasetDict):
        alias = {"validation": "val", "valid": "val", "dev": "val"}
        parts = {alias.get(k, k): v for k, v in dataset_or_path.items()}
        ds = hf.concatenate_datasets(list(parts.values()))
        offsets, start = {}, 0
        for k, v in parts.items():
            offsets[k] = (start, start + len(v))
            start += len(v)
    else:
        ds, offsets = dataset_or_path, {}
    if image_column not in ds.column_names or text_column not in ds.column_names:
        raise DataError(
            f"needs columns {text_column!r} and {image_column!r}; found {ds.column_names}", source=name
        )
    ds = ds.cast_column(image_column, hf.Image(decode=False))
    if label_columns is None:
        label_columns = [c for c in ds.column_names if c not in (text_column, image_column, id_column)]
    label_names: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for c in label_columns:
        feat = ds.features[c]
        inner = getattr(feat, "feature", None)
        if isinstance(feat, hf.ClassLabel):
            kinds[c], label_names[c] = "classification", list(feat.names)
        elif isinstance(inner, hf.ClassLabel) or (
            isinstance(feat, list) and isinstance(feat[0], hf.ClassLabel)
        ):
            kinds[c], label_names[c] = "multilabel", list((inner or feat[0]).names)
        elif isinstance(feat, hf.Value) and feat.dtype.startswith("float"):
            kinds[c], label_names[c] = "regression", []
        else:
            kinds[c] = "classification"
            label_names[c] = sorted({str(v) for v in ds[c] if v is not None})
    skips = SkipLog(policy, f"from_hf({name})")
    examples: list[Example] = []
    truncated = 0
    ids_by_row: list[str | None] = []
    for n, row in enumerate(ds):
        item = (
            str(row[id_column]) if id_column and id_column in row and row[id_column] is not None else str(n)
        )
        where = f"{name}[{n}]"
        ids_by_row.append(None)
        try:
            caption, cut = clean_text(
                row[text_column] or "", source=where, item=item, allow_empty=allow_empty_text
            )
            img = row[image_column]
            image = (img or {}).get("bytes") or (img or {}).get("path")
            if not image:
                raise DataError("no image", source=where, item=item)
            labels = {}
            for c in label_columns:
                v = row[c]
                if kinds[c] == "classification" and not isinstance(ds.features[c], hf.ClassLabel):
                    v = None if v is None else label_names[c].index(str(v))
                labels[c] = v
        except DataError as e:
            skips(e)
            continue
        truncated += cut
        ids_by_row[-1] = item
        examples.append(Example(item, caption, image, labels))
    examples, report = _finish(examples, skips, report_path, len(ds), truncated)
    if offsets:
        kept = {ex.id for ex in examples}
        splits = {
            k: [i for i in ids_by_row[a:b] if i is not None and i in kept] for k, (a, b) in offsets.items()
        }
    return MultimodalDataset(examples, label_names, kinds, splits=splits, name=name, skip_report=report)


# ------------------------------------------------------------------------------------------------


def load_dataset(spec: str | Path, **kw: Any) -> MultimodalDataset:
    """By spec: "synthetic" / "synthetic:N", an MVSA folder, a .csv/.jsonl file, or a saved HF dataset."""
    from fusionkit.data.synthetic import make_synthetic

    s = str(spec)
    if s == "synthetic" or s.startswith("synthetic:"):
        n = s.partition(":")[2]
        return make_synthetic(int(n), **kw) if n else make_synthetic(**kw)
    path = Path(s).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {s!r} not found: no such file or folder (or use 'synthetic[:N]')")
    if path.is_file():
        return read_table(path, **kw)
    if (path / "labelResultAll.txt").is_file() or (path / "splits" / "train.json").is_file():
        return read_mvsa(path, **kw)
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return from_hf(path, **kw)
    raise ValueError(f"{path}: not an MVSA folder, a table file or a saved Hugging Face dataset")
