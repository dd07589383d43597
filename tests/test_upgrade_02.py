"""Runs and studies written by fusionkit 0.2 (faked by writing its formats, as tests/test_upgrade.py does for 0.1):
what 0.3 does otherwise (splits, encoder keys) is said, with what to do; what it can compare, it compares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fusionkit.cli import main
from tests.test_own_data import train_args, write_table


def as_02(run: Path) -> Path:
    """`run`'s files as fusionkit 0.2.0 wrote them: split.json and data_fingerprint.json without a scheme or
    version, checkpoints recording 0.2.0, no environment.json."""
    for name in ("split.json", "data_fingerprint.json"):
        saved = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps({k: v for k, v in saved.items() if k not in ("scheme", "fusionkit_version")}))
    for config in (run / "checkpoints").glob("*/config.json"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "fusionkit_version": "0.2.0"}))
    (run / "environment.json").unlink()
    return run


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run on a CSV, as fusionkit 0.2.0 left it."""
    root = tmp_path_factory.mktemp("upgrade02")
    table = write_table(root / "data", n=24)
    assert main(train_args(table, root / "runs", "old")) == 0
    return as_02(root / "runs" / "old")


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("run.lock"))
    return copy


def _edited(run: Path, tmp_path: Path) -> Path:
    """A copy of the run's CSV with one train row's label changed."""
    config = json.loads((run / "config.json").read_text())
    table = Path(config["data"]["dataset"])
    row = json.loads((run / "split.json").read_text())["train"][0]
    lines = table.read_text().splitlines()
    lines = [line.rpartition(",")[0] + (",sad" if line.endswith(",happy") else ",happy") if line.startswith(f"{row},")
             else line for line in lines]  # fmt: skip
    edited = table.parent / "edited.csv"
    edited.write_text("\n".join(lines) + "\n")
    return edited


def test_resuming_an_02_run_on_edited_data_says_it_changed(old_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    run = _copy(old_run, tmp_path)
    edited = _edited(run, tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data.dataset", str(edited)]) != 0
    err = capsys.readouterr().err
    assert "changed since its last checkpoint (as fusionkit 0.2.0 recorded it)" in err and "content changed" in err
    assert "cannot be checked" not in err  # was: "cannot be checked ... recorded by an older fusionkit (0.1)"
    assert main(["eval", str(run), "--data", str(edited), "--split", "train"]) != 0  # eval names the same version
    assert "(trained by fusionkit 0.2.0;" in capsys.readouterr().err


def test_resuming_an_02_run_compares_its_data_and_writes_no_start_record(old_run: Path, tmp_path: Path) -> None:
    run = _copy(old_run, tmp_path)
    assert main(["train", "--resume", str(run)]) == 0  # unchanged data: compared, and equal
    logged = json.loads((run / "resume_log.jsonl").read_text().splitlines()[-1])
    assert logged["data_changes"] == [] and logged["environment"]["packages"]["fusionkit"]
    assert not (run / "environment.json").exists()  # it began under 0.2.0: no start record is made up


def order_split(run: Path) -> Path:
    """`run`'s split.json as fusionkit 0.2 drew it: each class's rows cut in their order in the file (t0..t23, moods
    cycling: 6 train, 1 val, 1 test each), no scheme recorded. Its data_fingerprint.json, of the other split, goes."""
    split = json.loads((run / "split.json").read_text())
    rows = [f"t{i}" for i in range(24)]
    (run / "split.json").write_text(json.dumps({"dataset": split["dataset"], "seed": 0, "ratios": split["ratios"],
                                                "train": rows[:18], "val": rows[18:21], "test": rows[21:]}))  # fmt: skip
    (run / "data_fingerprint.json").unlink()
    return run


def test_training_an_02_runs_config_again_says_its_split_differs(old_run: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    old = order_split(_copy(old_run, tmp_path))
    caplog.set_level("WARNING", logger="fusionkit.training")
    out = ["--run.output_dir", str(old.parent)]
    assert main(["train", str(old / "config.yaml"), *out, "--run.name", "new"]) == 0
    warned = [r.getMessage() for r in caplog.records if "by fusionkit 0.2 or older" in r.getMessage()]
    assert len(warned) == 1 and "by a seeded hash of their ids" in warned[0]  # was: silent
    assert "of its 18 train rows are not in this run's train split" in warned[0]
    assert f"--data.split_file {old}/split.json" in warned[0]
    split = json.loads((old.parent / "new" / "split.json").read_text())
    assert split["scheme"] == 2 and split["fusionkit_version"]  # which scheme drew it: said by the file
    caplog.clear()
    assert main(["train", str(old / "config.yaml"), *out, "--run.name", "same", "--data.split_file",
                 str(old / "split.json")]) == 0  # fmt: skip
    assert json.loads((old.parent / "same" / "split.json").read_text())["train"] == [f"t{i}" for i in range(18)]
    assert not [r for r in caplog.records if "by fusionkit 0.2 or older" in r.getMessage()]


def test_an_ensemble_of_an_02_and_a_03_run_names_the_version_as_the_cause(old_run: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    old = order_split(_copy(old_run, tmp_path))
    out = ["--run.output_dir", str(old.parent)]
    assert main(["train", str(old / "config.yaml"), *out, "--run.name", "new"]) == 0
    capsys.readouterr()
    assert main(["eval", str(old), "--ensemble", str(old.parent / "new"), "--split", "test"]) != 0
    err = capsys.readouterr().err
    assert "drawn by fusionkit 0.2 or older" in err and f"--data.split_file {old}/split.json" in err
    assert "the same data.split_seed (the default" not in err  # was: advice to use the seed both already have
    assert main(["train", str(old / "config.yaml"), *out, "--run.name", "same", "--data.split_file",
                 str(old / "split.json")]) == 0  # fmt: skip
    assert main(["eval", str(old), "--ensemble", str(old.parent / "same"), "--split", "test"]) == 0


def test_continuing_an_02_tune_study_names_the_version_not_other_weights(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    pytest.importorskip("optuna")
    (tmp_path / "space.yaml").write_text("optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n")
    (tmp_path / "cfg.yaml").write_text(f"data: {{dataset: 'synthetic:48', cache_dir: {tmp_path / 'cache'}}}\n"
                                       "model: {freeze: encoders}\noptim: {epochs: 1}\nrun: {checkpoint_every: 0}\n")  # fmt: skip
    argv = ["tune", str(tmp_path / "cfg.yaml"), "--space", str(tmp_path / "space.yaml"), "--output-dir",
            str(tmp_path / "tune"), "--trials", "1"]  # fmt: skip
    assert main(argv) == 0
    journal = tmp_path / "tune" / "study.jsonl"  # its identity as 0.2 wrote it: no version, 0.2's encoder key
    ops = [json.loads(line) for line in journal.read_text().splitlines()]
    for op in ops:
        identity = op.get("user_attr", {}).get("identity")
        if identity is not None:
            identity.pop("fusionkit_version", None)
            identity["encoders"] = "3b9d3d5a2886318d"
    journal.write_text("".join(json.dumps(op) + "\n" for op in ops))
    kept = {p.name: p.read_bytes() for p in journal.parent.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "written by fusionkit 0.2 or older, which keyed encoder weights otherwise" in err and "--output-dir" in err
    assert "an encoder was saved again" not in err  # was: the user's encoders blamed
    assert {p.name: p.read_bytes() for p in journal.parent.iterdir() if p.is_file()} == kept
