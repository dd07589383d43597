"""Readers, label protocols, splits, synthetic data and every bad-input case under raise and skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionkit.data import (
    MAX_TEXT_CHARS,
    DataError,
    Example,
    MultimodalDataset,
    from_hf,
    load_dataset,
    make_synthetic,
    read_mvsa,
    read_table,
    split_dataset,
)

SHARED = Path(os.environ.get("FUSIONKIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
MVSA_SHARED = SHARED / "data" / "mvsa-single"


def _jpg(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", (40, 30), color).save(path)
    return path


def _mvsa_raw(root: Path, rows: dict[str, str], header: str = "ID\ttext,image") -> Path:
    (root / "data").mkdir(parents=True)
    for item in rows:
        _jpg(root / "data" / f"{item}.jpg")
        (root / "data" / f"{item}.txt").write_text(f"caption {item}", encoding="utf-8")
    (root / "labelResultAll.txt").write_text(
        "\n".join([header, *(f"{k}\t{v}" for k, v in rows.items())]) + "\n"
    )
    return root


# ------------------------------------------------------------------------------------------------ MVSA


def test_mvsa_single_protocol(tmp_path: Path) -> None:
    rows = {
        "1": "positive,positive",  # agree -> positive
        "2": "neutral,negative",  # one neutral -> the other
        "3": "positive,neutral",
        "4": "positive,negative",  # conflict -> dropped
        "5": "neutral,neutral",
    }
    ds = read_mvsa(_mvsa_raw(tmp_path / "mvsa", rows), "single")
    assert ds.ids == ["1", "2", "3", "5"]
    assert [ex.labels["sentiment"] for ex in ds] == ["positive", "negative", "positive", "neutral"]
    assert ds[1].labels == {
        "sentiment": "negative",
        "text_sentiment": "neutral",
        "image_sentiment": "negative",
    }
    assert ds.label_names == dict.fromkeys(
        ["sentiment", "text_sentiment", "image_sentiment"], ["positive", "neutral", "negative"]
    )
    kept = read_mvsa(tmp_path / "mvsa", "single", keep_conflicts=True)
    assert kept[kept.index_of("4")].labels == {
        "sentiment": None,
        "text_sentiment": "positive",
        "image_sentiment": "negative",
    }


def test_mvsa_multiple_protocol(tmp_path: Path) -> None:
    rows = {
        "1": "positive,neutral\tpositive,positive\tneutral,positive",  # text pos (2/3), image pos -> pos
        "2": "negative,neutral\tnegative,neutral\tpositive,negative",  # text neg, image neutral -> neg
        "3": "positive,negative\tneutral,neutral\tnegative,positive",  # text: no majority -> dropped
        "4": "positive,negative\tpositive,negative\tpositive,positive",  # pos vs neg -> dropped
    }
    root = _mvsa_raw(tmp_path / "mvsa", rows, header="ID\ttext,image\ttext,image\ttext,image")
    ds = read_mvsa(root, "multiple")
    assert ds.ids == ["1", "2"]
    assert [ex.labels["sentiment"] for ex in ds] == ["positive", "negative"]
    assert ds[0].meta["annotations"] == ["positive,neutral", "positive,positive", "neutral,positive"]
    with pytest.raises(DataError, match="expected 1 'text,image'"):
        read_mvsa(root, "single")


def test_mvsa_bad_rows_raise_and_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _mvsa_raw(
        tmp_path / "mvsa", {"1": "positive,positive", "2": "postive,neutral", "3": "neutral,neutral"}
    )
    (root / "data" / "3.jpg").unlink()
    (root / "data" / "1.txt").write_bytes("caf\u00e9 \u4e2d\u6587".encode("gb18030"))  # GB18030 caption
    with pytest.raises(DataError, match="unknown label value 'postive,neutral'") as e:
        read_mvsa(root)
    assert "labelResultAll.txt:3" in str(e.value)
    report = tmp_path / "skipped.jsonl"
    ds = read_mvsa(root, on_error="skip", report_path=report)
    assert ds.ids == ["1"] and ds[0].text == "caf\u00e9 \u4e2d\u6587"
    skipped = [json.loads(line) for line in report.read_text().splitlines()]
    assert [s["item"] for s in skipped] == ["2", "3"]
    assert "image file not found" in skipped[1]["problem"] and ds.skip_report == report
    assert f"skipped 2 of 3 items; see {report}" in caplog.text


def test_mvsa_clmlf_layout(tmp_path: Path) -> None:
    root = tmp_path / "mvsa"
    (root / "data").mkdir(parents=True)
    (root / "splits").mkdir()
    for i in range(6):
        _jpg(root / "data" / f"{i}.jpg")
        (root / "data" / f"{i}.txt").write_text(f"text {i}")
    split = {"train": [0, 1, 2], "dev": [3], "test": [4, 5]}
    for name, ids in split.items():
        rows = [
            {"id": str(i), "text": "x", **({} if name == "test" else {"emotion_label": i % 3})} for i in ids
        ]
        (root / "splits" / f"{name}.json").write_text(json.dumps(rows))
    ds = read_mvsa(root)
    parts = split_dataset(ds, seed=123)  # predefined splits win over ratios/seed
    assert [p.ids for p in parts.values()] == [["0", "1", "2"], ["3"], ["4", "5"]]
    assert ds[0].text == "text 0"  # the .txt file is the source, not the JSON's text
    assert [ex.labels["sentiment"] for ex in parts["train"]] == ["positive", "neutral", "negative"]
    assert [ex.labels["sentiment"] for ex in parts["test"]] == [None, None]


@pytest.mark.skipif(not MVSA_SHARED.is_dir(), reason=f"shared MVSA-Single copy not found at {MVSA_SHARED}")
def test_mvsa_shared_copy() -> None:
    ds = read_mvsa(MVSA_SHARED)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 3611, "val": 450, "test": 450}
    assert all(ex.text for ex in ds) and "\ufffd" not in "".join(ex.text for ex in ds)


# ------------------------------------------------------------------------------------------------ tables


def _table_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for i in range(4):
        _jpg(tmp_path / "img" / f"{i}.jpg")
    return tmp_path


def test_read_csv_and_jsonl(tmp_path: Path) -> None:
    d = _table_dir(tmp_path)
    (d / "t.csv").write_text("id,text,image,mood,score\na,hello,img/0.jpg,happy,0.5\nb,bye,img/1.jpg,,1\n")
    ds = read_table(d / "t.csv", label_columns=["mood", "score"])
    assert ds.ids == ["a", "b"] and ds.task_types == {} and ds.label_names == {"mood": [], "score": []}
    assert ds[0].labels == {"mood": "happy", "score": "0.5"} and ds[1].labels == {"mood": None, "score": "1"}
    assert ds[0].image == str((d / "img" / "0.jpg").resolve())
    assert read_table(d / "t.csv", label_columns="mood")[0].labels == {"mood": "happy"}
    rows = [
        {"text": "x", "image": "img/2.jpg", "tags": ["sky", "sea"]},
        {"text": "y", "image": "img/3.jpg", "tags": []},
    ]
    (d / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = read_table(d / "t.jsonl")  # label_columns=None: every column but text/image/id
    assert ds.label_names == {"tags": []} and ds.ids == ["0", "1"]
    assert [ex.labels["tags"] for ex in ds] == [["sky", "sea"], []]  # raw, order kept
    hf = ds.to_hf()
    assert len(hf) == 2 and hf.features["image"].__class__.__name__ == "Image"
    assert hf["tags"] == [["sky", "sea"], []]


BAD_ROWS = {
    "missing image": ("x", "img/nope.jpg", "pos", "image file not found"),
    "empty caption": ("   ", "img/0.jpg", "pos", "caption is empty"),
    "image is a folder": ("x", "img", "pos", "is not a file"),
    "extra field": ("x", "img/0.jpg", "pos,oops", "row has 4 fields but the header has 3"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_table_bad_rows(tmp_path: Path, case: str) -> None:
    d = _table_dir(tmp_path)
    text, image, label, message = BAD_ROWS[case]
    (d / "t.csv").write_text(f"text,image,y\nfine,img/1.jpg,pos\n{text},{image},{label}\n")
    kw = {"label_columns": ["y"]}
    with pytest.raises(DataError, match=message) as e:
        read_table(d / "t.csv", **kw)
    assert "t.csv:3" in str(e.value)  # names the file and row
    ds = read_table(d / "t.csv", on_error="skip", report_path=d / "r.jsonl", **kw)
    assert len(ds) == 1 and message in (d / "r.jsonl").read_text()


def test_table_non_utf8_caption_and_duplicates(tmp_path: Path) -> None:
    d = _table_dir(tmp_path)
    (d / "t.csv").write_bytes(b"id,text,image\na,ok,img/0.jpg\nb,caf\xe9,img/1.jpg\na,again,img/2.jpg\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_table(d / "t.csv")
    ds = read_table(d / "t.csv", on_error="skip", report_path=d / "r.jsonl")
    assert ds.ids == ["a"] and ds[0].text == "ok"
    problems = [json.loads(x)["problem"] for x in (d / "r.jsonl").read_text().splitlines()]
    assert problems == ["caption is not valid UTF-8", "duplicate id 'a'"]
    (d / "dup.csv").write_text("id,text,image\na,one,img/0.jpg\na,two,img/1.jpg\n")
    with pytest.raises(DataError, match="duplicate id 'a'"):
        read_table(d / "dup.csv")


def test_megabyte_caption_is_capped(tmp_path: Path) -> None:
    d = _table_dir(tmp_path)
    (d / "t.csv").write_text("text,image\n" + "word " * 400_000 + ",img/0.jpg\n")
    assert read_table(d / "t.csv")[0].text == ("word " * 400_000)[:MAX_TEXT_CHARS].rstrip()  # no space left at the cut


def test_from_hf_and_saved_dir(tmp_path: Path) -> None:
    import datasets as hf

    ds = make_synthetic(12, image_size=16)
    saved = hf.DatasetDict(
        {"train": ds.subset(range(8)).to_hf(), "validation": ds.subset(range(8, 12)).to_hf()}
    )
    saved.save_to_disk(tmp_path / "hf")
    back = load_dataset(str(tmp_path / "hf"))
    assert back.ids == ds.ids and back.label_names == {"sentiment": ["positive", "neutral", "negative"]}
    assert [ex.labels["sentiment"] for ex in back] == [ex.labels["sentiment"] for ex in ds]
    assert {ex.labels["sentiment"] for ex in back} <= {"positive", "neutral", "negative"}  # names, not ints
    assert isinstance(back[0].image, bytes)  # kept encoded: decoded once, by the cache
    assert back.splits == {"train": ds.ids[:8], "val": ds.ids[8:]}
    single = from_hf(saved["train"])
    assert len(single) == 8 and single.splits is None


def test_predefined_splits_without_val_get_it_from_train(caplog: pytest.LogCaptureFixture) -> None:
    """`load_dataset("imagefolder")` and friends give a DatasetDict of train only: training on all of it with
    no epoch selection and nothing scored would be silent; val (and test, when also missing) come from train."""
    import datasets as hf

    ds = make_synthetic(40, image_size=8)
    only_train = from_hf(hf.DatasetDict({"train": ds.to_hf()}))
    parts = split_dataset(only_train, ratios=(0.6, 0.2, 0.2), seed=3)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [24, 8, 8]
    assert sorted(i for p in parts.values() for i in p.ids) == sorted(ds.ids)
    assert "no val and no test" in caplog.text and "val 8, test 8" in caplog.text
    assert {k: p.ids for k, p in parts.items()} == {
        k: p.ids for k, p in split_dataset(only_train, ratios=(0.6, 0.2, 0.2), seed=3).items()
    }  # seeded
    with_test = from_hf(hf.DatasetDict({"train": ds.subset(range(30)).to_hf(), "test": ds.subset(range(30, 40)).to_hf()}))
    parts = split_dataset(with_test, ratios=(0.8, 0.2, 0.0))
    assert parts["test"].ids == ds.ids[30:]  # its own test split is kept
    assert len(parts["val"]) == 6 and sorted(parts["train"].ids + parts["val"].ids) == sorted(ds.ids[:30])


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert len(load_dataset("synthetic:5")) == 5
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_dataset(str(tmp_path / "nowhere.csv"))


# ------------------------------------------------------------------------------------------------ splits


def test_split_stratified_deterministic_and_reused(tmp_path: Path) -> None:
    ds = make_synthetic(300, image_size=8)
    a, b = split_dataset(ds, seed=1), split_dataset(ds, seed=1)
    assert {k: v.ids for k, v in a.items()} == {k: v.ids for k, v in b.items()}
    assert [len(v) for v in a.values()] == [240, 30, 30]
    assert sorted(sum((v.ids for v in a.values()), [])) == sorted(ds.ids)
    full = np.array(list(ds.label_counts("sentiment").values())) / len(ds)
    val = np.array(list(a["val"].label_counts("sentiment").values())) / 30
    assert np.abs(full - val).max() < 0.04  # stratified: class shares preserved
    assert split_dataset(ds, seed=2)["val"].ids != a["val"].ids
    path = tmp_path / "split.json"
    first = split_dataset(ds, seed=1, path=path)
    again = split_dataset(ds, seed=99, path=path)  # the file wins over the seed
    assert again["test"].ids == first["test"].ids and json.loads(path.read_text())["seed"] == 1
    with pytest.raises(DataError, match="make a new split"):  # a stale split file is never half-used
        split_dataset(ds.subset(range(10)), path=path)


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_prefix() -> None:
    a, b = make_synthetic(40, seed=3, image_size=32), make_synthetic(40, seed=3, image_size=32)
    assert [ex.text for ex in a] == [ex.text for ex in b] and a.fingerprint == b.fingerprint
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert make_synthetic(10, seed=3, image_size=32).ids == a.ids[:10]
    assert [ex.text for ex in make_synthetic(40, seed=4, image_size=32)] != [ex.text for ex in a]


def test_synthetic_label_needs_both_modalities() -> None:
    """A random forest on bag-of-words alone or on image colours alone stays near 50%; on both ~94%."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.model_selection import cross_val_score

    from fusionkit.models.tiny import tiny_vocab

    ds = make_synthetic(900, seed=0, image_size=32)
    vocab = tiny_vocab()
    assert all(w in vocab for ex in ds for w in ex.text.split())  # tokenizes into whole words
    y = np.array([ex.labels["sentiment"] for ex in ds])
    assert min(ds.label_counts("sentiment").values()) > 250  # balanced classes
    text = CountVectorizer().fit_transform([ex.text for ex in ds]).toarray()
    image = np.stack(
        [np.asarray(ex.image.resize((2, 2), Image.Resampling.BOX), dtype=np.float32).ravel() for ex in ds]
    )

    def acc(x: np.ndarray) -> float:
        return cross_val_score(RandomForestClassifier(100, random_state=0), x, y, cv=3).mean()

    assert acc(text) < 0.62 and acc(image) < 0.62
    assert acc(np.hstack([text, image])) > 0.85


def test_to_hf_gives_each_bound_task_its_column_type(tmp_path: Path) -> None:
    from fusionkit.config import TaskConfig
    from fusionkit.tasks import bind_labels

    rows = [("sunny day", "positive", "sky|sea", "0.5"), ("rain", "negative", "", "1"), ("fog", None, "sky", None)]
    ds = MultimodalDataset(
        [Example(str(i), t, str(_jpg(tmp_path / f"{i}.jpg")), {"mood": m, "tags": g, "score": s})
         for i, (t, m, g, s) in enumerate(rows)], {}
    )  # fmt: skip
    tasks = [TaskConfig("mood", class_names=["positive", "negative"]), TaskConfig("tags", "multilabel"),
             TaskConfig("score", "regression")]  # fmt: skip
    bound, _ = bind_labels(ds, tasks)
    features = bound.to_hf().features
    assert features["mood"].names == ["positive", "negative"]
    assert features["tags"].feature.names == ["sea", "sky"] and features["score"].dtype == "float32"
    back = load_dataset(bound.to_hf())
    assert back.label_names["mood"] == ["positive", "negative"]
    assert [ex.labels["mood"] for ex in back] == ["positive", "negative", None]


def test_an_image_path_not_found_names_the_file_it_probably_means(tmp_path: Path) -> None:
    """Windows separators, another case, another Unicode form (macOS NFD file names): 'not found' says which."""
    import unicodedata

    (tmp_path / "Pics" / "sub").mkdir(parents=True)
    _jpg(tmp_path / "Pics" / "sub" / "Cat.jpg")
    _jpg(tmp_path / "Pics" / unicodedata.normalize("NFD", "café.jpg"))
    for written, meant, how in [
        ("Pics\\sub\\Cat.jpg", "Pics/sub/Cat.jpg", "'\\' between folders"),
        ("pics/SUB/cat.jpg", "Pics/sub/Cat.jpg", "another case"),
        ("Pics/caf\u00e9.jpg", "Pics/" + unicodedata.normalize("NFD", "café.jpg"), "the same name in another Unicode form"),
    ]:
        (tmp_path / "t.csv").write_text(f"id,text,image,mood\n1,hi,Pics/sub/Cat.jpg,a\n2,yo,{written},b\n")
        with pytest.raises(DataError, match="image file not found") as e:
            read_table(tmp_path / "t.csv")
        assert f"did you mean {meant!r}? it differs by {how}" in str(e.value) and "t.csv:3" in str(e.value)
    (tmp_path / "t.csv").write_text("id,text,image,mood\n1,hi,Pics/sub/Cat.jpg,a\n2,yo,Pics/sub/Dog.jpg,b\n")
    with pytest.raises(DataError, match="image file not found") as e:
        read_table(tmp_path / "t.csv")
    assert "did you mean" not in str(e.value)
    (tmp_path / "t.csv").write_text("id,text,image,mood\n1,hi,Pics/sub/Cat.jpg,a\n2,yo,C:\\data\\Cat.jpg,b\n")
    with pytest.raises(DataError, match="it is a Windows path"):
        read_table(tmp_path / "t.csv")


def test_a_column_not_found_names_the_one_probably_meant(tmp_path: Path) -> None:
    _jpg(tmp_path / "a.jpg")
    (tmp_path / "t.csv").write_text("ID,Text ,image_path,mood\n1,hi,a.jpg,happy\n")
    with pytest.raises(DataError, match=r"caption column 'text' \(did you mean 'Text'\?\) nor the image column "
                       r"'image' \(did you mean 'image_path'\?\)"):  # fmt: skip
        read_table(tmp_path / "t.csv", id_column="ID")
    with pytest.raises(DataError, match=r"no column 'text' \(did you mean 'Text'\?\)"):
        read_table(tmp_path / "t.csv", id_column="ID", image_column="image_path")
    with pytest.raises(DataError, match=r"no column 'imagepath' \(did you mean 'image_path'\?\)"):
        read_table(tmp_path / "t.csv", id_column="ID", text_column="Text", image_column="imagepath")
    with pytest.raises(DataError) as e:
        read_table(tmp_path / "t.csv", id_column="ID", text_column="Text", image_column="picture")
    assert "did you mean" not in str(e.value)


def test_a_plugin_subclass_of_classification_stratifies_the_split_as_classification_does() -> None:
    """A task type registered over ClassificationTask splits its rows by class as the built-in does (its name
    alone once made the split unstratified); a multilabel task's tag sets stratify nothing."""
    import fusionkit
    from fusionkit.tasks import ClassificationTask, bind_labels

    @fusionkit.register_task("fk_strat_clf")
    class Mine(ClassificationTask):
        pass

    ds = make_synthetic(300, image_size=8)
    ref, _ = bind_labels(ds, [fusionkit.TaskConfig("sentiment")])
    mine, _ = bind_labels(ds, [fusionkit.TaskConfig("sentiment", type="fk_strat_clf")])
    assert {k: v.ids for k, v in split_dataset(mine, seed=1).items()} == {k: v.ids for k, v in split_dataset(ref, seed=1).items()}
