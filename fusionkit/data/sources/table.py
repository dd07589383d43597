"""Tables: CSV, JSON Lines, Parquet files and in-memory pandas DataFrames, one row per pair."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fusionkit.data.dataset import MultimodalDataset
from fusionkit.data.errors import DataError
from fusionkit.data.sources.hf import class_label_names, decode_class_labels
from fusionkit.data.sources.registry import register_source
from fusionkit.data.sources.rows import SKIP_ROWS, ReadOptions, RowReader, require_sides, row_id

log = logging.getLogger("fusionkit.data")

TABLE_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}

# (location, row number or a DataFrame's index label, cells or the row's error)
Row = tuple[str, int | str, Mapping[str, Any] | DataError]


def _csv_rows(
    path: Path, text: str, delimiter: str = ",", needed: Sequence[str] = ()
) -> tuple[list[str], Iterator[Row]]:
    """Header and records; a record names its physical lines (captions may span lines)."""
    # csv's default 128 KiB field limit would reject a whole file for one huge caption; captions
    # are capped to MAX_TEXT_CHARS instead. (The limit is process-wide; we only raise it.)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
    # strict: a field that opens with a quote and goes on after its closing one ("Best day" said no one) is an
    # error at its line; the lenient reader dropped the quotes and kept going, changing the caption silently
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return [], iter(())
    except csv.Error:
        raise _quote_error(f"{path}:{reader.line_num}") from None
    dup = sorted({h for h in header if h and header.count(h) > 1})  # "" x2: trailing empty columns
    if dup:
        raise DataError(f"column(s) {dup} appear more than once in the header", source=f"{path}:1",
                        hint="rename or remove the repeated column(s): a cell would otherwise be read from one of "
                        "them without telling which")  # fmt: skip

    raw_lines = io.StringIO(text, newline="").readlines()  # split as the reader counts lines ("\r" alone too)

    def rows() -> Iterator[Row]:
        cut: list[str] = []  # rows with fewer fields than the header: their last columns read as empty
        yield from _records(cut)
        if cut:
            log.warning("%s: %d row(s) have fewer fields than the header (%s%s): their last columns (labels among "
                        "them) are read as empty; check their %r separators", path, len(cut), ", ".join(cut[:3]),
                        ", ..." if len(cut) > 3 else "", delimiter)  # fmt: skip

    def _records(cut: list[str]) -> Iterator[Row]:
        rows_reader, at = reader, 0  # `at`: the lines before the current reader's text (it restarts after a quote)
        n, last = -1, reader.line_num  # records are numbered from 0, as Parquet, DataFrame and HF rows are
        while True:
            try:
                cells = next(rows_reader)
            except StopIteration:
                return
            except csv.Error as e:  # the reader goes on at the next line
                first, last, n = last + 1, at + rows_reader.line_num, n + 1
                where = f"{path}:{first}" if first == last else f"{path}:{first}-{last}"
                if "end of data" in str(e) or last > first:  # ran on over rows to a stray quote (an inch mark)
                    yield f"{path}:{first}", n, _unclosed(f"{path}:{first}", first, last)
                    rows_reader, at, last = _restart(first), first, first
                else:
                    yield where, n, _quote_error(where)
                continue
            first, last = last + 1, at + rows_reader.line_num
            where = f"{path}:{first}" if first == last else f"{path}:{first}-{last}"
            if not cells:  # a blank line
                continue
            n += 1
            # a quoted field spanning lines ends with its closing quote on the record's last line; none there
            # means the quote never closed and the reader ran on to the end of the file, whole rows included
            # ... and one that "closed" on a later stray quote (an inch mark: 5") holds whole rows inside it
            if last > first and ('"' not in raw_lines[min(last, len(raw_lines)) - 1]
                                 or _holds_rows(raw_lines[first - 1 : last], delimiter, header,
                                                needed[1] if len(needed) > 1 else None, path.parent)):  # fmt: skip
                err = _unclosed(f"{path}:{first}", first, last)
                err.cells = dict(zip(header, cells))  # type: ignore[attr-defined]
                yield f"{path}:{first}", n, err
                rows_reader, at, last = _restart(first), first, first
                continue
            short = [c for c in needed if c in header and header.index(c) >= len(cells)]
            if short:  # a row cut short (a lost delimiter), not an empty cell: say so
                err = DataError(f"row has {len(cells)} fields but the header has {len(header)} (no {short} field)",
                                source=where, hint=f"check the row's {delimiter!r} separators")  # fmt: skip
                err.cells = dict(zip(header, cells))  # type: ignore[attr-defined]
                yield where, n, err
                continue
            if 0 < len(cells) < len(header) and any(h for h in header[len(cells):]):
                cut.append(f"line {first}")
            if len(cells) > len(header):
                err = DataError(f"row has {len(cells)} fields but the header has {len(header)}", source=where,
                                hint=f"quote fields that contain the delimiter {delimiter!r} (e.g. in a caption)")  # fmt: skip
                err.cells = dict(zip(header, cells))  # type: ignore[attr-defined]  # its id, if it can be read
                yield where, n, err
            else:
                yield where, n, dict(zip(header, cells))

    def _restart(line: int) -> Iterator[list[str]]:
        """A reader from the line after `line`: the row whose quote never closed is left out, not the rows after it."""
        return csv.reader(io.StringIO("".join(raw_lines[line:]), newline=""), delimiter=delimiter, strict=True)

    return header, rows()


def _unclosed(where: str, first: int, last: int) -> DataError:
    return DataError(f"a quote opened on line {first} is not closed where it should be: it ran on over lines "
                     f"{first}-{last} (whole rows) as one field", source=where,
                     hint=f'close the quote, or write a quote inside a quoted field as ""; skipping bad rows ({SKIP_ROWS}) '
                     f"leaves out just this row and reads on from line {first + 1}")  # fmt: skip


def _quote_error(where: str) -> DataError:
    return DataError("a field opens with a quote but goes on after its closing quote", source=where,
                     hint='quote the whole field and double the quotes inside it: """Best day ever"" said no one" '
                     "reads as \"Best day ever\" said no one")  # fmt: skip


def _holds_rows(lines: Sequence[str], delimiter: str, header: Sequence[str], image_column: str | None,
                root: Path) -> bool:  # fmt: skip
    """A record's physical lines hold whole rows: a quote that never closed, or closed on a later stray quote (an
    inch mark), swallowed them. Then its first line is itself a whole row (the quote opened in a caption that
    ended on that line) and a later line is one too. Shaped like a row: the header's count of fields and, in
    the image column's place, an image path (an image suffix, or a file that exists), whether or not its file
    exists: a swallowed row's image may be missing too (missing_image=keep). A caption spanning lines, a shot
    list in it included, starts with only part of a row. Without an image column: an inner line with the
    header's count of 4+ fields."""

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.rstrip("\r\n").split(delimiter)]

    if image_column not in header:
        return len(header) >= 4 and any(len(cells(line)) == len(header) for line in lines[1:-1])
    at = header.index(image_column)

    def row_shaped(line: str) -> bool:
        found = cells(line)
        return len(found) == len(header) and bool(found[at]) and (
            Path(found[at]).suffix.lower() in _IMAGE_SUFFIXES or (root / found[at]).is_file())

    return row_shaped(lines[0]) and any(map(row_shaped, lines[1:]))


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated is not None:
        raise _RepeatedKey(repeated)
    return dict(pairs)


def _jsonl_rows(path: Path, text: str) -> tuple[list[str], list[Row]]:
    """One JSON object per line. Lines are split on "\\n" only (JSON Lines), so U+2028 or U+0085 in
    a caption stays inside its record; a line that is not an object is an error for that row."""
    rows: list[Row] = []
    columns: dict[str, None] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip(" \t\r"):
            continue
        where = f"{path}:{lineno}"
        try:
            value = json.loads(line, object_pairs_hook=_unique_keys)
        except _RepeatedKey as e:  # json keeps the last of two equal keys: the first value would be lost unseen
            rows.append((where, len(rows), DataError(f"key {e.args[0]!r} appears more than once in the object",
                                                     source=where, hint="keep one of them")))  # fmt: skip
            continue
        except json.JSONDecodeError as e:
            rows.append((where, len(rows), DataError(f"invalid JSON ({e.msg}, column {e.colno})", source=where,
                                                     hint="fix the line (one JSON object per line), or skip such "
                                                     f"rows: {SKIP_ROWS}")))  # fmt: skip
            continue
        if not isinstance(value, dict):
            err = DataError(f"line is a JSON {type(value).__name__}, not an object", source=where)
            rows.append((where, len(rows), err))
            continue
        columns.update(dict.fromkeys(value))
        rows.append((where, len(rows), value))
    return list(columns), rows


def _frame_rows(df: Any, name: str, by_label: bool = False) -> tuple[list[str], Iterator[Row]]:
    """`by_label`: rows are named by their index label (`name.loc[label]`), else by their position."""
    columns = [str(c) for c in df.columns]
    if len(set(columns)) != len(columns):
        raise DataError(f"duplicate column names in {columns}", source=name)
    records = ({str(k): v for k, v in r.items()} for r in df.to_dict("records"))
    if not by_label:
        return columns, ((f"{name}[{n}]", n, r) for n, r in enumerate(records))
    labels = (row_id(label, n) for n, label in enumerate(df.index))  # 1050 (not np.int64(1050)), 'a'
    return columns, ((f"{name}.loc[{label}]", label, r) for label, r in zip(labels, records))


def _category_names(df: Any) -> dict[str, list[str]]:
    """A Categorical column's categories, in their declared order, unused ones included: its class order,
    as a `ClassLabel`'s names are (not the sorted values seen)."""
    import pandas as pd

    return {str(c): [str(v) for v in df[c].cat.categories] for c in df.columns
            if isinstance(df[c].dtype, pd.CategoricalDtype)}  # fmt: skip


def _labelled_index(df: Any) -> bool:
    """A DataFrame's rows are named by their index labels when the index is not the default 0..n-1 (a
    filtered, sampled or re-indexed frame, where `df.loc[5]` is not the 6th row); by position when the labels
    repeat (`pd.concat` without ignore_index), which is said."""
    import pandas as pd

    index = df.index
    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return False
    if not index.is_unique:
        log.warning("DataFrame: its index repeats labels (e.g. %r): rows are named by their position (0, 1, ...); "
                    "df.reset_index() keeps the labels as a column", index[index.duplicated()].tolist()[0])  # fmt: skip
        return False
    return True


def _read_rows(
    columns: list[str],
    rows: Iterator[Row] | list[Row],
    opts: ReadOptions,
    rr: RowReader,
    name: str,
    source: str,
    declared: Mapping[str, list[str]] | None = None,
    class_labels: Mapping[str, list[str]] | None = None,
    row_names: str = "their row number",
) -> MultimodalDataset:
    """Shared by every table: check the columns, turn each row into an Example, finish.

    `declared`: class names per column, in order (a Categorical's categories); `class_labels`: those of a
    Parquet file's `ClassLabel` columns, whose int cells are read as these names. No columns at all (JSONL
    lines that are all errors) means nothing to check; no rows is an error."""
    label_columns: list[str] = []
    if columns:
        require_sides(opts, columns, source, row_names=row_names)
        label_columns = opts.label_columns_of(columns, source)
    names_of = {c: class_labels[c] for c in label_columns if c in (class_labels or {})}
    declared = {**(declared or {}), **names_of}
    examples, total = [], 0
    for where, n, row in rows:
        total += 1
        if isinstance(row, DataError):
            cells = getattr(row, "cells", {})
            if rr.wanted(row_id(cells.get(opts.id_column), n) if opts.id_column else str(n)):  # not another split's
                rr.skips(row)
            continue
        if names_of:
            row = decode_class_labels(dict(row), names_of)
        ex = rr.example(row, where=where, row_number=n, label_columns=label_columns)
        if ex is not None:
            examples.append(ex)
    if not total:  # said here: later, a task would name a label column the file lacks, or a class count of 0
        raise DataError(f"no rows below its header {columns}" if columns else "it is empty (no header, no rows)",
                        source=source, hint="name the file that holds the data: a header line, then one row per "
                        "image-caption pair")  # fmt: skip
    examples, report = rr.finish(examples, total)
    return MultimodalDataset(examples, {c: declared.get(c, []) for c in label_columns}, name=name,
                             skip_report=report)  # fmt: skip


def _parquet_class_names(path: Path, columns: Sequence[str]) -> dict[str, list[str]]:
    """The `ClassLabel` columns of a Parquet file written by `datasets` (`Dataset.to_parquet`): their names
    are in the schema's "huggingface" metadata, and without them -1 (missing) would train as a class."""
    import datasets as hf
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if b"huggingface" not in (schema.metadata or {}):
        return {}
    try:
        features = hf.Features.from_arrow_schema(schema)
    except Exception as e:  # metadata edited by hand, or from a newer `datasets`: its labels are then read raw
        log.warning("%s: its Hugging Face features metadata cannot be read (%s: %s): ClassLabel columns are read "
                    "as their raw ints", path, type(e).__name__, e)  # fmt: skip
        return {}
    return class_label_names(features, columns)


def _is_dataframe(obj: Any) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(obj, pd.DataFrame)


def _is_table_file(obj: Any) -> bool:
    return isinstance(obj, Path) and obj.is_file() and obj.suffix.lower() in TABLE_SUFFIXES


@register_source("table", lambda obj: _is_dataframe(obj) or _is_table_file(obj))
def read_table(source: str | Path | Any, **options: Any) -> MultimodalDataset:
    """A CSV, TSV, JSONL or Parquet file, or a pandas DataFrame: one row per image-caption pair.

    Options: see `ReadOptions`. Image paths are relative to the file's folder (a DataFrame: to
    `image_root`, default the working directory); an image cell may also hold bytes, a PIL image or
    an HF `{"bytes", "path"}` dict. Labels are kept raw: CSV cells as stripped strings, JSON/Parquet/
    DataFrame values as given; an empty, None or NaN cell is a missing label. A Parquet file written by
    `datasets` (`Dataset.to_parquet`) keeps its `ClassLabel` columns: read as `from_hf` reads them; a pandas
    Categorical column declares its categories, in order, as the classes.
    Locations in errors: `file:line` (CSV: the physical lines of the record), `name[row]` (0-based)
    for Parquet and DataFrames. A missing id becomes the record's number, counted from 0 in every format (so
    one split file names the same rows of a CSV and of its Parquet copy); a DataFrame whose index is not the
    default 0..n-1 names its rows by their index label instead (`DataFrame.loc[label]`, id `label`).
    """
    opts = ReadOptions.from_kwargs(options)
    if _is_dataframe(source):
        rr = RowReader(opts, "read_table(DataFrame)")
        by_label = _labelled_index(source)
        columns, rows = _frame_rows(source, "DataFrame", by_label)
        return _read_rows(columns, rows, opts, rr, "dataframe", "DataFrame", _category_names(source),
                          row_names="their index label (df.loc[label])" if by_label else "their row number")  # fmt: skip
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"table {path} does not exist")
    fmt = TABLE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unsupported table format {path.suffix!r}; use one of {sorted(TABLE_SUFFIXES)}"
        )
    rr = RowReader(opts, f"read_table({path})", image_root=path.parent)
    declared: dict[str, list[str]] = {}
    class_labels: dict[str, list[str]] = {}
    if fmt == "parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"not a readable Parquet file ({e})", source=str(path)) from None
        names = [n for n in frame.index.names if n is not None]
        if names and not set(map(str, names)) & set(map(str, frame.columns)):  # `df.set_index("id").to_parquet()`:
            frame = frame.reset_index()  # the index is a column the user named (its ids), read as one
        columns, rows = _frame_rows(frame, str(path))
        declared, class_labels = _category_names(frame), _parquet_class_names(path, columns)
    else:
        raw = path.read_bytes()
        head = raw[:4096]  # a byte-order mark, or NUL every other byte (UTF-16 ASCII): Excel's "Unicode text";
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or head.count(b"\x00") > len(head) // 4:  # a stray NUL is a row's
            raise DataError("the file is UTF-16 (or another encoding with NUL bytes), not UTF-8", source=str(path),
                            hint="re-encode it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8 IN > OUT, or save as "
                            "'CSV UTF-8' in Excel")  # fmt: skip
        # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
        text = raw.decode("utf-8-sig", errors="surrogateescape")
        if fmt == "jsonl":
            columns, rows = _jsonl_rows(path, text)
        else:
            columns, rows = _csv_rows(path, text, "\t" if fmt == "tsv" else ",", (opts.text_column, opts.image_column))
    return _read_rows(columns, rows, opts, rr, path.stem, str(path), declared, class_labels)
