"""Run dirs never lose a user's results: no overwrite, one live writer, copy-proof pointers, checked resumes.

One tiny run on a CSV dataset is trained once per module; every test works on a copy of it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionkit.cli import main
from fusionkit.config import ConfigError, parse_value
from fusionkit.models import FusionModel
from fusionkit.training import Trainer, build_config, train
from fusionkit.training.checkpoint import load_state
from fusionkit.training.rundir import RunDir, RunDirError, follow_pointer
from tests.reliability_utils import tally

CLASSES = ["negative", "neutral", "positive"]


def _write_csv(folder: Path, flip: bool = False) -> Path:
    """24 synthetic pairs as a CSV + PNG files; `flip` relabels the first rows (same ids, texts, images)."""
    from fusionkit.data import make_synthetic

    ds = make_synthetic(24, seed=3, image_size=32)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "image", "sentiment"])
        for i, ex in enumerate(ds):
            label = ex.labels["sentiment"]
            name = CLASSES[label] if isinstance(label, int) else label
            if flip and i < 6:
                name = CLASSES[(CLASSES.index(name) + 1) % 3]
            if not (folder / f"{ex.id}.png").exists():
                ex.image.save(folder / f"{ex.id}.png")
            writer.writerow([ex.id, ex.text, f"{ex.id}.png", name])
    return path


def _overrides(root: Path, data: Path, name: str = "run") -> dict[str, Any]:
    return {
        "data.dataset": str(data), "data.cache_dir": str(root / "cache"), "data.split_ratios": [0.5, 0.25, 0.25],
        "optim.epochs": 2, "optim.batch_size": 4, "run.checkpoint_every": 2, "run.output_dir": str(root / "runs"),
        "run.name": name, "run.progress": False, "run.plots": False,
        "model.tasks": [{"name": "sentiment", "class_names": CLASSES}],
    }  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root, run dir) of one finished 2-epoch run on data/pairs.csv."""
    root = tmp_path_factory.mktemp("rundir")
    data = _write_csv(root / "data")
    train(build_config(None, _overrides(root, data)))
    return root, root / "runs" / "run"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.lock"}  # fmt: skip


def _copy(base: tuple[Path, Path], tmp_path: Path, name: str = "copy") -> Path:
    """The base run copied with symlinks turned into files/folders (zip, cloud sync, `cp -rL`)."""
    run = tmp_path / "runs" / name
    shutil.copytree(base[1], run, symlinks=False)
    return run


def _resume_config(run: Path, **changes: Any) -> Any:
    """What `fusionkit train --resume RUN --a.b X` builds: the saved config plus the overrides."""
    cfg = build_config(run / "config.yaml", changes)
    cfg.run.output_dir, cfg.run.name = str(run.parent), run.name
    return cfg


# ------------------------------------------------------------------------------ never overwrite


def test_pointers_are_files_naming_a_checkpoint(base: tuple[Path, Path]) -> None:
    run = RunDir(base[1])
    for pointer in ("last", "best"):
        assert (run.path / pointer).is_file() and not (run.path / pointer).is_symlink()
        assert (run.path / pointer).read_text().startswith("checkpoints/step-")
    assert load_state(run.last)["step"] == json.loads((run.path / "summary.json").read_text())["steps"]
    assert FusionModel.from_pretrained(run.path / "best").config.tasks[0].name == "sentiment"  # pointer accepted


def test_same_name_again_is_refused_and_the_first_run_is_intact(base: tuple[Path, Path], tmp_path: Path) -> None:
    root, first = base
    before = _digest(first)
    tally("rundir/never_overwritten", tried=2)
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        train(build_config(None, _overrides(root, root / "data" / "pairs.csv")))
    assert main(["train", "--run.output_dir", str(root / "runs"), "--run.name", "run", "--data.dataset",
                 str(root / "data" / "pairs.csv")]) == 1  # fmt: skip
    assert _digest(first) == before
    tally("rundir/never_overwritten", intact=2)


def test_a_new_run_inside_a_run_dir_is_refused(base: tuple[Path, Path]) -> None:
    root, first = base
    before = _digest(first)
    for output_dir in (first, first / "checkpoints" / "sub"):
        overrides = {**_overrides(root, root / "data" / "pairs.csv", "nested"), "run.output_dir": str(output_dir)}
        with pytest.raises(RunDirError, match=f"is inside the run dir {first}"):
            train(build_config(None, overrides))
    assert _digest(first) == before


def test_saving_a_model_back_into_its_run_is_refused_and_the_run_still_evaluates(
    base: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, first = base
    run = _copy(base, tmp_path)
    model = FusionModel.from_pretrained(run)
    before = _digest(run)
    step = RunDir(run).last
    for target, where in [(run, f"{run} is the run dir"), (step, f"is inside the run dir {run}"),
                          (run / "exported", f"is inside the run dir {run}")]:  # fmt: skip
        with pytest.raises(FileExistsError, match=f"{where}.*Save it to a folder outside the run"):
            model.save_pretrained(target)
    assert _digest(run) == before and not (run / "exported").exists()
    assert main(["eval", str(run), "--cache-dir", str(root / "cache")]) == 0  # the run's own data, as before
    assert "synthetic" not in capsys.readouterr().err
    own = tmp_path / "project"  # a folder of the user's with a config.json of its own
    own.mkdir()
    (own / "config.json").write_text('{"lr": 0.1}')
    with pytest.raises(FileExistsError, match=f"{own / 'config.json'} exists and is not a fusionkit model's"):
        model.save_pretrained(own)
    assert (own / "config.json").read_text() == '{"lr": 0.1}' and not (own / "model.safetensors").exists()
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    model.save_pretrained(saved)  # a saved model is written over, as transformers does
    assert FusionModel.from_pretrained(saved).config == model.config


def test_a_model_copied_to_a_run_root_does_not_shadow_best(base: tuple[Path, Path], tmp_path: Path) -> None:
    """A run that an older version saved a model into (config.json replaced) still loads its best checkpoint."""
    run = _copy(base, tmp_path)
    best = FusionModel.from_pretrained(run / "best")
    other = FusionModel.from_pretrained(run / "best")
    with torch.no_grad():
        next(other.heads.parameters()).add_(1.0)
    shutil.copytree(other.save_pretrained(tmp_path / "other"), run, dirs_exist_ok=True)  # what an older version's
    # `save_pretrained(run)` left: a model config.json, model.safetensors and encoder folders at the run root
    loaded = FusionModel.from_pretrained(run)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), best.state_dict().values()))


def test_a_run_without_best_is_loaded_from_last_with_a_warning(
    base: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy(base, tmp_path)
    (run / "best").unlink()  # killed before its first evaluation
    last = RunDir(run).last
    with caplog.at_level(logging.WARNING, "fusionkit"):
        FusionModel.from_pretrained(run)
        FusionModel.from_pretrained(run)  # said once per process
    step = int(last.name.split("-")[1])
    assert caplog.text.count(f"has no `best` pointer (a run stopped before its first evaluation, or the file was "
                             f"deleted): using last, step {step}") == 1  # fmt: skip
    caplog.clear()
    FusionModel.from_pretrained(base[1])  # a run with a best checkpoint: nothing to say
    assert "no best checkpoint" not in caplog.text


def test_a_live_writer_keeps_a_second_one_out(
    base: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second process is refused while the first holds the lock; once it is SIGKILLed the lock is taken."""
    run = _copy(base, tmp_path)
    code = f"from fusionkit.training.rundir import RunDir; r = RunDir({str(run)!r}); r.lock(); print('ok', flush=True); " \
           "import time; time.sleep(60)"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(RunDirError, match=f"another live training.*{holder.pid}"):
            Trainer(_resume_config(run), resume=True)
        with pytest.raises(RunDirError, match="another live training"):
            RunDir(run).lock()
        with pytest.raises(RunDirError, match=f"being written by another live training.*{holder.pid}"):
            train(_resume_config(run))  # a fresh run with the same name
    finally:
        holder.kill()
        holder.wait()
    second = RunDir(run)
    with caplog.at_level(logging.WARNING, "fusionkit.training"):
        second.lock()  # the dead holder's flock is gone with it
    assert f"taking over the lock left by {holder.pid}@" in caplog.text
    assert (run / "run.lock").read_text().startswith(f"{os.getpid()}@")
    second.unlock()


def test_default_names_and_increment_never_reuse_a_dir(tmp_path: Path) -> None:
    a = RunDir.create(tmp_path, "exp", "increment")
    (a.path / "summary.json").write_text("{}")
    b = RunDir.create(tmp_path, "exp", "increment")  # `a` still holds its lock and has content
    assert (a.path.name, b.path.name) == ("exp", "exp-1")
    c = RunDir.create(tmp_path, None)
    d = RunDir.create(tmp_path, None)  # same second: a timestamp twice still gives two dirs
    assert c.path != d.path
    for r in (a, b, c, d):
        r.unlock()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    contents=st.lists(st.sampled_from(["summary.json", "checkpoints", "notes.txt", "last", "run.lock"]), max_size=3),
    locked=st.booleans(),
    policy=st.sampled_from(["error", "increment"]),
)
def test_create_never_takes_a_dir_with_content_or_a_writer(
    tmp_path_factory: pytest.TempPathFactory, contents: list[str], locked: bool, policy: str
) -> None:
    """Whatever the dir holds (files, folders, a stale or live lock), `create` returns an empty dir of its own."""
    root = tmp_path_factory.mktemp("states")
    existing = root / "exp"
    existing.mkdir()
    for name in contents:
        (existing / name).mkdir(exist_ok=True) if name == "checkpoints" else (existing / name).write_text("x")
    holder = RunDir(existing)
    if locked:
        holder.lock()
    before = _digest(existing)
    taken = bool(set(contents) - {"run.lock"}) or locked
    tally("rundir/never_overwritten", tried=int(taken))
    try:
        if taken and policy == "error":
            with pytest.raises(RunDirError):
                RunDir.create(root, "exp", policy)
        else:
            run = RunDir.create(root, "exp", policy)
            assert run.locked and run.contents() == []
            assert run.path.name == ("exp-1" if taken else "exp")
            run.unlock()
    finally:
        holder.unlock()
    assert _digest(existing) == before
    tally("rundir/never_overwritten", intact=int(taken))


# ------------------------------------------------------------------------------ copies and resumes


def _tamper_last(run: Path) -> None:
    """Point `last` back at the epoch-1 checkpoint, so a resume has an epoch left to train."""
    steps = sorted((run / "checkpoints").glob("step-*"))
    (run / "last").write_text(f"checkpoints/{steps[0].name}\n")


def test_copied_run_dir_resumes_through_a_full_epoch(base: tuple[Path, Path], tmp_path: Path) -> None:
    run = _copy(base, tmp_path)
    _tamper_last(run)
    first = sorted((run / "checkpoints").glob("step-*"))[0]
    mine = [run / "checkpoints" / f"{first.name}-keep", run / "checkpoints" / f"{first.name} (copy)"]
    for folder in mine:  # the user's own copies: pruning never deletes them
        shutil.copytree(first, folder)
    start = load_state(run / "last")["step"]
    summary = train(_resume_config(run), resume=True)
    assert all((folder / "model.safetensors").is_file() for folder in mine)
    assert summary["steps"] > start and RunDir(run).last.name.startswith(f"step-{summary['steps']:08d}")
    log = [json.loads(line) for line in (run / "resume_log.jsonl").read_text().splitlines()]
    assert log[-1]["from_step"] == start and log[-1]["config_changes"]["run.output_dir"][1] == str(run.parent)


def test_resume_without_last_names_the_newest_checkpoint_left(
    base: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(base, tmp_path)
    newest = RunDir(run).last.relative_to(run).as_posix()
    (run / "last").unlink()
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"the newest is {newest}" in err and f"echo {newest} > {run / 'last'}" in err
    (run / "last").write_text("checkpoints/step-99999999\n")  # a pointer that outlived its checkpoint
    assert main(["train", "--resume", str(run)]) == 1
    assert f"the newest checkpoint left is {newest}: echo {newest} > {run / 'last'}" in capsys.readouterr().err
    # a new name or folder for a resumed run would be silently ignored: refused, before the run is touched
    assert main(["train", "--resume", str(run), "--run.name", "other", "--run.output_dir", str(tmp_path)]) == 2
    assert "run.name, run.output_dir cannot change it" in capsys.readouterr().err


def test_a_resume_from_where_the_run_was_started_changes_no_config_key(
    base: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with run.output_dir "runs" and resumed as --resume runs/NAME: the absolute path the CLI
    gives is the same folder, not a change logged in resume_log.jsonl, and config.yaml is not rewritten."""
    run = _copy(base, tmp_path, "run")  # its own name: not a change either
    for name in ("config.yaml", "config.json"):  # as `fusionkit train --run.output_dir runs` saved it
        text = (run / name).read_text()
        assert text.count(str(base[0] / "runs")) == 1
        (run / name).write_text(text.replace(str(base[0] / "runs"), "runs"))
    saved = (run / "config.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "runs/run"]) == 0
    assert json.loads((run / "resume_log.jsonl").read_text().splitlines()[-1])["config_changes"] == {}
    assert (run / "config.yaml").read_bytes() == saved


def test_a_damaged_checkpoint_is_named_with_the_file_it_lacks_and_an_intact_one(
    base: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(base, tmp_path)
    last, best = RunDir(run).last, RunDir(run).best
    intact = [p for p in sorted((run / "checkpoints").glob("step-*")) if p not in (last, best)]
    assert intact  # an earlier checkpoint the hint can name
    earlier = f"checkpoints/{intact[-1].name}"
    (last / "trainer_state.pt").unlink()
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"names checkpoints/{last.name}, which lacks trainer_state.pt" in err
    assert f"echo {earlier} > {run / 'last'}" in err
    (best / "model.safetensors").unlink()
    assert main(["predict", str(run), "--split", "test", "--output", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err
    assert f"its `best` pointer names checkpoints/{best.name}, which lacks model.safetensors" in err
    assert f"echo {earlier} > {run / 'best'}" in err


def test_old_symlink_layout_is_still_read(base: tuple[Path, Path], tmp_path: Path) -> None:
    run = _copy(base, tmp_path)
    target = RunDir(run).last.name
    (run / "last").unlink()
    (run / "last").symlink_to(Path("checkpoints") / target)
    assert RunDir(run).last.name == target and follow_pointer(run / "last").name == target
    shutil.rmtree(run / "best") if (run / "best").is_dir() else (run / "best").unlink()
    shutil.copytree(run / "checkpoints" / target, run / "best")  # an old symlink copied as a folder
    RunDir(run).set_pointer("best", run / "checkpoints" / target)  # kept under checkpoints/, never deleted
    assert (run / "best").is_file() and (run / "checkpoints" / "copied-best" / "model.safetensors").is_file()


def test_resume_with_changed_labels_is_refused(base: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = base
    run = _copy(base, tmp_path)
    before = _digest(run)
    tally("rundir/never_overwritten", tried=1)
    _write_csv(root / "data", flip=True)
    try:
        with pytest.raises(RunDirError, match="data of .* changed.*split 'train': content changed"):
            Trainer(_resume_config(run), resume=True).fit()
    finally:
        _write_csv(root / "data")
    after = _digest(run)
    assert {k: v for k, v in after.items() if k != "skipped_rows.jsonl"} == {
        k: v for k, v in before.items() if k != "skipped_rows.jsonl"
    }
    tally("rundir/never_overwritten", intact=1)


def test_resume_with_a_new_lr_is_refused_then_accepted_and_recorded(
    base: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(base, tmp_path)
    _tamper_last(run)
    assert main(["train", "--resume", str(run), "--optim.lr", "0.0005"]) == 1
    assert "optim.lr: 0.002 -> 0.0005" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--optim.lr", "0.0005", "--accept-changes"]) == 0
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.0005
    assert "lr: 0.0005" in (run / "config.yaml").read_text()
    entry = json.loads((run / "resume_log.jsonl").read_text().splitlines()[-1])
    assert entry["config_changes"]["optim.lr"] == [0.002, 0.0005]
    groups = load_state(run / "last")["optimizer"]["param_groups"]
    assert {g["initial_lr"] for g in groups if g["name"].startswith("fusion")} == {0.0005}  # trained with it


def test_a_run_written_before_a_config_key_existed_resumes(base: tuple[Path, Path], tmp_path: Path) -> None:
    """Keys added to the config since a run was saved take their defaults: not a change that blocks resume."""
    import yaml

    run = _copy(base, tmp_path)
    _tamper_last(run)
    for name, load, dump in (("config.json", json.loads, json.dumps), ("config.yaml", yaml.safe_load, yaml.safe_dump)):
        saved = load((run / name).read_text())
        del saved["data"]["split_seed"], saved["model"]["tasks"][0]["logit_adjustment"]  # newer than the run
        (run / name).write_text(dump(saved))
    assert main(["train", "--resume", str(run)]) == 0
    entry = json.loads((run / "resume_log.jsonl").read_text().splitlines()[-1])
    assert not any(k.startswith(("data.split_seed", "model.tasks")) for k in entry["config_changes"])
    # a real change is still refused
    assert main(["train", "--resume", str(run), "--data.split_seed", "3"]) == 1


# ------------------------------------------------------------------------------ tampered and impossible configs


@pytest.mark.parametrize(
    "file,keys,value",
    [("config.json", ["model", "fusion", "dim"], 2**20), ("config.json", ["model", "fusion", "depth"], 10**6),
     ("config.json", ["model", "tasks", 0, "num_classes"], 10**9), ("text_encoder/config.json", ["hidden_size"], 2**16)],
)  # fmt: skip
def test_tampered_config_is_refused_before_allocating(
    base: tuple[Path, Path], tmp_path: Path, file: str, keys: list[Any], value: int
) -> None:
    """A config edited to describe a huge model fails in seconds, not after asking for terabytes."""
    model_dir = tmp_path / "model"
    shutil.copytree(RunDir(base[1]).best, model_dir)
    meta = json.loads((model_dir / file).read_text())
    node = meta
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    (model_dir / file).write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="do not match model.safetensors|far larger than model.safetensors|num_classes|class"):
        FusionModel.from_pretrained(model_dir)
    assert time.perf_counter() - start < 10


def test_a_model_that_cannot_be_built_on_meta_is_loaded_unchecked(base: tuple[Path, Path]) -> None:
    from fusionkit.models.fusion_model import check_saved_shapes

    def build() -> Any:
        raise NotImplementedError("Cannot copy out of meta tensor")

    with pytest.warns(UserWarning, match="cannot check"):
        check_saved_shapes(RunDir(base[1]).best / "model.safetensors", build)


@pytest.mark.parametrize(
    "key,value",
    [("model.fusion.num_heads", 0), ("model.fusion.dim", 0), ("model.fusion.depth", 0), ("run.patience", 0),
     ("optim.batch_size", 0), ("optim.eval_batch_size", -1), ("model.text.max_length", 0),
     ("model.fusion.dropout", 1.5), ("run.keep_checkpoints", 0), ("run.name", "../elsewhere"), ("run.name", ""),
     ("run.name_exists", "overwrite"), ("optim.max_steps", 0), ("optim.grad_clip", -1.0),
     ("optim.encoder_lr_scale", -1.0), ("optim.min_lr_ratio", 5.0), ("optim.weight_decay", -0.1),
     ("optim.lr", float("inf")), ("optim.lr", 1e300), ("optim.weight_decay", float("inf")),
     ("optim.encoder_lr_scale", float("inf")), ("optim.betas", [1.5, 0.9]), ("optim.eps", -1.0)],
)  # fmt: skip
def test_impossible_values_are_config_errors(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        build_config(None, {key: value})


def test_max_length_beyond_the_encoders_positions_fails_at_start(tmp_path: Path) -> None:
    cfg = build_config(None, {"model.text.max_length": 4096, "run.output_dir": str(tmp_path), "run.name": "x"})
    with pytest.raises(ConfigError, match="max_length=4096 exceeds .* 512 position"):
        Trainer(cfg)
    assert not (tmp_path / "x").exists()  # refused before any training; the half-made dir is gone
    with pytest.raises(ConfigError, match="max_length=4096"):  # so the same name fails the same way
        Trainer(cfg)


def test_the_python_api_refuses_what_train_refuses() -> None:
    """create_model (and so from_pretrained of a tampered config) checks the built encoders as train does."""
    from fusionkit import create_model

    with pytest.raises(ConfigError, match="max_length=1000 exceeds .* 512 position"):
        create_model("tiny", text={"max_length": 1000})
    with pytest.raises(ConfigError, match="image_grid=5 exceeds"):
        create_model("tiny", fusion={"image_grid": 5})
    with pytest.raises(ConfigError, match="pool_layers=3 exceeds"):
        create_model("tiny", text={"pool_layers": 3})


@pytest.mark.parametrize(
    "overrides,message",
    [({"model.freeze": "top_k", "model.trainable_layers": 9}, r"model.trainable_layers=9 exceeds the text encoder"),
     ({"model.freeze": "top_k", "model.image.trainable_layers": 5}, r"model.image.trainable_layers=5 exceeds"),
     ({"model.text.pool_layers": 3}, r"model.text.pool_layers=3 exceeds the text encoder \(tiny\)'s 2 blocks")],
)  # fmt: skip
def test_more_blocks_than_an_encoder_has_fails_at_start(tmp_path: Path, overrides: dict, message: str) -> None:
    cfg = build_config(None, {**overrides, "run.output_dir": str(tmp_path), "run.name": "x"})
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg)
    assert not (tmp_path / "x").exists()


def test_numeric_run_name() -> None:
    assert build_config(None, {"run.name": parse_value("2024")}).run.name == "2024"


# ------------------------------------------------------------------------------ CLI output paths


def test_output_never_overwrites_the_input_and_is_checked_before_work(
    base: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root, run = base
    data = root / "data" / "pairs.csv"
    before = data.read_bytes()
    common = [str(run), "--data", str(data), "--cache-dir", str(root / "cache")]
    link = tmp_path / "alias.csv"
    link.symlink_to(data)
    for command, out in [("eval", data), ("predict", data), ("eval", link),
                         ("predict", run / "predictions_test.csv"), ("eval", run / "summary.json")]:  # fmt: skip
        assert main([command, *common, "--output", str(out)]) == 2, (command, out)
        err = capsys.readouterr().err
        assert "would overwrite" in err or (command == "eval" and "eval writes .json files" in err), err
    second = tmp_path / "second_run"  # another run's files and its checkpoints' are not written over either
    shutil.copytree(run, second, symlinks=True)
    step = next((second / "checkpoints").iterdir())
    for command, out in [("predict", second / "predictions_test.csv"), ("eval", second / "summary.json"),
                         ("eval", step / "config.json")]:  # fmt: skip
        assert main([command, *common, "--output", str(out)]) == 2, (command, out)
        assert f"would overwrite a file of the {'model' if out.parent == step else 'run'} in" in capsys.readouterr().err
    # a new name inside a checkpoint or a run's own folder: refused, without claiming a file is there
    for out, said in [(step / "preds.csv", f"is inside the model folder {step} (its files are the model's own)"),
                      (second / "checkpoints" / "p.csv", f"is inside the run dir {second} (its files are the run's own)")]:  # fmt: skip
        assert main(["predict", *common, "--output", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert said in err and "would overwrite" not in err and not out.exists()
    assert main(["predict", *common, "--output", str(second / "my_predictions.csv")]) == 0  # a new file beside it
    weights = next(step.glob("*.safetensors"))
    before_weights = weights.read_bytes()
    (tmp_path / "linked.csv").hardlink_to(weights)  # another name for the weights: replaced, not written through
    assert main(["predict", *common, "--output", str(tmp_path / "linked.csv")]) == 0
    assert weights.read_bytes() == before_weights and (tmp_path / "linked.csv").read_text().startswith("id,")
    image = next((root / "data").glob("*.png"))
    assert main(["eval", *common, "--output", str(image)]) == 2  # eval writes .json only: an image is never hit
    other = tmp_path / "other.csv"  # predicting another file onto the run's own training data
    shutil.copy(data, other)
    assert main(["predict", str(run), "--data", str(other), "--output", str(data), "--cache-dir", common[-1]]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert data.read_bytes() == before
    tally("rundir/outputs_refused", refused=5)
    caplog.set_level(logging.INFO)
    caplog.clear()  # the commands above read the cache
    assert main(["embed", *common, "--output", str(tmp_path / "x.csv")]) == 2
    assert ".npy or .parquet" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.csv*"))
    assert not any("cache" in r.getMessage() for r in caplog.records)  # refused before reading any data
    tally("rundir/outputs_refused", refused=1)
    out = tmp_path / "new" / "folder" / "preds.csv"
    assert main(["predict", *common, "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 25


def test_a_lock_held_by_this_process_says_so(tmp_path: Path) -> None:
    first = RunDir.create(tmp_path, "exp")
    with pytest.raises(RunDirError, match="the holder is this process"):
        RunDir(first.path).lock()
    first.unlock()
    RunDir(first.path).lock()  # released: free again


def test_ratios_that_leave_a_split_empty_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = build_config(None, {"data.dataset": "synthetic:40", "data.split_ratios": [0.99, 0.005, 0.005],
                              "data.cache_dir": str(tmp_path / "c"), "optim.max_steps": 1, "run.progress": False,
                              "run.plots": False, "run.output_dir": str(tmp_path), "run.name": "r"})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fusionkit.training"):
        train(cfg)
    assert "the val split is empty" in caplog.text and "no epoch is selected" in caplog.text
    assert "the test split is empty" in caplog.text


def test_a_folder_of_other_files_is_not_called_a_run_nor_offered_for_deletion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tweets.csv").write_text("id,text\n")
    with pytest.raises(RunDirError, match=r"holds other files \(tweets.csv\), not a run") as e:
        RunDir.create(tmp_path, "data")
    assert "delete" not in str(e.value)
    (tmp_path / "notes").write_text("notes\n")  # a file where the run dir would go
    argv = ["train", "--data.dataset", "synthetic:8", "--run.output_dir", str(tmp_path), "--run.name", "notes"]
    assert main(argv) == 1
    assert f"{tmp_path / 'notes'} is a file, not a run dir" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "notes\n"


def test_a_run_copied_as_a_tree_of_symlinks_loads(tmp_path: Path) -> None:
    """`cp -rs RUN COPY` links every file, the `best`/`last` pointer files too: they are still pointers."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("notes\n")  # a file of the run's name: increment skips it
    argv = ["train", "--data.dataset", "synthetic:40", "--optim.max_steps", "2", "--run.output_dir",
            str(tmp_path / "runs"), "--run.name", "r", "--data.cache_dir", str(tmp_path / "cache"),
            "--run.progress", "false", "--run.plots", "false", "--run.name_exists", "increment"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "runs" / "r").read_text() == "notes\n"
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "runs" / "r-1", copy, copy_function=os.symlink)
    assert (copy / "best").is_symlink() and (copy / "best").resolve().is_file()
    original = FusionModel.from_pretrained(tmp_path / "runs" / "r-1")
    linked = FusionModel.from_pretrained(copy)
    assert all((a == b).all() for a, b in zip(original.state_dict().values(), linked.state_dict().values()))


def test_a_run_whose_data_moved_resumes_from_the_new_path_without_accept_changes(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    """The content is what the run checks (data_fingerprint.json), not the path: a moved copy is the same data."""
    import yaml

    root, _ = base
    run = _copy(base, tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["dataset"] = str(tmp_path / "gone" / "pairs.csv")  # where the data was, before it moved
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(FileNotFoundError, match=r"is not there any more: if it moved, resume with --data.dataset"):
        Trainer(_resume_config(run), resume=True)
    shutil.copytree(root / "data", tmp_path / "moved")
    moved = tmp_path / "moved" / Path(_resume_config(run).data.dataset).name
    Trainer(_resume_config(run, **{"data.dataset": str(moved)}), resume=True).fit()  # no --accept-changes needed
