"""MVSA-Single / -Multiple (Niu et al., MMM 2016): the raw release and the CLMLF split layout."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from fusionkit.data.dataset import Example, MultimodalDataset, decode_text
from fusionkit.data.errors import DataError
from fusionkit.data.sources.registry import register_source
from fusionkit.data.sources.rows import ReadOptions, RowReader, prune_splits

log = logging.getLogger("fusionkit.data")

SENTIMENT = ["positive", "neutral", "negative"]  # MVSA's classes; CLMLF's emotion_label indexes this
RAW_COLUMNS = ["sentiment", "text_sentiment", "image_sentiment"]


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


def _is_mvsa(obj: Any) -> bool:
    return isinstance(obj, Path) and (
        (obj / "labelResultAll.txt").is_file() or (obj / "splits" / "train.json").is_file()
    )


class _Pairs:
    """Reads the caption and image of one MVSA id from `data/<id>.txt|jpg` through a RowReader."""

    def __init__(self, root: Path, rr: RowReader, label_columns: list[str]) -> None:
        self.data, self.rr, self.label_columns = root / "data", rr, label_columns
        self.encodings: Counter[str] = Counter()
        self.examples: list[Example] = []

    def caption(self, item: str, where: str) -> str | None:
        if not item or any(c in item for c in "/\\\x00") or item in (".", ".."):
            raise DataError(f"id {item!r} is not a file name", source=where, item=item)
        path = self.data / f"{item}.txt"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DataError(
                f"caption file cannot be read ({e.strerror})", source=str(path), item=item
            ) from None
        text, enc = decode_text(raw, source=str(path))
        self.encodings[enc] += 1
        return text

    def add(self, item: str, where: str, n: int, labels: dict[str, Any], meta: dict[str, Any]) -> bool:
        if not self.rr.wanted(item):
            return False
        try:
            text = self.caption(item, where)
        except DataError as e:
            self.rr.skips(e)
            return False
        row = {"id": item, "text": text, "image": f"{item}.jpg", **labels}
        ex = self.rr.example(
            row,
            where=where,
            row_number=n,
            label_columns=self.label_columns,
            meta=meta,
            no_text="caption is empty" if text is not None else f"caption file {item}.txt not found",
        )
        if ex is not None:
            self.examples.append(ex)
        return ex is not None


def _read_raw(path: Path, variant: str, keep_conflicts: bool, pairs: _Pairs) -> int:
    """`labelResultAll.txt` (BOM and CRLF tolerated): merged sentiment plus both per-modality labels."""
    lines = path.read_bytes().decode("utf-8-sig", errors="replace").split("\n")
    annotators = 1 if variant == "single" else 3
    other = "multiple" if annotators == 1 else "single"
    conflicts, total = 0, 0
    for lineno, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip() or (lineno == 1 and line.upper().startswith("ID")):  # header "ID\ttext,image"
            continue
        total += 1
        where = f"{path}:{lineno}"
        fields = line.split("\t")
        item = fields[0].strip()
        try:
            if len(fields) != 1 + annotators:
                raise DataError(
                    f"expected {annotators} 'text,image' annotation(s), found {len(fields) - 1}",
                    source=where,
                    item=item,
                    hint=f"if this is MVSA-{other.title()}, pass variant={other!r}",
                )
            votes = [tuple(p.strip().lower() for p in f.split(",")) for f in fields[1:]]
            for v in votes:
                if len(v) != 2 or any(x not in SENTIMENT for x in v):
                    raise DataError(
                        f"unknown label value {','.join(v)!r}; expected two of {SENTIMENT}",
                        source=where,
                        item=item,
                    )
        except DataError as e:
            pairs.rr.skips(e)
            continue
        text_l, image_l = _majority([v[0] for v in votes]), _majority([v[1] for v in votes])
        merged = _combine(text_l, image_l) if text_l and image_l else None
        if merged is None:
            conflicts += 1
            if not keep_conflicts:
                continue
        labels = dict(zip(RAW_COLUMNS, (merged, text_l, image_l)))
        pairs.add(item, where, total, labels, {"annotations": [",".join(v) for v in votes]})
    log.info(
        "read_mvsa(%s, %s): %s %d pairs with conflicting or no-majority text/image labels (protocol)",
        path.parent,
        variant,
        "kept (sentiment=None)" if keep_conflicts else "dropped",
        conflicts,
    )
    return total


def _read_clmlf(root: Path, pairs: _Pairs) -> tuple[int, dict[str, list[str]]]:
    """`splits/{train,dev,test}.json`: CLMLF's split, labels merged already; test has none."""
    splits: dict[str, list[str]] = {}
    total = 0
    for split, fname in (("train", "train.json"), ("val", "dev.json"), ("test", "test.json")):
        path = root / "splits" / fname
        try:
            rows = json.loads(path.read_bytes().decode("utf-8-sig")) if path.is_file() else []
        except (ValueError, UnicodeDecodeError) as e:  # the whole file is unreadable: nothing to skip to
            raise DataError(f"not a JSON split file ({e})", source=str(path)) from None
        if not isinstance(rows, list):
            raise DataError(f"expected a JSON list of rows, got a {type(rows).__name__}", source=str(path))
        splits[split] = []
        for n, row in enumerate(rows):
            total += 1
            where = f"{path}[{n}]"
            try:
                if not isinstance(row, dict):
                    raise DataError(f"row is a JSON {type(row).__name__}, not an object", source=where)
                if row.get("id") in (None, ""):
                    raise DataError('row has no "id"', source=where)
                item, raw = str(row["id"]), row.get("emotion_label")
                if raw is not None and (isinstance(raw, bool) or raw not in (0, 1, 2)):
                    raise DataError(
                        f"unknown emotion_label {raw!r}; expected 0, 1 or 2", source=where, item=item
                    )
            except DataError as e:
                pairs.rr.skips(e)
                continue
            if pairs.add(item, where, total, {"sentiment": None if raw is None else SENTIMENT[raw]}, {}):
                splits[split].append(item)
    return total, splits


@register_source("mvsa", _is_mvsa)
def read_mvsa(
    root: str | Path,
    variant: Literal["single", "multiple"] = "single",
    *,
    keep_conflicts: bool = False,
    **options: Any,
) -> MultimodalDataset:
    """MVSA-Single / -Multiple as released, or in the CLMLF split layout; labels are class names.

    Raw layout (`labelResultAll.txt`): columns `sentiment` (merged by the literature's protocol, see
    data_cards/mvsa_*.md), `text_sentiment` and `image_sentiment`. Pairs whose text and image labels
    conflict are dropped (counted in the log) unless `keep_conflicts`, which keeps them with
    `sentiment=None`. CLMLF layout (`splits/{train,dev,test}.json`): its splits; test labels are None.
    `options`: see `ReadOptions` (column names and `image_root` are fixed by the layout and not used).
    """
    root = Path(root)
    opts = dataclasses.replace(
        ReadOptions.from_kwargs(options),
        text_column="text",
        image_column="image",
        id_column="id",
        image_root=None,
    )
    if variant not in ("single", "multiple"):
        raise ValueError(f"variant must be 'single' or 'multiple', got {variant!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"MVSA folder {root} does not exist")
    label_file = root / "labelResultAll.txt"
    raw = label_file.is_file()
    if not raw and not (root / "splits" / "train.json").is_file():
        raise FileNotFoundError(
            f"{root} has neither labelResultAll.txt nor splits/train.json: not an MVSA folder"
        )
    available = RAW_COLUMNS if raw else RAW_COLUMNS[:1]
    label_columns = opts.label_columns_of(available, str(root))
    rr = RowReader(opts, f"read_mvsa({root})", image_root=root / "data", table_cells=False)
    pairs = _Pairs(root, rr, list(label_columns))
    splits: dict[str, list[str]] | None = None
    if raw:
        total = _read_raw(label_file, variant, keep_conflicts, pairs)
    else:
        total, splits = _read_clmlf(root, pairs)
    if pairs.encodings.get("gb18030"):
        log.info(
            "read_mvsa(%s): %d captions were GB18030, not UTF-8, and were decoded as such",
            root,
            pairs.encodings["gb18030"],
        )
    if pairs.encodings.get("latin-1"):  # GB18030 would have turned them into CJK ('müde' -> 'm黡e') without an error
        log.warning("read_mvsa(%s): %d captions were neither UTF-8 nor GB18030 text but Latin-1 ('müde') and were "
                    "decoded as such; re-encode them as UTF-8 to be sure", root, pairs.encodings["latin-1"])  # fmt: skip
    examples, report = rr.finish(pairs.examples, total)
    if splits is not None:  # an id in two splits would leak: it stays in its first split only
        splits = prune_splits(splits, examples)
    label_names = {c: list(SENTIMENT) for c in label_columns}
    return MultimodalDataset(examples, label_names, splits=splits, name=f"mvsa-{variant}", skip_report=report)
