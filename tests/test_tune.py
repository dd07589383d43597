"""`fusionkit tune`: tiny Optuna searches on synthetic data write their table, plot and best config."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("optuna")

import fusionkit  # noqa: E402
from fusionkit.cli import main  # noqa: E402
from fusionkit.config import ConfigError  # noqa: E402
from fusionkit.data import DataError, make_synthetic  # noqa: E402
from fusionkit.training.config import build_config  # noqa: E402
from fusionkit.tune import apply_params, load_space  # noqa: E402
from tests.encoder_folders import save_tiny_bert  # noqa: E402


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump({
            "data": {"dataset": "synthetic:96", "cache_dir": str(tmp_path / "cache")},
            "model": {"freeze": "encoders"},
            "optim": {"epochs": 2, "batch_size": 16},
            "run": {"output_dir": str(tmp_path / "runs"), "name": "base", "checkpoint_every": 0},
        })
    )  # fmt: skip
    return path


def test_cli_tune_writes_table_plot_and_best_config_keeping_a_users_own_files(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(  # as a user writes it: PyYAML reads 1e-4 (no decimal point) as a string
        "optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n"
        "model.fusion.depth: {type: int, low: 1, high: 2}\n"
        "model.fusion.dim: {type: int, low: 32, high: 96, step: 32}\n"  # 2 heads: any step of 32 is valid
        "model.fusion.dropout: {type: float, low: 0.0, high: 0.3, step: 0.1}\n"
        "model.tasks.sentiment.class_weights: {type: categorical, choices: [null, balanced]}\n"
    )
    out = tmp_path / "tune"
    out.mkdir()  # --output-dir a folder of the user's, with files of the names tune writes
    mine = {"best.yaml": "optim: {lr: 0.5}\n", "trials.md": "# my notes\n"}
    for name, text in mine.items():
        (out / name).write_text(text)
    argv = [
        "tune",
        str(write_config(tmp_path)),
        "--trials",
        "3",
        "--space",
        str(space),
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert len({r["optim.lr"] for r in rows}) == 3  # the sampler drew different values
    assert all(1e-4 <= float(r["optim.lr"]) <= 1e-2 for r in rows)
    assert {int(r["model.fusion.dim"]) for r in rows} <= {32, 64, 96}  # on the step's grid
    assert all(round(float(r["model.fusion.dropout"]), 9) in (0.0, 0.1, 0.2, 0.3) for r in rows)
    assert (out / "history.png").stat().st_size > 1000
    assert "| trial |" in (out / "trials.md").read_text()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert all(float(r["val_loss"]) > 0 for r in rows if r["state"] == "COMPLETE")  # each trial's, to break ties
    best_row = min((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: (-float(r["value"]), float(r["val_loss"])))
    assert best["optim"]["lr"] == pytest.approx(float(best_row["optim.lr"]))
    assert best["model"]["fusion"]["depth"] == int(best_row["model.fusion.depth"])
    # every trial was a normal run dir, and the best config trains as it is
    assert all(Path(r["run_dir"]).is_dir() for r in rows)
    assert build_config(out / "best.yaml").optim.lr == best["optim"]["lr"]
    assert {name: (out / f"{name}.~1~").read_text() for name in mine} == mine  # kept, as --output elsewhere


def test_task_options_and_bad_spaces() -> None:
    cfg = build_config(None, {})
    tuned = apply_params(cfg, {"model.tasks.sentiment.label_smoothing": 0.1, "optim.lr": 1e-3})
    assert tuned.model.tasks[0].label_smoothing == 0.1 and tuned.optim.lr == 1e-3
    with pytest.raises(ConfigError, match="no task 'mood'"):
        apply_params(cfg, {"model.tasks.mood.label_smoothing": 0.1})
    # a task's own parameters: model.tasks.<name>.params.<key>, the others kept
    sc = {"name": "sc", "type": "supcon", "params": {"labels_from": "sentiment", "views": "joint"}}
    with_sc = build_config(None, {"model.tasks": [{"name": "sentiment"}, sc]})
    tuned = apply_params(with_sc, {"model.tasks.sc.params.temperature": 0.2})
    assert tuned.model.tasks[1].params == {"labels_from": "sentiment", "views": "joint", "temperature": 0.2}
    with pytest.raises(ConfigError, match="unknown params"):
        apply_params(with_sc, {"model.tasks.sc.params.temprature": 0.2}).validate()
    with pytest.raises(ConfigError, match="needs type"):
        load_space({"optim.lr": {"low": 1, "high": 2}})
    with pytest.raises(ConfigError, match="low must be < high"):
        load_space({"optim.lr": {"type": "float", "low": 2, "high": 1}})


def test_fusionkit_tune_is_exported_and_importing_fusionkit_does_not_need_optuna() -> None:
    """`fusionkit.tune(...)` as the README names it; optuna is an optional extra, imported when tune runs."""
    code = "import sys, fusionkit; print(callable(fusionkit.tune), 'tune' in fusionkit.__all__, 'optuna' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True", "False"]


def test_default_space_takes_each_task_types_own_options() -> None:
    from fusionkit.config import TaskConfig
    from fusionkit.tune import default_space

    space = default_space([TaskConfig("mood"), TaskConfig("score", type="regression"), TaskConfig("topic")])
    assert {"model.tasks.mood.label_smoothing", "model.tasks.mood.class_weights",
            "model.tasks.topic.label_smoothing"} <= set(space)  # fmt: skip
    assert not any(k.startswith("model.tasks.score.") for k in space)  # regression declares none
    assert "optim.lr" in space


def test_tuning_again_in_the_same_dir_adds_trials_and_never_loses_any(tmp_path: Path, capsys) -> None:
    """A second `tune` on the same dir continues the study (new values, trials numbered on); one with another
    config or space is refused before any trial, and the first study's files are untouched."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    out = tmp_path / "tune"
    argv = ["tune", str(write_config(tmp_path)), "--space", str(space), "--output-dir", str(out), "--trials"]
    assert main([*argv, "2"]) == 0
    first = list(csv.DictReader((out / "trials.csv").open()))
    assert main([*argv, "2"]) == 0
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"] and rows[:2] == first
    assert len({r["optim.lr"] for r in rows}) == 4  # the continued sampler drew new values
    assert len({r["run_dir"] for r in rows}) == 4 and all(Path(r["run_dir"]).is_dir() for r in rows)
    assert "best of 4 trials" in (out / "best.yaml").read_text()
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([*argv, "1", "--optim.epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds a tuning study (4 trials)" in err and "optim.epochs" in err and "--output-dir" in err
    space.write_text(yaml.safe_dump({"optim.weight_decay": {"type": "float", "low": 1e-3, "high": 0.1}}))
    assert main([*argv, "1"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == kept
    (out / "study.jsonl").unlink()  # a tune dir written before studies were kept
    assert main([*argv, "1"]) == 2 and "cannot be continued" in capsys.readouterr().err
    assert (out / "trials.csv").read_bytes() == kept["trials.csv"]


@pytest.mark.parametrize(
    "entry,named",
    [({"optim.lrr": {"type": "float", "low": 1e-3, "high": 1e-2}}, "unknown key(s) ['lrr']"),
     ({"model.fusion.strategy": {"type": "categorical", "choices": ["late", "crossattn"]}}, "'crossattn'"),
     ({"optim.warmup_ratio": {"type": "float", "low": 0.0, "high": 1.5}}, "warmup_ratio must be in [0, 1)"),
     # keys that change what a trial's value measures: ranked by one metric, scored on one val split
     ({"run.metric": {"type": "categorical", "choices": ["val/loss", "val/sentiment/accuracy"]}}, "same metric"),
     ({"data.split_seed": {"type": "int", "low": 0, "high": 3}}, "same val rows"),
     # a typo in a distribution's options is not ignored (it would sample linearly / off the step)
     ({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "lg": True}}, "unknown option(s) ['lg']"),
     ({"optim.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "log: true needs low > 0"),
     ({"optim.lr": {"type": "float", "low": "a lot", "high": 1e-2}}, "low must be a number, got 'a lot'"),
     ({"model.fusion.depth": {"type": "int", "low": 1, "high": 2.5}}, "high of an int must be a whole number"),
     # a large grid: the highest value on the step's grid is checked (285, odd for 2 heads), not high (290, never drawn)
     ({"model.fusion.dim": {"type": "int", "low": 30, "high": 290, "step": 15}}, "the value 285 gives"),
     # a small grid: every value is checked, not only the ends (30 and 32 are valid for 2 heads, 31 is not)
     ({"model.fusion.dim": {"type": "int", "low": 30, "high": 32}}, "the value 31 gives"),
     # a task's labels: trials would be ranked on different labels
     ({"model.tasks.sentiment.column": {"type": "categorical", "choices": ["sentiment", "text"]}}, "same labels"),
     ({"model.tasks.sentiment.type": {"type": "categorical", "choices": ["classification", "regression"]}},
      "same labels"),
     ({"model.tasks.sentiment.class_names": {"type": "categorical", "choices": [None, ["a", "b", "c"]]}}, "same labels"),
     ({"model.tasks.sentiment.num_classes": {"type": "int", "low": 2, "high": 3}}, "same labels"),
     ({"data.image_root": {"type": "categorical", "choices": [None, "/tmp"]}}, "same val rows"),
     # a section whose value sets one of those keys
     ({"data": {"type": "categorical", "choices": [{"augment": True}, {"text_column": "caption"}]}},
      "sets data.text_column"),
     ({"model": {"type": "categorical", "choices": [{"tasks": [{"name": "sentiment", "column": "x"}]}]}},
      "sets model.tasks"),
     # a section and one of its own keys: a trial uses one value, and trials.csv would record both
     ({"optim": {"type": "categorical", "choices": [{"lr": 0.01}]},
       "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "it sets 'optim.lr', which the space also searches"),
     # valid as a config, but not for these encoders: the model's own checks run on every value too
     ({"model.text.max_length": {"type": "categorical", "choices": [16, 600]}}, "exceeds the text encoder's"),
     ({"model.fusion.image_grid": {"type": "int", "low": 1, "high": 40}}, "exceeds the image encoder's")],
)  # fmt: skip
def test_a_bad_space_stops_before_the_first_trial(tmp_path: Path, capsys, entry: dict, named: str) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(entry))
    out = tmp_path / "tune"
    argv = ["tune", str(write_config(tmp_path)), "--space", str(space), "--output-dir", str(out), "--trials", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"search space {next(iter(entry))!r}" in err and named in err
    assert not (out / "trials").exists() and not (out / "study.jsonl").exists()


def test_a_metric_typo_or_a_failed_first_trial_does_not_block_the_corrected_command(tmp_path: Path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    out = tmp_path / "tune"
    argv = ["tune", str(write_config(tmp_path)), "--space", str(space), "--output-dir", str(out), "--trials", "1"]
    assert main([*argv, "--run.metric", "val/sentiment/f1"]) == 2
    assert "val/sentiment/macro_f1" in capsys.readouterr().err and not out.exists()  # refused before the study
    assert main([*argv, "--data.dataset", str(tmp_path / "missing.csv")]) != 0 and not (out / "study.jsonl").exists()
    assert main([*argv, "--model.fusion.image_grid", "100"]) == 2 and not out.exists()  # refused building the model
    unstable = tmp_path / "unstable.yaml"  # NaN losses: the first trial fails
    unstable.write_text(yaml.safe_dump({"optim.lr": {"type": "float", "low": 900.0, "high": 999.0}}))
    assert main([*argv, "--space", str(unstable), "--optim.grad_clip", "null", "--optim.warmup_ratio", "0",
                 "--data.dataset", "synthetic:48", "--optim.epochs", "1"]) == 2  # fmt: skip
    assert "no tuning trial completed" in capsys.readouterr().err
    assert main(argv) == 0  # the corrected command: a new study, the failed one kept aside
    assert [p.name.startswith("study.failed-") for p in out.glob("study.*.jsonl")] == [True]
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 1


def test_an_interrupted_tune_summarises_what_finished_and_the_same_command_continues(tmp_path: Path) -> None:
    """Ctrl-C after a finished trial (here: raised by an Optuna callback) leaves trials.md and a best.yaml
    of the finished trials, says how to continue, and the same call adds trials to the study."""
    from fusionkit.training.trainer import TrainingInterrupted
    from fusionkit.tune import tune

    space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    cfg, out = build_config(write_config(tmp_path)), tmp_path / "tune"

    def ctrl_c_after_two(study, trial) -> None:
        if trial.number == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="same fusionkit tune command"):
        tune(cfg, 5, space, out, callbacks=[ctrl_c_after_two])
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    best = min(rows, key=lambda r: -float(r["value"]))
    assert f"(trial {best['trial']})" in (out / "best.yaml").read_text()
    assert "2 trials (2 complete)" in (out / "trials.md").read_text()
    assert tune(cfg, 1, space, out)["trials"] == 3


def test_a_trial_interrupted_midway_says_so_in_trials_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna records a trial stopped by Ctrl-C as failed; its error column says interrupted, not nothing."""
    from fusionkit.training.trainer import Trainer, TrainingInterrupted
    from fusionkit.tune import tune

    fit, calls = Trainer.fit, []

    def fit_then_ctrl_c(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", fit_then_ctrl_c)
    space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    with pytest.raises(TrainingInterrupted):
        tune(build_config(write_config(tmp_path)), 3, space, tmp_path / "tune")
    rows = list(csv.DictReader((tmp_path / "tune" / "trials.csv").open()))
    assert [(r["state"], r["error"]) for r in rows] == [
        ("COMPLETE", ""), ("FAIL", "interrupted (Ctrl-C / SIGTERM) before it finished")]  # fmt: skip


def test_val_loss_warns_when_a_task_param_in_the_space_changes_the_loss_scale(tmp_path: Path, caplog) -> None:
    """Trials ranked by val/loss while supcon's temperature varies compare losses of different scales."""
    supcon = {"name": "sc", "type": "supcon", "params": {"labels_from": "sentiment", "views": "joint"}}
    cfg = build_config(write_config(tmp_path), {"optim.epochs": 1, "data.dataset": "synthetic:48",
                                                "model.tasks": [{"name": "sentiment"}, supcon], "run.metric": "val/loss"})  # fmt: skip
    space = {"model.tasks.sc.params.temperature": {"type": "float", "low": 0.05, "high": 0.5, "log": True}}
    assert fusionkit.tune(cfg, 1, space, tmp_path / "tune")["metric"] == "val/loss"
    warned = [r.getMessage() for r in caplog.records if r.name == "fusionkit.tune" and r.levelname == "WARNING"]
    assert len(warned) == 1 and "model.tasks.sc.params.temperature" in warned[0]


def test_a_search_whose_trials_all_fail_ends_in_one_error_naming_the_first(tmp_path: Path, caplog, capsys) -> None:
    """Trials that all fail (NaN losses: a huge lr, no clipping) end in one error, exit 2, with each trial's
    error in trials.csv and its traceback in the run dir, not a traceback per trial; stopped before any trial
    finished, tune says there is no trials.md / best.yaml yet."""
    from fusionkit.training.trainer import TrainingInterrupted

    config = write_config(tmp_path)
    unstable = yaml.safe_load(config.read_text())
    unstable["data"]["dataset"] = "synthetic:48"
    unstable["optim"].update(epochs=1, grad_clip=None, warmup_ratio=0.0)
    config.write_text(yaml.safe_dump(unstable))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "float", "low": 900.0, "high": 999.0}}))
    out = tmp_path / "tune"

    def ctrl_c(study, trial) -> None:
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="none complete, so there is no trials.md or best.yaml yet"):
        fusionkit.tune(build_config(config), 3, space, out, callbacks=[ctrl_c])
    capsys.readouterr()
    argv = ["tune", str(config), "--space", str(space), "--output-dir", str(out), "--trials", "1"]
    assert main(argv) == 2  # the same study, continued: trials 0 and 1 failed
    err = capsys.readouterr().err
    assert "no tuning trial completed: 1 of 1 failed; the first (trial 1): NonFiniteLossError: loss is nan" in err
    assert not any(r.exc_info for r in caplog.records)  # no traceback per trial
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"] and all("loss is nan" in r["error"] for r in rows)
    assert "Traceback" in (Path(rows[1]["run_dir"]) / "error.txt").read_text()
    assert not (out / "trials.md").exists() and not (out / "best.yaml").exists()


def test_a_task_option_is_set_on_the_command_line_as_in_a_search_space(tmp_path: Path, capsys) -> None:
    cfg = build_config(None, {"model.tasks": [{"name": "mood"}], "model.tasks.mood.label_smoothing": 0.1})
    assert cfg.model.tasks[0].label_smoothing == 0.1
    with pytest.raises(ConfigError, match="no task 'moood'"):
        build_config(None, {"model.tasks.moood.label_smoothing": 0.1})
    assert main(["train", "--config", str(write_config(tmp_path))]) == 2
    assert "CONFIG is positional" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="sum to 1"):
        build_config(None, {"data.split_ratios": [0.6, 0.2, 0.3]})


def synthetic_frame(n: int, seed: int) -> Any:
    """Synthetic rows as a pandas DataFrame (PIL images in the image column), as a user passes their data."""
    pd = pytest.importorskip("pandas")
    rows = make_synthetic(n, seed=seed, image_size=32).examples
    return pd.DataFrame({"text": [r.text for r in rows], "image": [r.image for r in rows],
                         "sentiment": [r.labels["sentiment"] for r in rows]})  # fmt: skip


def test_tuning_on_a_dataframe_records_it_and_is_not_continued_on_other_data(tmp_path: Path, capsys) -> None:
    """`fusionkit.tune(..., data=DataFrame)` trains every trial on the frame; its best.yaml says so (no silent
    training on the config's synthetic data). The same config and space on other rows must not add trials to
    the old study, whose best config would then be chosen across two datasets."""
    cfg = build_config(write_config(tmp_path), {"optim.epochs": 1})
    space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    out = tmp_path / "tune"
    with pytest.raises(DataError, match="'text'"):  # unreadable data: refused before the tune dir exists
        fusionkit.tune(cfg, 1, space, out, data=synthetic_frame(64, seed=0).drop(columns="text"))
    assert not out.exists()
    assert fusionkit.tune(cfg, 1, space, out, data=synthetic_frame(64, seed=0))["trials"] == 1
    best = out / "best.yaml"
    assert yaml.safe_load(best.read_text())["data"]["dataset"] == "in-memory:DataFrame"
    assert "fusionkit.train('best.yaml', data=" in best.read_text()
    capsys.readouterr()
    assert main(["train", str(best)]) == 2 and "fusionkit.train(config, data=...)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"another config, search space, data or encoder weights \(data: .*edited"):
        fusionkit.tune(cfg, 1, space, out, data=synthetic_frame(64, seed=1))
    assert fusionkit.tune(cfg, 1, space, out, data=synthetic_frame(64, seed=0))["trials"] == 2


def test_a_study_of_other_encoder_weights_in_the_same_folder_is_not_continued(tmp_path: Path, capsys) -> None:
    """The config names the encoder by its folder: weights saved there again are another study (its trials
    trained on other features, so best.yaml would not reproduce its value), refused as edited data is."""
    save_tiny_bert(tmp_path / "bert", seed=0)
    config = write_config(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    out = tmp_path / "tune"
    argv = ["tune", str(config), "--space", str(space), "--output-dir", str(out), "--trials", "1",
            "--model.text.name", str(tmp_path / "bert"), "--model.text.max_length", "32", "--optim.epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    save_tiny_bert(tmp_path / "bert", seed=1)  # the same path, other weights
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a tuning study (1 trials)" in err and "encoder weights" in err and "--output-dir" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == kept
    save_tiny_bert(tmp_path / "bert", seed=0)  # the weights the study trained with: it continues
    assert main(argv) == 0 and len(list(csv.DictReader((out / "trials.csv").open()))) == 2


@pytest.mark.parametrize(
    "name,text,named",
    [("trials.csv", "trial,my score\n1,0.9\n", "holds a trials.csv that is not this study's"),
     # a JSON-lines file of the user's: Optuna's journal reader failed with a raw KeyError 'op_code'
     ("study.jsonl", '{"my": "log line"}\n', "study.jsonl is not a fusionkit tune study")],
)  # fmt: skip
def test_a_users_own_file_of_a_name_tune_keeps_is_refused_before_anything_is_written(
    tmp_path: Path, capsys, name: str, text: str, named: str
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text(text)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    argv = ["tune", str(write_config(tmp_path)), "--space", str(space), "--output-dir", str(out), "--trials", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "--output-dir NEW_DIR" in err
    assert sorted(p.name for p in out.iterdir()) == [name]  # no empty study.jsonl (or lock) left beside it
    assert (out / name).read_text() == text


def test_an_output_dir_that_is_a_file_is_said_to_be_one(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "afile"
    mine.write_text("mine\n")
    for out in (mine, mine / "sub"):
        assert main(["tune", str(write_config(tmp_path)), "--output-dir", str(out), "--trials", "1"]) == 2
        assert f"{mine} is a file, not a folder" in capsys.readouterr().err  # not "[Errno 17] File exists"
    assert mine.read_text() == "mine\n"


def test_a_tune_dir_inside_a_run_dir_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    run = tmp_path / "runs" / "mine"
    assert main(["train", "--data.dataset", "synthetic:48", "--optim.max_steps", "1", "--run.output_dir",
                 str(run.parent), "--run.name", "mine", "--run.progress", "false", "--run.plots", "false"]) == 0  # fmt: skip
    before = sorted(p.name for p in run.iterdir())
    assert main(["tune", str(write_config(tmp_path)), "--output-dir", str(run), "--trials", "1"]) != 0
    assert f"inside the run dir {run}" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before  # no study.jsonl / trials.csv written into the run


def test_a_tune_dir_inside_a_model_folder_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    """An encoder folder, a saved model or an ONNX export holds that model's files only (predict --output refuses
    them too): the study's files would sit beside its weights."""
    from fusionkit import create_model

    saved = tmp_path / "saved"
    create_model("tiny").save_pretrained(saved)
    export = tmp_path / "onnx"
    export.mkdir()
    (export / "export.json").write_text("{}")
    config = write_config(tmp_path)
    for out, folder in ((saved, saved), (saved / "sub", saved), (export, export)):
        before = sorted(p.name for p in folder.rglob("*"))
        assert main(["tune", str(config), "--output-dir", str(out), "--trials", "1"]) == 2
        assert "is inside the model folder" in capsys.readouterr().err
        assert sorted(p.name for p in folder.rglob("*")) == before


def test_a_trial_whose_values_make_an_invalid_config_fails_and_the_search_goes_on(tmp_path: Path, capsys) -> None:
    """Each value is valid alone (the space check passes), but dim 64 with 3 heads is not: that trial fails with
    its error in trials.csv, the others train. Trials that keep drawing invalid configs stop the search."""
    config = write_config(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("model.fusion.dim: {type: categorical, choices: [48, 64]}\n"
                     "model.fusion.num_heads: {type: categorical, choices: [2, 3]}\n")  # fmt: skip
    out = tmp_path / "tune"
    argv = ["tune", str(config), "--space", str(space), "--optim.epochs", "1", "--data.dataset", "synthetic:48",
            "--model.fusion.dim", "48"]  # fmt: skip
    assert main([*argv, "--output-dir", str(out), "--trials", "5"]) == 0  # the seeded sampler draws 64 with 3 heads among them
    rows = list(csv.DictReader((out / "trials.csv").open()))
    invalid = [r for r in rows if (r["model.fusion.dim"], r["model.fusion.num_heads"]) == ("64", "3")]
    assert len(rows) == 5 and invalid and len(invalid) < len(rows)
    assert all(r["state"] == "FAIL" and "not divisible by model.fusion.num_heads=3" in r["error"] for r in invalid)
    assert all(r["state"] == "COMPLETE" for r in rows if r not in invalid)
    assert (out / "best.yaml").is_file()
    space.write_text("model.fusion.dim: {type: categorical, choices: [64]}\n"  # with 3 heads only: never valid
                     "model.fusion.num_heads: {type: categorical, choices: [3]}\n")  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--output-dir", str(tmp_path / "never"), "--trials", "20"]) == 2
    err = capsys.readouterr().err
    assert "the last 5 trials drew values that make no valid config" in err and "narrow the search space" in err
    rows = list(csv.DictReader((tmp_path / "never" / "trials.csv").open()))
    assert len(rows) == 5 and {r["state"] for r in rows} == {"FAIL"}


def test_the_default_space_tunes_the_encoder_rates_only_when_top_blocks_train() -> None:
    from fusionkit.tune import default_space

    rates = {"optim.encoder_lr_scale", "optim.layer_decay"}
    assert rates <= set(default_space(freeze="top_k"))
    assert not rates & set(default_space()) and not rates & set(default_space(freeze="none"))


def test_default_space_takes_tasks_as_configs_write_them() -> None:
    """README's `default_space(tasks, ...)`: plain dicts failed with "'dict' object has no attribute 'type'"."""
    from fusionkit.config import TaskConfig
    from fusionkit.tune import default_space

    written = default_space([{"name": "mood"}, {"name": "price", "type": "regression"}], "top_k")
    assert written == default_space([TaskConfig("mood"), TaskConfig("price", type="regression")], "top_k")
    assert "model.tasks.mood.label_smoothing" in written and "optim.layer_decay" in written


def test_encoder_folders_in_a_space_are_absolute_and_checked_before_the_first_trial(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative folder in a space is relative to the working directory, as `--model.text.name enc` is, and
    stored absolute (best.yaml trained from elsewhere read it as a hub id); a missing one is refused up front,
    not at the trial that draws it."""
    save_tiny_bert(tmp_path / "enc" / "text", seed=0)
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.yaml"
    argv = ["tune", str(write_config(tmp_path)), "--space", str(space), "--trials", "1", "--optim.epochs", "1",
            "--data.dataset", "synthetic:48", "--model.text.max_length", "32", "--output-dir"]  # fmt: skip
    space.write_text("model.text.name: {type: categorical, choices: [enc/text, ./enc/gone]}\n")
    assert main([*argv, str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "search space 'model.text.name': the value './enc/gone'" in err and "does not exist" in err
    assert f"relative to the working directory, {tmp_path}" in err and not (tmp_path / "refused").exists()
    space.write_text("model.text.name: {type: categorical, choices: [enc/text]}\n")
    out = tmp_path / "tune"
    assert main([*argv, str(out)]) == 0
    folder = str(tmp_path / "enc" / "text")
    assert [r["model.text.name"] for r in csv.DictReader((out / "trials.csv").open())] == [folder]
    monkeypatch.chdir(tmp_path / "enc")  # best.yaml trains from any directory
    assert build_config(out / "best.yaml").model.text.name == folder


def test_a_trial_the_trainer_refuses_fails_and_the_search_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config error only the trainer finds (labels a drawn value makes invalid, ...) fails that trial, with its
    message in trials.csv; it used to end the whole search."""
    from fusionkit.training.trainer import Trainer

    init = Trainer.__init__

    def refuse_trial_1(self, cfg, **kwargs) -> None:
        if cfg.run.name == "trial-001":
            raise ConfigError("task sentiment: labels not valid for this trial")
        init(self, cfg, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", refuse_trial_1)
    space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    cfg = build_config(write_config(tmp_path), {"optim.epochs": 1, "data.dataset": "synthetic:48"})
    assert fusionkit.tune(cfg, 3, space, tmp_path / "tune")["trials"] == 3
    rows = list(csv.DictReader((tmp_path / "tune" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "labels not valid for this trial" in rows[1]["error"]


def test_a_trial_left_running_by_a_killed_tune_is_failed_when_the_study_is_opened_again(tmp_path: Path) -> None:
    """kill -9 mid-trial: trials.csv already lists the finished trials (written after each one), and the same
    command marks the killed trial failed, saying why, instead of RUNNING forever."""
    import signal

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    out = tmp_path / "tune"
    argv = ["tune", str(write_config(tmp_path)), "--space", str(space), "--output-dir", str(out),
            "--optim.epochs", "1", "--data.dataset", "synthetic:48", "--trials"]  # fmt: skip
    killed_in_trial_1 = (
        "import os, signal, sys\n"
        "from fusionkit.training.trainer import Trainer\n"
        "fit = Trainer.fit\n"
        "def fit_or_die(self):\n"
        "    if self.cfg.run.name == 'trial-001':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return fit(self)\n"
        "Trainer.fit = fit_or_die\n"
        "from fusionkit.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    done = subprocess.run([sys.executable, "-c", killed_in_trial_1, *argv, "3"], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert [r["state"] for r in csv.DictReader((out / "trials.csv").open())] == ["COMPLETE"]
    assert main([*argv, "1"]) == 0
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "tune process ended while it ran" in rows[1]["error"]
    assert "3 trials (2 complete, 1 fail)" in (out / "trials.md").read_text()


def test_the_default_space_suits_the_configs_heads_and_says_it_is_the_default(tmp_path: Path, capsys) -> None:
    """Its fusion widths are multiples of num_heads (64 with 3 heads was refused); an error in it says it is
    the default space and how to pass another."""
    argv = ["tune", str(write_config(tmp_path)), "--trials", "1", "--optim.epochs", "1", "--data.dataset",
            "synthetic:48", "--model.fusion.num_heads", "3", "--output-dir"]  # fmt: skip
    assert main([*argv, str(tmp_path / "tune"), "--model.fusion.dim", "48"]) == 0
    rows = list(csv.DictReader((tmp_path / "tune" / "trials.csv").open()))
    assert rows[0]["state"] == "COMPLETE" and int(rows[0]["model.fusion.dim"]) % 3 == 0
    capsys.readouterr()  # an MLP of less than one unit at the narrowest default width (63 x 0.01)
    assert main([*argv, str(tmp_path / "t2"), "--model.fusion.dim", "102", "--model.fusion.mlp_ratio", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "the default search space (no --space given)" in err and "--space SPACE.yaml" in err


def test_a_data_warning_is_said_once_per_search_not_once_per_trial(tmp_path: Path, caplog) -> None:
    """Every trial reads the same rows: a tag in every train row is warned about once, not per trial; and the
    filter leaves with the search (a later training warns again)."""
    frame = synthetic_frame(48, seed=0)
    frame["tags"] = "always"
    frame.loc[3, "text"] = ""  # skipped by every trial, reported in each trial's own run dir
    tasks = [{"name": "sentiment"}, {"name": "tags", "type": "multilabel"}]
    cfg = build_config(write_config(tmp_path), {"optim.epochs": 1, "model.tasks": tasks, "data.missing_text": "skip"})
    space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    assert fusionkit.tune(cfg, 3, space, tmp_path / "tune", data=frame)["trials"] == 3

    def constant_tag_warnings() -> int:
        return sum("can only learn a constant" in r.getMessage() for r in caplog.records)

    assert constant_tag_warnings() == 1
    assert sum("skipped 1 of 48 items; see" in r.getMessage() and "trial-" in r.getMessage()
               for r in caplog.records) == 1  # fmt: skip
    fusionkit.train(build_config(write_config(tmp_path), {"optim.epochs": 1, "model.tasks": tasks,
                                                          "data.missing_text": "skip", "run.name": "after"}), data=frame)  # fmt: skip
    assert constant_tag_warnings() == 2


def test_a_study_killed_in_its_first_trial_is_restarted_by_a_corrected_command_as_a_failed_one_is(
    tmp_path: Path, caplog
) -> None:
    """kill -9 during trial 0, then the command with a corrected setting: nothing was learned, so the study starts
    again (the old one kept aside), as after a Ctrl-C or a failed trial; it was refused as 'another config'."""
    import signal

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    out = tmp_path / "tune"
    argv = ["tune", str(write_config(tmp_path)), "--space", str(space), "--output-dir", str(out),
            "--data.dataset", "synthetic:48", "--trials", "1"]  # fmt: skip
    killed_in_trial_0 = (
        "import os, signal, sys\n"
        "from fusionkit.training.trainer import Trainer\n"
        "Trainer.fit = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from fusionkit.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    done = subprocess.run([sys.executable, "-c", killed_in_trial_0, *argv, "--optim.epochs", "3"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert main([*argv, "--optim.epochs", "1"]) == 0
    assert "held only failed trials of another config" in caplog.text
    assert [r["state"] for r in csv.DictReader((out / "trials.csv").open())] == ["COMPLETE"]
