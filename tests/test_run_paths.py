"""Paths and files of a run: `~` in every path key and output, the split of tiny classes, run files written
whole (a hard-linked copy of a run leaves the original alone), strict JSON, ids kept as written."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import fusionkit
from fusionkit.cli import main
from fusionkit.data import Example, MultimodalDataset, split_dataset


def _labelled(labels: list[str]) -> MultimodalDataset:
    names = sorted(set(labels))
    examples = [Example(str(i), f"caption {i}", None, {"y": names.index(y)}) for i, y in enumerate(labels)]
    return MultimodalDataset(examples, {"y": names}, {"y": "classification"})


@pytest.mark.parametrize("seed", range(8))
def test_a_class_too_small_for_every_split_is_trained_on(seed: int) -> None:
    """A class with one row goes to train, with two to train and val, whatever the seed: the rounding carried
    across classes had put such a class's only row in val, where the model never learns it."""
    labels = ["a"] * 2 + ["b", "c", "d"] + ["e"] * 30
    ds = _labelled(labels)
    parts = split_dataset(ds, (0.8, 0.1, 0.1), seed)
    label_of = {ex.id: labels[int(ex.id)] for ex in ds}
    in_train = {label_of[i] for i in parts["train"].ids}
    assert in_train == {"a", "b", "c", "d", "e"}
    assert "a" in {label_of[i] for i in parts["val"].ids}  # its second row: val, then test
    assert sum(len(p) for p in parts.values()) == len(ds)


def test_a_split_depends_on_the_rows_not_their_order_and_an_edited_label_moves_that_row() -> None:
    """The same rows shuffled gave another split (13 of 36 train ids changed: another model, other test scores),
    and fixing one label re-dealt 24 of 60 rows, silently; a row's split now follows its id and the seed."""
    import random

    labels = [("joy", "gloom", "meh")[i % 3] if i % 7 else "meh" for i in range(90)]
    ds = _labelled(labels)
    first = {k: set(p.ids) for k, p in split_dataset(ds, (0.6, 0.2, 0.2), 0).items()}
    order = list(range(len(ds)))
    random.Random(3).shuffle(order)
    shuffled = {k: set(p.ids) for k, p in split_dataset(ds.subset(order), (0.6, 0.2, 0.2), 0).items()}
    assert shuffled == first
    edited = list(labels)
    edited[next(i for i in map(int, first["test"]) if labels[i] == "joy")] = "gloom"
    again = {k: set(p.ids) for k, p in split_dataset(_labelled(edited), (0.6, 0.2, 0.2), 0).items()}
    moved = {i for k in first for i in first[k] - again[k]}
    assert len(moved) <= 5, moved  # the edited row, and a row at a cut of the two classes it left and joined
    rng = random.Random(0)  # other classes' rows never move (the rounding was carried from class to class: an edit
    for _ in range(40):  # in one class moved rows of the classes sorted after it, in 66 of 300 such edits)
        names = [f"c{k}" for k in range(rng.randint(3, 6))]
        before = [rng.choice(names) for _ in range(rng.randint(20, 80))]
        after, j = list(before), rng.randrange(len(before))
        after[j] = rng.choice([c for c in names if c != before[j]])
        a, b = ({k: set(p.ids) for k, p in split_dataset(_labelled(y), (0.8, 0.1, 0.1), 0).items()} for y in (before, after))
        assert all(before[int(i)] in (before[j], after[j]) for k in a for i in a[k] - b[k])
    assert {k: set(p.ids) for k, p in split_dataset(ds, (0.6, 0.2, 0.2), 1).items()} != first  # the seed still deals


# ------------------------------------------------------------------------------------------ `~` and run files

NAMES = ("negative", "neutral", "positive")
QUIET = ["--run.progress", "false", "--run.plots", "false"]


def _write_home(home: Path) -> None:
    """~/data/posts.csv with image paths relative to ~/pics; rows 20-23 have no label (the val split of
    ~/mysplit.json: its loss is NaN)."""
    from fusionkit.data import make_synthetic

    (home / "data").mkdir(parents=True)
    (home / "pics").mkdir()
    rows = []
    for i, ex in enumerate(make_synthetic(24, seed=3, image_size=32)):
        ex.image.save(home / "pics" / f"{ex.id}.png")
        label = ex.labels["sentiment"]
        rows.append([ex.id, ex.text, f"{ex.id}.png", "" if i >= 20 else NAMES[label] if isinstance(label, int) else label])
    with open(home / "data" / "posts.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "text", "image", "sentiment"], *rows])
    ids = [r[0] for r in rows]
    (home / "mysplit.json").write_text(json.dumps({"train": ids[:16], "test": ids[16:20], "val": ids[20:]}))


@pytest.fixture(scope="module")
def home_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(home, working dir, run dir) of a 2-epoch run whose every path is given as `~/...` (HOME a tmp dir)."""
    tmp = tmp_path_factory.mktemp("home")
    home, cwd = tmp / "home", tmp / "work"
    cwd.mkdir()
    _write_home(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.chdir(cwd)
        argv = ["train", "--data.dataset", "~/data/posts.csv", "--data.image_root", "~/pics", "--data.split_file",
                "~/mysplit.json", "--data.cache_dir", "~/cache", "--run.output_dir", "~/runs", "--run.name", "r",
                "--optim.epochs", "2", "--optim.batch_size", "4", "--run.checkpoint_every", "0",
                "--model.tasks", json.dumps([{"name": "sentiment", "class_names": list(NAMES)}]),
                "--run.metric", "val/loss", *QUIET]  # fmt: skip
        assert main(argv) == 0
        yield home, cwd, home / "runs" / "r"


def test_home_paths_in_every_path_key_are_the_home_folder(home_run: tuple[Path, Path, Path]) -> None:
    """`~` in data.dataset, image_root, split_file, cache_dir and run.output_dir is the home folder: the split
    file given is used (not a new one under ./~/), nothing named `~` appears in the working directory, and
    config.yaml holds absolute paths."""
    home, cwd, run = home_run
    assert not (cwd / "~").exists()
    assert json.loads((run / "split.json").read_text())["val"] == json.loads((home / "mysplit.json").read_text())["val"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["dataset"] == str(home / "data" / "posts.csv") and saved["image_root"] == str(home / "pics")
    assert saved["split_file"] == str(home / "mysplit.json") and saved["cache_dir"] == str(home / "cache")


def test_home_paths_in_the_output_options(home_run: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """predict / eval / embed --output "~/..." write into the home folder, not a folder named `~`."""
    home, cwd, run = home_run
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["predict", "~/runs/r", "--split", "test", "--output", "~/out/p.csv", "--no-progress"]) == 0
    assert main(["eval", "~/runs/r", "--split", "test", "--output", "~/out/m.json", "--no-progress"]) == 0
    assert main(["embed", "~/runs/r", "--output", "~/out/e.npy", "--no-progress"]) == 0
    assert not (cwd / "~").exists()
    assert all((home / "out" / name).is_file() for name in ("p.csv", "m.json", "e.npy"))


def test_run_files_are_strict_json_with_null_for_nan(home_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A NaN or infinite number (a diverged val loss) is written null: Python's `NaN` token is not JSON, and
    strict readers (jq, JavaScript) refuse the whole file. summary.json, metrics.jsonl and eval --output share
    the writer."""
    from fusionkit.training.report import json_text, write_jsonl

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    run = home_run[2]
    strict((run / "summary.json").read_text())
    [strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    row = {"val/loss": float("nan"), "best": float("inf"), "details": {"per_class": [1.0, float("-inf")]}}
    assert strict(json_text(row)) == {"val/loss": None, "best": None, "details": {"per_class": [1.0, None]}}
    write_jsonl(tmp_path / "m.jsonl", [row])
    assert strict((tmp_path / "m.jsonl").read_text())["val/loss"] is None


def test_resuming_a_hard_linked_copy_leaves_the_original_alone(home_run: tuple[Path, Path, Path],
                                                              tmp_path: Path) -> None:  # fmt: skip
    """`cp -al RUN COPY` shares every file: a resume of the copy writes its files anew (metrics.jsonl,
    summary.json, the lock, the logs...), so the original run's bytes do not change."""
    home, _, run = home_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-al", str(run), str(copy)], check=True)
    first = sorted((copy / "checkpoints").glob("step-*"))[0].name
    (copy / "last").unlink()  # a new file (not the shared one): an epoch left to train
    (copy / "last").write_text(f"checkpoints/{first}\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(copy), *QUIET[:2]]) == 0
    assert (copy / "resume_log.jsonl").is_file()
    changed = sorted(str(p.relative_to(run)) for p, data in before.items() if p.read_bytes() != data)
    assert changed == []


def test_a_split_file_that_does_not_exist_is_named(home_run: tuple[Path, Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """--split-file given but absent: said so, not "--split test needs the run's split.json or --split-file"."""
    run = home_run[2]
    assert main(["predict", str(run), "--split-file", "/nonexist.json", "--split", "test", "--output",
                 str(run.parent / "x.csv")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--split-file /nonexist.json does not exist" in err and "needs the run's split.json" not in err


def test_every_image_path_failing_under_skip_says_where_they_were_looked_for(
    home_run: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Paths relative to another folder than the one read: under data.missing_image: skip (or --on-error skip)
    each row was skipped before it was counted, so the user got "0 classes" or "no readable rows left"
    instead of the error that names the folder and image_root / --image-root."""
    home, _, run = home_run
    table = home / "data" / "posts.csv"  # its paths are relative to ~/pics, not to ~/data
    argv = ["train", "--data.dataset", str(table), "--data.missing_image", "skip", "--run.output_dir",
            str(tmp_path / "runs"), "--data.cache_dir", str(home / "cache"), *QUIET]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "none of its 24 image paths names a file" in err and "image_root" in err
    copy = tmp_path / "posts.csv"  # another file: its paths are read from its own folder, as the hint says
    copy.write_bytes(table.read_bytes())
    assert main(["predict", str(run), "--data", str(copy), "--on-error", "skip", "--output",
                 str(tmp_path / "p.csv")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "none of its 24 image paths names a file" in err and "--image-root" in err


def test_home_paths_in_save_and_load_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`save_pretrained("~/m")` wrote a folder named "~" in the working directory, and `from_pretrained("~/m")`
    said it does not exist: both are the home folder's, as on the command line."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    model = fusionkit.create_model("tiny")
    model.save_pretrained("~/saved")
    assert (home / "saved" / "config.json").is_file() and not (cwd / "~").exists()
    assert fusionkit.FusionModel.from_pretrained("~/saved").class_names == model.class_names
    fusionkit.FusionProcessor.from_model(model).save_pretrained("~/proc")
    assert (home / "proc" / "processor_config.json").is_file() and not (cwd / "~").exists()


def test_a_moved_finished_run_resumed_names_where_it_is_now(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--resume` of a finished run returns its summary: after `mv` it named the old folder, where another run with
    the same name may live now (its best checkpoint loaded as this run's)."""
    from .test_train import tiny_config

    fusionkit.train(tiny_config(tmp_path, "r1", **{"data.dataset": "synthetic:40", "optim.epochs": 1}))
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "runs" / "r1").rename(moved / "r1")
    capsys.readouterr()
    assert main(["train", "--resume", str(moved / "r1")]) == 0
    out = capsys.readouterr().out
    assert f"run dir: {moved / 'r1'}" in out and str(tmp_path / "runs") not in out
    best = Path(fusionkit.train(str(moved / "r1"), resume=True)["best_checkpoint"])
    assert best.parent.parent == moved / "r1" and best.is_dir()
    on_disk = json.loads((moved / "r1" / "summary.json").read_text())  # the file says so too (its results unchanged)
    assert on_disk["run_dir"] == str(moved / "r1") and Path(on_disk["best_checkpoint"]) == best


def test_a_run_records_the_environment_it_ran_in(tmp_path: Path) -> None:
    """Versions, machine and command line were nowhere in the run dir: a bitwise mismatch between two machines
    could not be traced to a torch version or a CPU without AMX. environment.json holds the start's; a resume
    logs its own."""
    import torch

    from .test_train import tiny_config

    cfg = tiny_config(tmp_path, "env", **{"data.dataset": "synthetic:40", "optim.epochs": 1})
    run = Path(fusionkit.train(cfg)["run_dir"])
    env = json.loads((run / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["fusionkit"] == fusionkit.__version__
    assert env["python"] and env["cpu"] and isinstance(env["cpu_flags"], list) and "argv" in env
    before = (run / "environment.json").read_text()
    fusionkit.train(str(run), resume=True)
    assert (run / "environment.json").read_text() == before
    logged = json.loads((run / "resume_log.jsonl").read_text().splitlines()[-1])
    assert logged["environment"]["packages"] == env["packages"]
