"""A user's own data end to end: their column names and label strings through train, eval, predict and embed.

Every test goes through public entry points (`fusionkit.cli.main`, `fusionkit.train`, `model.predict`)
on files written the way users write them: `id,caption,photo,mood`, string labels, empty cells.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fusionkit
from fusionkit.cli import main
from fusionkit.config import ConfigError
from fusionkit.tasks import bind_labels

MOODS = {"happy": (250, 200, 0), "sad": (0, 0, 200), "meh": (128, 128, 128)}
WORDS = {"happy": "great sunny day", "sad": "awful rainy mess", "meh": "ordinary tuesday"}
FAST = ["--optim.max_steps", "4", "--optim.batch_size", "16", "--run.progress", "false", "--run.plots", "false"]


def write_table(folder: Path, n: int = 64, *, label_every: int = 1, name: str = "tweets.csv") -> Path:
    """`id,caption,photo,mood` with string moods; every `label_every`-th row labelled, others empty."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        mood = list(MOODS)[i % 3]
        img = folder / f"img{i}.png"
        if not img.exists():
            noise = np.random.default_rng(i).integers(0, 30, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(np.full((24, 32, 3), MOODS[mood], np.uint8) + noise).save(img)
        rows.append({"id": f"t{i}", "caption": f"{WORDS[mood]} #{i}", "photo": img.name,
                     "mood": mood if i % label_every == 0 else ""})  # fmt: skip
    path = folder / name
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def train_args(table: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--data.dataset", str(table), "--data.text_column", "caption",
            "--data.image_column", "photo", "--model.tasks", '[{"name": "mood"}]',
            "--run.output_dir", str(out), "--run.name", name, "--data.cache_dir", str(out / "cache"),
            *FAST, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("own")
    table = write_table(root / "data")
    assert main(train_args(table, root / "runs", "r1")) == 0
    return root, table


def test_trained_model_keeps_label_strings_everywhere(trained_run: tuple[Path, Path]) -> None:
    root, table = trained_run
    run = root / "runs" / "r1"
    model = fusionkit.FusionModel.from_pretrained(run)
    assert model.class_names == {"mood": ["happy", "meh", "sad"]}  # sorted distinct strings of the data
    rows = list(csv.DictReader((run / "predictions_test.csv").open()))
    assert rows and {r["mood"] for r in rows} <= set(MOODS)
    labels = {r["id"]: r["mood"] for r in csv.DictReader(table.open())}  # each row's label beside its prediction
    assert [r["mood_true"] for r in rows] == [labels[r["id"]] for r in rows]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["details"]["mood"]["class_names"] == ["happy", "meh", "sad"]
    assert set(summary["test"]["details"]["mood"]["report"]) >= set(MOODS)


def test_predict_every_row_of_a_new_file_without_labels(trained_run: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    root, table = trained_run
    new = tmp_path / "new.csv"
    with table.open() as src, new.open("w", newline="") as dst:  # the same rows, no label column
        reader = csv.DictReader(src)
        w = csv.DictWriter(dst, fieldnames=["id", "caption", "photo"])
        w.writeheader()
        for r in reader:
            w.writerow({"id": r["id"], "caption": r["caption"], "photo": str(table.parent / r["photo"])})
    out = tmp_path / "preds.csv"
    assert main(["predict", str(root / "runs" / "r1"), "--data", str(new), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(64)]  # every row, no split applied
    assert {r["mood"] for r in rows} <= set(MOODS)
    probs = [sum(float(r[f"mood_prob_{c}"]) for c in MOODS) for r in rows]
    assert np.allclose(probs, 1.0, atol=1e-4)
    captions = tmp_path / "captions.csv"  # no image column at all: a model trained on pairs refuses to guess ...
    captions.write_text("id,caption\nc1,great sunny day\nc2,awful rainy mess\n")
    before = out.read_bytes()
    assert main(["predict", str(root / "runs" / "r1"), "--data", str(captions), "--output", str(out)]) == 1
    assert out.read_bytes() == before
    assert "no column 'photo'" in capsys.readouterr().err
    # ... until told the file has no images: captions alone are predicted
    argv = ["predict", str(root / "runs" / "r1"), "--data", str(captions), "--output", str(out), "--image-column", ""]
    assert main(argv) == 0
    assert [r["id"] for r in csv.DictReader(out.open())] == ["c1", "c2"]


def test_predict_one_raw_pair_and_one_modality(trained_run: tuple[Path, Path], capsys: pytest.CaptureFixture,
                                               caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    root, table = trained_run
    run = str(root / "runs" / "r1")
    assert main(["predict", run, "--text", "great sunny day", "--image", str(table.parent / "img0.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mood"] in MOODS and set(out["mood_prob"]) == set(MOODS)
    assert main(["predict", run, "--text", "awful rainy mess"]) == 0  # caption alone
    assert json.loads(capsys.readouterr().out)["mood"] in MOODS
    model = fusionkit.FusionModel.from_pretrained(run)
    with caplog.at_level("WARNING", logger="fusionkit"):
        preds = model.predict(texts=["great sunny day", None], images=[None, str(table.parent / "img1.png")])
    assert len(preds) == 2 and all(p["mood"] in MOODS for p in preds)
    # trained without modality dropout: the Python API says so, as the CLI does
    assert "1 of 2 pairs of predict() have no caption" in caplog.text and "have no image" in caplog.text
    with pytest.raises(TypeError, match="takes lists"):  # one caption as a str would be read letter by letter
        model.predict(texts="great sunny day", images=str(table.parent / "img1.png"))


def test_eval_uses_the_runs_split_and_other_files_whole(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, table = trained_run
    run = root / "runs" / "r1"
    split = json.loads((run / "split.json").read_text())
    out = tmp_path / "m.json"
    assert main(["eval", str(run), "--split", "test", "--output", str(out)]) == 0
    report = json.loads(out.read_text())["details"]["mood"]["report"]
    assert report["macro avg"]["support"] == len(split["test"])  # the run's test rows, not others
    # the same file named explicitly with --split test: still the run's split.json
    assert main(["eval", str(run), "--data", str(table), "--split", "test", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["details"]["mood"]["report"]["macro avg"]["support"] == len(split["test"])
    # another file: all of its rows
    other = write_table(tmp_path / "other", n=12)
    args = ["eval", str(run), "--data", str(other), "--text-column", "caption", "--image-column", "photo"]
    assert main([*args, "--output", str(out)]) == 0
    assert json.loads(out.read_text())["details"]["mood"]["report"]["macro avg"]["support"] == 12


def test_embed_with_own_columns_returns_ids(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, table = trained_run
    out = tmp_path / "vecs.npy"
    assert main(["embed", str(root / "runs" / "r1"), "--data", str(table), "--output", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape[0] == 64 and np.isfinite(vectors).all()


def test_embed_names_an_unreadable_image_or_skips_it_in_place(
    trained_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, _ = trained_run
    table = write_table(tmp_path / "data", n=10)
    (tmp_path / "data" / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)  # a broken download
    out = tmp_path / "vecs.npy"
    args = ["embed", str(root / "runs" / "r1"), "--data", str(table), "--output", str(out)]
    assert main(args) == 1
    assert "item t3" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--on-error", "skip"]) == 0
    vectors, ids = np.load(out), json.loads(out.with_suffix(".ids.json").read_text())
    assert ids == [f"t{i}" for i in range(10)]  # every row keeps its place ...
    assert np.isnan(vectors[3]).all() and np.isfinite(np.delete(vectors, 3, axis=0)).all()  # ... t3 without a vector


def test_wrong_metric_and_column_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture, caplog) -> None:
    table = write_table(tmp_path / "data", n=12)
    assert main(train_args(table, tmp_path / "runs", "bad", "--run.metric", "val/mood/f1_macro")) == 2
    assert "val/mood/macro_f1" in capsys.readouterr().err  # the message lists the valid names
    assert main(train_args(table, tmp_path / "runs", "bad2", "--model.tasks", '[{"name": "sentiment"}]')) != 0
    err = capsys.readouterr().err
    assert "'sentiment'" in err and "mood" in err and "model.tasks[].column" in err
    assert not (tmp_path / "runs" / "cache").exists()  # nothing was cached: it failed before that step
    assert not (tmp_path / "runs" / "bad").exists()  # no half-made run dir blocks the corrected command
    assert not (tmp_path / "runs").exists()  # nor is an empty output folder left behind
    # ... and a report of rows the reader skipped, which the log named, is kept elsewhere, said
    gappy = tmp_path / "data" / "gappy.csv"
    gappy.write_text(table.read_text().replace("img3.png", ""))
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(train_args(gappy, tmp_path / "runs", "bad3", "--data.missing_image", "skip",
                               "--run.metric", "val/mood/f1_macro")) == 2  # fmt: skip
    kept = Path(tempfile.gettempdir()) / "fusionkit-skipped" / "bad3-skipped_rows.jsonl"
    assert f"is kept as {kept}" in caplog.text and '"t3"' in kept.read_text()
    assert not (tmp_path / "runs" / "bad3").exists()
    assert main(train_args(table, tmp_path / "runs", "bad")) == 0


def _raw(labels: list[object], declared: list[str] | None = None) -> fusionkit.MultimodalDataset:
    examples = [fusionkit.data.Example(str(i), "x", b"", {"y": v}) for i, v in enumerate(labels)]
    return fusionkit.MultimodalDataset(examples, {"y": declared or []})


def test_labels_spelled_none_unicode_forms_and_empty_tag_lists(caplog: pytest.LogCaptureFixture) -> None:
    """"None" is a class when listed (and a warned-about missing label when not); "ü" composed or not is one
    class; a CSV multilabel cell "[]" is the empty set of tags, not a class named "[]"."""
    listed = fusionkit.TaskConfig("y", class_names=["None", "negative", "positive"])
    ds, [cfg] = bind_labels(_raw(["None", "positive", "None", "negative", ""]), [listed])
    assert [ex.labels["y"] for ex in ds] == [0, 2, 0, 1, None]
    with caplog.at_level(logging.WARNING, logger="fusionkit.tasks"):
        ds, [cfg] = bind_labels(_raw(["None", "positive", "negative"]), [fusionkit.TaskConfig("y")])
    assert cfg.class_names == ["negative", "positive"] and ds[0].labels["y"] is None
    assert "1 labels ['None']" in caplog.text and "class_names" in caplog.text
    composed, decomposed = "Gl\u00fccklich", "Glu\u0308cklich"
    _, [cfg] = bind_labels(_raw([composed, decomposed, "traurig"]), [fusionkit.TaskConfig("y")])
    assert cfg.class_names == [composed, "traurig"]
    _, [cfg] = bind_labels(_raw([True, "True", "false"]), [fusionkit.TaskConfig("y")])  # Parquet and CSV spellings
    assert cfg.class_names == ["false", "true"]
    tags = fusionkit.TaskConfig("y", type="multilabel")
    ds, [cfg] = bind_labels(_raw(["a|b", "[]", '["b"]', ""]), [tags])
    assert cfg.class_names == ["a", "b"] and [ex.labels["y"] for ex in ds] == [[0, 1], [], [1], None]


def test_bytes_that_are_not_utf8_in_a_label_or_id_are_refused_at_read(tmp_path: Path) -> None:
    table = write_table(tmp_path / "data", n=12)
    raw = table.read_bytes().replace(b"sad", "tr\u00e4urig".encode("latin-1"), 1)  # one Latin-1 label
    table.write_bytes(raw)
    with pytest.raises(fusionkit.DataError, match=r"item t1: column 'mood' is not valid UTF-8"):
        fusionkit.load_dataset(table, text_column="caption", image_column="photo")
    assert main(train_args(table, tmp_path / "runs", "r")) == 1
    assert not (tmp_path / "runs" / "r").exists()  # refused before training, not when writing predictions


def test_class_order_reconciled_by_name_not_position() -> None:
    task = fusionkit.TaskConfig("y", class_names=["positive", "neutral", "negative"])
    # HF ClassLabel order negative/neutral/positive: rows keep their meaning under the config's order
    ds, [cfg] = bind_labels(_raw(["negative", "positive", "neutral"], ["negative", "neutral", "positive"]), [task])
    assert cfg.class_names == ["positive", "neutral", "negative"]
    assert [ex.labels["y"] for ex in ds] == [2, 0, 1]
    # a data class the config does not know is an error naming the row and the classes, never a remap;
    # under on_error="skip" that row loses its label (reported), not its caption and image
    with pytest.raises(fusionkit.DataError, match="item 0.*happy.*positive"):
        bind_labels(_raw(["happy", "positive"]), [task])
    kept, _ = bind_labels(_raw(["happy", "positive"]), [task], on_error="skip")
    assert [(ex.id, ex.labels["y"]) for ex in kept] == [("0", None), ("1", 0)]
    # the source declares classes the config lacks: a schema error listing both
    with pytest.raises(ConfigError, match="declares classes.*class_names"):
        bind_labels(_raw(["positive"], ["positive", "happy"]), [task])
    # declared order is used when the config has none; data strings sorted otherwise
    _, [cfg] = bind_labels(_raw(["b", "a"], ["b", "a", "c"]), [fusionkit.TaskConfig("y")])
    assert cfg.class_names == ["b", "a", "c"]
    _, [cfg] = bind_labels(_raw(["10", "2", "1"]), [fusionkit.TaskConfig("y")])
    assert cfg.class_names == ["1", "2", "10"]
    # case variants are a clear error unless the config lists them as distinct classes
    with pytest.raises(ConfigError, match="case"):
        bind_labels(_raw(["Positive", "positive", "negative"]), [fusionkit.TaskConfig("y")])
    ok = fusionkit.TaskConfig("y", class_names=["Positive", "positive", "negative"])
    assert bind_labels(_raw(["Positive", "positive"]), [ok])[1][0].num_classes == 3


def test_missing_labels_are_missing_for_their_task_only() -> None:
    tasks = [fusionkit.TaskConfig("y"), fusionkit.TaskConfig("z", "regression", column="score")]
    examples = [
        fusionkit.data.Example("a", "x", b"", {"y": "p", "score": "1.5"}),
        fusionkit.data.Example("b", "x", b"", {"y": None, "score": 2}),
        fusionkit.data.Example("c", "x", b"", {"y": float("nan"), "score": ""}),
        fusionkit.data.Example("d", "x", b"", {"y": "q", "score": float("nan")}),
    ]
    ds, cfgs = bind_labels(fusionkit.MultimodalDataset(examples, {}), tasks)
    assert [ex.labels for ex in ds] == [
        {"y": 0, "z": 1.5}, {"y": None, "z": 2.0}, {"y": None, "z": None}, {"y": 1, "z": None}
    ]
    assert cfgs[0].class_names == ["p", "q"]  # "nan" is not a class
    bad = [fusionkit.data.Example("e", "x", b"", {"y": "p", "score": "inf"})]
    with pytest.raises(fusionkit.DataError, match="item e.*infinite"):
        bind_labels(fusionkit.MultimodalDataset(bad, {}), [cfgs[0], tasks[1]])


def test_a_label_seen_only_in_test_is_a_class(tmp_path: Path) -> None:
    table = write_table(tmp_path / "data", n=30)
    rows = list(csv.DictReader(table.open()))
    rows[-1]["mood"] = "furious"  # one row only: lands in one split
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(train_args(table, tmp_path / "runs", "r")) == 0
    model = fusionkit.FusionModel.from_pretrained(tmp_path / "runs" / "r")
    assert model.class_names["mood"] == ["furious", "happy", "meh", "sad"]


def test_sparse_and_unlabelled_rows_train_with_itm(tmp_path: Path) -> None:
    table = write_table(tmp_path / "data", n=48, label_every=8)  # 1 row in 8 labelled
    tasks = '[{"name": "mood"}, {"name": "match", "type": "itm", "weight": 0.5}]'
    assert main(train_args(table, tmp_path / "runs", "sparse", "--model.tasks", tasks)) == 0
    history = [json.loads(x) for x in (tmp_path / "runs" / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(h["train/loss"]) for h in history if "train/loss" in h)
    unlabelled = write_table(tmp_path / "u", n=32, label_every=10**6)  # only row 0 labelled
    rows = list(csv.DictReader(unlabelled.open()))
    with unlabelled.open("w", newline="") as f:  # no label column at all
        w = csv.DictWriter(f, fieldnames=["id", "caption", "photo"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("id", "caption", "photo")} for r in rows)
    args = train_args(unlabelled, tmp_path / "runs", "itm", "--model.tasks", '[{"name": "match", "type": "itm"}]')
    assert main(args) == 0
    summary = json.loads((tmp_path / "runs" / "itm" / "summary.json").read_text())
    assert "val/match/accuracy" in summary["val"]


def test_dataframe_and_in_memory_dataset_through_python_api(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    hf = pytest.importorskip("datasets")
    table = write_table(tmp_path / "data", n=36)
    frame = pd.read_csv(table)
    frame["photo"] = [str(table.parent / p) for p in frame["photo"]]
    cfg = {"data": {"text_column": "caption", "image_column": "photo", "cache_dir": str(tmp_path / "c")},
           "model": {"tasks": [{"name": "mood"}]},
           "optim": {"max_steps": 4, "batch_size": 12},
           "run": {"output_dir": str(tmp_path / "runs"), "progress": False, "plots": False}}  # fmt: skip
    summary = fusionkit.train({**cfg, "run": {**cfg["run"], "name": "df"}}, data=frame)
    assert fusionkit.FusionModel.from_pretrained(summary["run_dir"]).class_names["mood"] == ["happy", "meh", "sad"]
    # the run says what it trained on; eval without --data says to pass it (no other dataset is read)
    assert json.loads((Path(summary["run_dir"]) / "config.json").read_text())["data"]["dataset"] == "in-memory:DataFrame"
    assert main(["eval", summary["run_dir"]]) == 2
    assert main(["eval", summary["run_dir"], "--data", str(table), "--split", "val"]) == 0
    names = ["sad", "meh", "happy"]  # ClassLabel order differs from the sorted one: kept, matched by name
    ds = hf.Dataset.from_dict(
        {"caption": list(frame["caption"]), "photo": list(frame["photo"]),
         "mood": [names.index(m) for m in frame["mood"]]},  # fmt: skip
        features=hf.Features({"caption": hf.Value("string"), "photo": hf.Image(),
                              "mood": hf.ClassLabel(names=names)}),  # fmt: skip
    )
    summary = fusionkit.train({**cfg, "run": {**cfg["run"], "name": "hf"}}, data=ds)
    model = fusionkit.FusionModel.from_pretrained(summary["run_dir"])
    assert model.class_names["mood"] == names
    preds = model.predict(texts=["great sunny day"] * 2, images=[str(table.parent / "img0.png")] * 2)
    assert preds[0]["mood"] in names


def test_python_api_resume_keeps_the_class_names_the_data_gave(tmp_path: Path) -> None:
    table = write_table(tmp_path / "data", n=24)
    cfg = {"data": {"dataset": str(table), "text_column": "caption", "image_column": "photo",
                    "cache_dir": str(tmp_path / "c")},
           "model": {"tasks": [{"name": "mood", "class_weights": "balanced"}]},
           "optim": {"max_steps": 2, "batch_size": 8},
           "run": {"output_dir": str(tmp_path / "runs"), "name": "r", "progress": False, "plots": False}}  # fmt: skip
    first = fusionkit.train(cfg)
    again = fusionkit.train(cfg, resume=True)  # the same config: not refused as "changed"
    assert again["steps"] == first["steps"] == 2
    saved = fusionkit.FusionModel.from_pretrained(tmp_path / "runs" / "r").config.tasks[0]
    assert saved.class_names == ["happy", "meh", "sad"] and isinstance(saved.class_weights, list)


def test_a_run_trained_on_a_dataframe_resumes_from_python_and_says_so_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pd = pytest.importorskip("pandas")
    table = write_table(tmp_path / "data", n=24)
    frame = pd.read_csv(table).assign(photo=lambda d: [str(table.parent / p) for p in d.photo])
    monkeypatch.chdir(tmp_path)  # where a relative "in-memory:DataFrame" would have been looked for
    cfg = {"data": {"text_column": "caption", "image_column": "photo", "cache_dir": str(tmp_path / "c")},
           "model": {"tasks": [{"name": "mood"}]}, "optim": {"max_steps": 2, "batch_size": 8},
           "run": {"output_dir": str(tmp_path / "runs"), "name": "df", "progress": False, "plots": False}}  # fmt: skip
    first = fusionkit.train(cfg, data=frame)
    assert fusionkit.train(cfg, data=frame, resume=True)["steps"] == first["steps"]  # not a "changed config"
    assert main(["train", "--resume", str(tmp_path / "runs" / "df")]) != 0
    assert "in-memory dataset; pass it again" in capsys.readouterr().err


def test_resume_with_the_same_command_naming_its_classes_is_not_a_change(tmp_path: Path) -> None:
    """Classes listed in the config (in the user's order), with the weights and prior the data fits: the
    same command with resume continues the run; naming other classes is still a change."""
    table = write_table(tmp_path / "data", n=24)
    task = {"name": "mood", "class_names": ["sad", "happy", "meh"], "class_weights": "balanced", "logit_adjustment": 1.0}
    cfg = {"data": {"dataset": str(table), "text_column": "caption", "image_column": "photo",
                    "cache_dir": str(tmp_path / "c")},
           "model": {"tasks": [task]}, "optim": {"max_steps": 2, "batch_size": 8},
           "run": {"output_dir": str(tmp_path / "runs"), "name": "named", "progress": False, "plots": False}}  # fmt: skip
    first = fusionkit.train(cfg)
    assert fusionkit.train(cfg, resume=True)["steps"] == first["steps"] == 2  # not refused as "changed"
    other = {**cfg, "model": {"tasks": [{**task, "class_names": ["happy", "sad", "meh"]}]}}
    with pytest.raises(Exception, match="changed config"):
        fusionkit.train(other, resume=True)


def test_logit_adjustment_prior_is_fitted_saved_and_kept_on_resume(tmp_path: Path) -> None:
    """The prior comes from the train split's labels, is saved with the model, and a resumed run keeps it."""
    table = write_table(tmp_path / "data", n=24)
    cfg = {"data": {"dataset": str(table), "text_column": "caption", "image_column": "photo",
                    "cache_dir": str(tmp_path / "c")},
           "model": {"tasks": [{"name": "mood", "logit_adjustment": 1.0}]},
           "optim": {"max_steps": 2, "batch_size": 8},
           "run": {"output_dir": str(tmp_path / "runs"), "name": "la", "progress": False, "plots": False}}  # fmt: skip
    first = fusionkit.train(cfg)
    again = fusionkit.train(cfg, resume=True)  # the fitted prior is not a config change
    assert again["steps"] == first["steps"] == 2
    run = tmp_path / "runs" / "la"
    train_ids = set(json.loads((run / "split.json").read_text())["train"])
    moods = [r["mood"] for r in csv.DictReader(table.open()) if r["id"] in train_ids]
    saved = fusionkit.FusionModel.from_pretrained(run).config.tasks[0]
    expected = [round(moods.count(c) / len(moods), 6) for c in saved.class_names]
    assert saved.logit_adjustment == 1.0 and saved.class_prior == expected


def test_an_unlabelled_test_split_is_predicted_and_said_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A withheld test set (labels kept elsewhere, like MVSA-Single's): predictions, no made-up scores."""
    table = write_table(tmp_path / "data", label_every=2)  # odd rows have no mood
    ids = [f"t{i}" for i in range(64)]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids[:40:2] + ids[41::2], "val": ids[40::2], "test": ids[1:40:2]}))
    assert main(train_args(table, tmp_path / "runs", "withheld", "--data.split_file", str(split))) == 0
    out = capsys.readouterr().out
    assert "val: loss=" in out and "mood/accuracy=" in out  # the labelled split is scored
    assert "test: no labels to score; predictions in predictions_test.csv" in out
    rows = list(csv.DictReader((tmp_path / "runs" / "withheld" / "predictions_test.csv").open()))
    assert [r["id"] for r in rows] == ids[1:40:2] and {r["mood"] for r in rows} <= set(MOODS)
    assert {r["mood_true"] for r in rows} == {""}  # withheld: no label to write beside them


def test_a_relative_dataset_on_the_command_line_is_found_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = write_table(tmp_path / "data", n=24)
    monkeypatch.chdir(tmp_path / "data")
    argv = train_args(Path("tweets.csv"), tmp_path / "runs", "rel")
    assert main(argv) == 0
    saved = json.loads((tmp_path / "runs" / "rel" / "config.json").read_text())["data"]["dataset"]
    assert saved == str(table)
    monkeypatch.chdir(tmp_path)  # another directory, later
    assert main(["eval", str(tmp_path / "runs" / "rel"), "--output", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["val/mood/accuracy"] >= 0


def test_a_saved_hf_dataset_with_relative_image_paths_is_evaluated_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths of a `save_to_disk` folder are relative to the working directory at training: the run
    records that folder (data.image_root), so eval finds the same images, not `./img0.png` of wherever it runs."""
    import datasets as hf
    import pandas as pd

    write_table(tmp_path / "data", n=24)
    hf.Dataset.from_pandas(pd.read_csv(tmp_path / "data" / "tweets.csv", dtype=str)).save_to_disk(tmp_path / "hf")
    monkeypatch.chdir(tmp_path / "data")
    assert main(train_args(tmp_path / "hf", tmp_path / "runs", "hfrel")) == 0
    run = tmp_path / "runs" / "hfrel"
    assert json.loads((run / "config.json").read_text())["data"]["image_root"] == str(tmp_path / "data")
    metrics = json.loads((run / "summary.json").read_text())["test"]
    elsewhere = tmp_path / "elsewhere"
    write_table(elsewhere, n=24, name="decoy.csv")  # other images under the same names
    for i in range(24):
        Image.new("RGB", (8, 8), (i, i, i)).save(elsewhere / f"img{i}.png")
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(run), "--split", "test", "--output", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["test/mood/accuracy"] == pytest.approx(metrics["test/mood/accuracy"])
    assert again["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)


def test_eval_of_the_runs_split_refuses_rows_that_changed_since_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Without an id column rows are named by position: a reordered file must not be scored as the held-out rows."""
    table = write_table(tmp_path / "data", n=30)
    rows = list(csv.DictReader(table.open()))
    noid = tmp_path / "data" / "noid.csv"

    def write(rs: list[dict[str, str]]) -> None:
        with noid.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["caption", "photo", "mood"])
            w.writeheader()
            w.writerows({k: r[k] for k in ("caption", "photo", "mood")} for r in rs)

    write(rows)
    assert main(train_args(noid, tmp_path / "runs", "noid")) == 0
    run = str(tmp_path / "runs" / "noid")
    assert main(["eval", run, "--split", "test"]) == 0  # unchanged: scored
    write(rows[::-1])
    capsys.readouterr()
    assert main(["eval", run, "--split", "test"]) == 1
    err = capsys.readouterr().err
    assert "the test split of" in err and "changed content" in err and "--split all" in err
    assert main(["eval", run, "--data", str(noid), "--split", "all"]) == 0  # a deliberate choice of rows
    # naming the same file, or predicting (no labels read), holds the same split to the same check
    assert main(["eval", run, "--data", str(noid), "--split", "test"]) == 1
    out = tmp_path / "p.csv"
    assert main(["predict", run, "--split", "test", "--output", str(out)]) == 1 and not out.exists()
    write(rows)
    assert main(["predict", run, "--split", "test", "--output", str(out)]) == 0
    # a run's label report is one of its own files: never an --output
    (tmp_path / "runs" / "noid" / "skipped_labels.jsonl").write_text("{}\n")
    capsys.readouterr()
    assert main(["predict", run, "--split", "test", "--output", run + "/skipped_labels.jsonl"]) == 2
    assert "would overwrite a file of the run" in capsys.readouterr().err


def test_eval_of_rows_without_labels_says_so(trained_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    root, table = trained_run
    rows = list(csv.DictReader(table.open()))
    blank = tmp_path / "blank.csv"
    with blank.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "mood": "", "photo": str(table.parent / r["photo"])} for r in rows[:6])
    out = tmp_path / "m.json"
    capsys.readouterr()
    argv = ["eval", str(root / "runs" / "r1"), "--data", str(blank), "--split", "all", "--output", str(out)]
    assert main(argv) == 2
    assert "no labelled rows to score" in capsys.readouterr().err and not out.exists()


def test_predicting_a_runs_own_split_of_a_csv_reuses_trainings_caches(tmp_path: Path) -> None:
    """`predict RUN --ensemble RUN2` of two frozen-encoder seeds on the run's test split reads the caches
    training built (the rows read with their labels, as training read them): no new data cache or features.
    Unlabelled rows (every 4th row labelled here) are predicted all the same."""
    table = write_table(tmp_path / "data", label_every=4)
    runs = tmp_path / "runs"
    for name, seed in (("s0", "0"), ("s1", "1")):
        assert main(train_args(table, runs, name, "--model.freeze", "encoders", "--run.seed", seed)) == 0
    cache = runs / "cache"
    built = sorted(p.name for p in cache.iterdir())
    out = tmp_path / "p.csv"
    assert main(["predict", str(runs / "s0"), "--ensemble", str(runs / "s1"), "--output", str(out)]) == 0
    test = json.loads((runs / "s0" / "split.json").read_text())["test"]
    assert sorted(r["id"] for r in csv.DictReader(out.open())) == sorted(test)
    assert sorted(p.name for p in cache.iterdir()) == built


@pytest.mark.parametrize("case", ["skipped_sides", "label_typo_under_skip", "rows_appended", "train_image_deleted"])
def test_predict_of_a_runs_own_split_after_the_table_changed_around_it(tmp_path: Path, case: str) -> None:
    """The run's test split is predicted, all of it and only it, when the table holds rows training skipped
    (missing sides under skip), a test row's label became unreadable (on_error: skip), rows were appended, or
    the image of a train row was deleted (the split is read alone: another split's rows are not checked)."""
    table = write_table(tmp_path / "data", n=48)
    rows = list(csv.DictReader(table.open()))
    extra = {"skipped_sides": ["--data.missing_text", "skip", "--data.missing_image", "skip"],
             "label_typo_under_skip": ["--data.on_error", "skip"]}.get(case, [])  # fmt: skip
    if case == "skipped_sides":
        rows[5]["caption"], rows[17]["photo"] = "", ""
    _write_rows(table, rows)
    runs = tmp_path / "runs"
    assert main(train_args(table, runs, "r", "--model.freeze", "encoders", *extra)) == 0
    test = json.loads((runs / "r" / "split.json").read_text())["test"]
    if case == "label_typo_under_skip":
        for r in rows:
            r["mood"] = "sadd" if r["id"] == test[0] else r["mood"]
    if case == "rows_appended":
        rows += [{**rows[0], "id": "new1"}, {**rows[1], "id": "new2"}]
    if case == "train_image_deleted":
        train = json.loads((runs / "r" / "split.json").read_text())["train"]
        (table.parent / next(r["photo"] for r in rows if r["id"] == train[0])).unlink()
    _write_rows(table, rows)
    out = tmp_path / "p.csv"
    assert main(["predict", str(runs / "r"), "--output", str(out)]) == 0
    assert sorted(r["id"] for r in csv.DictReader(out.open())) == sorted(test)
    if case == "train_image_deleted":
        assert main(["eval", str(runs / "r"), "--split", "test"]) == 0
        (table.parent / next(r["photo"] for r in rows if r["id"] == test[0])).unlink()  # one the split needs
        assert main(["predict", str(runs / "r"), "--output", str(tmp_path / "p2.csv")]) == 1
        assert not (tmp_path / "p2.csv").exists()


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_predict_on_a_file_with_other_column_names_is_refused_not_guessed(
    trained_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A new file naming its columns differently: an error listing them (never a prediction from placeholders),
    and with --text-column / --image-column the same rows predict."""
    root, table = trained_run
    rows = [{"id": r["id"], "text": r["caption"], "img": r["photo"]} for r in csv.DictReader(table.open())][:6]
    renamed = table.parent / "renamed.csv"
    _write_rows(renamed, rows)
    out = tmp_path / "p.csv"
    run = str(root / "runs" / "r1")
    assert main(["predict", run, "--data", str(renamed), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "neither the caption column 'caption' nor the image column 'photo'" in err and "'img'" in err
    assert not out.exists()
    assert main(["predict", run, "--data", str(renamed), "--output", str(out), "--text-column", "text",
                 "--image-column", "img"]) == 0  # fmt: skip
    assert [r["id"] for r in csv.DictReader(out.open())] == [r["id"] for r in rows]
    # only the image column renamed: eval refuses it as predict does (it scored the model from captions alone)
    labelled = [{"id": r["id"], "caption": r["caption"], "img": r["photo"], "mood": r["mood"]}
                for r in csv.DictReader(table.open())][:6]  # fmt: skip
    _write_rows(renamed, labelled)
    for command in (["predict", run, "--output", str(tmp_path / "q.csv")], ["eval", run]):
        assert main([*command, "--data", str(renamed)]) == 1, command
        assert "no column 'photo'" in capsys.readouterr().err


def test_a_row_with_neither_side_and_a_misspelled_id_column_are_errors(tmp_path: Path, capsys) -> None:
    table = write_table(tmp_path / "data", n=12)
    rows = list(csv.DictReader(table.open()))
    rows[4]["caption"], rows[4]["photo"] = "", ""
    _write_rows(table, rows)
    keep = ["--data.missing_text", "keep", "--data.missing_image", "keep"]
    assert main(train_args(table, tmp_path / "runs", "a", *keep)) == 1
    assert "item t4: row has neither a caption nor an image" in capsys.readouterr().err
    assert main(train_args(table, tmp_path / "runs", "b", *keep, "--data.on_error", "skip")) == 0  # skipped, reported
    assert main(train_args(table, tmp_path / "runs", "c", *keep, "--data.id_column", "ID")) != 0
    err = capsys.readouterr().err
    assert "no column 'ID' (did you mean 'id'?) (data.id_column)" in err
    assert not (tmp_path / "runs" / "c").exists()
    model = fusionkit.FusionModel.from_pretrained(tmp_path / "runs" / "b")
    with pytest.raises(ValueError, match=r"pairs \[1\] have neither a caption nor an image"):
        model.predict(texts=["great sunny day", None], images=[None, None])


def test_image_paths_read_from_the_wrong_folder_say_where_they_were_looked_for(tmp_path: Path, capsys) -> None:
    table = write_table(tmp_path / "data", n=12)
    moved = tmp_path / "sub" / "tweets.csv"  # the table moved, its relative image paths did not
    moved.parent.mkdir()
    moved.write_bytes(table.read_bytes())
    assert main(train_args(moved, tmp_path / "runs", "a")) == 1
    err = capsys.readouterr().err
    assert f"looked for {moved.parent / 'img0.png'}" in err and f"read from {moved.parent}" in err
    assert "missing_image=skip" in err  # not "keep": a path that names no file is a mistake
    # kept as missing, not one image would be found: an error, not a text-only model
    assert main(train_args(moved, tmp_path / "runs", "b", "--data.missing_image", "keep")) == 1
    assert "none of its 12 image paths names a file" in capsys.readouterr().err


def test_eval_reads_labels_from_a_column_of_another_name(trained_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    root, table = trained_run
    rows = [{**{k: v for k, v in r.items() if k != "mood"}, "Stimmung": r["mood"]} for r in csv.DictReader(table.open())]
    renamed = table.parent / "renamed_labels.csv"
    _write_rows(renamed, rows)
    run = str(root / "runs" / "r1")
    assert main(["eval", run, "--data", str(renamed)]) != 0
    err = capsys.readouterr().err
    assert "none of the label columns of this model's tasks (mood: 'mood')" in err and "'Stimmung'" in err
    assert "--label-column TASK=COLUMN" in err
    out = tmp_path / "m.json"
    assert main(["eval", run, "--data", str(renamed), "--label-column", "Stimmung", "--output", str(out)]) == 0
    same = tmp_path / "same.json"
    assert main(["eval", run, "--data", str(table), "--output", str(same)]) == 0
    got, expected = json.loads(out.read_text()), json.loads(same.read_text())
    assert got["all/mood/accuracy"] == expected["all/mood/accuracy"]


def test_a_moved_dataset_and_a_resume_of_no_run_dir_say_what_to_do(
    trained_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, table = trained_run
    run = root / "runs" / "r1"
    moved = table.with_name("moved.csv")
    table.rename(moved)
    try:
        assert main(["eval", str(run)]) == 1
        assert "pass --data NEW_PATH --split val" in capsys.readouterr().err
        assert main(["eval", str(run), "--data", str(moved), "--split", "val"]) == 0
    finally:
        moved.rename(table)
    step = next((run / "checkpoints").iterdir())
    assert main(["train", "--resume", str(step)]) == 2
    assert f"not a run dir (no config.yaml); the run dir is {run}" in capsys.readouterr().err


def test_a_contrastive_model_scores_and_predicts_rows_without_images(tmp_path: Path) -> None:
    """No complete pair in a batch: the contrastive task has nothing to rank (no crash), the labelled task is
    scored; retrieval over such rows is refused rather than counted as hits."""
    table = write_table(tmp_path / "data", n=24)
    tasks = '[{"name": "mood"}, {"name": "align", "type": "contrastive", "weight": 0.5}]'
    assert main(train_args(table, tmp_path / "runs", "r", "--model.tasks", tasks,
                           "--data.missing_image", "keep")) == 0  # fmt: skip
    rows = [{**r, "photo": ""} for r in csv.DictReader(table.open())]
    text_only = table.with_name("text_only.csv")
    _write_rows(text_only, rows)
    out = tmp_path / "m.json"
    assert main(["eval", str(tmp_path / "runs" / "r"), "--data", str(text_only), "--output", str(out)]) == 0
    assert "all/mood/accuracy" in json.loads(out.read_text())
    assert main(["predict", str(tmp_path / "runs" / "r"), "--data", str(text_only),
                 "--output", str(tmp_path / "p.csv")]) == 0  # fmt: skip
    r1 = []
    for batch_size in ("3", "64"):  # R@1 ranks every caption against every image of the data, in any batches
        assert main(["eval", str(tmp_path / "runs" / "r"), "--data", str(table), "--batch-size", batch_size,
                     "--output", str(out)]) == 0  # fmt: skip
        r1.append(json.loads(out.read_text())["all/align/r@1"])
    assert r1[0] == r1[1]
    vectors = np.random.default_rng(0).normal(size=(4, 8))
    with pytest.raises(ValueError, match="NaN"):
        fusionkit.embedding.retrieval_recall(vectors, np.where(np.arange(4)[:, None] == 1, np.nan, vectors))


def test_an_output_inside_a_cache_folder_is_refused(trained_run: tuple[Path, Path], capsys) -> None:
    root, _ = trained_run
    store = next(p.parent for p in (root / "runs" / "cache").rglob("meta.json"))
    before = (store / "meta.json").read_bytes()
    run = str(root / "runs" / "r1")
    assert main(["eval", run, "--output", str(store / "meta.json")]) == 2
    assert main(["predict", run, "--output", str(store / "new.csv")]) == 2
    assert "is inside the cache folder" in capsys.readouterr().err
    assert (store / "meta.json").read_bytes() == before and not (store / "new.csv").exists()


def test_embed_of_a_run_without_data_embeds_all_its_rows(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, table = trained_run  # as `embed --help` says: all of the run's data, not its test split
    assert main(["embed", str(root / "runs" / "r1"), "--output", str(tmp_path / "v.npy")]) == 0
    ids = json.loads((tmp_path / "v.ids.json").read_text())
    assert ids == [r["id"] for r in csv.DictReader(table.open())] and np.load(tmp_path / "v.npy").shape[0] == len(ids)


def test_a_killed_writers_temp_file_beside_the_output_is_swept(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = trained_run
    dead = tmp_path / ".preds.tmp-999999.csv"  # what a SIGKILLed predict leaves (no `finally` ran)
    dead.write_text("id,mood\nhalf")
    assert main(["predict", str(root / "runs" / "r1"), "--output", str(tmp_path / "preds.csv")]) == 0
    assert not dead.exists() and [p.name for p in tmp_path.iterdir()] == ["preds.csv"]


def test_a_skipped_label_costs_that_task_only(tmp_path: Path) -> None:
    """Under on_error="skip" a bad mood (or an infinite score) leaves that row's other labels in place."""
    examples = [
        fusionkit.data.Example("a", "x", b"", {"mood": "happy", "score": "inf", "topic": "food"}),
        fusionkit.data.Example("b", "x", b"", {"mood": "angry", "score": "0.5", "topic": "sport"}),
    ]
    tasks = [fusionkit.TaskConfig("mood", class_names=["happy", "sad"]), fusionkit.TaskConfig("topic"),
             fusionkit.TaskConfig("score", type="regression")]  # fmt: skip
    ds, _ = bind_labels(fusionkit.MultimodalDataset(examples, {}), tasks, on_error="skip",
                        report_path=tmp_path / "skipped.jsonl")  # fmt: skip
    assert [ex.labels for ex in ds] == [{"mood": 0, "topic": 0, "score": None},
                                        {"mood": None, "topic": 1, "score": 0.5}]  # fmt: skip
    reported = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["item"] for r in reported) == ["a", "b"]


def test_a_keep_policy_that_kept_no_imageless_row_still_warns(tmp_path: Path, caplog) -> None:
    """data.missing_image keep on complete data trains no image placeholder: predicting without images is warned
    about as for any model that never saw such rows (the policy alone silenced it)."""
    table = write_table(tmp_path / "data", 24)
    assert main(train_args(table, tmp_path / "runs", "k", "--data.missing_image", "keep")) == 0
    model = fusionkit.FusionModel.from_pretrained(tmp_path / "runs" / "k")
    assert model.trained_without == ()
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        model.predict(texts=["a caption"], images=[None])
    assert "which this model was not trained for" in caplog.text


def test_predicting_rows_without_an_image_warns_only_a_model_that_never_saw_such_rows(tmp_path: Path, caplog) -> None:
    table = write_table(tmp_path / "data", 30)
    rows = list(csv.DictReader(table.open()))
    for r in rows[::4]:
        r["photo"] = ""
    gappy = tmp_path / "data" / "gappy.csv"
    with gappy.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    warned = {}
    for name, extra in (("strict", ("--data.missing_image", "skip")), ("keep", ("--data.missing_image", "keep"))):
        assert main(train_args(gappy, tmp_path / "runs", name, *extra)) == 0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fusionkit"):
            assert main(["predict", str(tmp_path / "runs" / name), "--data", str(gappy),
                         "--output", str(tmp_path / f"{name}.csv")]) == 0  # fmt: skip
        warned[name] = "which this model was not trained for" in caplog.text
        caplog.clear()  # joint vectors of such rows: the same warning
        with caplog.at_level(logging.WARNING, logger="fusionkit"):
            assert main(["embed", str(tmp_path / "runs" / name), "--data", str(gappy),
                         "--output", str(tmp_path / f"{name}.npy")]) == 0  # fmt: skip
        warned[name + " (embed)"] = "which this model was not trained for" in caplog.text
        caplog.clear()  # the same from Python, on the model reloaded from its run dir
        with caplog.at_level(logging.WARNING, logger="fusionkit"):
            fusionkit.FusionModel.from_pretrained(tmp_path / "runs" / name).predict(texts=["a caption"], images=[None])
        warned[name + " (python)"] = "which this model was not trained for" in caplog.text
    caplog.clear()  # an ensemble warns for any member that never saw such rows, whichever is listed first
    keep, strict = (fusionkit.FusionModel.from_pretrained(tmp_path / "runs" / n) for n in ("keep", "strict"))
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        keep.predict(texts=["a caption"], images=[None], ensemble=strict)
    warned["keep + strict (python)"] = caplog.text.count("which this model was not trained for")
    assert warned == {"strict": True, "keep": False, "strict (python)": True, "keep (python)": False,
                      "strict (embed)": True, "keep (embed)": False, "keep + strict (python)": 1}
    # the keep run's split reused by a run that skips imageless rows: those rows leave its splits (said), the rest
    # keep their places (skip vs keep compared on the same test rows)
    keep_split = json.loads((tmp_path / "runs" / "keep" / "split.json").read_text())
    assert main(train_args(gappy, tmp_path / "runs", "strict-same-split", "--data.missing_image", "skip",
                           "--data.split_file", str(tmp_path / "runs" / "keep" / "split.json"))) == 0  # fmt: skip
    reused = json.loads((tmp_path / "runs" / "strict-same-split" / "split.json").read_text())
    imageless = {r["id"] for r in rows if not r["photo"]}
    assert reused["test"] == [i for i in keep_split["test"] if i not in imageless] and imageless
    # a model that trained on imageless rows: a new file without the image column is fine, a path naming no file
    # in a new file is still a mistake (as for any model), not a row without an image
    keep = str(tmp_path / "runs" / "keep")
    with gappy.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "photo"])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k != "photo"} for r in rows)
    assert main(["predict", keep, "--data", str(gappy), "--output", str(tmp_path / "no_images.csv")]) == 0
    typo = tmp_path / "data" / "typo.csv"
    typo.write_text("id,caption,photo\nq1,a caption,nope.png\n")
    assert main(["predict", keep, "--data", str(typo), "--output", str(tmp_path / "typo_out.csv")]) == 1  # DataError


def test_label_spellings_from_pandas_and_a_declared_class_count_that_the_data_lacks() -> None:
    tags = fusionkit.TaskConfig("y", type="multilabel")
    ds, [cfg] = bind_labels(_raw(["['red', 'small']", '["red"]', "small|red", "[]"]), [tags])
    assert cfg.class_names == ["red", "small"] and [ex.labels["y"] for ex in ds] == [[0, 1], [0], [0, 1], []]
    # an int column with gaps: "2.0" in pandas' CSV, the float 2.0 in its Parquet copy: one set of classes
    _, [from_csv] = bind_labels(_raw(["1.0", "2.0", "10.0", ""]), [fusionkit.TaskConfig("y")])
    _, [from_parquet] = bind_labels(_raw([1.0, 2.0, 10.0, float("nan")]), [fusionkit.TaskConfig("y")])
    assert from_csv.class_names == from_parquet.class_names == ["1", "2", "10"]
    with pytest.raises(ConfigError, match=r"num_classes=4 but the data has 3 classes .*list all 4 in"):
        bind_labels(_raw(["bird", "cat", "dog"]), [fusionkit.TaskConfig("y", num_classes=4)])
    # a zero-width space or full-width letters: a second class that looks like the first one
    for twin in ("happy\u200b", "\uff48\uff41\uff50\uff50\uff59"):
        with pytest.raises(ConfigError, match=r"differ only in case or spelling"):
            bind_labels(_raw(["happy", twin, "sad"]), [fusionkit.TaskConfig("y")])


def split_sad_apart(tmp_path: Path, parts: Callable[[list[str], list[str]], dict]) -> tuple[Path, Path]:
    """A 36-row table and a split file placing its 'sad' rows by `parts(rest, sad) -> {split: ids}`."""
    table = write_table(tmp_path / "data", 36)
    rows = list(csv.DictReader(table.open()))
    sad = [r["id"] for r in rows if r["mood"] == "sad"]
    rest = [r["id"] for r in rows if r["mood"] != "sad"]
    split = tmp_path / "split.json"
    split.write_text(json.dumps(parts(rest, sad)))
    return table, split


def test_a_class_missing_from_train_is_said_and_its_rows_keep_a_finite_loss(tmp_path: Path, caplog) -> None:
    table, split = split_sad_apart(tmp_path, lambda rest, sad: {"train": rest[:18], "val": rest[18:] + sad[:4],
                                                                "test": sad[4:]})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(train_args(table, tmp_path / "runs", "r", "--data.split_file", str(split),
                               "--model.tasks.mood.class_weights", "balanced")) == 0  # fmt: skip
    assert "class(es) ['sad'] have labelled val/test rows but none in train" in caplog.text
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert np.isfinite(summary["test"]["test/loss"])  # a test split of that class only: 0/0 before


def test_class_names_listed_as_the_file_spells_them_match_its_labels(tmp_path: Path) -> None:
    """`class_names: ["True", "False"]` for a CSV's True/False cells, `"sad "` for cells with that trailing space:
    labels are read stripped and booleans lower-case, and the listed names are read the same way (they were refused
    as 'unknown label'); the model keeps them in that spelling, in the listed order."""
    table = write_table(tmp_path / "data", 24)
    rows = list(csv.DictReader(table.open()))
    for r in rows:
        r["flag"], r["mood"] = str(r["mood"] == "happy"), r["mood"] + " " * (r["mood"] == "sad")
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tasks = [{"name": "flag", "class_names": ["True", "False"]}, {"name": "mood", "class_names": ["sad ", "meh", "happy"]}]
    assert main([*train_args(table, tmp_path / "runs", "r", "--optim.max_steps", "1"), "--model.tasks",
                 json.dumps(tasks)]) == 0  # fmt: skip
    model = fusionkit.FusionModel.from_pretrained(tmp_path / "runs" / "r")
    assert model.class_names == {"flag": ["true", "false"], "mood": ["sad", "meh", "happy"]}
    with pytest.raises(ConfigError, match="'True' and 'true' are one class"):
        fusionkit.build_config(None, {"model.tasks": [{"name": "flag", "class_names": ["True", "true"]}]})


def test_a_class_with_train_rows_but_none_in_val_is_said(tmp_path: Path, caplog) -> None:
    """A rare class that the split put in train only: val's macro-F1 chooses the checkpoint without it."""
    table, split = split_sad_apart(tmp_path, lambda rest, sad: {"train": rest[:18] + sad[:6], "val": rest[18:],
                                                                "test": sad[6:]})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(train_args(table, tmp_path / "runs", "r", "--data.split_file", str(split),
                               "--optim.max_steps", "1")) == 0  # fmt: skip
    assert "class(es) ['sad'] have labelled train rows but none in val" in caplog.text
    assert "have labelled val/test rows but none in train" not in caplog.text


def test_a_file_whose_every_row_is_skipped_is_an_error_not_an_empty_output(
    trained_run: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    root, _ = trained_run
    bad = tmp_path / "bad.csv"
    bad.write_text("id,caption,photo,mood\na,x,gone.jpg,happy\nb,y,gone2.jpg,sad\n")
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", str(root / "runs" / "r1"), "--data", str(bad), "--on-error", "skip",
                 "--output", str(out)]) == 1  # fmt: skip
    # every path names no file: said as such (relative to the wrong folder?), not as rows that were skipped
    assert "none of its 2 image paths names a file" in capsys.readouterr().err and not out.exists()
    for name in ("gone.jpg", "gone2.jpg"):  # files that are there but no image: each row skipped, none left
        (tmp_path / name).write_text("not an image")
    assert main(["predict", str(root / "runs" / "r1"), "--data", str(bad), "--on-error", "skip",
                 "--output", str(out)]) == 1  # fmt: skip
    assert "no readable rows left" in capsys.readouterr().err and not out.exists()


def test_an_existing_file_at_the_output_is_kept_beside_it(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, table = trained_run
    out = tmp_path / "notes.csv"
    out.write_text("my,hand,labelled,notes\n")
    run = str(root / "runs" / "r1")
    assert main(["predict", run, "--data", str(table), "--output", str(out)]) == 0
    assert (tmp_path / "notes.csv.~1~").read_text() == "my,hand,labelled,notes\n"
    first = out.read_text()
    assert first.startswith("id,mood")
    assert main(["predict", run, "--data", str(table), "--output", str(out)]) == 0
    assert (tmp_path / "notes.csv.~2~").read_text() == first and out.read_text() == first


def test_a_rare_label_that_looks_like_a_large_class_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """'Postive' once beside 'Positive' 10 times became a fourth class in every output, without a word."""
    labels = ["Positive"] * 10 + ["negative"] * 10 + ["Postive", "meh"]
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        _, [cfg] = bind_labels(_raw(labels), [fusionkit.TaskConfig("y")])
    assert cfg.class_names == ["Positive", "Postive", "meh", "negative"]  # still a class: said, not refused
    assert "label 'Postive' has 1 row(s)" in caplog.text and "looks like 'Positive' (10 rows)" in caplog.text
    assert "'meh'" not in caplog.text  # rare, but like no other class
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        bind_labels(_raw(labels), [fusionkit.TaskConfig("y", class_names=["Positive", "Postive", "meh", "negative"])])
    assert "a typo?" not in caplog.text  # listed by the user: meant
