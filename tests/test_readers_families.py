"""Reader defect families (issue 10) and the same options for every source (issues 9, 12).

Each family is tested across the sources it can reach, with hypothesis where the input is open-ended
(captions, ids, cells). Sources: CSV, JSONL, Parquet, pandas DataFrame, `datasets.Dataset` (in
memory) and a `DatasetDict` saved to disk; all read with custom column names and string labels.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fusionkit.data import (
    MAX_TEXT_CHARS,
    DataError,
    MultimodalDataset,
    load_dataset,
    load_image,
    read_mvsa,
    split_dataset,
)
from fusionkit.data.sources import SOURCES, ReadOptions
from tests.reliability_utils import record

SETTINGS = dict(
    max_examples=int(os.environ.get("FUSIONKIT_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
COLUMNS = dict(id_column="id", text_column="caption", image_column="photo")
KINDS = ["csv", "jsonl", "parquet", "dataframe", "hf", "hf-disk"]
ROWS = [
    {"id": "t1", "caption": "what a day", "photo": "img/0.jpg", "mood": "positive"},
    {"id": "0", "caption": "so tired", "photo": "img/1.jpg", "mood": "Negative"},
    {"id": "t3", "caption": "a street", "photo": "img/2.jpg", "mood": None},
]


_tally: dict[str, dict[str, int]] = {}  # family -> figures, for benchmarks/reliability.py


def _count(family: str, **figures: int) -> None:
    t = _tally.setdefault(family, {})
    for k, v in figures.items():
        t[k] = t.get(k, 0) + v


@pytest.fixture(scope="module", autouse=True)
def _record_families() -> Any:
    yield
    for family, figures in sorted(_tally.items()):
        record(f"readers/{family}", **figures)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with img/0..3.jpg, shared by the tests of this module (tables are written per test)."""
    d = tmp_path_factory.mktemp("family")
    (d / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(d / "img" / f"{i}.jpg")
    return d


def _write(kind: str, rows: list[dict[str, Any]], d: Path, name: str = "t") -> tuple[Any, dict[str, Any]]:
    """`rows` as the given source kind: (what to pass to load_dataset, extra options)."""
    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["id", "caption", "photo"]
    if kind == "csv":
        path = d / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, columns)  # "\r\n" ends: a caption's lone "\r" or "\n" gets quoted
            w.writeheader()
            w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
        return path, {}
    if kind == "jsonl":
        path = d / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path, {}
    frame = pd.DataFrame(rows, columns=columns, dtype=object)
    if kind == "parquet":
        frame.to_parquet(d / f"{name}.parquet")
        return d / f"{name}.parquet", {}
    if kind == "dataframe":
        return frame, {"image_root": d}
    import datasets as hf

    ds = hf.Dataset.from_list(rows)
    if kind == "hf":
        return ds, {"image_root": d}
    hf.DatasetDict({"train": ds}).save_to_disk(d / f"{name}-hf")
    return str(d / f"{name}-hf"), {"image_root": d}


def _where(kind: str, row: int, name: str = "t") -> str:
    """How an error names 0-based data row `row` in each source."""
    return {
        "csv": f"{name}.csv:{row + 2}",
        "jsonl": f"{name}.jsonl:{row + 1}",
        "parquet": f"{name}.parquet[{row}]",
        "dataframe": f"DataFrame[{row}]",
        "hf": f"hf-dataset[{row}]",
        "hf-disk": f"{name}-hf/train[{row}]",
    }[kind]


def _read(kind: str, rows: list[dict[str, Any]], d: Path, **kw: Any) -> MultimodalDataset:
    obj, extra = _write(kind, rows, d)
    return load_dataset(obj, **COLUMNS, **extra, **kw)


# ------------------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_reads_custom_columns_with_raw_string_labels(kind: str, folder: Path) -> None:
    ds = _read(kind, ROWS, folder)
    assert ds.ids == ["t1", "0", "t3"]
    assert [ex.text for ex in ds] == ["what a day", "so tired", "a street"]
    assert [ex.labels for ex in ds] == [{"mood": "positive"}, {"mood": "Negative"}, {"mood": None}]
    assert ds[1].image == str((folder / "img" / "1.jpg").resolve())  # relative to the file / image_root
    assert ds.label_names == {"mood": []} and ds.task_types == {}
    assert ds.label_counts("mood") == {"positive": 1, "Negative": 1, "<missing>": 1}
    assert ds[1].meta["source"].endswith(_where(kind, 1))  # for label errors the tasks find later


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", ["text_column", "image_column", "label_columns"])
def test_missing_column_names_the_columns_found_and_the_config_key(
    kind: str, option: str, folder: Path
) -> None:
    key = {"text_column": "data.text_column", "image_column": "data.image_column"}.get(option)
    obj, extra = _write(kind, ROWS, folder)
    kw = {**COLUMNS, **extra, option: "nope" if option != "label_columns" else ["mood", "nope"]}
    with pytest.raises(DataError, match="no column 'nope'") as e:
        load_dataset(obj, **kw)
    assert "'caption'" in str(e.value) and "'mood'" in str(e.value)  # lists what it found
    assert (key or "model.tasks[].column") in str(e.value)


def test_load_dataset_dispatch(folder: Path) -> None:
    ds = load_dataset("synthetic:3")
    assert load_dataset(ds, text_column="whatever") is ds  # returned unchanged
    assert set(SOURCES) >= {"table", "hf", "mvsa", "synthetic"}
    (folder / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a .csv/.tsv/.jsonl/.parquet table"):
        load_dataset(folder / "x.txt")
    with pytest.raises(TypeError, match="cannot read a int"):
        load_dataset(3)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(folder / "nowhere.csv")
    assert load_dataset("synthetic:4", label_columns=["sentiment"], on_error="skip").ids == ds.ids + [
        "syn-000003"
    ]
    with pytest.raises(DataError, match="no column 'mood'"):
        load_dataset("synthetic:4", label_columns=["mood"])


def test_reader_options_are_checked(folder: Path) -> None:
    path, _ = _write("csv", [{**ROWS[0], "caption": ""}], folder)
    assert load_dataset(path, **COLUMNS, allow_empty_text=True)[0].text is None  # old keyword = keep
    with pytest.raises(TypeError, match="task_types"):
        load_dataset(path, task_types={"mood": "classification"})
    with pytest.raises(TypeError, match="not a mapping to class names"):
        load_dataset(path, label_columns={"mood": ["a", "b"]})
    with pytest.raises(TypeError, match="unknown reader option"):
        load_dataset(path, text_colum="caption")
    with pytest.raises(ValueError, match="missing_image must be one of"):
        load_dataset(path, missing_image="drop")
    assert ReadOptions.from_kwargs({"label_columns": "mood"}).label_columns == ("mood",)


# ------------------------------------------------------------------------------------------------ missing


MISSING = {  # modality -> cell values that mean "missing" in a source that can hold them
    "text": ["", "   ", None],
    "image": ["", None, "img/gone.jpg"],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("modality", ["text", "image"])
def test_missing_modality_error_skip_keep(kind: str, modality: str, folder: Path, tmp_path: Path) -> None:
    column, key = ("caption", "missing_text") if modality == "text" else ("photo", "missing_image")
    values = MISSING[modality]
    rows = [ROWS[0], *({**ROWS[1], "id": f"m{i}", column: v} for i, v in enumerate(values))]
    with pytest.raises(DataError) as e:
        _read(kind, rows, folder)
    assert _where(kind, 1) in str(e.value) and "item m0" in str(e.value)
    assert f"data.{key}=keep" in str(e.value)
    report = tmp_path / "skipped.jsonl"
    skipped = _read(kind, rows, folder, report_path=report, **{key: "skip"})  # on_error stays "raise"
    assert skipped.ids == ["t1"] and skipped.skip_report == report
    assert [json.loads(line)["item"] for line in report.read_text().splitlines()] == ["m0", "m1", "m2"]
    kept = _read(kind, rows, folder, **{key: "keep"})
    assert kept.ids == ["t1", "m0", "m1", "m2"]
    assert [getattr(ex, modality) is None for ex in kept] == [False, True, True, True]
    other = "image" if modality == "text" else "text"
    assert all(getattr(ex, other) is not None for ex in kept)


def test_missing_text_error_under_on_error_skip_is_reported(folder: Path, tmp_path: Path) -> None:
    rows = [ROWS[0], {**ROWS[1], "caption": ""}]
    ds = _read("csv", rows, folder, on_error="skip", report_path=tmp_path / "r.jsonl")
    assert ds.ids == ["t1"] and "caption is empty" in (tmp_path / "r.jsonl").read_text()


def test_nan_caption_and_image_in_a_dataframe_are_missing(folder: Path) -> None:
    frame = pd.DataFrame({"text": ["hi", math.nan, "yo"], "image": ["img/0.jpg", "img/1.jpg", math.nan]})
    ds = load_dataset(frame, image_root=folder, missing_text="keep", missing_image="keep")
    assert [ex.text for ex in ds] == ["hi", None, "yo"] and ds[2].image is None and ds.ids == ["0", "1", "2"]


def test_mvsa_missing_caption_file_and_image_follow_the_policies(tmp_path: Path) -> None:
    root = _mvsa(tmp_path, {"1": "positive,positive", "2": "neutral,neutral", "3": "negative,negative"})
    (root / "data" / "2.txt").unlink()
    (root / "data" / "3.jpg").unlink()
    with pytest.raises(DataError, match=r"caption file 2.txt not found.*data.missing_text=keep"):
        read_mvsa(root)
    ds = read_mvsa(root, missing_text="keep", missing_image="keep")
    assert [(ex.text, ex.image is None) for ex in ds] == [
        ("caption 1", False),
        (None, False),
        ("caption 3", True),
    ]
    assert read_mvsa(root, missing_text="skip", missing_image="skip").ids == ["1"]


# ------------------------------------------------------------------------------------------------ text


captions = st.text(max_size=60) | st.sampled_from(["a\u2028b", "x\u2029y", "p\u0085q", "\u2028", "\r\n x", "NA", " nan "])


@settings(**SETTINGS)
@given(texts=st.lists(captions, min_size=1, max_size=5), kind=st.sampled_from(["csv", "jsonl", "parquet"]))
def test_any_unicode_caption_round_trips(texts: list[str], kind: str, folder: Path) -> None:
    """JSON Lines splits on "\\n" only: U+2028/U+2029/U+0085 inside a caption stay in its record."""
    rows = [{"id": f"r{i}", "caption": t, "photo": "img/0.jpg"} for i, t in enumerate(texts)]
    ds = _read(kind, rows, folder, missing_text="keep")
    assert ds.ids == [r["id"] for r in rows]
    from fusionkit.data.dataset import MISSING_SPELLINGS  # a caption "NA" or "nan" is a missing caption, said

    assert [ex.text for ex in ds] == [None if t.strip().lower() in MISSING_SPELLINGS else t.strip()[:MAX_TEXT_CHARS].rstrip() or None
                                      for t in texts]  # fmt: skip
    _count("unicode_captions", examples=1, captions=len(texts))


def test_undecodable_bytes_are_a_row_error(folder: Path, tmp_path: Path) -> None:
    path = folder / "bytes.jsonl"
    path.write_bytes(b'{"text": "ok", "image": "img/0.jpg"}\n{"text": "caf\xe9", "image": "img/1.jpg"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl:2.*not valid UTF-8"):
        load_dataset(path)
    assert load_dataset(path, on_error="skip", report_path=tmp_path / "r.jsonl").ids == ["0"]


# ------------------------------------------------------------------------------------------------ ids

plain_ids = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Z"]), min_size=1, max_size=8
)
ids = st.lists(
    st.integers(0, 10**6) | plain_ids.filter(lambda s: s.lower().lstrip("+-") != "nan"),
    min_size=1,
    max_size=6,
    unique_by=str,
)


@settings(**SETTINGS)
@given(values=ids, kind=st.sampled_from(["csv", "jsonl", "dataframe"]))
def test_ids_are_kept_as_given(values: list[Any], kind: str, folder: Path) -> None:
    """An id 0 (int or "0") stays "0"; only a missing or empty id is replaced by the row number."""
    rows = [{"id": v, "caption": "hi", "photo": "img/0.jpg"} for v in values]
    assert _read(kind, rows, folder).ids == [str(v) for v in values]
    _count("ids", examples=1, ids=len(values))


@pytest.mark.parametrize("kind", ["csv", "jsonl", "dataframe", "hf"])
def test_missing_ids_become_row_numbers(kind: str, folder: Path) -> None:
    rows = [
        {"id": 0, "caption": "a", "photo": "img/0.jpg"},
        {"id": None, "caption": "b", "photo": "img/1.jpg"},
    ]
    if kind == "hf":
        rows = [{**r, "id": None if r["id"] is None else str(r["id"])} for r in rows]
    # the record number, from 0 in every format: a split file names the same rows of a CSV and its Parquet copy
    got = _read(kind, [*rows, {"caption": "c", "photo": "img/2.jpg"}], folder).ids
    assert got == ["0", "1", "2"]


def test_float_ids_from_an_int_column_with_gaps(folder: Path) -> None:
    frame = pd.DataFrame({"id": [7, None, 9], "text": ["a", "b", "c"], "image": ["img/0.jpg"] * 3})
    assert frame["id"].dtype.kind == "f"  # pandas made the ints floats
    assert load_dataset(frame, image_root=folder).ids == ["7", "1", "9"]


def test_float_ids_past_2_to_the_53_are_refused_not_rounded(folder: Path) -> None:
    """Tweet ids (18 digits) in an int column with a gap become floats: 862345678901234567 would read as
    ...560, a plausible id of another tweet; the row is named with what to do."""
    frame = pd.DataFrame({"id": [862345678901234567, None], "text": ["a", "b"], "image": ["img/0.jpg"] * 2})
    with pytest.raises(DataError, match=r"\[0\].*item 862345678901234560.*above 2\^53.*dtype=\{'id': str\}"):
        load_dataset(frame, image_root=folder)
    as_text = frame.assign(id=["862345678901234567", None])  # what the hint says: ids read as strings
    assert load_dataset(as_text, image_root=folder).ids == ["862345678901234567", "1"]


# ------------------------------------------------------------------------------------------------ cells


cells = (
    st.none()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**40), 2**40)
    | st.booleans()
    | st.text(max_size=6)
    | st.sampled_from(["nan", "NaN", " -nan ", "inf", "-Infinity", " Positive ", "positive", "a|b"])
    | st.lists(st.text(max_size=3), max_size=3)
)


def _expected(v: Any) -> Any:
    """The contract for a raw label: missing (None, NaN, empty) -> None; strings stripped, a "nan" string kept as
    "None" and "null" are (the task reads them as missing, and counts them in a warning)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        return v.strip() or None
    return v


@settings(**SETTINGS)
@given(values=st.lists(cells, min_size=1, max_size=6), kind=st.sampled_from(["jsonl", "dataframe", "csv"]))
def test_label_cells_are_raw_and_nan_is_missing(values: list[Any], kind: str, folder: Path) -> None:
    """NaN cells are missing labels; "nan" text, inf, case and '|' stay raw (the task binder judges them)."""
    if kind == "csv":  # a CSV cell is text
        values = [v if isinstance(v, str) else "" if v is None else str(v) for v in values]
    rows = [{"id": f"r{i}", "caption": "hi", "photo": "img/0.jpg", "y": v} for i, v in enumerate(values)]
    ds = _read(kind, rows, folder)
    got = [ex.labels["y"] for ex in ds]
    want = [_expected(v) for v in values]
    assert [type(g) for g in got] == [type(w) for w in want]
    assert json.dumps(got) == json.dumps(want)  # equal, with inf == inf
    _count("label_cells", examples=1, cells=len(values), missing=want.count(None))


def test_jsonl_nan_and_infinity_literals(folder: Path) -> None:
    path = folder / "lit.jsonl"
    path.write_text(
        '{"text": "a", "image": "img/0.jpg", "y": NaN}\n{"text": "b", "image": "img/1.jpg", "y": Infinity}\n'
    )
    assert [ex.labels["y"] for ex in load_dataset(path)] == [None, math.inf]


# ------------------------------------------------------------------------------------------------ rows


@pytest.mark.parametrize("line", ["[1, 2]", "null", "3", '"text"', "true", "{not json"])
def test_jsonl_line_that_is_not_an_object_is_a_row_error(line: str, folder: Path, tmp_path: Path) -> None:
    path = folder / "lines.jsonl"
    ok = json.dumps({"text": "fine", "image": "img/0.jpg"})
    path.write_text(f"{ok}\n{line}\n{ok.replace('0.jpg', '1.jpg')}\n")
    with pytest.raises(DataError, match="lines.jsonl:2"):
        load_dataset(path)
    ds = load_dataset(path, on_error="skip", report_path=tmp_path / "r.jsonl")
    assert ds.ids == ["0", "2"] and "lines.jsonl:2" in (tmp_path / "r.jsonl").read_text()
    only_bad = folder / "bad.jsonl"
    only_bad.write_text(f"{line}\n")
    assert len(load_dataset(only_bad, on_error="skip", report_path=tmp_path / "r2.jsonl")) == 0


@settings(**SETTINGS)
@given(
    texts=st.lists(st.text(alphabet="ab ,\n\"'", max_size=12), max_size=5),
    extra=st.integers(1, 3),
)
def test_csv_errors_name_the_physical_line_after_multiline_captions(
    texts: list[str], extra: int, folder: Path
) -> None:
    """A row with more fields than the header is an error (never cut), at the line it starts on."""
    texts = [t if t.strip() else "x" for t in texts]
    rows = [{"id": f"r{i}", "caption": t, "photo": "img/0.jpg"} for i, t in enumerate(texts)]
    path, _ = _write("csv", rows, folder, name="lines")
    line = 2 + sum(t.count("\n") + 1 for t in texts)
    with path.open("a") as f:
        f.write("bad,caption,img/1.jpg" + ",more" * extra + "\n")
    with pytest.raises(DataError, match=f"lines.csv:{line}: row has {3 + extra} fields but the header has 3"):
        load_dataset(path, **COLUMNS)
    assert load_dataset(path, **COLUMNS, on_error="skip").ids == [r["id"] for r in rows]
    _count("csv_lines", examples=1, multiline_captions=sum("\n" in t for t in texts))


def test_csv_multiline_record_error_names_its_lines(folder: Path) -> None:
    path = folder / "ml.csv"
    path.write_text('id,text,image\na,"one\ntwo",img/0.jpg\nb,"three\nfour\nfive",img/gone.jpg\n')
    with pytest.raises(DataError, match="ml.csv:4-6, item b: image file not found"):
        load_dataset(path)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "dataframe"])
@pytest.mark.parametrize("bad", ["nul", "loop", "loop-inside", "folder"])
def test_bad_image_paths_are_row_errors(kind: str, bad: str, folder: Path, tmp_path: Path) -> None:
    loop = folder / "loop"
    if not loop.is_symlink():
        os.symlink("loop", loop)  # a symlink to itself
    ref = {"nul": "img/0.jpg\x00.png", "loop": "loop", "loop-inside": "loop/x.jpg", "folder": "img"}[bad]
    problem = {
        "nul": "NUL byte",
        "loop": "symlink loop",
        "loop-inside": "symlink loop",
        "folder": "not a file",
    }
    rows = [ROWS[0], {**ROWS[1], "photo": ref}, ROWS[2]]
    with pytest.raises(DataError, match=problem[bad]) as e:
        _read(kind, rows, folder, missing_image="keep")  # a bad path is not a missing image
    assert _where(kind, 1) in str(e.value)
    ds = _read(kind, rows, folder, on_error="skip", report_path=tmp_path / "r.jsonl")
    assert ds.ids == ["t1", "t3"] and problem[bad] in (tmp_path / "r.jsonl").read_text()


def test_image_cells_may_hold_bytes_pil_or_hf_dicts(folder: Path) -> None:
    raw = (folder / "img" / "0.jpg").read_bytes()
    im = Image.new("RGB", (4, 4))
    frame = pd.DataFrame(
        {
            "text": ["a", "b", "c", "d"],
            "image": [raw, im, {"bytes": None, "path": "img/1.jpg"}, {"bytes": b""}],
        }
    )
    ds = load_dataset(frame, image_root=folder, missing_image="keep")
    assert ds[0].image == raw and ds[1].image is im
    with pytest.raises(DataError, match=r"empty \(0 bytes\)"):  # an empty file's bytes, as a 0-byte file: not a
        load_image(ds[3].image)  # missing image (that is an empty cell or None)
    assert ds[2].image == str((folder / "img" / "1.jpg").resolve())
    with pytest.raises(DataError, match="image cell must be a path, bytes or a PIL image, got int"):
        load_dataset(pd.DataFrame({"text": ["a"], "image": [3]}))
    with pytest.raises(DataError, match="caption must be text, got list"):
        load_dataset(pd.DataFrame({"text": [["a"]], "image": ["img/0.jpg"]}), image_root=folder)


# ------------------------------------------------------------------------------------------------ HF


def test_hf_classlabel_names_are_declared_and_ints_become_names(folder: Path) -> None:
    import datasets as hf

    features = hf.Features(
        {
            "caption": hf.Value("string"),
            "photo": hf.Image(),
            "mood": hf.ClassLabel(names=["negative", "neutral", "positive"]),
            "tags": hf.Sequence(hf.ClassLabel(names=["sky", "sea"])),
            "score": hf.Value("float32"),
        }
    )
    data = {
        "caption": ["a", "b", "c"],
        "photo": [str(folder / "img" / f"{i}.jpg") for i in range(3)],
        "mood": [2, 0, -1],
        "tags": [[1, 0], [], [0]],
        "score": [0.5, None, float("nan")],
    }
    ds = load_dataset(
        hf.Dataset.from_dict(data, features=features), text_column="caption", image_column="photo"
    )
    assert ds.label_names == {
        "mood": ["negative", "neutral", "positive"],
        "tags": ["sky", "sea"],
        "score": [],
    }
    assert [ex.labels for ex in ds] == [
        {"mood": "positive", "tags": ["sea", "sky"], "score": 0.5},
        {"mood": "negative", "tags": [], "score": None},
        {"mood": None, "tags": ["sky"], "score": None},
    ]
    assert isinstance(ds[0].image, bytes | str) and ds.ids == ["0", "1", "2"]
    back = load_dataset(ds.to_hf())  # declared names survive a round trip
    assert back.label_names["mood"] == ["negative", "neutral", "positive"]
    assert [ex.labels["mood"] for ex in back] == ["positive", "negative", None]


def test_hf_datasetdict_splits_drop_skipped_and_duplicate_rows(folder: Path) -> None:
    import datasets as hf

    def part(ids: list[str], photos: list[str]) -> Any:
        return hf.Dataset.from_dict({"id": ids, "text": ["x"] * len(ids), "image": photos})

    ok = str(folder / "img" / "0.jpg")
    dd = hf.DatasetDict(
        {"train": part(["a", "b"], [ok, "gone.jpg"]), "validation": part(["a", "c"], [ok, ok])}
    )
    ds = load_dataset(dd, on_error="skip", missing_image="skip")
    assert ds.ids == ["a", "c"] and ds.splits == {"train": ["a"], "val": ["c"]}


# ------------------------------------------------------------------------------------------------ MVSA


def _mvsa(tmp_path: Path, rows: dict[str, str], raw: bytes | None = None) -> Path:
    root = tmp_path / "mvsa"
    (root / "data").mkdir(parents=True)
    for item in rows:
        Image.new("RGB", (8, 8)).save(root / "data" / f"{item}.jpg")
        (root / "data" / f"{item}.txt").write_text(f"caption {item}", encoding="utf-8")
    text = "\n".join(["ID\ttext,image", *(f"{k}\t{v}" for k, v in rows.items())]) + "\n"
    (root / "labelResultAll.txt").write_bytes(raw if raw is not None else text.encode())
    return root


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r\n\r\n"])
def test_mvsa_label_file_with_bom_and_crlf(bom: bool, newline: str, tmp_path: Path) -> None:
    rows = {"1": "positive,positive", "2": "neutral,negative"}
    text = newline.join(["ID\ttext,image", *(f"{k}\t{v}" for k, v in rows.items())]) + newline
    raw = ("\ufeff" if bom else "").encode() + text.encode()
    ds = read_mvsa(_mvsa(tmp_path, rows, raw))
    assert ds.ids == ["1", "2"] and [ex.labels["sentiment"] for ex in ds] == ["positive", "negative"]
    assert ds.label_names["sentiment"] == ["positive", "neutral", "negative"]
    assert read_mvsa(tmp_path / "mvsa", label_columns=["sentiment"]).label_names == {
        "sentiment": ["positive", "neutral", "negative"]
    }


@pytest.mark.parametrize(
    "row,problem",
    [
        ({"text": "no id", "emotion_label": 0}, 'row has no "id"'),
        ({"id": "", "emotion_label": 0}, 'row has no "id"'),
        ([1, 2], "not an object"),
        ({"id": "2", "emotion_label": True}, "unknown emotion_label True"),
        ({"id": "2", "emotion_label": 5}, "unknown emotion_label 5"),
        ({"id": "../../etc/passwd", "emotion_label": 0}, "is not a file name"),
    ],
)
def test_clmlf_bad_split_rows_are_row_errors(row: Any, problem: str, tmp_path: Path) -> None:
    root = tmp_path / "mvsa"
    (root / "data").mkdir(parents=True)
    (root / "splits").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / "data" / f"{i}.jpg")
        (root / "data" / f"{i}.txt").write_text(f"text {i}")
    rows = [{"id": 0, "emotion_label": 2}, row, {"id": "1", "emotion_label": 1}]
    (root / "splits" / "train.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=problem) as e:
        read_mvsa(root)
    assert "train.json[1]" in str(e.value)
    ds = read_mvsa(root, on_error="skip", report_path=tmp_path / "r.jsonl")
    assert ds.ids == ["0", "1"] and [ex.labels["sentiment"] for ex in ds] == ["negative", "neutral"]
    assert ds.splits == {"train": ["0", "1"], "val": [], "test": []}


# ------------------------------------------------------------------------------------------------ splits


def test_reused_split_file_refuses_rows_it_does_not_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = load_dataset("synthetic:40")
    path = tmp_path / "split.json"
    first = split_dataset(ds.subset(range(30)), path=path)
    grown = load_dataset("synthetic:40")
    with pytest.raises(DataError, match="10 rows of the dataset are in no split") as e:
        split_dataset(grown, path=path)
    assert "make a new split" in str(e.value).lower() and "allow_new_rows=True" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        parts = split_dataset(grown, path=path, allow_new_rows=True)
    assert "10 new rows" in caplog.text
    assert parts["train"].ids == first["train"].ids + grown.ids[30:]
    assert parts["val"].ids == first["val"].ids and parts["test"].ids == first["test"].ids


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"train": [1.5], "val": [], "test": []}',
        '{"train": [true], "val": [], "test": []}',
        '{"train": []}',
        '{"train": ["syn-000001"], "val": ["syn-000001"], "test": []}',
    ],
)
def test_a_broken_split_file_is_a_clear_error(content: str, tmp_path: Path) -> None:
    (tmp_path / "split.json").write_text(content)
    problems = "not a split file|lists of ids|more than once"
    with pytest.raises(DataError, match=f"split.json.*({problems}).*fix it, or make a new split"):
        split_dataset(load_dataset("synthetic:5"), path=tmp_path / "split.json")


def test_a_hand_written_split_file_may_name_integer_ids(tmp_path: Path) -> None:
    """Ids are strings once read (a numeric id column, or row numbers): a split file of numbers names them."""
    from fusionkit.data import Example

    ds = MultimodalDataset([Example(str(i), f"caption {i}", None, {}) for i in range(6)], {})
    (tmp_path / "split.json").write_text('{"train": [0, 1, 2, 3], "val": [4], "test": ["5"]}')
    parts = split_dataset(ds, path=tmp_path / "split.json")
    assert parts["train"].ids == ["0", "1", "2", "3"] and parts["val"].ids == ["4"] and parts["test"].ids == ["5"]


def test_raw_split_matches_the_split_of_bound_indices() -> None:
    """Stratifying on raw declared names gives the same split as on their indices (binding later)."""
    raw = load_dataset("synthetic:90")
    names = raw.label_names["sentiment"]
    examples = [type(ex)(ex.id, ex.text, ex.image, {"s": names.index(ex.labels["sentiment"])}) for ex in raw]
    bound = MultimodalDataset(examples, {"s": names}, {"s": "classification"})
    a, b = split_dataset(raw, seed=3), split_dataset(bound, seed=3)
    assert {k: v.ids for k, v in a.items()} == {k: v.ids for k, v in b.items()}


def test_label_counts_on_raw_values() -> None:
    from fusionkit.data import Example

    exs = [Example(str(i), "t", "p", {"y": v}) for i, v in enumerate(["b", None, ["a", "b"], 3, "b"])]
    assert MultimodalDataset(exs, {"y": ["a", "b", "c"]}).label_counts("y") == {
        "a": 1,
        "b": 3,
        "c": 0,
        "<missing>": 1,
        "3": 1,
    }


# ------------------------------------------------------------------------------------------------ Windows


@settings(**SETTINGS)
@given(
    texts=st.lists(st.text(alphabet="ab ,\n\"'", max_size=12).filter(str.strip), max_size=4),
    bom=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_csv_from_windows_editors(texts: list[str], bom: bool, newline: str, folder: Path) -> None:
    """Excel's "CSV UTF-8" (BOM, CRLF, spaces after commas in the header) reads like any CSV."""
    path = folder / "win.csv"
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        f.write("id, caption, photo, mood" + newline)
        w = csv.writer(f, lineterminator=newline)
        w.writerows([f"r{i}", t, "img/0.jpg", "Positive"] for i, t in enumerate(texts))
        f.write("bad,x,img/0.jpg,Positive,extra" + newline)
    line = 2 + sum(t.count("\n") + 1 for t in texts)
    with pytest.raises(DataError, match=f"win.csv:{line}: row has 5 fields"):
        load_dataset(path, **COLUMNS)
    ds = load_dataset(path, **COLUMNS, on_error="skip")
    assert ds.ids == [f"r{i}" for i in range(len(texts))]
    assert [ex.text for ex in ds] == [t.strip() for t in texts]
    assert all(ex.labels == {"mood": "Positive"} for ex in ds)


def test_parquet_with_hf_image_structs(folder: Path) -> None:
    raw = (folder / "img" / "0.jpg").read_bytes()
    images = [
        {"bytes": raw, "path": None},
        {"bytes": None, "path": "img/1.jpg"},
        {"bytes": None, "path": None},
    ]
    pd.DataFrame({"text": ["a", "b", "c"], "image": images}).to_parquet(folder / "s.parquet")
    ds = load_dataset(folder / "s.parquet", missing_image="keep")
    assert (
        ds[0].image == raw
        and ds[1].image == str((folder / "img" / "1.jpg").resolve())
        and ds[2].image is None
    )


def test_mvsa_layout_fixes_columns_and_image_folder(tmp_path: Path) -> None:
    root = _mvsa(tmp_path, {"1": "positive,positive"})
    ds = read_mvsa(root, text_column="caption", image_column="photo", image_root=tmp_path / "elsewhere")
    assert ds[0].text == "caption 1" and ds[0].image == str((root / "data" / "1.jpg").resolve())
    with pytest.raises(DataError, match=r"no column 'mood' \(model.tasks\[\].column\)"):
        read_mvsa(root, label_columns=["mood"])


def test_hf_test_split_without_labels(folder: Path) -> None:
    import datasets as hf

    photo = str(folder / "img" / "0.jpg")
    train = hf.Dataset.from_dict(
        {"text": ["a", "b"], "image": [photo] * 2, "mood": [1, 0]},
        features=hf.Features(
            {"text": hf.Value("string"), "image": hf.Image(), "mood": hf.ClassLabel(names=["sad", "happy"])}
        ),
    )
    test = hf.Dataset.from_dict({"text": ["c"], "image": [photo]}).cast_column("image", hf.Image())
    ds = load_dataset(hf.DatasetDict({"train": train, "test": test}))
    assert ds.ids == ["0", "1", "2"] and ds.splits == {"train": ["0", "1"], "test": ["2"]}
    assert [ex.labels["mood"] for ex in ds] == ["happy", "sad", None]
    assert ds.label_names == {"mood": ["sad", "happy"]} and ds[2].meta["source"] == "hf-dataset/test[0]"


json_cells = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4,
)
any_row = st.fixed_dictionaries(
    {},
    optional={
        "id": json_cells,
        "caption": json_cells,
        "photo": json_cells | st.sampled_from(["img/0.jpg", "img/1.jpg", "img", "/", "x" * 300, "a\x00b"]),
        "mood": json_cells,
    },
)


@settings(**SETTINGS)
@given(rows=st.lists(any_row, min_size=1, max_size=6), kind=st.sampled_from(["jsonl", "dataframe"]))
def test_any_row_is_kept_or_reported_under_skip(rows: list[dict[str, Any]], kind: str, folder: Path) -> None:
    """Under on_error="skip" nothing escapes as an exception: every row is kept or in the report."""
    rows = [{"caption": "x", "photo": "img/0.jpg", **r} for r in rows[:1]] + rows[1:]  # columns exist
    report = folder / f"any-{kind}.jsonl"
    report.unlink(missing_ok=True)
    ds = _read(
        kind, rows, folder, on_error="skip", missing_text="keep", missing_image="keep", report_path=report
    )
    reported = report.read_text().splitlines() if report.exists() else []
    assert len(ds) + len(reported) == len(rows)
    assert len(set(ds.ids)) == len(ds)
    _count("any_row_skip", examples=1, rows_tried=len(rows), rows_reported=len(reported), rows_kept=len(ds))
    assert all(ex.text is None or isinstance(ex.text, str) for ex in ds)


def test_table_shapes(folder: Path) -> None:
    """Duplicate header names are an error; a short CSV row has empty trailing cells; JSONL tolerates
    CRLF and blank lines and still names the right line."""
    dup = folder / "dup.csv"
    dup.write_text("id,text,image,text\na,b,img/0.jpg,c\n")
    with pytest.raises(DataError, match=r"dup.csv:1: column\(s\) \['text'\] appear more than once"):
        load_dataset(dup)
    short = folder / "short.csv"
    short.write_text("id,text,image,mood,,\na,hi,img/0.jpg\n")  # trailing commas name no column
    assert load_dataset(short)[0].labels == {"mood": None}
    lines = folder / "crlf.jsonl"
    ok = json.dumps({"text": "a", "image": "img/0.jpg"})
    lines.write_bytes(f"{ok}\r\n\r\n  \r\n{ok.replace('0.jpg', 'gone.jpg')}\r\n".encode())
    with pytest.raises(DataError, match="crlf.jsonl:4, item 1: image file not found"):
        load_dataset(lines)


def test_clmlf_split_file_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "mvsa" / "splits").mkdir(parents=True)
    (tmp_path / "mvsa" / "splits" / "train.json").write_text('[{"id": "1"')
    with pytest.raises(DataError, match="train.json: not a JSON split file"):
        read_mvsa(tmp_path / "mvsa")


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="t.parquet: not a readable Parquet file"):
        load_dataset(tmp_path / "t.parquet")


def test_duplicate_id_names_both_rows(folder: Path) -> None:
    path = folder / "dup-ids.csv"
    path.write_text("id,text,image\na,one,img/0.jpg\nb,two,img/1.jpg\na,three,img/2.jpg\n")
    with pytest.raises(
        DataError, match=r"dup-ids.csv:4, item a: duplicate id 'a'. .*first appears at .*dup-ids.csv:2"
    ):
        load_dataset(path)
    assert [ex.text for ex in load_dataset(path, on_error="skip")] == ["one", "two"]


def test_tsv_reads_like_csv(folder: Path) -> None:
    path = folder / "t.tsv"
    path.write_text(
        'id\tcaption\tphoto\tmood\nt1\thi, there\timg/0.jpg\tpositive\nt2\t"two\nlines"\timg/1.jpg\t\n'
    )
    ds = load_dataset(path, **COLUMNS)
    assert [ex.text for ex in ds] == ["hi, there", "two\nlines"] and [ex.labels["mood"] for ex in ds] == [
        "positive",
        None,
    ]


@settings(**SETTINGS)
@given(text=st.text(max_size=40), bom=st.booleans(), gb=st.booleans())
def test_mvsa_caption_files_round_trip(
    text: str, bom: bool, gb: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A caption file in UTF-8 (with or without BOM) or GB18030 reads back as its stripped text."""
    root = _mvsa(tmp_path_factory.mktemp("cap"), {"1": "positive,positive"})
    try:
        raw = text.encode("gb18030") if gb else ("\ufeff" if bom else "").encode() + text.encode()
    except UnicodeEncodeError:
        return
    (root / "data" / "1.txt").write_bytes(raw)
    try:
        ds = read_mvsa(root, missing_text="keep")
    except DataError as e:  # GB18030 bytes may be invalid UTF-8 *and* ambiguous: only this error is allowed
        assert gb and "neither UTF-8 nor gb18030" in str(e)
        return
    decoded = raw.decode("utf-8-sig") if not gb or _is_utf8(raw) else raw.decode("gb18030")
    if gb and not _is_utf8(raw) and all(b < 0x80 or b >= 0xC0 for b in raw):  # may also be Latin-1 ('müde')
        assert ds[0].text in {(t.strip()[:MAX_TEXT_CHARS].rstrip() or None) for t in (decoded, raw.decode("latin-1"))}
        return
    assert ds[0].text == (decoded.strip()[:MAX_TEXT_CHARS].rstrip() or None)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("kind", KINDS)
def test_huge_caption_is_capped_in_every_source(kind: str, folder: Path) -> None:
    rows = [{"id": "big", "caption": "word " * 10_000, "photo": "img/0.jpg"}]
    assert _read(kind, rows, folder)[0].text == rows[0]["caption"][:MAX_TEXT_CHARS].rstrip()


def test_ids_are_stripped(folder: Path) -> None:
    rows = [
        {"id": " 7 ", "caption": "a", "photo": "img/0.jpg"},
        {"id": "\t", "caption": "b", "photo": "img/1.jpg"},
    ]
    assert _read("csv", rows, folder).ids == ["7", "1"]  # an empty id: the record number, from 0


def test_a_semicolon_separated_csv_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("id;caption;photo;mood\nt1;hello;a.png;happy\n")
    with pytest.raises(DataError, match=r"column 'caption'.*separate its fields with ';'"):
        load_dataset(path, text_column="caption", image_column="photo")


def test_an_unclosed_quote_is_named_not_read_as_one_long_caption(tmp_path: Path) -> None:
    rows = ["id,caption,photo,mood"] + [f"t{i},words {i},,happy" for i in range(8)]
    rows[4] = 't3,"words 3,,happy'  # the quote never closes: the rest of the file is one field
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"bad.csv:5: a quote opened on line 5 is not closed.*lines 5-9"):
        load_dataset(tmp_path / "bad.csv", text_column="caption", image_column="photo", missing_image="keep")
    ok = rows[:4] + ['t3,"two lines,\nof caption",,happy'] + rows[5:]  # a real multi-line caption still reads
    (tmp_path / "ok.csv").write_text("\n".join(ok) + "\n")
    ds = load_dataset(tmp_path / "ok.csv", text_column="caption", image_column="photo", missing_image="keep")
    assert len(ds) == 8


def test_a_row_cut_short_is_named_as_such_not_as_an_empty_cell(tmp_path: Path) -> None:
    (tmp_path / "short.csv").write_text("id,caption,photo,mood\nt1,hello\nt2,hi,,happy\n")
    with pytest.raises(DataError, match=r"short.csv:2.*row has 2 fields but the header has 4 \(no \['photo'\] field\)"):
        load_dataset(tmp_path / "short.csv", text_column="caption", image_column="photo", missing_image="keep")
    (tmp_path / "unlabelled.csv").write_text("id,caption,photo,mood\nt1,hello,\nt2,hi,,happy\n")  # no label field: fine
    assert len(load_dataset(tmp_path / "unlabelled.csv", text_column="caption", image_column="photo",
                            missing_image="keep")) == 2


def test_a_quote_closed_by_a_later_stray_quote_a_lone_cr_and_a_short_row(folder: Path, caplog) -> None:
    """An unclosed quote that a later inch mark (5") "closes" swallowed whole rows silently; a lone "\\r"
    inside a quoted caption is valid CSV; a row cut short loses its labels, which is said."""
    lines = ["id,caption,photo,mood"] + [f"r{i},caption {i},img/{i % 4}.jpg,happy" for i in range(8)]
    lines[2] = 'r1,"caption 1 opens a quote,img/1.jpg,happy'
    lines[6] = 'r5,my 5" screen,img/1.jpg,sad'
    swallow = folder / "swallow.csv"
    swallow.write_text("\n".join(lines) + "\n")
    cols = dict(COLUMNS, label_columns=["mood"])
    with pytest.raises(DataError, match=r"swallow.csv:3: a quote opened on line 3 is not closed.*lines 3-7"):
        load_dataset(swallow, **cols)
    assert load_dataset(swallow, **cols, on_error="skip").ids == [f"r{i}" for i in range(8) if i != 1]
    # two adjacent captions opening a quote (a quoted tweet) in a TSV: the record spans just two lines
    (folder / "quoted.tsv").write_text('id\tcaption\tphoto\tmood\na\t"Best day\timg/0.jpg\thappy\n'
                                       'b\t"Worst day\timg/1.jpg\tsad\nc\tok\timg/2.jpg\thappy\n')  # fmt: skip
    with pytest.raises(DataError, match=r"quoted.tsv:2: a quote opened on line 2 is not closed"):
        load_dataset(folder / "quoted.tsv", **cols)
    # ... while a caption whose inner line only looks like a row (no such image file) is read as written
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([["id", "caption", "photo", "mood"], ["s", "Shot list:\nwide, dusk, beach.jpg, f/8\nlove it",
                                                                   "img/0.jpg", "happy"]])  # fmt: skip
    (folder / "shots.csv").write_text(buf.getvalue(), newline="")
    assert load_dataset(folder / "shots.csv", **cols)[0].text == "Shot list:\nwide, dusk, beach.jpg, f/8\nlove it"
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([["id", "caption", "photo", "mood"], ["a", "one\rtwo", "img/0.jpg", "happy"],
                               ["b", "three", "img/1.jpg", "sad"]])  # fmt: skip
    (folder / "cr.csv").write_text(buf.getvalue(), newline="")
    assert [ex.text for ex in load_dataset(folder / "cr.csv", **cols)] == ["one\rtwo", "three"]
    (folder / "short.csv").write_text("id,caption,photo,mood\na,x,img/0.jpg,happy\nb,y,img/1.jpg\n")
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        ds = load_dataset(folder / "short.csv", **cols)
    assert ds.ids == ["a", "b"] and "1 row(s) have fewer fields than the header (line 3)" in caplog.text


@pytest.mark.parametrize("sep", [",", "\t"])
def test_text_after_a_closing_quote_is_named_not_dropped(folder: Path, sep: str) -> None:
    """A tweet that starts with a quotation ("Best day ever" said no one) lost its quotes without a word."""
    name = "q.csv" if sep == "," else "q.tsv"
    lines = ["id,caption,photo,mood", 'a,"Best day ever" said no one,img/0.jpg,happy', "b,ok,img/1.jpg,sad",
             'c,"""Best day ever"" said no one",img/2.jpg,happy', 'd,my 5" phone,img/3.jpg,sad']  # fmt: skip
    (folder / name).write_text("\n".join(line.replace(",", sep) for line in lines) + "\n")
    with pytest.raises(DataError, match=rf"{name}:2: a field opens with a quote but goes on after its closing"):
        load_dataset(folder / name, **COLUMNS)
    ds = load_dataset(folder / name, **COLUMNS, on_error="skip")
    assert [ex.text for ex in ds] == ["ok", '"Best day ever" said no one', 'my 5" phone']


def test_a_caption_spelled_nan_or_none_is_missing_in_a_csv_as_in_its_dataframe(folder: Path, caplog) -> None:
    """`df.astype(str).to_csv()` writes a missing caption as "nan": the CSV trained on the word while pandas'
    read_csv of the same file (the README's DataFrame route) made it missing."""
    (folder / "na.csv").write_text("id,caption,photo\na,nan,img/0.jpg\nb,None,img/1.jpg\nc,Nancy,img/2.jpg\n")
    opts = dict(COLUMNS, missing_text="keep")
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        from_csv = load_dataset(folder / "na.csv", **opts)
    frame = pd.read_csv(folder / "na.csv", dtype=str)
    from_frame = load_dataset(frame.assign(photo=[str(folder / p) for p in frame["photo"]]), **opts)
    assert [ex.text for ex in from_csv] == [ex.text for ex in from_frame] == [None, None, "Nancy"]
    assert "2 captions spelled like a missing value (['None', 'nan'])" in caplog.text
    with pytest.raises(DataError, match="na.csv:2, item a: caption 'nan' is a missing-value spelling"):
        load_dataset(folder / "na.csv", **COLUMNS)  # missing_text error: the row is named, not trained on "nan"


def test_a_url_in_the_image_column_is_named_as_one(folder: Path) -> None:
    path = folder / "urls.csv"
    path.write_text("id,caption,photo\na,x,http://example.com/cat.jpg\n")
    with pytest.raises(DataError, match=r"urls.csv:2, item a: image 'http://example.com/cat.jpg' is a URL"):
        load_dataset(path, **COLUMNS)


def test_a_utf16_file_is_named_as_such(folder: Path) -> None:
    for suffix in ("csv", "jsonl"):
        body = "id,caption,photo\na,x,img/0.jpg\n" if suffix == "csv" else '{"id": "a", "caption": "x"}\n'
        for encoding in ("utf-16", "utf-16-le"):  # with its byte-order mark, as Excel writes, and without
            (folder / f"u16.{suffix}").write_bytes(body.encode(encoding))
            with pytest.raises(DataError, match=rf"u16.{suffix}: the file is UTF-16.*Re-encode it as UTF-8"):
                load_dataset(folder / f"u16.{suffix}", **COLUMNS)


def test_a_jsonl_key_given_twice_is_that_rows_error(folder: Path) -> None:
    (folder / "twice.jsonl").write_text('{"id": "a", "caption": "first", "caption": "second", "photo": "img/0.jpg"}\n'
                                        '{"id": "b", "caption": "ok", "photo": "img/1.jpg"}\n')  # fmt: skip
    with pytest.raises(DataError, match=r"twice.jsonl:1: key 'caption' appears more than once"):
        load_dataset(folder / "twice.jsonl", **COLUMNS)
    assert load_dataset(folder / "twice.jsonl", **COLUMNS, on_error="skip").ids == ["b"]


def test_an_id_spelled_nan_is_an_id_not_a_missing_one(folder: Path) -> None:
    """"Nan" is a name; only an empty cell (or a float NaN from pandas) is a missing id, named by its row."""
    (folder / "nan.csv").write_text("id,caption,photo\nNan,sunny,img/0.jpg\n,rain,img/1.jpg\n")
    (folder / "nan.jsonl").write_text('{"id": "NaN", "caption": "a", "photo": "img/0.jpg"}\n')
    assert load_dataset(folder / "nan.csv", **COLUMNS).ids == ["Nan", "1"]
    assert load_dataset(folder / "nan.jsonl", **COLUMNS).ids == ["NaN"]
    assert load_dataset(pd.DataFrame({"id": [float("nan")], "caption": ["a"], "photo": ["img/0.jpg"]}),
                        image_root=folder, **COLUMNS).ids == ["0"]  # fmt: skip


def test_int_ids_with_gaps_name_the_same_rows_in_csv_and_parquet(folder: Path) -> None:
    frame = pd.DataFrame({"id": [100, None, 102], "caption": ["a", "b", "c"], "photo": ["img/0.jpg"] * 3})
    frame.to_csv(folder / "ids.csv", index=False)  # 100.0, "", 102.0
    frame.to_parquet(folder / "ids.parquet")
    csv_ids = load_dataset(folder / "ids.csv", **COLUMNS).ids
    assert csv_ids == load_dataset(folder / "ids.parquet", **COLUMNS).ids == ["100", "1", "102"]


def test_string_ids_pandas_never_writes_as_floats_are_kept_as_written(folder: Path) -> None:
    """Only pandas' "100.0" is read as the int 100: "007.0" and "+5.0" are someone's ids, kept so predictions
    join back to the table (they were "7" and "5", and "007.0" could take the id of a real "7")."""
    (folder / "ids2.csv").write_text("id,caption,photo\n007.0,a,img/0.jpg\n+5.0,b,img/1.jpg\n-3.0,c,img/0.jpg\n"
                                     "0.0,d,img/1.jpg\n7,e,img/0.jpg\n 007 ,f,img/1.jpg\n")  # fmt: skip
    assert load_dataset(folder / "ids2.csv", **COLUMNS).ids == ["007.0", "+5.0", "-3", "0", "7", "007"]


def test_a_parquet_files_named_index_is_the_column_it_names(tmp_path: Path) -> None:
    """`df.set_index("id").to_parquet(...)`: pandas keeps the ids as the index; they are the id column, not row
    numbers (a shuffled file's predictions would join back to other rows)."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"id": ["b7", "a1", "c3"], "text": ["x", "y", "z"]}).set_index("id")
    frame.to_parquet(tmp_path / "posts.parquet")
    ds = load_dataset(str(tmp_path / "posts.parquet"), missing_image="keep")
    assert ds.ids == ["b7", "a1", "c3"] and [ex.text for ex in ds] == ["x", "y", "z"]


def test_undecodable_image_bytes_in_a_table_are_named_by_their_row_with_one_hint(tmp_path: Path) -> None:
    """Bytes in a Parquet column have no file name: the error names the table's row; its hint says once how to
    skip such rows."""
    import io as _io

    from PIL import Image

    from fusionkit.config import ImagePreprocess
    from fusionkit.data import DataError, build_cache
    from fusionkit.models.tiny import tiny_tokenizer

    good = _io.BytesIO()
    Image.new("RGB", (8, 8)).save(good, format="PNG")
    frame = pd.DataFrame({"id": ["a", "b"], "text": ["x", "y"],
                          "image": [good.getvalue(), b"\x89PNG\r\n\x1a\n" + b"garbage" * 5]})  # fmt: skip
    frame.to_parquet(tmp_path / "t.parquet")
    ds = load_dataset(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError) as e:
        build_cache(ds, tiny_tokenizer(), ImagePreprocess(size=(8, 8)), tmp_path / "cache", num_proc=1)
    assert f"{tmp_path / 't.parquet'}[1], item b:" in str(e.value) and str(e.value).count("on_error") == 1
