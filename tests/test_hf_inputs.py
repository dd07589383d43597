"""Hugging Face shaped inputs: `ClassLabel`s in a Parquet file, a `DatasetDict`'s split names, HF image dicts,
and a DataFrame's own index and categories."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from PIL import Image

import fusionkit
from fusionkit.config import TaskConfig
from fusionkit.data import load_dataset
from fusionkit.data.errors import DataError

hf = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")

NAMES = ["zebra", "apple", "mango"]  # not sorted: the declared order is the class order
TAGS = ["sun", "beach", "cat"]


def _png(colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def _dataset(n: int = 12) -> hf.Dataset:
    features = hf.Features(caption=hf.Value("string"), photo=hf.Image(), mood=hf.ClassLabel(names=NAMES),
                           tags=hf.Sequence(hf.ClassLabel(names=TAGS)))  # fmt: skip
    rows = [{"caption": f"caption {i}", "photo": {"bytes": _png(), "path": None}, "mood": i % 3 if i % 4 else -1,
             "tags": [t for t in range(3) if (i >> t) & 1]} for i in range(n)]  # fmt: skip
    return hf.Dataset.from_list(rows, features=features)


def test_a_parquet_file_from_datasets_keeps_its_classlabel_names(tmp_path: Path) -> None:
    """`Dataset.to_parquet` writes ClassLabel ints; their names are in the schema's metadata. Read raw, -1 (no
    label) trained as a class and the classes came out '-1', '0', '1', '2'."""
    ds = _dataset()
    ds.to_parquet(tmp_path / "ds.parquet")
    read = {"text_column": "caption", "image_column": "photo"}
    from_file, from_hf = load_dataset(tmp_path / "ds.parquet", **read), load_dataset(ds, **read)
    assert from_file.label_names == from_hf.label_names == {"mood": NAMES, "tags": TAGS}
    assert [ex.labels for ex in from_file] == [ex.labels for ex in from_hf]
    assert [ex.labels["mood"] for ex in from_file][:4] == [None, "apple", "mango", "zebra"]
    assert from_file[3].labels["tags"] == ["sun", "beach"]


@pytest.mark.parametrize("extra", ["unsupervised", "validation_matched"])
def test_a_datasetdict_split_of_another_name_is_refused_not_dropped(extra: str) -> None:
    ds = _dataset()
    dd = hf.DatasetDict(train=ds.select(range(8)), test=ds.select(range(8, 10)), **{extra: ds.select(range(10, 12))})
    with pytest.raises(DataError, match=rf"split\(s\) \['{extra}'\] \(2 rows\) are none of those read.*"
                                        rf"dd\.pop\('{extra}'\)"):  # fmt: skip
        load_dataset(dd, text_column="caption", image_column="photo")


def test_two_datasetdict_splits_that_read_as_one_are_refused() -> None:
    ds = _dataset()
    dd = hf.DatasetDict(train=ds.select(range(8)), validation=ds.select(range(8, 10)), dev=ds.select(range(10, 12)))
    with pytest.raises(DataError, match="its splits 'validation' and 'dev' both read as the val split"):
        load_dataset(dd, text_column="caption", image_column="photo")


def _train_config(tmp_path: Path, name: str) -> dict:
    return {"data": {"text_column": "caption", "image_column": "photo", "cache_dir": str(tmp_path / "c")},
            "model": {"tasks": [{"name": "mood"}]}, "optim": {"max_steps": 1, "batch_size": 4},
            "run": {"output_dir": str(tmp_path / "runs"), "name": name, "progress": False, "plots": False}}  # fmt: skip


def test_an_empty_split_of_the_datas_own_splits_is_not_blamed_on_split_ratios(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = _dataset()
    dd = hf.DatasetDict(train=ds.select(range(8)), validation=ds.select(range(8, 12)))  # no test split
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        fusionkit.train(_train_config(tmp_path, "own"), data=dd)
    assert "the test split is empty (the data's own splits were used, not data.split_ratios: train 8, val 4" in (
        caplog.text)  # fmt: skip
    assert "data.split_ratios [0.8" not in caplog.text


def test_predict_takes_hf_image_dicts(tmp_path: Path) -> None:
    """`Image(decode=False)` cells, which training from a table takes, are taken by predict too."""
    (tmp_path / "b.png").write_bytes(_png("blue"))
    model = fusionkit.create_model("tiny")
    as_dicts = model.predict(texts=["a", "b"], images=[{"bytes": _png(), "path": None},
                                                       {"bytes": None, "path": str(tmp_path / "b.png")}])  # fmt: skip
    assert as_dicts == model.predict(texts=["a", "b"], images=[_png(), str(tmp_path / "b.png")])
    with pytest.raises(DataError, match="holds neither bytes nor a path"):
        model.predict(texts=["a"], images=[{"bytes": None, "path": None}])


def test_a_dataframe_with_its_own_index_names_rows_by_label(caplog: pytest.LogCaptureFixture) -> None:
    """After df.sample() or a filter, position 5 is not df.loc[5]: errors and ids name the index label."""
    df = pd.DataFrame({"text": ["a", "b", None, "d"], "image": [_png()] * 4}, index=[1030, 1000, 1020, 1010])
    with pytest.raises(DataError, match=r"DataFrame\.loc\[1020\], item 1020: caption is empty"):
        load_dataset(df)
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        assert load_dataset(df, missing_text="skip").ids == ["1030", "1000", "1010"]
    assert "rows are named by their index label (df.loc[label])" in caplog.text
    assert load_dataset(df.reset_index(drop=True), missing_text="keep").ids == ["0", "1", "2", "3"]  # as before
    twice = pd.concat([df, df])  # labels repeat: positions, said
    assert load_dataset(twice, missing_text="keep").ids == [str(i) for i in range(8)]
    assert "its index repeats labels (e.g. 1030)" in caplog.text


@pytest.mark.parametrize("via", ["frame", "parquet"])
def test_a_categorical_label_column_declares_its_classes_in_order(via: str, tmp_path: Path) -> None:
    moods = pd.Categorical(["apple", "zebra", None], categories=["zebra", "apple", "mango", "kiwi"])
    levels = pd.Categorical([3, 1, 3], categories=[3, 1, 2])  # int categories: read as they are, not as positions
    df = pd.DataFrame({"text": ["a", "b", "c"], "image": [_png()] * 3, "mood": moods, "level": levels})
    if via == "parquet":
        df.to_parquet(tmp_path / "df.parquet")  # pandas keeps the categories in the file
    ds = load_dataset(df if via == "frame" else tmp_path / "df.parquet")
    levels_declared = ["3", "1", "2"] if via == "frame" else []  # pyarrow reads back only string categories
    assert ds.label_names == {"mood": ["zebra", "apple", "mango", "kiwi"], "level": levels_declared}
    assert [ex.labels for ex in ds] == [{"mood": "apple", "level": 3}, {"mood": "zebra", "level": 1},
                                        {"mood": None, "level": 3}]  # fmt: skip
    _, (task,) = fusionkit.tasks.bind_labels(ds, [TaskConfig(name="mood")])
    assert task.class_names == ["zebra", "apple", "mango", "kiwi"]  # not sorted, "kiwi" (no rows) kept


def test_a_classlabel_number_past_its_names_is_an_error_not_a_missing_label(tmp_path: Path) -> None:
    """-1 is HF's "no label"; 5 of 3 names (a Parquet file another tool rewrote) was read as missing without a word."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fusionkit.config import ConfigError
    from fusionkit.tasks import bind_labels

    _dataset().to_parquet(tmp_path / "ds.parquet")
    table = pq.read_table(tmp_path / "ds.parquet")
    moods = table.column("mood").to_pylist()
    moods[1] = 5
    at = table.schema.get_field_index("mood")
    pq.write_table(table.set_column(at, table.schema.field(at), pa.array(moods, table.schema.field(at).type)),
                   tmp_path / "edited.parquet")  # fmt: skip
    ds = load_dataset(tmp_path / "edited.parquet", text_column="caption", image_column="photo")
    assert ds.label_names["mood"] == NAMES and ds[0].labels["mood"] is None  # the -1 is still missing
    with pytest.raises(ConfigError, match=r"labels \['5'\] .* are not among the classes \['zebra', 'apple', 'mango'\]"):
        bind_labels(ds, [TaskConfig("mood")])


def test_predict_split_of_a_datasetdict_folder_is_its_own_split(tmp_path: Path) -> None:
    """`predict --data DD --split test` of a saved DatasetDict predicts DD's own test split, as training reads
    DD's splits; it looked the run's split.json ids up in DD instead (here 2 rows of DD's 4, or an error)."""
    from fusionkit.cli import main

    ds = _dataset()
    fusionkit.train(_train_config(tmp_path, "own"), data=hf.DatasetDict(
        train=ds.select(range(6)), validation=ds.select(range(6, 8)), test=ds.select(range(10, 12))))  # fmt: skip
    hf.DatasetDict(train=ds.select(range(8)), test=ds.select(range(8, 12))).save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "out.csv"
    assert main(["predict", str(tmp_path / "runs" / "own"), "--data", str(tmp_path / "dd"), "--split", "test",
                 "--text-column", "caption", "--image-column", "photo", "--output", str(out)]) == 0  # fmt: skip
    assert pd.read_csv(out, dtype=str)["id"].tolist() == ["8", "9", "10", "11"]
