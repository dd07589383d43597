"""Messy files from a user trial: each test is one way real data broke a reader, read through `load_dataset`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from fusionkit.data import DataError, load_dataset


def _jpg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def test_hf_dataset_without_an_image_column_reads_rows_without_images(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A captions-only HF dataset read as one without images (`--image-column ''`, missing_image=keep), as the same
    CSV is, and a DatasetDict whose test split alone lacks the column; it crashed with a raw KeyError."""
    import datasets as hf

    caps = hf.Dataset.from_dict({"id": ["a", "b"], "caption": ["good day", "bad day"]})
    caps.save_to_disk(tmp_path / "hf_caps")
    for spec, column in ((str(tmp_path / "hf_caps"), ""), (caps, "image")):
        ds = load_dataset(spec, text_column="caption", image_column=column, missing_image="keep")
        assert [(ex.id, ex.text, ex.image) for ex in ds] == [("a", "good day", None), ("b", "bad day", None)]
    img = str(_jpg(tmp_path / "p.jpg"))
    parts = hf.DatasetDict({"train": hf.Dataset.from_dict({"text": ["x", "y"], "image": [img, img]}),
                            "test": hf.Dataset.from_dict({"text": ["z"]})})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        ds = load_dataset(parts, missing_image="keep")
    assert [ex.image for ex in ds] == [img, img, None] and "every row is read without it" in caplog.text
    with pytest.raises(DataError, match="no column 'image'"):  # not kept: the usual clear error
        load_dataset(parts)


def _table(tmp_path: Path, name: str, lines: list[str]) -> Path:
    for i in range(3):
        _jpg(tmp_path / "img" / f"p{i}.jpg")
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path / name


PHOTOS = dict(text_column="caption", image_column="photo")


def test_an_unclosed_quote_that_swallows_a_row_with_a_missing_image_is_named(tmp_path: Path) -> None:
    """The swallowed row's image file is missing (kept: missing_image=keep): it was not taken for a row, and row 1
    silently got the caption 'Best day,img/p0.jpg,happy\\n2,12' and row 2's label."""
    path = _table(tmp_path, "f.csv", ["id,caption,photo,mood", '1,"Best day,img/p0.jpg,happy',
                                      '2,12",img/nofile.jpg,sad', "3,ok,img/p2.jpg,happy"])  # fmt: skip
    with pytest.raises(DataError, match=r"f.csv:2: a quote opened on line 2 is not closed"):
        load_dataset(path, **PHOTOS, missing_image="keep")


def test_on_error_skip_leaves_out_the_row_with_an_unclosed_quote_not_the_rows_after_it(tmp_path: Path) -> None:
    lines = ["id,caption,photo,mood", *(f"{i},caption {i},img/p{i % 3}.jpg,happy" for i in range(1, 10))]
    lines[4] = '4,"unclosed,img/p1.jpg,happy'
    path = _table(tmp_path, "mix.csv", lines)
    report = tmp_path / "skipped.jsonl"
    ds = load_dataset(path, **PHOTOS, on_error="skip", report_path=report)
    assert ds.ids == [str(i) for i in range(1, 10) if i != 4]
    assert [json.loads(line)["source"] for line in report.read_text().splitlines()] == [f"{path}:5"]


def test_latin1_mvsa_captions_are_not_read_as_gb18030_garbage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """GB18030 (MVSA's fallback) takes most Latin-1 bytes: 'Ich bin müde' read as 'Ich bin m黡e' with an INFO line.
    Real GB18030 captions (hanzi, 'é' as GB18030 writes it) still read as before."""
    captions = {"1": ("Ich bin müde", "latin-1"), "2": ("naïve señor", "latin-1"), "3": ("我的iPhone 晚安", "gb18030"),
                "4": ("café…", "gb18030"), "5": ("plain", "utf-8")}  # fmt: skip
    root = tmp_path / "mvsa"
    for item, (text, enc) in captions.items():
        _jpg(root / "data" / f"{item}.jpg")
        (root / "data" / f"{item}.txt").write_bytes(text.encode(enc))
    (root / "labelResultAll.txt").write_text("ID\ttext,image\n" + "".join(f"{k}\tpositive,positive\n" for k in captions))
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        ds = load_dataset(root)
    assert {ex.id: ex.text for ex in ds} == {k: text for k, (text, _) in captions.items()}
    assert "2 captions were neither UTF-8 nor GB18030 text but Latin-1" in caplog.text


def test_empty_and_header_only_tables_say_so(tmp_path: Path) -> None:
    """A 0-byte CSV was 'task mood reads its labels from column mood, which empty does not have'; a header-only one
    'the column mood has 0 class(es)'."""
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.csv: it is empty \(no header, no rows\)"):
        load_dataset(tmp_path / "empty.csv", **PHOTOS)
    (tmp_path / "head.csv").write_text("id,caption,photo,mood\n")
    with pytest.raises(DataError, match=r"head.csv: no rows below its header \['id', 'caption', 'photo', 'mood'\]"):
        load_dataset(tmp_path / "head.csv", **PHOTOS)


def test_a_dict_label_is_named_by_its_line_and_id(tmp_path: Path) -> None:
    """It was 'g, item ?: label {'x': 1} (dict) is not a class name': neither the line nor the id."""
    from fusionkit.config import TaskConfig
    from fusionkit.tasks import bind_labels

    rows = [{"id": f"r{i}", "caption": f"c{i}", "mood": "happy" if i % 2 else "sad"} for i in range(6)]
    rows[3]["mood"] = {"x": 1}
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(tmp_path / "g.jsonl", text_column="caption", image_column="", missing_image="keep")
    with pytest.raises(DataError, match=r"g.jsonl:4, item r3: label \{'x': 1\} \(dict\) is not a class name"):
        bind_labels(ds, [TaskConfig(name="mood", type="classification")])


def test_a_split_file_whose_ids_lost_their_leading_zeros_says_so(tmp_path: Path) -> None:
    """CSV ids 000..029 and the split made on them, reused on a Parquet copy written by pandas (ids 0..29), was
    'the dataset lost rows since the split was made'."""
    import pandas as pd

    from fusionkit.data import split_dataset

    lines = ["id,caption,photo,mood", *(f"{i:03d},caption {i},img/p{i % 3}.jpg,{'ab'[i % 2]}" for i in range(30))]
    csv_ds = load_dataset(_table(tmp_path, "t.csv", lines), **PHOTOS)
    split_dataset(csv_ds, path=tmp_path / "split.json")
    pd.read_csv(tmp_path / "t.csv").to_parquet(tmp_path / "t.parquet")  # pandas reads 000 as the number 0
    parquet_ds = load_dataset(tmp_path / "t.parquet", **PHOTOS)
    assert parquet_ds.ids[:3] == ["0", "1", "2"]
    with pytest.raises(DataError, match=r"split file names 30 ids not in the dataset .* spelled differently"):
        split_dataset(parquet_ds, path=tmp_path / "split.json")


def test_a_png_with_a_corrupted_chunk_is_named_a_damaged_png(tmp_path: Path) -> None:
    """It was 'not an image file in a decoded format (JPEG, PNG, ...)', as a text file named .png is."""
    import io

    from fusionkit.data import load_image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:20] = b"\xff\xff\xff\xff"  # the IHDR chunk's width
    (tmp_path / "bad.png").write_bytes(bytes(raw))
    for src in (tmp_path / "bad.png", bytes(raw)):
        with pytest.raises(DataError, match="starts as a PNG does .* cannot be decoded: it is damaged"):
            load_image(src)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="not an image file in a decoded format"):
        load_image(tmp_path / "text.png")
