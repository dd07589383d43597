"""Messy files from a user trial: each test is one way real data broke a reader, read through `load_dataset`."""

from __future__ import annotations

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
