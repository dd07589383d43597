"""The one in-memory dataset type every reader returns, its fingerprint, and seeded stratified splits."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fusionkit import __version__
from fusionkit.config import check_split
from fusionkit.data.errors import DataError
from fusionkit.data.image import image_digest

log = logging.getLogger("fusionkit.data")

SPLITS = ("train", "val", "test")

# Raw captions are cut to this many characters when read: a BERT-family encoder sees at most 512
# tokens (~3k characters), so a megabyte "caption" is only a memory hazard.
MAX_TEXT_CHARS = 20_000
FALLBACK_ENCODINGS = ("gb18030",)  # MVSA: 1,061 captions were re-encoded to GB18030 upstream


# cells that spreadsheets and pandas write for "no value" (pandas' read_csv makes them NaN): a label spelled so is
# missing unless class_names lists it, a caption spelled so is missing (CSV and its DataFrame read alike)
MISSING_SPELLINGS = ("nan", "none", "null", "na", "n/a", "#n/a", "<na>")


def missing_value(value: Any) -> bool:
    """None, or how pandas writes an empty cell (NaN, NA, NaT): `list(df.caption)` holds those."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    return type(value).__name__ in ("NAType", "NaTType")


def spelled_missing(text: str) -> bool:
    """A cell spelled like a missing value ("nan", "None", "NA", ...: `df.astype(str).to_csv()` writes those)."""
    return text.strip().lower() in MISSING_SPELLINGS


def missing_caption(text: Any) -> bool:
    """No caption, by the one rule the readers apply to a table's cells, so a caption reads the same in training,
    `predict`, the processor and `embed`: None, a pandas empty cell (NaN, NA), a blank string, or a string spelled
    like a missing value (`MISSING_SPELLINGS`)."""
    return missing_value(text) or (isinstance(text, str) and (not text.strip() or spelled_missing(text)))


def decode_text(raw: bytes, *, source: str, encodings: Sequence[str] = FALLBACK_ENCODINGS) -> tuple[str, str]:
    """Decode UTF-8, else each fallback encoding in turn, else Latin-1 where the bytes read as Latin-1 text;
    returns (text, encoding used).

    GB18030 takes most Latin-1 bytes without an error ('müde' reads 'm黡e'), so a fallback whose text looks like
    Latin-1 misread (see `_misread_latin1`) is passed over for Latin-1."""
    for enc in ("utf-8-sig", *encodings):
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        if enc == "utf-8-sig" or not _misread_latin1(raw, text):
            return text, enc
    if _latin1_letters_only(raw):
        return raw.decode("latin-1"), "latin-1"
    raise DataError(
        f"caption bytes are neither UTF-8 nor {'/'.join(encodings)}",
        source=source,
        hint="re-encode the file as UTF-8",
    )


def _latin1_letters_only(raw: bytes) -> bool:
    """Every byte outside ASCII is a Latin-1 letter (0xC0-0xFF: à, é, ñ, ü, ...)."""
    return all(b < 0x80 or b >= 0xC0 for b in raw)


_GLUED_TO_A_LETTER = re.compile(r"[A-Za-z][^\x00-\x7f]|[^\x00-\x7f][A-Za-z]")


def _misread_latin1(raw: bytes, text: str) -> bool:
    """Latin-1 text decoded as a multi-byte encoding: its only non-ASCII bytes are Latin-1 letters, and a decoded
    character (a CJK one, eating the next letter's byte) sits against an ASCII letter, inside a word. Real GB18030
    text almost always has bytes below 0xC0 (every common hanzi's lead or trail byte, '…', kana, Cyrillic)."""
    return _latin1_letters_only(raw) and _GLUED_TO_A_LETTER.search(text) is not None


def clean_text(text: str) -> tuple[str, bool]:
    """Strip and cap the length; returns (text, was_truncated). An empty result is the caller's call.

    The one rule for a caption on every path (readers, data cache, processor): a byte-level BPE or SentencePiece
    tokenizer makes tokens of spaces. Cleaning twice changes nothing (a cut caption is stripped again)."""
    text = text.strip()
    if len(text) > MAX_TEXT_CHARS:
        return text[:MAX_TEXT_CHARS].rstrip(), True
    return text, False


ImageSource = str | bytes | Image.Image  # a file path, encoded bytes or a decoded image


@dataclass
class Example:
    """One image-caption pair; `text` / `image` None = that modality is missing (kept on purpose).

    `labels` maps a column (raw, from a reader) or a task (after `fusionkit.tasks.bind_labels`) to
    its label; None = no label.
    """

    id: str
    text: str | None
    image: ImageSource | None
    labels: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. raw per-annotator labels


class MultimodalDataset(Sequence[Example]):
    """A list of `Example`s plus the label schema.

    As read (raw): labels are keyed by source column with the source's values, `label_names[column]`
    lists the class names the source declares, in order (HF ClassLabel, MVSA), else [], and
    `task_types` is empty. Once bound to tasks (`fusionkit.tasks.bind_labels`): keyed by task name,
    `task_types[task]` is its type and labels are encoded (classification: an index into
    `label_names[task]`; multilabel: a list of indices; regression: a float). `splits` holds
    predefined id lists.
    """

    def __init__(
        self,
        examples: Iterable[Example],
        label_names: Mapping[str, Sequence[str]],
        task_types: Mapping[str, str] | None = None,
        *,
        splits: Mapping[str, Sequence[str]] | None = None,
        name: str = "dataset",
        fingerprint: str | None = None,
        skip_report: Path | None = None,
    ) -> None:
        self.examples = list(examples)
        self.label_names = {k: list(v) for k, v in label_names.items()}
        # Types are the tasks' business (fusionkit.tasks validates them); a raw dataset has none.
        self.task_types = dict(task_types or {})
        for t, kind in self.task_types.items():
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"task {t!r}: type must be a task type name, got {kind!r}")
        self.splits = {k: list(v) for k, v in splits.items()} if splits else None
        self.name = name
        self.skip_report = skip_report
        self._fingerprint = fingerprint
        self._image_fingerprint: str | None = None
        self._index = {ex.id: i for i, ex in enumerate(self.examples)}
        if len(self._index) != len(self.examples):
            dup = next(ex.id for i, ex in enumerate(self.examples) if self._index[ex.id] != i)
            raise DataError(f"duplicate id {dup!r}", source=name, hint="ids must be unique")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        return self.examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"MultimodalDataset({self.name!r}, n={len(self)}, tasks={list(self.label_names)})"

    @property
    def ids(self) -> list[str]:
        return [ex.id for ex in self.examples]

    def index_of(self, id_: str) -> int:
        return self._index[id_]

    def subset(self, indices_or_ids: Iterable[int | str], name: str | None = None) -> MultimodalDataset:
        """Items by position (ints) or by id (strs), in the order given."""
        picked = []
        for k in indices_or_ids:
            if isinstance(k, str):
                if k not in self._index:
                    raise KeyError(f"{self.name}: no item with id {k!r}")
                k = self._index[k]
            picked.append(self.examples[int(k)])
        return MultimodalDataset(
            picked, self.label_names, self.task_types, name=name or f"{self.name}[subset]"
        )

    def label_counts(self, task: str) -> dict[str, int]:
        """Class name (or raw value) -> count, None as "<missing>"; a list counts each of its values.

        Declared class names come first (zero counts included). Works on raw and bound datasets alike.
        """
        names = self.label_names.get(task, [])
        encoded = self.task_types.get(task) in ("classification", "multilabel")

        def key(v: Any) -> str:
            if encoded and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
                return names[v]
            return str(v)

        counts: dict[str, int] = {n: 0 for n in names}
        for ex in self.examples:
            v = ex.labels.get(task)
            for k in ["<missing>"] if v is None else [key(x) for x in v] if isinstance(v, list) else [key(v)]:
                counts[k] = counts.get(k, 0) + 1
        return counts

    @property
    def fingerprint(self) -> str:
        """Content hash: schema, ids, texts, labels and image CONTENT (see `image_digest`), so a file
        replaced under the same name, size and mtime changes it; a moved dataset keeps it."""
        if self._fingerprint is None:
            h, images = hashlib.sha256(), hashlib.sha256()
            h.update(json.dumps([self.label_names, self.task_types], sort_keys=True).encode())
            for ex in self.examples:
                h.update(json.dumps([ex.id, ex.text, ex.labels], sort_keys=True, default=str).encode())
                digest = image_digest(ex.image)
                h.update(digest)
                images.update(json.dumps(ex.id).encode() + digest)
            self._fingerprint, self._image_fingerprint = h.hexdigest(), images.hexdigest()
        return self._fingerprint

    @property
    def image_fingerprint(self) -> str:
        """Hash of the ids and image CONTENT alone (one pass with `fingerprint`): what image features depend on, so
        an edited caption or label reuses them."""
        whole = self.fingerprint  # computes both; a fingerprint given whole (synthetic data) stands for both
        return self._image_fingerprint or whole

    def to_hf(self) -> Any:
        """A `datasets.Dataset` with an `Image` feature; declared class names become `ClassLabel`s.

        Each bound task's type gives its column's feature (`Task.hf_feature`: classification a
        `ClassLabel`, multilabel a sequence of them, regression float32). A column read with class names
        but not bound to a task is a `ClassLabel` (a list: a sequence of them); others keep HF's type.
        """
        import datasets as hf

        from ..tasks import TASK_REGISTRY

        features: dict[str, Any] = {"id": hf.Value("string"), "text": hf.Value("string"), "image": hf.Image()}
        for t in self.label_names:
            kind, names = self.task_types.get(t), self.label_names[t]
            values = [ex.labels.get(t) for ex in self.examples]
            feature = TASK_REGISTRY[kind].hf_feature(names) if kind in TASK_REGISTRY else None
            if feature is None and names:
                lists = any(isinstance(v, list) for v in values)
                feature = hf.Sequence(hf.ClassLabel(names=names)) if lists else hf.ClassLabel(names=names)
            features[t] = feature or hf.Dataset.from_dict({t: values}).features[t]  # as HF infers it

        def image_value(img: str | bytes | Image.Image) -> Any:
            return {"bytes": img, "path": None} if isinstance(img, bytes) else img

        columns: dict[str, list[Any]] = {
            "id": self.ids,
            "text": [ex.text for ex in self.examples],
            "image": [image_value(ex.image) for ex in self.examples],
        }
        for t in self.label_names:
            columns[t] = [ex.labels.get(t) for ex in self.examples]
        return hf.Dataset.from_dict(columns, features=hf.Features(features))


# How `split_dataset` draws a split, recorded as "scheme" in the split files it writes. Files of fusionkit 0.2 and
# older record none: they shuffled each class's rows by their position in the data (scheme 1). 2 (0.3): a seeded
# hash of each row's id. Raise it whenever the same rows, ratios and seed would be split otherwise.
SPLIT_SCHEME = 2
OLDER_SPLITS = "fusionkit 0.2 or older, which split rows by their order in the data"


def split_scheme(saved: Mapping[str, Any]) -> int | None:
    """The `SPLIT_SCHEME` that drew a split file's content (`saved`): 1 for a split an older fusionkit drew (a
    seed, no scheme), None for one that records no seed (written by hand or by another tool)."""
    scheme = saved.get("scheme")
    return scheme if isinstance(scheme, int) else 1 if "seed" in saved else None


def _stratified_split(labels: list[Any], ratios: Sequence[float], seed: int, keys: Sequence[str]) -> list[list[int]]:
    """Per class, order the rows by a seeded hash of their id (`keys`) and cut by `ratios` with largest-remainder
    rounding, so every split gets its share. A row's place depends on its id, its class's size and the seed alone,
    not on where it sits in the file or on other classes: the same rows shuffled split the same, and an edited label
    moves that row (and at most a row at each cut of the two classes), where a shuffle of row positions re-dealt a
    third. A class's rounding ties go to a split drawn by a seeded hash of the class (not always to val).

    Rounding never takes a class's rows away from train: a class too small to give each split a row fills train
    first, then val, then test (whatever the seed), and any class keeps a train row, since a class seen only in
    val/test is never learned."""

    def rank(text: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{text}".encode()).digest()

    by_class: dict[Any, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    parts: list[list[int]] = [[] for _ in ratios]
    total = float(sum(ratios))
    used = [j for j, r in enumerate(ratios) if r > 0]
    for y, members in by_class.items():
        idx = np.array(sorted(members, key=lambda i: rank(keys[i])), dtype=int)
        exact = np.array(ratios) / total * len(idx)
        counts = np.floor(exact).astype(int)
        if len(idx) < len(used):  # one row each, in split order
            counts[:] = 0
            counts[used[: len(idx)]] = 1
        else:  # the rows rounding left go to the largest remainders; ties by the class's own draw
            order = sorted(range(len(ratios)), key=lambda j: (counts[j] - exact[j], rank(f"{y!r}\0{j}")))
            for j in order[: len(idx) - counts.sum()]:
                counts[j] += 1
            if counts[0] == 0 and ratios[0] > 0:  # a tiny train ratio: one row moves to train from the split that got the most
                counts[int(np.argmax(counts))] -= 1
                counts[0] = 1
        for part, chunk in zip(parts, np.split(idx, np.cumsum(counts)[:-1])):
            part.extend(chunk.tolist())
    return [sorted(p) for p in parts]


def _complete_splits(
    ds: MultimodalDataset, ids: dict[str, list[str]], ratios: Sequence[float], seed: int
) -> dict[str, list[str]]:
    """Predefined splits without val (a `DatasetDict` of train only, or of train + test) get one drawn from
    train by `ratios`, and test too when that is missing as well, as an unsplit dataset would: without val no
    epoch is selected, and without test nothing is scored on held-out rows."""
    if not ids["train"] or ids["val"] or ratios[1] <= 0:
        return ids
    draw_test = not ids["test"] and ratios[2] > 0
    train = ds.subset(ids["train"])
    parts = _stratified_split(_strata(train), (ratios[0], ratios[1], ratios[2] if draw_test else 0.0), seed, train.ids)
    drawn = {k: [train[i].id for i in part] for k, part in zip(SPLITS, parts)}
    log.warning(
        "%s: its own splits have %s: drawn from its %d train rows by data.split_ratios %s (seed %d): %s",
        ds.name, "no val and no test" if draw_test else "no val", len(train), list(ratios), seed,
        ", ".join(f"{k} {len(v)}" for k, v in drawn.items() if v),
    )  # fmt: skip
    return {**drawn, "test": drawn["test"] if draw_test else ids["test"]}


def _strata(ds: MultimodalDataset) -> list[Any]:
    """Per example, the class NAME to stratify on (first classification task, or on a raw dataset the first
    column with declared class names): the split then does not depend on the order classes are listed in."""
    from ..tasks import TASK_REGISTRY

    task = next((t for t, k in ds.task_types.items() if k in TASK_REGISTRY and TASK_REGISTRY.get_class(k).stratifies),
                None)  # fmt: skip
    if task is not None:
        names = ds.label_names.get(task) or []
        index = [ex.labels.get(task) for ex in ds]
        return [names[i] if isinstance(i, int) and 0 <= i < len(names) else i for i in index]
    column = next((c for c, names in ds.label_names.items() if names and not ds.task_types), None)
    if column is None:
        return [None] * len(ds)
    known = set(ds.label_names[column])
    return [v if isinstance(v, str) and v in known else None for v in (ex.labels.get(column) for ex in ds)]


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """A split file's id lists, `{"train": [...], "val": [...], "test": [...]}`; ids may be strings or
    integers (read as strings, as ids are). Anything else (not JSON, a missing split, an id named twice)
    is an error saying what is wrong."""
    path = Path(path)
    hint = ('a split file is {"train": [ids], "val": [ids], "test": [ids]}: fix it, or make a new split '
            "(another data.split_file path, or a new run)")  # fmt: skip
    try:
        saved = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"not a split file ({e})", source=str(path), hint=hint) from None
    ok = isinstance(saved, dict) and all(
        isinstance(saved.get(k), list) and all(isinstance(i, str | int) and not isinstance(i, bool) for i in saved[k])
        for k in SPLITS
    )
    if not ok:
        raise DataError(f"a split file holds {list(SPLITS)} as lists of ids (strings or integers)",
                        source=str(path), hint=hint)  # fmt: skip
    ids = {k: [str(i) for i in saved[k]] for k in SPLITS}
    twice = sorted(i for i, n in Counter(i for k in SPLITS for i in ids[k]).items() if n > 1)
    if twice:
        raise DataError(f"{len(twice)} ids named more than once (e.g. {twice[:3]}): the splits would leak",
                        source=str(path), hint=hint)  # fmt: skip
    return ids


def _as_number(id_: str) -> str:
    """An id of digits as its number ("007" -> "7"): how a CSV's id and its numeric copy's compare."""
    return str(int(id_)) if id_.isdecimal() else id_


LEGACY_IDS = ("fusionkit 0.2 read an id written like 007.0 or +5.0 as the number (7, 5); since 0.3 it is kept as "
              "written: write the ids as the data writes them in a copy of the split file, or make a new split")


def legacy_spelled(unknown: Collection[str], known: Collection[str] | None = None) -> bool:
    """Whether ids a split file names but the data lacks are 0.2's spelling of ids written like "007.0": numbers
    (each of them a number that one of `known`, when given, reads as)."""
    numbers = {str(int(float(i))) for i in known or () if re.fullmatch(r"[+-]?\d+\.0", i)}
    return bool(unknown) and all(re.fullmatch(r"-?\d+", i) and (known is None or i in numbers) for i in unknown)


def split_dataset(
    ds: MultimodalDataset,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    path: str | Path | None = None,
    *,
    allow_new_rows: bool = False,
    skipped: Collection[str] = (),
) -> dict[str, MultimodalDataset]:
    """train/val/test: the dataset's own splits if it has them, else a seeded split stratified on the
    first classification task. With `path`, an existing file is reused (so every run and strategy sees
    the same split) and a new split is written there.

    A reused file must cover the dataset: ids it names that the dataset lacks are an error, and so are
    rows it does not name (the data grew) unless `allow_new_rows`, which puts them in train and warns.
    `skipped`: ids the reader left out on purpose (a `missing_*` or `on_error` skip policy): the file's rows
    among them are dropped from its splits, with a warning, not taken for lost rows.
    """
    ratios, seed = check_split(ratios, seed, ("ratios", "seed"))  # the rule of data.split_ratios / split_seed
    path = Path(path) if path is not None else None
    if path is not None and path.is_file():
        ids = read_split_file(path)
        known = set(ds.ids)
        left_out = {i for k in SPLITS for i in ids[k] if i not in known and i in set(skipped)}
        if left_out:  # e.g. a split made by a run that kept imageless rows, reused by one that skips them
            log.warning("%s: %d of its rows were skipped by this run's reading policy (e.g. %s): they are left out "
                        "of its splits", path, len(left_out), sorted(left_out)[:3])  # fmt: skip
            ids = {k: [i for i in ids[k] if i not in left_out] for k in SPLITS}
        unknown = [i for k in SPLITS for i in ids[k] if i not in known]
        respelled = {_as_number(i) for i in known}
        if unknown and all(_as_number(i) in respelled for i in unknown):
            raise DataError(
                f"split file names {len(unknown)} ids not in the dataset (e.g. {unknown[:3]}), but each is the "
                f"number of one of its ids, spelled differently (e.g. {ds.ids[:3]}): leading zeros were lost or "
                "added (a CSV's 007 is a Parquet or pandas copy's 7)",
                source=str(path),
                hint="read the ids as text where they were written (pandas: dtype={'id': str}) so they keep their "
                "spelling, or make a new split (another data.split_file path, or a new run)",
            )
        if unknown:
            raise DataError(
                f"split file names {len(unknown)} ids not in the dataset (e.g. {unknown[:3]})",
                source=str(path),
                hint=LEGACY_IDS if legacy_spelled(unknown, known) else "the dataset lost rows since the split was "
                "made: restore them, or make a new split (another data.split_file path, or a new run); a run dir's "
                "split.json is that run's record: keep it",
            )
        named = {i for k in SPLITS for i in ids[k]}
        new = [i for i in ds.ids if i not in named]
        if new and not allow_new_rows:
            raise DataError(
                f"{len(new)} rows of the dataset are in no split of this file (e.g. {new[:3]}): rows added since the "
                "split was made, or left out of it (a split made over the labelled rows only, as a k-fold of "
                "StratifiedKFold is)",
                source=str(path),
                hint="make a new split (another data.split_file path, or a new run; a run dir's split.json is "
                "that run's record: keep it), or pass allow_new_rows=True to put the new rows in train (also when "
                "the run that made the split skipped them: data.missing_* or data.on_error skip)",
            )
        if new:
            log.warning("%s: %d new rows are in no split; adding them to train", path, len(new))
            ids["train"] = [*ids["train"], *new]
        log.info("reusing split from %s", path)
    elif ds.splits is not None:
        ids = _complete_splits(ds, {k: list(ds.splits.get(k, [])) for k in SPLITS}, ratios, seed)
    else:
        parts = _stratified_split(_strata(ds), ratios, seed, ds.ids)
        ids = {k: [ds[i].id for i in part] for k, part in zip(SPLITS, parts)}
    if path is not None and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # which scheme and version drew it: the same seed draws another split in another scheme (see SPLIT_SCHEME)
        payload = {"dataset": ds.name, "seed": seed, "ratios": list(ratios), "scheme": SPLIT_SCHEME,
                   "fusionkit_version": __version__, **ids}  # fmt: skip
        path.write_text(json.dumps(payload, indent=1))
    return {k: ds.subset(v, name=f"{ds.name}[{k}]") for k, v in ids.items()}
