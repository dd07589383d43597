"""`fusionkit train/eval/predict/embed` run in-process on a tiny synthetic budget."""

from __future__ import annotations

import csv
import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import fusionkit
from fusionkit.cli import main
from fusionkit.models import FusionModel
from fusionkit.tasks import ClassificationTask
from fusionkit.training.rundir import follow_pointer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    argv = ["train", "--data.dataset", "synthetic:80", "--data.cache_dir", str(tmp / "cache"),
            "--optim.epochs", "1", "--optim.batch_size=16", "--run.output_dir", str(tmp / "runs"),
            "--run.name", "cli", "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    assert main(argv) == 0
    return tmp / "runs" / "cli"


def test_train_summary(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    n_train = len(json.loads((run_dir / "split.json").read_text())["train"])
    assert summary["steps"] == -(-n_train // 16) and "val/sentiment/accuracy" in summary["val"]
    assert follow_pointer(run_dir / "last").name == f"step-{summary['steps']:08d}"


def test_eval_predict_embed(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ["--cache-dir", str(run_dir.parent.parent / "cache")]
    out = tmp_path / "metrics.json"
    assert main(["eval", str(run_dir), "--output", str(out), *cache]) == 0
    metrics = json.loads(out.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        metrics["val/sentiment/accuracy"] == summary["val"]["val/sentiment/accuracy"]
    )  # same split, same model

    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), "--output", str(preds), *cache]) == 0
    rows = list(csv.DictReader(preds.open()))
    split = json.loads((run_dir / "split.json").read_text())
    assert [r["id"] for r in rows] == split["test"]
    assert {r["sentiment"] for r in rows} <= {"positive", "neutral", "negative"}
    probs = np.array(
        [[float(r[f"sentiment_prob_{c}"]) for c in ("positive", "neutral", "negative")] for r in rows]
    )
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)

    vecs = tmp_path / "vecs.npy"
    assert main(["embed", str(run_dir / "best"), "--data", "synthetic:20", "--output", str(vecs)]) == 0
    v = np.load(vecs)
    assert v.shape == (20, 64) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert json.loads(vecs.with_suffix(".ids.json").read_text())[0] == "syn-000000"


def test_embed_keeps_the_vectors_and_their_ids_under_one_backup_number(run_dir: Path, tmp_path: Path) -> None:
    """A file of the user's at the --output, then two embeds: the first embed's vectors and ids are both kept
    as ~2~ (the ids became ~1~ beside vectors ~2~ when each file took its own first free number)."""
    vecs = tmp_path / "vec.npy"
    vecs.write_text("hi\n")
    for n in (20, 12):
        assert main(["embed", str(run_dir / "best"), "--data", f"synthetic:{n}", "--output", str(vecs)]) == 0
    assert (tmp_path / "vec.npy.~1~").read_text() == "hi\n"
    assert np.load(tmp_path / "vec.npy.~2~").shape[0] == 20
    assert len(json.loads((tmp_path / "vec.ids.json.~2~").read_text())) == 20
    assert not (tmp_path / "vec.ids.json.~1~").exists() and np.load(vecs).shape[0] == 12


def test_bad_input_gives_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--optim.lrr", "1"]) == 2
    assert "unknown option --optim.lrr; did you mean --optim.lr?" in capsys.readouterr().err
    assert main(["train", "--optim.epochs", "many"]) == 2
    assert "expected int" in capsys.readouterr().err
    assert (
        main(["train", "--data.dataset", str(tmp_path / "missing"), "--run.output_dir", str(tmp_path)]) == 1
    )
    assert "not found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 1


def test_eval_on_a_csv_reads_its_labels(run_dir: Path, tmp_path: Path) -> None:
    """A CSV dataset: `eval` reads the label column named after the model's task (as `train` does)."""
    from fusionkit.data import make_synthetic

    ds = make_synthetic(24, seed=3, image_size=32)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "image", "sentiment"])
        for ex in ds:
            ex.image.save(tmp_path / f"{ex.id}.png")
            writer.writerow([ex.id, ex.text, f"{ex.id}.png", ex.labels["sentiment"]])  # raw label names
    out = tmp_path / "metrics.json"
    argv = ["eval", str(run_dir), "--data", str(tmp_path / "pairs.csv"), "--split", "all"]
    assert main([*argv, "--output", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["all/sentiment/accuracy"] <= 1.0
    assert sum(map(sum, metrics["details"]["sentiment"]["confusion"])) == 24  # every row was scored


def test_predict_and_eval_an_ensemble_of_seeds(run_dir: Path, tmp_path: Path, capsys) -> None:
    """`--ensemble` averages the class probabilities of several runs (e.g. seeds) over the same rows."""
    cache = ["--cache-dir", str(run_dir.parent.parent / "cache")]
    other_argv = ["train", "--data.dataset", "synthetic:80", "--data.cache_dir", cache[1], "--optim.epochs", "1",
                  "--optim.batch_size=16", "--run.output_dir", str(tmp_path), "--run.name", "seed1",
                  "--run.seed", "1",
                  "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    assert main(other_argv) == 0
    other = tmp_path / "seed1"
    names = ("positive", "neutral", "negative")

    def probs(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
        rows = list(csv.DictReader(path.open()))
        p = np.array([[float(r[f"sentiment_prob_{c}"]) for c in names] for r in rows])
        return [r["id"] for r in rows], p, [r["sentiment"] for r in rows]

    outs = {}
    for key, argv in {"a": [str(run_dir)], "b": [str(other)], "ab": [str(run_dir), "--ensemble", str(other)]}.items():
        outs[key] = tmp_path / f"{key}.csv"
        assert main(["predict", *argv, "--output", str(outs[key]), *cache]) == 0
    ids_a, pa, _ = probs(outs["a"])
    ids_b, pb, _ = probs(outs["b"])
    ids_ab, pab, labels = probs(outs["ab"])
    assert ids_a == ids_b == ids_ab
    assert not np.allclose(pa, pb, atol=1e-3)  # two seeds really differ
    np.testing.assert_allclose(pab, (pa + pb) / 2, atol=2e-6)
    assert labels == [names[i] for i in pab.argmax(1)]
    # each model's loss is its own: the ensemble has none
    both = tmp_path / "both.json"
    alone = tmp_path / "alone.json"
    assert main(["eval", str(run_dir), "--ensemble", str(other), "--output", str(both), *cache]) == 0
    assert main(["eval", str(run_dir), "--output", str(alone), *cache]) == 0
    m_both, m_alone = json.loads(both.read_text()), json.loads(alone.read_text())
    assert "val/loss" in m_alone and "val/loss" not in m_both and "val/sentiment/accuracy" in m_both
    # one raw pair: the same average (it printed the first model's answer alone before)
    from fusionkit.data import make_synthetic

    pair = make_synthetic(1, image_size=32)[0]
    pair.image.save(tmp_path / "pair.png")
    printed = {}
    for key, argv in {"a": [str(run_dir)], "b": [str(other)], "ab": [str(run_dir), "--ensemble", str(other)]}.items():
        capsys.readouterr()
        assert main(["predict", *argv, "--text", pair.text, "--image", str(tmp_path / "pair.png")]) == 0
        printed[key] = json.loads(capsys.readouterr().out)["sentiment_prob"]
    for c in names:
        assert printed["ab"][c] == pytest.approx((printed["a"][c] + printed["b"][c]) / 2, abs=2e-6)


def test_seeds_share_a_split_and_an_ensemble_never_scores_rows_a_member_trained_on(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another run.seed keeps the split (so seeds can be ensembled); a member that trained on the scored
    rows (another data.split_seed) is refused, naming it and how to fix it, before anything is written."""
    cache = ["--cache-dir", str(run_dir.parent.parent / "cache")]
    common = ["train", "--data.dataset", "synthetic:80", "--data.cache_dir", cache[1], "--optim.epochs", "1",
              "--run.output_dir", str(tmp_path), "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    assert main([*common, "--run.name", "seed2", "--run.seed", "2"]) == 0
    assert main([*common, "--run.name", "resplit", "--data.split_seed", "5"]) == 0
    split = json.loads((run_dir / "split.json").read_text())
    assert json.loads((tmp_path / "seed2" / "split.json").read_text()) == split
    resplit = json.loads((tmp_path / "resplit" / "split.json").read_text())
    leaked = set(resplit["train"]) & set(split["val"])
    assert leaked  # the other split trained on some of this run's val rows
    out = tmp_path / "m.json"
    assert main(["eval", str(run_dir), "--ensemble", str(tmp_path / "seed2"), "--output", str(out), *cache]) == 0
    capsys.readouterr()
    argv = ["eval", str(run_dir), "--ensemble", str(tmp_path / "seed2"), str(tmp_path / "resplit" / "best")]
    out.unlink()
    assert main([*argv, "--output", str(out), *cache]) == 2
    err = capsys.readouterr().err
    assert f"was trained on {len(leaked)} of the {len(split['val'])} val rows" in err and "resplit" in err
    assert "data.split_file" in err and not out.exists()
    # `--split all` of another file is the user's choice of rows: not checked
    preds = tmp_path / "p.csv"
    argv = ["predict", str(run_dir), "--ensemble", str(tmp_path / "resplit"), "--data", "synthetic:12", "--output"]
    assert main([*argv, str(preds), *cache]) == 0 and len(list(csv.DictReader(preds.open()))) == 12


@pytest.mark.parametrize("module", ["fusionkit", "fusionkit.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    """Launchers are handed `-m fusionkit` or `-m fusionkit.cli`; neither may exit silently doing nothing."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--resume" in done.stdout


def test_an_ensemble_matches_classes_by_name_and_refuses_other_classes(run_dir: Path, tmp_path: Path, capsys) -> None:
    """A member whose classes are listed in another order is averaged class by class (by name); a member
    with other classes is refused."""
    cache = ["--cache-dir", str(run_dir.parent.parent / "cache")]
    names = ["positive", "neutral", "negative"]  # the first member's order (the synthetic data's)

    def member(name: str, classes: list[str]) -> Path:
        argv = ["train", "--data.dataset", "synthetic:80", "--data.cache_dir", cache[1], "--optim.epochs", "1",
                "--run.output_dir", str(tmp_path), "--run.name", name, "--run.progress", "false", "--run.plots",
                "false", "--model.tasks", json.dumps([{"name": "sentiment", "class_names": classes}])]  # fmt: skip
        assert main(argv) == 0
        return tmp_path / name

    def probs(argv: list[str], out: Path) -> np.ndarray:
        assert main(["predict", *argv, "--output", str(out), *cache]) == 0
        return np.array([[float(r[f"sentiment_prob_{c}"]) for c in names] for r in csv.DictReader(out.open())])

    reordered = member("reordered", ["negative", "neutral", "positive"])
    alone, other = probs([str(run_dir)], tmp_path / "a.csv"), probs([str(reordered)], tmp_path / "b.csv")
    both = probs([str(run_dir), "--ensemble", str(reordered)], tmp_path / "ab.csv")
    np.testing.assert_allclose(both, (alone + other) / 2, atol=2e-6)
    # eval binds the labels to each member's class order: that is not "the rows changed"
    scores = tmp_path / "ab.json"
    assert main(["eval", str(run_dir), "--ensemble", str(reordered), "--output", str(scores), *cache]) == 0
    assert 0.0 <= json.loads(scores.read_text())["val/sentiment/accuracy"] <= 1.0
    more = member("more", [*names, "angry"])
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), "--ensemble", str(more), "--output", str(out), *cache]) == 2
    assert "other tasks or classes" in capsys.readouterr().err and not out.exists()


def test_an_ensemble_of_frozen_encoder_runs_encodes_each_pair_once(tmp_path: Path) -> None:
    """Members whose frozen encoders are the same weights share one encoder pass, kept in the feature cache
    (a second prediction runs no encoder), and the ensemble still averages the members' probabilities."""
    cache = tmp_path / "cache"
    common = ["--data.dataset", "synthetic:64", "--data.cache_dir", str(cache), "--model.freeze", "encoders",
              "--optim.epochs", "1", "--optim.batch_size=16", "--run.output_dir", str(tmp_path / "runs"),
              "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    # Same seed: the same random tiny encoders; two fusion strategies on top of them.
    for name, strategy in (("concat", "concat"), ("gated", "gated")):
        assert main(["train", *common, "--run.name", name, "--model.fusion.strategy", strategy]) == 0
    runs = tmp_path / "runs"
    table = tmp_path / "new.csv"  # rows no training run saw: their features are not cached yet
    table.write_text("id,text,image\n" + "".join(f"n{i},caption number {i},\n" for i in range(6)))

    def stores() -> dict[str, float]:
        return {p.name: p.stat().st_mtime_ns for p in cache.glob("features-*")}

    before = stores()
    names = ("positive", "neutral", "negative")
    probs = {}
    for key, argv in {"ens": [str(runs / "concat"), "--ensemble", str(runs / "gated")],
                      "concat": [str(runs / "concat")], "gated": [str(runs / "gated")]}.items():  # fmt: skip
        out = tmp_path / f"{key}.csv"
        assert main(["predict", *argv, "--data", str(table), "--output", str(out), "--cache-dir", str(cache)]) == 0
        rows = list(csv.DictReader(out.open()))
        assert [r["id"] for r in rows] == [f"n{i}" for i in range(6)]
        probs[key] = np.array([[float(r[f"sentiment_prob_{c}"]) for c in names] for r in rows])
        if key == "ens":
            added = set(stores()) - set(before)
            assert len(added) == 2, added  # one text + one image store for both members, not one pair each
            after_first = stores()
    assert not np.allclose(probs["concat"], probs["gated"], atol=1e-3)
    # float16 features against the single models' full-precision encoders
    np.testing.assert_allclose(probs["ens"], (probs["concat"] + probs["gated"]) / 2, atol=5e-3)
    out = tmp_path / "again.csv"
    argv = ["predict", str(runs / "gated"), "--ensemble", str(runs / "concat"), "--data", str(table),
            "--output", str(out), "--cache-dir", str(cache)]  # fmt: skip
    assert main(argv) == 0
    assert stores() == after_first  # nothing re-encoded or rewritten


def test_scoring_a_runs_own_split_reads_the_caches_training_built(tmp_path: Path) -> None:
    """Training caches the rows of all splits together; `eval`/`predict` of one of its splits (an ensemble
    of its seeds too) reads that cache, scores exactly the split's rows, and builds nothing new. A member
    whose frozen encoders differ (another seed's random encoders) runs them on the split alone."""
    cache = tmp_path / "cache"
    common = ["--data.dataset", "synthetic:48", "--data.cache_dir", str(cache), "--model.freeze", "encoders",
              "--optim.epochs", "1", "--optim.batch_size=16", "--run.output_dir", str(tmp_path / "runs"),
              "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    runs = tmp_path / "runs"
    assert main(["train", *common, "--run.name", "a", "--model.fusion.strategy", "concat"]) == 0
    assert main(["train", *common, "--run.name", "b", "--model.fusion.strategy", "gated"]) == 0
    built = sorted(p.name for p in cache.iterdir())
    val = json.loads((runs / "a" / "split.json").read_text())["val"]
    out = tmp_path / "ens.json"
    assert main(["eval", str(runs / "a"), "--ensemble", str(runs / "b"), "--output", str(out)]) == 0
    assert sorted(p.name for p in cache.iterdir()) == built  # no cache of the val split alone, no new features
    pred = tmp_path / "test.csv"
    assert main(["predict", str(runs / "a"), "--output", str(pred)]) == 0
    test = json.loads((runs / "a" / "split.json").read_text())["test"]
    assert sorted(r["id"] for r in csv.DictReader(pred.open())) == sorted(test)
    assert sorted(p.name for p in cache.iterdir()) == built
    # another seed: other random frozen encoders; with their features of all rows deleted, they run again,
    # on the val rows alone, and score the same rows
    assert main(["train", *common, "--run.name", "c", "--run.seed", "1"]) == 0
    for store in set(cache.iterdir()) - {cache / name for name in built}:
        shutil.rmtree(store)
    built = sorted(p.name for p in cache.iterdir())
    assert main(["predict", str(runs / "a"), "--ensemble", str(runs / "c"), "--split", "val", "--output", str(pred)]) == 0
    assert sorted(r["id"] for r in csv.DictReader(pred.open())) == sorted(val)
    added = sorted(set(p.name for p in cache.iterdir()) - set(built))
    # the split's own data cache and features (the image side's named by its content: "content")
    assert added and all("[val]" in name or name.startswith("features-content-image-") for name in added), added
    assert any("[val]" in name for name in added), added


def test_an_empty_split_is_a_clear_error_not_an_empty_file(tmp_path: Path, capsys) -> None:
    argv = ["train", "--data.dataset", "synthetic:40", "--data.cache_dir", str(tmp_path / "cache"),
            "--data.split_ratios", "[0.8, 0.2, 0]", "--optim.epochs", "1", "--run.output_dir", str(tmp_path),
            "--run.name", "notest", "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "notest"), "--output", str(out)]) == 2
    assert "test split of" in capsys.readouterr().err and not out.exists()
    assert main(["predict", str(tmp_path / "notest"), "--split", "val", "--output", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 8


def test_predict_keeps_an_empty_image_cell_but_refuses_a_broken_path(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in an image path must not silently turn a row into a caption-only prediction."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    table = tmp_path / "new.csv"
    table.write_text("id,text,image\nr0,a red square,a.png\nr1,another one,a_typo.png\n")
    out = tmp_path / "p.csv"
    cache = ["--cache-dir", str(run_dir.parent.parent / "cache")]
    assert main(["predict", str(run_dir), "--data", str(table), "--output", str(out), *cache]) == 1  # a data error
    err = capsys.readouterr().err
    assert "new.csv:3, item r1: image file not found: 'a_typo.png'" in err and "empty the cell" in err
    assert not out.exists()
    table.write_text("id,text,image\nr0,a red square,a.png\nr1,another one,\n")
    with caplog.at_level("WARNING"):
        assert main(["predict", str(run_dir), "--data", str(table), "--output", str(out), *cache]) == 0
    assert [r["id"] for r in csv.DictReader(out.open())] == ["r0", "r1"]
    assert "1 of 2 pairs of" in caplog.text and "have no image" in caplog.text and "modality_dropout 0" in caplog.text
    import shutil

    twin = tmp_path / "twin"  # an ensemble's members read the same rows: the warning once, not once per member
    shutil.copytree(run_dir, twin)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["predict", str(run_dir), "--ensemble", str(twin), "--data", str(table), "--output",
                     str(tmp_path / "e.csv"), *cache]) == 0  # fmt: skip
    assert caplog.text.count("have no image") == 1, caplog.text


def test_rows_added_to_train_by_allow_new_rows_are_in_the_runs_split(run_dir: Path, tmp_path: Path, capsys) -> None:
    """The run's split.json lists what it trained on, so the ensemble check sees rows allow_new_rows added."""
    split = json.loads((run_dir / "split.json").read_text())
    common = ["train", "--data.dataset", "synthetic:88", "--data.cache_dir", str(run_dir.parent.parent / "cache"),
              "--optim.epochs", "1", "--run.output_dir", str(tmp_path), "--run.progress", "false",
              "--run.plots", "false"]  # fmt: skip
    assert main([*common, "--run.name", "grown", "--data.split_file", str(run_dir / "split.json"),
                 "--data.allow_new_rows", "true"]) == 0  # fmt: skip
    new = [f"syn-{i:06d}" for i in range(80, 88)]
    grown = json.loads((tmp_path / "grown" / "split.json").read_text())
    assert grown["train"] == [*split["train"], *new] and grown["val"] == split["val"]
    assert json.loads((run_dir / "split.json").read_text()) == split  # the reused file itself is not touched
    other = tmp_path / "new_in_val.json"
    other.write_text(json.dumps({**split, "val": [*split["val"], *new]}))
    assert main([*common, "--run.name", "newval", "--data.split_file", str(other)]) == 0
    capsys.readouterr()
    argv = ["eval", str(tmp_path / "newval"), "--ensemble", str(tmp_path / "grown"), "--cache-dir", common[4]]
    assert main(argv) == 2
    assert "was trained on 8 of the" in capsys.readouterr().err


def test_k_folds_from_split_files_share_one_cache_and_ensemble_on_the_test_split(tmp_path: Path, capsys) -> None:
    """README's k-fold recipe: one split file per fold, one cache for all folds, the folds' ensemble
    predicts the shared test rows, and scoring a fold's val rows with the other folds is refused."""
    from fusionkit.data import load_dataset

    ids = load_dataset("synthetic:40").ids
    test, rest = ids[:8], ids[8:]
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    for k in (0, 1):
        val = rest[k::2]
        (tmp_path / f"fold{k}.json").write_text(json.dumps(
            {"train": [i for i in rest if i not in val], "val": val, "test": test}))  # fmt: skip
        argv = ["train", "--data.dataset", "synthetic:40", "--data.split_file", str(tmp_path / f"fold{k}.json"),
                "--data.cache_dir", str(cache), "--model.freeze", "encoders", "--optim.epochs", "1",
                "--run.output_dir", str(runs), "--run.name", f"f{k}", "--run.progress", "false",
                "--run.plots", "false"]  # fmt: skip
        assert main(argv) == 0
    assert len(list(cache.glob("features-*"))) == 2  # one text and one image store for both folds
    out = tmp_path / "test.csv"
    assert main(["predict", str(runs / "f0"), "--ensemble", str(runs / "f1"), "--output", str(out)]) == 0
    assert sorted(r["id"] for r in csv.DictReader(out.open())) == sorted(test)
    capsys.readouterr()
    assert main(["eval", str(runs / "f0"), "--ensemble", str(runs / "f1")]) == 2  # f1 trained on f0's val rows
    err = capsys.readouterr().err
    assert "f1 was trained on 16 of the 16 val rows" in err and "--split test" in err


def test_evaluating_twice_gives_the_same_scores_with_an_itm_task(tmp_path: Path, capsys) -> None:
    """ITM draws its negatives at random: evaluation seeds its own draws, so `eval` repeats itself."""
    tasks = json.dumps([{"name": "sentiment"}, {"name": "itm", "type": "itm", "weight": 0.5}])
    argv = ["train", "--data.dataset", "synthetic:48", "--data.cache_dir", str(tmp_path / "cache"),
            "--model.tasks", tasks, "--optim.epochs", "1", "--run.output_dir", str(tmp_path), "--run.name", "itm",
            "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    assert main(argv) == 0
    scores = []
    for k in range(2):
        assert main(["eval", str(tmp_path / "itm"), "--output", str(tmp_path / f"e{k}.json")]) == 0
        scores.append(json.loads((tmp_path / f"e{k}.json").read_text()))
    assert scores[0]["val/loss"] == scores[1]["val/loss"] and scores[0]["val/itm/accuracy"] == scores[1]["val/itm/accuracy"]


def test_scoring_rows_a_model_trained_on_is_refused(tmp_path: Path, capsys) -> None:
    """Another run's split file as --split-file: its test rows include rows this model trained on, so the
    score would be inflated. Refused, with what to do; the model's own train split can still be asked for."""
    common = ["train", "--data.dataset", "synthetic:60", "--data.cache_dir", str(tmp_path / "cache"),
              "--optim.epochs", "1", "--run.output_dir", str(tmp_path), "--run.progress", "false",
              "--run.plots", "false"]  # fmt: skip
    assert main([*common, "--run.name", "a"]) == 0
    assert main([*common, "--run.name", "b", "--data.split_seed", "3"]) == 0
    other = tmp_path / "b" / "split.json"
    capsys.readouterr()
    argv = ["eval", str(tmp_path / "a"), "--split-file", str(other), "--split", "test", "--data", "synthetic:60"]
    assert main([*argv, "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "was trained on" in err and "inflate" in err and not (tmp_path / "x.json").exists()
    # without --data too: the reason is the overlap, not "the rows changed"
    assert main(["eval", str(tmp_path / "a"), "--split-file", str(other), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "was trained on" in err and "changed content" not in err
    assert main(["eval", str(tmp_path / "a"), "--split", "train", "--output", str(tmp_path / "t.json")]) == 0
    # a hand-written subset of its own test split is scored as given
    own = json.loads((tmp_path / "a" / "split.json").read_text())
    (tmp_path / "sub.json").write_text(json.dumps({**own, "test": own["test"][:3]}))
    assert main(["eval", str(tmp_path / "a"), "--split-file", str(tmp_path / "sub.json"), "--split", "test",
                 "--output", str(tmp_path / "s.json")]) == 0  # fmt: skip


def test_a_users_own_task_type_is_found_by_the_command_line_and_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Registered in the user's module, named in $FUSIONKIT_PLUGINS: train, and from_pretrained, import it. The module
    lies in the working directory, which the `fusionkit` script (unlike `python -m`) does not put on sys.path."""
    (tmp_path / "fk_user_plugin.py").write_text(
        "from fusionkit import register_task\n"
        "from fusionkit.tasks import ClassificationTask\n\n"
        "@register_task('user_cls')\n"
        "class UserClassification(ClassificationTask):\n"
        "    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    argv = ["train", "--data.dataset", "synthetic:48", "--model.tasks", '[{"name": "sentiment", "type": "user_cls"}]',
            "--optim.max_steps", "1", "--run.output_dir", str(tmp_path / "runs"), "--run.name", "u",
            "--data.cache_dir", str(tmp_path / "cache"), "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    monkeypatch.setenv("FUSIONKIT_PLUGINS", "fk_user_plugin_typo")
    assert main(argv) == 2 and "plugin 'fk_user_plugin_typo' cannot be imported" in capsys.readouterr().err
    monkeypatch.setenv("FUSIONKIT_PLUGINS", "fk_user_plugin")
    assert main(argv) == 0
    model = FusionModel.from_pretrained(tmp_path / "runs" / "u")
    assert type(model.tasks["sentiment"]).__name__ == "UserClassification"
    importlib.reload(sys.modules["fk_user_plugin"])  # a notebook re-running its registering cell: allowed ...
    with pytest.raises(ValueError, match="'user_cls' is already registered"):  # ... another class under that name not

        @fusionkit.register_task("user_cls")
        class Other(ClassificationTask):
            pass


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_this_machine_lacks_is_a_clear_error(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "p.csv")
    for device, said in (("cuda", "sees no CUDA GPU"), ("bogus", "is not a device name")):
        assert main(["predict", str(run_dir), "--output", out, "--device", device]) == 2
        assert said in capsys.readouterr().err
    assert main(["train", "--run.device", "cuda:1", "--run.output_dir", str(tmp_path / "runs")]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_the_command_line_shows_fusionkits_info_lines_and_only_warnings_of_other_libraries(tmp_path: Path) -> None:
    """`fusionkit export` printed 354 INFO lines of onnx's graph passes: the root logger stays at WARNING while
    fusionkit's own INFO lines show (the run dir), and in-process the caller's logging comes back afterwards."""
    import subprocess

    script = ("import logging; from fusionkit.cli import main; "
              "logging.getLogger('fusionkit.training').info('not configured: not shown'); "
              f"main(['train', '--optim.max_steps', '1', '--data.dataset', 'synthetic:40', '--run.output_dir', "
              f"{str(tmp_path / 'runs')!r}, '--data.cache_dir', {str(tmp_path / 'cache')!r}, '--run.plots', 'false']); "
              "logging.getLogger('fusionkit.training').info('after: not shown either')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    info = [line for line in done.stderr.splitlines() if line.startswith("INFO")]
    assert any("run dir" in line for line in info) and all(line.startswith("INFO fusionkit") for line in info)
    assert "not shown" not in done.stderr


def test_version(capsys) -> None:
    import fusionkit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and f"fusionkit {fusionkit.__version__}" in capsys.readouterr().out
