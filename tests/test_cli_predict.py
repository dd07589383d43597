"""`fusionkit predict | eval` on files other than the run's own: where their images are read from, the
checks on its held-out rows and its ensemble members, and what the commands say."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionkit.cli import main

NAMES = ("positive", "neutral", "negative")
QUIET = ["--run.progress", "false", "--run.plots", "false"]


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained on tables/posts.csv whose image paths are relative to data/ (`--data.image_root data`)."""
    from fusionkit.data import make_synthetic

    tmp = tmp_path_factory.mktemp("pred")
    (tmp / "tables").mkdir()
    (tmp / "data" / "pics").mkdir(parents=True)
    with open(tmp / "tables" / "posts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "image", "sentiment"])
        for ex in make_synthetic(40, seed=1, image_size=32):
            ex.image.save(tmp / "data" / "pics" / f"{ex.id}.png")
            writer.writerow([ex.id, ex.text, f"pics/{ex.id}.png", ex.labels["sentiment"]])
    argv = ["train", "--data.dataset", str(tmp / "tables" / "posts.csv"), "--data.image_root", str(tmp / "data"),
            "--data.cache_dir", str(tmp / "cache"), "--optim.epochs", "1", "--run.output_dir", str(tmp / "runs"),
            "--run.name", "r", *QUIET]  # fmt: skip
    assert main(argv) == 0
    return tmp / "runs" / "r"


def _probs(path: Path) -> np.ndarray:
    return np.array([[float(r[f"sentiment_prob_{c}"]) for c in NAMES] for r in csv.DictReader(path.open())])


def test_a_new_files_image_paths_are_read_from_its_own_folder_not_the_runs_image_root(
    csv_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run's data.image_root is where its own rows' images are; a --data file's relative paths are read
    from that file's folder (or --image-root), even where the run's folder has an image of the same name."""
    tmp = csv_run.parent.parent
    Image.new("RGB", (32, 32), (220, 20, 20)).save(tmp / "data" / "pics" / "n0.png")  # the run's: red
    (tmp_path / "batch2" / "pics").mkdir(parents=True)
    blue = tmp_path / "batch2" / "pics" / "n0.png"
    Image.new("RGB", (32, 32), (20, 20, 220)).save(blue)
    cache = ["--cache-dir", str(tmp / "cache")]

    def predict(rows: str, *extra: str, name: str = "new.csv") -> np.ndarray:
        table, out = tmp_path / "batch2" / name, tmp_path / f"{name}.preds.csv"
        table.write_text("id,text,image\n" + rows)
        assert main(["predict", str(csv_run), "--data", str(table), "--output", str(out), *cache, *extra]) == 0
        return _probs(out)

    as_blue = predict(f"B0,item,{blue}\n", name="abs_blue.csv")
    as_red = predict(f"B0,item,{tmp / 'data' / 'pics' / 'n0.png'}\n", name="abs_red.csv")
    assert not np.allclose(as_blue, as_red, atol=1e-4)  # the model tells the two images apart
    np.testing.assert_allclose(predict("B0,item,pics/n0.png\n"), as_blue, atol=1e-6)
    # --image-root names the folder; the run's own split is still read with the run's image_root
    np.testing.assert_allclose(predict("B0,item,pics/n0.png\n", "--image-root", str(tmp / "data"), name="r.csv"),
                               as_red, atol=1e-6)  # fmt: skip
    broken = tmp_path / "batch2" / "broken.csv"
    broken.write_text("id,text,image\nB1,item,pics/n1.png\n")
    assert main(["predict", str(csv_run), "--data", str(broken), "--output", str(tmp_path / "b.csv"), *cache]) == 1
    assert f"relative paths are read from {blue.parent.parent}, the table file's own folder" in capsys.readouterr().err
    assert main(["predict", str(csv_run), "--output", str(tmp_path / "test.csv"), *cache]) == 0
    test = json.loads((csv_run / "split.json").read_text())["test"]
    assert [r["id"] for r in csv.DictReader((tmp_path / "test.csv").open())] == test


def test_every_ensemble_member_is_checked_before_any_runs_and_a_bare_model_folder_is_named(
    csv_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A member that trained on the scored rows is refused before any member's inference; a member saved by
    save_pretrained has no split.json, so its training rows are unknown: said, naming it."""
    import fusionkit.training.inference as inference
    from fusionkit.models import FusionModel

    tmp = csv_run.parent.parent
    argv = ["train", "--data.dataset", str(tmp / "tables" / "posts.csv"), "--data.image_root", str(tmp / "data"),
            "--data.cache_dir", str(tmp / "cache"), "--optim.epochs", "1", "--run.output_dir", str(tmp_path),
            "--run.name", "resplit", "--data.split_seed", "5", *QUIET]  # fmt: skip
    assert main(argv) == 0
    runs: list[object] = []
    real = inference.run_inference
    monkeypatch.setattr(inference, "run_inference", lambda *a, **k: runs.append(a) or real(*a, **k))
    cache = ["--cache-dir", str(tmp / "cache")]
    out = tmp_path / "m.json"
    assert main(["eval", str(csv_run), "--ensemble", str(tmp_path / "resplit"), "--output", str(out), *cache]) == 2
    assert "resplit was trained on" in capsys.readouterr().err and not runs and not out.exists()
    bare = tmp_path / "bare"
    FusionModel.from_pretrained(csv_run).save_pretrained(bare)
    with caplog.at_level("WARNING", logger="fusionkit"):
        assert main(["eval", str(csv_run), "--ensemble", str(bare), "--output", str(out), *cache]) == 0
    assert f"--ensemble: {bare} is a model folder, not a run dir: the rows it trained on are unknown" in caplog.text
    assert "the score is inflated" in caplog.text and len(runs) == 2


def test_scoring_the_runs_split_of_a_moved_file_checks_its_content(
    csv_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--data NEW_PATH --split test` (what the error for a moved dataset says to do) scores the run's held-out
    rows only if they are the rows it held out: an edited label is refused, as in the run's own file."""
    tmp = csv_run.parent.parent
    test = json.loads((csv_run / "split.json").read_text())["test"]
    rows = list(csv.reader((tmp / "tables" / "posts.csv").open()))
    moved = tmp / "data" / "moved.csv"  # beside the images its paths name
    cache = ["--cache-dir", str(tmp / "cache")]
    argv = ["eval", str(csv_run), "--data", str(moved), "--split", "test", *cache]

    def write(table: list[list[str]]) -> None:
        with open(moved, "w", newline="") as f:
            csv.writer(f).writerows(table)

    write(rows)
    assert main(argv) == 0  # the same rows: scored
    edited = [[*r[:3], next(c for c in NAMES if c != r[3])] if r[0] == test[0] else r for r in rows]
    write(edited)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the test split of" in err and "changed content" in err and "--split all" in err


def test_an_ensemble_of_other_classes_is_refused_naming_them_in_the_models_order(
    csv_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = csv_run.parent.parent
    classes = ["positive", "neutral", "negative", "angry"]
    argv = ["train", "--data.dataset", str(tmp / "tables" / "posts.csv"), "--data.image_root", str(tmp / "data"),
            "--data.cache_dir", str(tmp / "cache"), "--optim.max_steps", "1", "--run.output_dir", str(tmp_path),
            "--run.name", "more", "--model.tasks", json.dumps([{"name": "sentiment", "class_names": classes}]),
            *QUIET]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["eval", str(csv_run), "--ensemble", str(tmp_path / "more")]) == 2
    err = capsys.readouterr().err
    assert "other tasks or classes" in err and str(classes) in err  # as the model lists them, not sorted


def test_progress_bars_only_on_a_terminal_and_not_where_turned_off(
    csv_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bar's carriage returns fill a log file: bars are drawn on a terminal only, and not for a run trained
    with run.progress: false, nor with --no-progress."""
    import sys

    from fusionkit.models import FusionModel

    tmp = csv_run.parent.parent
    bare = tmp_path / "bare"  # no run config: bars by default
    FusionModel.from_pretrained(csv_run).save_pretrained(bare)
    table = tmp / "data" / "two.csv"
    table.write_text("id,text,image\nq0,one,pics/syn-000000.png\nq1,two,pics/syn-000001.png\n")

    def bar(checkpoint: Path, *extra: str, tty: bool = True, command: str = "predict") -> bool:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        capsys.readouterr()
        out = tmp_path / ("p.csv" if command == "predict" else "v.npy")
        argv = [command, str(checkpoint), "--data", str(table), "--output", str(out), *extra]
        assert main([*argv, "--cache-dir", str(tmp / "cache")]) == 0
        return "/s]" in capsys.readouterr().err  # a tqdm line's rate: "..., 10.0it/s]"

    assert bar(bare)
    assert not bar(bare, tty=False)
    assert not bar(bare, "--no-progress")
    assert not bar(csv_run)  # trained with run.progress: false
    assert bar(bare, command="embed") and not bar(bare, "--no-progress", command="embed")  # embed alike


def test_one_pairs_relative_image_is_read_from_image_root(csv_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = csv_run.parent.parent / "data"
    argv = ["predict", str(csv_run), "--text", "hi", "--image", "pics/syn-000000.png"]
    assert main([*argv, "--image-root", str(data)]) == 0
    from_root = json.loads(capsys.readouterr().out)
    assert main(["predict", str(csv_run), "--text", "hi", "--image", str(data / "pics" / "syn-000000.png")]) == 0
    assert from_root == json.loads(capsys.readouterr().out)
    assert main(["predict", str(csv_run), "--text", "hi", "--image", ""]) == 0  # no image, as --text "" is no caption
    assert json.loads(capsys.readouterr().out) == json.loads((main(["predict", str(csv_run), "--text", "hi"]),
                                                              capsys.readouterr().out)[1])  # fmt: skip


def test_one_sided_warnings_name_the_cli_input_and_embed_of_a_caption_file_does_not_warn(
    csv_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A single pair without an image is named as the CLI input (not a Python function); `embed` of a file with
    no image column writes text vectors, so 'predicted from the other side alone' would be untrue there."""
    import logging

    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(["predict", str(csv_run), "--text", "a lovely day"]) == 0
    assert "1 of 1 pairs of --text/--image have no image" in caplog.text and "predict()" not in caplog.text
    caplog.clear()
    table = tmp_path / "caps.csv"
    table.write_text("id,text\na,a lovely day\nb,so sad\n")
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(["embed", str(csv_run), "--data", str(table), "--image-column", "",
                     "--output", str(tmp_path / "v.npy")]) == 0  # fmt: skip
    assert "writing text vectors" in caplog.text and "other side alone" not in caplog.text
    caplog.clear()  # one side's own vectors: a row without that side gets NaN, said so; the other side is no matter
    tmp = csv_run.parent.parent
    pic = next((tmp / "data" / "pics").glob("*.png"))
    gappy = tmp_path / "gappy.csv"
    gappy.write_text(f"id,text,image\na,,{pic}\nb,so sad,\nc,fine,{pic}\n")
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(["embed", str(csv_run), "--data", str(gappy), "--modality", "text",
                     "--output", str(tmp_path / "t.npy")]) == 0  # fmt: skip
    assert "1 of 3 rows of" in caplog.text and "have no caption: their text vectors are NaN" in caplog.text
    assert "other side alone" not in caplog.text and "no image" not in caplog.text


def test_a_broken_image_path_gets_a_hint_that_fits_embed_as_well_as_predict(
    csv_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """embed was told to 'empty the cell to predict that row from its caption alone' (predict's wording)."""
    table = tmp_path / "broken.csv"
    table.write_text("id,text,image\nb0,a lovely day,pics/gone.png\n")
    for command, out in (("embed", "v.npy"), ("predict", "p.csv")):
        assert main([command, str(csv_run), "--data", str(table), "--output", str(tmp_path / out)]) == 1
        err = capsys.readouterr().err
        assert "broken.csv:2, item b0: image file not found: 'pics/gone.png'" in err
        assert "Fix the path, give the folder the paths are relative to (--image-root DIR), or empty the cell (the row is then read from its caption alone); --on-error skip" in err
        assert "to predict that row" not in err


def test_eval_of_a_file_without_label_columns_names_what_it_read(csv_run: Path, tmp_path: Path, capsys) -> None:
    table = tmp_path / "caps.csv"
    table.write_text("id,text\na,a lovely day\n")
    assert main(["eval", str(csv_run), "--data", str(table), "--image-column", ""]) == 2
    err = capsys.readouterr().err
    assert "besides those read as caption, image and id: none" in err and "fusionkit predict" in err


def test_a_copied_checkpoint_is_a_model_folder_wherever_it_lies_and_eval_says_what_it_scored(
    csv_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A colleague's checkpoint copied beside a run (named `../ckpt` from inside that run), into a project
    folder with a config.json and split.json of its own, or with a split.json inside it, is a model folder:
    never the run's or project's data and split taken as its own. eval says how many rows it scored, and its
    --output never replaces the --split-file it reads."""
    import shutil

    from fusionkit.training.rundir import follow_pointer

    tmp = csv_run.parent.parent
    best = follow_pointer(csv_run / "best")
    beside = shutil.copytree(best, csv_run.parent / "colleague")
    monkeypatch.chdir(csv_run)
    out = tmp_path / "p.csv"
    assert main(["predict", "../colleague", "--output", str(out)]) == 2  # was: the run's test split, silently
    assert "--data is required when the checkpoint is not inside a run dir" in capsys.readouterr().err
    assert not out.exists()
    shutil.rmtree(beside)

    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"project": "tweets"}')
    shutil.copy(csv_run / "split.json", project / "split.json")
    model = shutil.copytree(best, project / "model")
    shutil.copy(csv_run / "split.json", model / "split.json")  # sent along with the checkpoint
    monkeypatch.chdir(project)
    data = ["--data", str(tmp / "tables" / "posts.csv"), "--image-root", str(tmp / "data")]
    assert main(["eval", "model", *data, "--split", "test"]) == 2  # the project's split.json is not the model's
    assert "--split-file" in capsys.readouterr().err
    assert main(["eval", "model", *data]) == 0
    err = capsys.readouterr().err
    assert "scored 40 rows of the 'all' split: sentiment 40" in err
    assert main(["predict", "model", *data, "--output", str(out)]) == 0  # a split.json inside: still a model
    assert len(list(csv.DictReader(out.open()))) == 40
    mimic = tmp_path / "mimic"  # a config.json of the user's own with a run's keys, beside checkpoints/
    (mimic / "checkpoints").mkdir(parents=True)
    (mimic / "config.json").write_text('{"name": "my project", "model": "x", "data": "y", "run": "z"}')
    shutil.copy(csv_run / "split.json", mimic / "split.json")
    shutil.copytree(best, mimic / "checkpoints" / "step-5")
    assert main(["eval", str(mimic / "checkpoints" / "step-5")]) == 2  # was: AttributeError, a traceback
    assert "--data is required when the checkpoint is not inside a run dir" in capsys.readouterr().err
    split = (project / "split.json").read_text()
    argv = ["eval", "model", *data, "--split", "test", "--split-file", "split.json", "--output", "split.json"]
    assert main(argv) == 2 and "would overwrite the input" in capsys.readouterr().err
    assert (project / "split.json").read_text() == split and not list(project.glob("split.json.~*"))


def test_predict_of_the_runs_own_split_writes_its_labels_as_the_runs_predictions_do(
    csv_run: Path, tmp_path: Path
) -> None:
    """`predict RUN --split test` equals the run's predictions_test.csv, `sentiment_true` included; a new file's
    predictions have no such column (predict reads no labels from it)."""
    out = tmp_path / "p.csv"
    assert main(["predict", str(csv_run), "--split", "test", "--output", str(out)]) == 0
    ours, runs = list(csv.DictReader(out.open())), list(csv.DictReader((csv_run / "predictions_test.csv").open()))
    assert [r["sentiment_true"] for r in ours] == [r["sentiment_true"] for r in runs] and all(
        r["sentiment_true"] in NAMES for r in ours)
    assert [r["sentiment"] for r in ours] == [r["sentiment"] for r in runs]
    tmp = csv_run.parent.parent
    new = tmp_path / "new.csv"
    new.write_text(f"id,text,image\nq1,a lovely day,{next((tmp / 'data' / 'pics').glob('*.png'))}\n")
    assert main(["predict", str(csv_run), "--data", str(new), "--output", str(out)]) == 0
    assert "sentiment_true" not in next(csv.DictReader(out.open()))


def test_eval_scores_rows_without_an_image_apart_from_complete_ones(
    csv_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """details.by_sides: each group's rows and scores, equal to the accuracy of predict's rows of that group."""
    tmp = csv_run.parent.parent
    rows = list(csv.DictReader((tmp / "tables" / "posts.csv").open()))
    for r in rows:
        r["image"] = str(tmp / "data" / r["image"])
    for r in rows[::4]:
        r["image"] = ""
    gappy = tmp_path / "gappy.csv"
    with gappy.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out, preds = tmp_path / "m.json", tmp_path / "p.csv"
    assert main(["eval", str(csv_run), "--data", str(gappy), "--output", str(out)]) == 0
    assert "(30 with caption and image, 10 caption only, 0 image only" in capsys.readouterr().err
    sides = json.loads(out.read_text())["details"]["by_sides"]
    assert {k: v["rows"] for k, v in sides.items()} == {"caption and image": 30, "caption only": 10}
    assert {k: v["sentiment/labelled"] for k, v in sides.items()} == {"caption and image": 30, "caption only": 10}
    assert main(["predict", str(csv_run), "--data", str(gappy), "--output", str(preds)]) == 0
    truth = {r["id"]: (r["sentiment"], r["image"] == "") for r in rows}
    for group, imageless in (("caption and image", False), ("caption only", True)):
        hits = [p["sentiment"] == truth[p["id"]][0] for p in csv.DictReader(preds.open()) if truth[p["id"]][1] == imageless]
        assert sides[group]["sentiment/accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert main(["eval", str(csv_run), "--split", "test", "--output", str(out)]) == 0  # complete rows: no groups
    assert "by_sides" not in json.loads(out.read_text())["details"]


def test_split_validation_is_val_as_a_datasetdict_names_it(csv_run: Path, tmp_path: Path) -> None:
    outs = {}
    for name in ("val", "validation", "dev"):
        outs[name] = tmp_path / f"{name}.json"
        assert main(["eval", str(csv_run), "--split", name, "--output", str(outs[name])]) == 0
    assert outs["val"].read_text() == outs["validation"].read_text() == outs["dev"].read_text()


def test_predict_of_a_runs_split_warns_about_its_own_rows_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading training's cache of every split (and the labels to check the split) warned about other splits'
    rows, with other counts: the rows predicted are the ones a warning is about, once."""
    import logging

    from fusionkit.data import make_synthetic

    (tmp_path / "pics").mkdir()
    with open(tmp_path / "posts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "image", "sentiment"])
        for i, ex in enumerate(make_synthetic(40, seed=2, image_size=32)):
            ex.image.save(tmp_path / "pics" / f"{ex.id}.png")
            writer.writerow([ex.id, "N/A" if i % 3 == 0 else ex.text, f"pics/{ex.id}.png", ex.labels["sentiment"]])
    assert main(["train", "--data.dataset", str(tmp_path / "posts.csv"), "--data.missing_text", "keep",
                 "--data.cache_dir", str(tmp_path / "cache"), "--optim.epochs", "1", "--run.output_dir",
                 str(tmp_path / "runs"), "--run.name", "r", *QUIET]) == 0  # fmt: skip
    val = json.loads((tmp_path / "runs" / "r" / "split.json").read_text())["val"]
    rows = {r["id"]: r["text"] for r in csv.DictReader((tmp_path / "posts.csv").open())}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(["predict", str(tmp_path / "runs" / "r"), "--split", "val", "--output", str(tmp_path / "v.csv")]) == 0
    said = [r.getMessage() for r in caplog.records if "spelled like a missing value" in r.getMessage()]
    assert len(said) == 1 and f"posts.csv): {sum(rows[i] == 'N/A' for i in val)} captions" in said[0]
    assert main(["train", str(tmp_path / "runs" / "r" / "config.yaml"), "--run.name", "r2", "--run.seed", "1"]) == 0
    caplog.clear()  # an ensemble's second member reads the same rows: not said again
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(["predict", str(tmp_path / "runs" / "r"), "--split", "val", "--ensemble",
                     str(tmp_path / "runs" / "r2"), "--output", str(tmp_path / "e.csv")]) == 0  # fmt: skip
    assert sum("spelled like a missing value" in r.getMessage() for r in caplog.records) == 1
