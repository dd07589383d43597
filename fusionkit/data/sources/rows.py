"""What every reader shares: the options, turning one raw row into an `Example`, and finishing a read.

A reader only knows its format (how to get rows, their locations and the columns). Everything that
must behave the same for every source lives here: ids, captions and images that may be missing
(`missing_text` / `missing_image`), raw label values, duplicate ids and the skip report.
"""

from __future__ import annotations

import difflib
import errno
import logging
import math
import os
import re
import reprlib
import stat
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from fusionkit.data.dataset import MAX_TEXT_CHARS, Example, ImageSource, clean_text, spelled_missing
from fusionkit.data.errors import DataError, OnError, SkipLog, check_policy

log = logging.getLogger("fusionkit.data")

MissingPolicy = Literal["error", "skip", "keep"]
MISSING_POLICIES = ("error", "skip", "keep")
# how to skip bad rows, in every hint: `train` reads it from the config (--data.on_error skip), the others have a flag
SKIP_ROWS = "data.on_error: skip (eval, predict, embed: --on-error skip)"
# The config key that controls each reader option, named in errors so users know what to set.
DEFAULT_ID_COLUMN = "id"  # absent: rows are named by their row number; any other name must exist
CONFIG_KEYS = {
    "text_column": "data.text_column",
    "image_column": "data.image_column",
    "id_column": "data.id_column",
    "label_columns": "model.tasks[].column",
}


@dataclass(frozen=True)
class ReadOptions:
    """The keyword arguments every source accepts (`load_dataset(spec, **options)`).

    - `text_column`, `image_column`, `id_column`: column names (an absent or empty id cell: the row
      number becomes the id). Ignored by MVSA and synthetic data, whose layout is fixed.
    - `label_columns`: columns kept as raw labels; None = every column except text/image/id.
    - `on_error`: "raise" on the first bad row, or "skip" it and write it to the report.
    - `missing_text` / `missing_image`: a row without caption / image is an "error", is "skip"ped
      (and reported), or is kept ("keep": `Example.text` / `Example.image` is None).
    - `missing_image_file`: the policy for an image path that names no file, when it differs from
      `missing_image` (prediction keeps rows with an empty image cell, but a broken path is an error).
    - `report_path`: where skipped rows are listed (JSONL); default a temp file named in the log.
    - `image_root`: folder that relative image paths are relative to; given, it wins over the default (the
      working directory for a DataFrame / HF dataset, a table file's own folder for CSV/JSONL/Parquet).
    - `required_sides`: "text" / "image" whose column must be in the file even under `missing_*="keep"`
      (prediction with a model that never learned one side alone: a renamed column is a mistake, not that).
    - `only_ids`: read just the rows with these ids; the others are passed over unchecked (scoring one
      split of a table must not fail on a broken row of another, nor pay for checking it).
    - `keep_empty`: a row with neither a caption nor an image is kept (both None) instead of being a bad row:
      `fusionkit embed --on-error skip` writes a NaN vector in its place, as `fusionkit.embed` does.
    """

    text_column: str = "text"
    image_column: str = "image"
    id_column: str | None = DEFAULT_ID_COLUMN
    label_columns: tuple[str, ...] | None = None
    on_error: OnError = "raise"
    missing_text: MissingPolicy = "error"
    missing_image: MissingPolicy = "error"
    missing_image_file: MissingPolicy | None = None
    report_path: str | Path | None = None
    image_root: str | Path | None = None
    only_ids: frozenset[str] | None = None
    required_sides: tuple[str, ...] = ()
    keep_empty: bool = False

    @classmethod
    def from_kwargs(cls, kw: Mapping[str, Any]) -> ReadOptions:
        """Validate reader keyword arguments; unknown or retired keywords get an error saying why."""
        kw = dict(kw)
        if kw.pop("allow_empty_text", False):  # the retired keyword meant exactly this
            kw.setdefault("missing_text", "keep")
        if "task_types" in kw:
            raise TypeError(
                "readers no longer take task_types: labels are read raw and a task's type comes from "
                "model.tasks (fusionkit.tasks.bind_labels)"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise TypeError(f"unknown reader option(s) {unknown}; expected some of {sorted(known)}")
        labels = kw.get("label_columns")
        if isinstance(labels, Mapping):
            raise TypeError(
                "label_columns takes column names, not a mapping to class names: readers keep labels "
                "raw; class names and types belong to model.tasks (class_names, type)"
            )
        if labels is not None:
            kw["label_columns"] = (labels,) if isinstance(labels, str) else tuple(labels)
        if kw.get("only_ids") is not None:
            kw["only_ids"] = frozenset(map(str, kw["only_ids"]))
        opts = cls(**kw)
        check_policy(opts.on_error)
        for key in ("missing_text", "missing_image", "missing_image_file"):
            if getattr(opts, key) not in MISSING_POLICIES and (key != "missing_image_file" or opts.missing_image_file):
                raise ValueError(f"{key} must be one of {MISSING_POLICIES}, got {getattr(opts, key)!r}")
        return opts

    def label_columns_of(self, columns: Sequence[str], source: str) -> list[str]:
        """The label columns to read: the requested ones (each must exist) or all but text/image/id."""
        if self.label_columns is None:
            fixed = (self.text_column, self.image_column, self.id_column)
            return [c for c in columns if c not in fixed and c]  # "": a trailing delimiter in a header
        for c in self.label_columns:
            require_column(c, "label_columns", columns, source)
        return list(self.label_columns)


def require_sides(opts: ReadOptions, columns: Sequence[str], source: str, row_names: str = "their row number") -> None:
    """The caption and image columns must exist, except a side whose rows may lack it (`missing_*: keep`,
    as prediction reads): a captions-only file is then read as rows without images, and said so.
    `row_names`: what names the rows without an id column (said in the warning)."""
    if opts.text_column not in columns and opts.image_column not in columns:  # nothing to read a pair from
        raise DataError(
            f"neither the caption column {opts.text_column!r}{_closest(opts.text_column, columns)} nor the image column "
            f"{opts.image_column!r}{_closest(opts.image_column, columns)} is in it; "
            f"found columns {list(columns)}",
            source=source,
            hint=f"set {CONFIG_KEYS['text_column']} / {CONFIG_KEYS['image_column']} to the file's columns "
            "(eval, predict, embed: --text-column / --image-column)" + _separator_hint(columns),
        )
    if opts.id_column == DEFAULT_ID_COLUMN and columns and opts.id_column not in columns:
        log.warning("%s: no column %r: rows are named by %s (set %s to the column of ids)", source,
                    DEFAULT_ID_COLUMN, row_names, CONFIG_KEYS["id_column"])  # fmt: skip
    if opts.id_column and opts.id_column != DEFAULT_ID_COLUMN and opts.id_column not in columns:
        raise DataError(  # a named id column that is not there: a typo, not "number the rows"
            f"no column {opts.id_column!r}{_closest(opts.id_column, columns)} ({CONFIG_KEYS['id_column']}); "
            f"found columns {list(columns)}",
            source=source,
            hint=f"set {CONFIG_KEYS['id_column']} to the column of ids, or to null to name rows by their row number "
            "(eval, predict, embed: --id-column COLUMN, or --id-column '')",
        )
    for option, policy in (("text_column", opts.missing_text), ("image_column", opts.missing_image)):
        name = getattr(opts, option)
        side = option.removesuffix("_column")
        if name in columns or policy != "keep":
            require_column(name, option, columns, source)
        elif name and side in opts.required_sides:
            raise DataError(
                f"no column {name!r}{_closest(name, columns)} ({CONFIG_KEYS[option]}); found columns {list(columns)}", source=source,
                hint=f"the model reads {side}s and never learned to do without them: name the {side} column "
                f"(fusionkit predict: --{side}-column COLUMN); a model that reads both sides also takes "
                f"--{side}-column '' to predict without {side}s anyway",
            )
        elif name:  # "": the caller says the file has no such column
            log.warning("%s: no column %r (%s): every row is read without it; found columns %s", source, name,
                        CONFIG_KEYS[option], list(columns))  # fmt: skip


def _separator_hint(columns: Sequence[str]) -> str:
    """A table read as one column whose name holds ';' or a tab was written with another separator."""
    sep = next((d for d in ";\t|" if len(columns) == 1 and d in columns[0]), None)
    return f"; the file seems to separate its fields with {sep!r}: save it comma-separated" if sep else ""


def _closest(name: str, columns: Sequence[str]) -> str:
    """' (did you mean 'Caption'?)' for a column named in another case, with stray spaces or a typo."""
    folded = {str(c).strip().casefold(): c for c in columns}
    close = folded.get(name.strip().casefold()) or next(iter(difflib.get_close_matches(name, list(map(str, columns)), n=1)), None)
    return f" (did you mean {close!r}?)" if close is not None else ""


def require_column(column: str, option: str, columns: Sequence[str], source: str) -> None:
    """A missing column is a clear error listing the columns found and the config key to set."""
    if column not in columns:
        raise DataError(
            f"no column {column!r}{_closest(column, columns)} ({CONFIG_KEYS[option]}); found columns {list(columns)}",
            source=source,
            hint=f"set {CONFIG_KEYS[option]} to one of the columns found"
            + (" (fusionkit eval: --label-column TASK=COLUMN)" if option == "label_columns" else
               f" (eval, predict, embed: --{option.replace('_', '-')} COLUMN)" if option.endswith("_column") else "")
            + _separator_hint(columns),
        )


# ------------------------------------------------------------------------------------------------ cells


def _is_na_object(value: Any) -> bool:
    pd = sys.modules.get("pandas")  # only a loaded pandas can have made pd.NA / pd.NaT
    return pd is not None and (value is pd.NA or value is pd.NaT)


def raw_value(value: Any) -> Any:
    """A cell as a plain Python value; None when missing (None, NaN, pd.NA, empty or "nan" string).

    Strings are stripped. Everything else is left as the source gave it (numpy scalars and arrays
    become Python numbers and lists): `inf` stays `inf` and `Positive` stays `Positive`, because
    judging label values is the task's job (`fusionkit.tasks`), which rejects a non-finite target.
    """
    if value is None or _is_na_object(value):
        return None
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy scalar or array
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        value = value.strip()
        return None if not value or value.lower().lstrip("+-") == "nan" else value
    return value


def label_value(value: Any) -> Any:
    """A label cell as `raw_value` reads it, but a "nan" string kept: the task reads it as missing and says how
    many such spellings it found (a pandas NaN written into a string column, `astype(str)`, is one)."""
    if isinstance(value, str) and value.strip().lower().lstrip("+-") == "nan":
        return value.strip()
    return raw_value(value)


def row_id(value: Any, row_number: int | str) -> str:
    """The id cell as a string; only a missing or empty one becomes the row number (an id 0 stays "0"). A string
    is an id as written (stripped), "NaN" included (a user name): only a float NaN or None is a missing id. The one
    rewrite is pandas' spelling of an int with gaps, "100.0" -> "100"; "007.0" and "+5.0", which pandas never
    writes, stay as they are so the ids join back to the user's table."""
    value = value.strip() or None if isinstance(value, str) else raw_value(value)
    if value is None:
        return str(row_number)
    if isinstance(value, float) and value.is_integer():  # an int column with gaps reads as floats
        return str(int(value))
    if isinstance(value, str) and _INTEGRAL_FLOAT.fullmatch(value):  # ... and is written "100.0" to CSV:
        return str(int(value[:-2]))  # the same id as its Parquet copy's 100.0, so they share a split file
    return str(value)


_INTEGRAL_FLOAT = re.compile(r"-?(?:0|[1-9]\d*)\.0")  # how pandas writes an int float: no "+", no leading 0


# ------------------------------------------------------------------------------------------------ rows


class _SkipRow(Exception):
    """A row dropped by a `missing_*="skip"` policy: reported, never raised."""

    def __init__(self, err: DataError) -> None:
        self.err = err


_MISSING_HINTS = {
    "text": ("missing_text", "keep image-only rows"),
    "image": ("missing_image", "keep text-only rows"),
}


class RowReader:
    """Turns raw rows into `Example`s under one set of options; collects skips for the report."""

    def __init__(
        self, options: ReadOptions, what: str, image_root: str | Path | None = None, *, table_cells: bool = True
    ) -> None:
        """`table_cells`: captions are cells of a table, where "nan" or "None" stands for a missing value (not
        so for a caption file of its own, as MVSA's)."""
        self.opts = options
        self.table_cells = table_cells
        self.skips = SkipLog(options.on_error, what)
        root = options.image_root if options.image_root is not None else image_root
        # resolved once; `~` is the home folder, as in every path a config or the command line names
        self.image_root = os.path.realpath(os.path.expanduser(root) if root is not None else os.getcwd())
        # where that folder came from, said when paths name no file (a given image_root wins over the file's folder)
        self.root_from = ("image_root" if options.image_root is not None else
                          "the table file's own folder" if image_root is not None else "the working directory")  # fmt: skip
        self.truncated = 0
        self.spelled_missing: dict[str, int] = {}  # caption cells such as "nan" or "None", read as missing
        self.broken_paths: list[str] = []  # image paths naming no file, the rows kept or skipped
        self.kept_broken = 0  # of them, rows kept without an image (missing_image=keep)
        self.found_images = 0

    def example(
        self,
        row: Mapping[str, Any],
        *,
        where: str,
        row_number: int | str,
        label_columns: Iterable[str],
        meta: dict[str, Any] | None = None,
        no_text: str = "caption is empty",
    ) -> Example | None:
        """One row -> an Example (its location in `meta["source"]`, for label errors found later by
        the tasks), or None when the row was skipped (and recorded).

        `no_text` is the problem reported when the caption is missing (MVSA: its file is)."""
        o = self.opts
        item = row_id(row.get(o.id_column), row_number) if o.id_column else str(row_number)
        if not self.wanted(item):
            return None
        try:
            raw_id = raw_value(row.get(o.id_column)) if o.id_column else None
            if isinstance(raw_id, float) and abs(raw_id) >= 2**53:  # not every integer there is a float: ids
                raise DataError(  # merge or change, and predictions name rows the user never had
                    f"id {item} is a float above 2^53, where digits are lost (a tweet id 862345678901234567 reads "
                    "862345678901234560)", source=where, item=item,
                    hint=f"read column {o.id_column!r} as strings (pandas: dtype={{{o.id_column!r}: str}}); pandas "
                    "stores an integer column with empty cells as floats",
                )  # fmt: skip
            text = self.text(row.get(o.text_column), where=where, item=item, no_text=no_text)
            image = self.image(row.get(o.image_column), where=where, item=item)
            if text is None and image is None and not o.keep_empty:  # nothing left to learn or predict from
                raise DataError("row has neither a caption nor an image", source=where, item=item,
                                hint=f"fill in one of them, or skip such rows: {SKIP_ROWS}")  # fmt: skip
            labels = {c: label_value(row.get(c)) for c in label_columns}
            for column, value in [(o.id_column or "id", item), *labels.items()]:
                if isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value):
                    raise DataError(f"column {column!r} is not valid UTF-8 ({value!r})", source=where, item=item,
                                    hint="re-encode the file as UTF-8")  # fmt: skip
        except _SkipRow as s:
            self.skips.record(s.err)
            return None
        except DataError as e:
            self.skips(e)
            return None
        return Example(item, text, image, labels, {**(meta or {}), "source": where})

    def wanted(self, item: str) -> bool:
        return self.opts.only_ids is None or item in self.opts.only_ids

    def missing(
        self, modality: str, problem: str, *, where: str, item: str, policy: str | None = None, hint: str = ""
    ) -> None:
        """Apply missing_text / missing_image (or `policy`): returns (keep), raises _SkipRow (skip) or DataError."""
        key, keep_what = _MISSING_HINTS[modality]
        policy = policy or getattr(self.opts, key)
        if policy == "keep":
            return
        hint = hint or f"set data.{key}=keep to {keep_what}, or data.{key}=skip to drop them"
        err = DataError(problem, source=where, item=item, hint=hint)
        if policy == "skip":
            raise _SkipRow(err)
        raise err

    def text(self, value: Any, *, where: str, item: str, no_text: str = "caption is empty") -> str | None:
        """A caption cell -> stripped, length-capped text; None (missing, kept) per missing_text."""
        if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy scalar or array
            value = value.tolist()
        if value is None or _is_na_object(value) or (isinstance(value, float) and math.isnan(value)):
            value = None
        if value is not None and not isinstance(value, str):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise DataError(f"caption must be text, got {type(value).__name__}", source=where, item=item)
            value = str(value)
        spelled = None
        if self.table_cells and value is not None and spelled_missing(value):  # "nan" from df.astype(str).to_csv()
            spelled, value = value.strip(), None
            self.spelled_missing[spelled] = self.spelled_missing.get(spelled, 0) + 1
        if value is not None and any("\udc80" <= ch <= "\udcff" for ch in value):
            raise DataError(
                "caption is not valid UTF-8", source=where, item=item, hint="re-encode the file as UTF-8"
            )
        text, cut = clean_text(value or "")
        if not text:  # "caption is empty" would send the user looking at a cell that reads 'None'
            problem = no_text if spelled is None else (f"caption {spelled!r} is a missing-value spelling (as 'nan', "
                                                       "'NA' or 'null'), read as an empty cell")  # fmt: skip
            self.missing("text", problem, where=where, item=item)
            return None
        self.truncated += cut
        return text

    def image(self, value: Any, *, where: str, item: str) -> ImageSource | None:
        """An image cell (path, bytes, PIL image, HF {"bytes", "path"}) -> an image source, or None."""
        if isinstance(value, Mapping):  # HF Image(decode=False) and its Parquet export
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, bytes | bytearray | memoryview):  # b"" too: an empty file's content, which decoding
            return bytes(value)  # refuses as such (as it does a 0-byte file), not an image left out
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        value = raw_value(value)
        if value is None:
            self.missing("image", "no image (empty cell)", where=where, item=item)
            return None
        if not isinstance(value, str):
            raise DataError(f"image cell must be a path, bytes or a PIL image, got {type(value).__name__} "
                            f"{reprlib.repr(value)}", source=where, item=item,
                            hint="write the image file's path as text, e.g. \"photos/0001.jpg\" "
                            f"(relative paths are read from {self.image_root}), or empty the cell for a row without "
                            "an image")  # fmt: skip
        path = resolve_image_path(value, self.image_root, where=where, item=item)
        if path is None:
            own = self.opts.missing_image_file  # prediction: an empty cell is kept, a broken path is not
            hint = ("fix the path, give the folder the paths are relative to (--image-root DIR), or empty the cell "
                    "(the row is then read from its caption alone); --on-error skip (on_error='skip') leaves such "
                    "rows out" if own else
                    "fix the path, or set data.missing_image=skip to leave such rows out")  # fmt: skip
            problem = (f"image file not found: {value!r} (looked for {os.path.join(self.image_root, value)}; "
                       f"relative paths are read from {self.image_root}, {self.root_from})")  # fmt: skip
            if "://" in value or value.startswith("~"):  # a URL, or a home path no shell expanded
                problem = (f"image {value!r} is a URL or '~' path: images are read from local files only "
                           "(download them, or write the full path)")  # fmt: skip
            elif re.match(r"[A-Za-z]:[\\/]", value):  # C:\data\a.png from a table made on Windows
                problem += "; it is a Windows path (drive letter): write paths relative to the table's folder"
            elif len(self.broken_paths) < 3 and (near := near_miss(value, self.image_root)):  # a few: it lists folders
                problem += f"; did you mean {near}"
            # before the policy skips the row: when not one path names a file, `finish` says the folder is wrong
            self.broken_paths.append(value)
            self.missing("image", problem, where=where, item=item, policy=own, hint=hint)
            self.kept_broken += 1
        else:
            self.found_images += 1
        return path

    def finish(self, examples: list[Example], total: int) -> tuple[list[Example], Path | None]:
        """Drop duplicate ids (first wins; an error under "raise"), log truncations, write the report."""
        first: dict[str, str] = {}  # id -> where it first appeared
        kept = []
        for ex in examples:
            where = ex.meta["source"]
            if ex.id in first:
                hint = (f"ids must be unique; {ex.id!r} first appears at {first[ex.id]} (a row whose id cell is "
                        "empty is named by its row number)")  # fmt: skip
                self.skips(DataError(f"duplicate id {ex.id!r}", source=where, item=ex.id, hint=hint))
                continue
            first[ex.id] = where
            kept.append(ex)
        if self.truncated:
            cap = f"{MAX_TEXT_CHARS:,}"
            log.warning("%s: %d captions longer than %s characters were cut to their first %s (as predict and the "
                        "processor cut them)", self.skips.what, self.truncated, cap, cap)  # fmt: skip
        if self.spelled_missing:
            log.warning("%s: %d captions spelled like a missing value (%s) are read as missing captions",
                        self.skips.what, sum(self.spelled_missing.values()), sorted(self.spelled_missing))  # fmt: skip
        if self.broken_paths and not self.found_images:  # not one image: the paths are read from the wrong folder
            raise DataError(
                f"none of its {len(self.broken_paths)} image paths names a file (e.g. {self.broken_paths[0]!r}, "
                f"looked for {os.path.join(self.image_root, self.broken_paths[0])})",
                source=self.skips.what,
                hint=f"relative paths are read from {self.image_root} ({self.root_from}): fix the paths, or "
                "give the folder they are relative to as image_root (--image-root for predict, eval and embed)",
            )
        if self.kept_broken:  # skipped rows are in the skip report
            log.warning("%s: %d image paths name no file (e.g. %r, read from %s): those rows have no image",
                        self.skips.what, self.kept_broken, self.broken_paths[0], self.image_root)  # fmt: skip
        return kept, self.skips.finish(self.opts.report_path, total)


def near_miss(ref: str, root: str) -> str | None:
    """The file that `ref` (found nowhere) probably means, and how the two differ: Windows '\\' separators,
    another case, or another Unicode form (a macOS NFD name in an NFC table, the same text to the eye).
    Why: "not found" alone sends a user looking at a path that looks right."""
    parts = [p for p in re.split(r"[\\/]", ref) if p not in ("", ".")]
    found, folder = [], os.path.join(root, "/" if ref.startswith(("/", "\\")) else "")
    how = {"'\\' between folders (write '/')"} if "\\" in ref else set()
    for part in parts:
        if part == "..":
            found.append(part)
            folder = os.path.join(folder, part)
            continue
        try:
            names = os.listdir(folder)
        except OSError:
            return None
        key = unicodedata.normalize("NFC", part).casefold()
        same = (n for n in names if unicodedata.normalize("NFC", n).casefold() == key)
        name = part if part in names else next(same, None)
        if name is None:
            return None
        if name != part:
            nfc = unicodedata.normalize("NFC", name) == unicodedata.normalize("NFC", part)
            how.add("the same name in another Unicode form (NFD/NFC): rename the file or rewrite the cell" if nfc
                    else "another case: names are case-sensitive")  # fmt: skip
        found.append(name)
        folder = os.path.join(folder, name)
    if not how or not os.path.isfile(folder):
        return None
    near = ("/" if ref.startswith(("/", "\\")) else "") + "/".join(found)
    return f"{near!r}? it differs by {' and '.join(sorted(how))}"


def resolve_image_path(ref: str, root: str, *, where: str, item: str) -> str | None:
    """An image path (relative to the resolved folder `root`) -> its absolute path; None if no such file.

    Every other problem with the path (NUL byte, symlink loop, a folder, no permission) is a
    `DataError` for this row, so `on_error="skip"` can skip it like any bad row. Paths are joined and
    normalised as strings (symlinks resolved only around a "..", where the two can differ): a
    pathlib `resolve()` per row costs more than reading the row.
    """
    if "\x00" in ref:
        raise DataError(f"image path {ref!r} contains a NUL byte", source=where, item=item)
    path = os.path.join(root, ref)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        reason = "is a symlink loop" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
        raise DataError(f"image path {ref!r} {reason}", source=where, item=item) from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"image path {ref!r} is not a file (a folder?)", source=where, item=item,
                        hint="name the image file itself, or skip such rows: data.on_error: skip (--on-error skip "
                        "for predict, eval and embed); a folder is a broken path, not a missing image, so "
                        "data.missing_image does not apply")  # fmt: skip
    return os.path.realpath(path) if ".." in ref else os.path.normpath(path)


def prune_splits(splits: Mapping[str, Sequence[str]], examples: Sequence[Example]) -> dict[str, list[str]]:
    """Predefined splits restricted to the examples kept; an id in two splits stays in its first only."""
    kept = {ex.id for ex in examples}
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for k, ids in splits.items():
        out[k] = []
        for i in ids:
            if i in kept and i not in seen:
                seen.add(i)
                out[k].append(i)
    return out
