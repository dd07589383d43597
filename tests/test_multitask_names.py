"""Task names in a multi-task model: a name never overwrites another task's predictions or the id, never names a
path, and metrics are read by the task names; resumes say plainly what changed in the tasks; eval repeats the
run's own numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionkit.cli import main
from fusionkit.config import ConfigError, TaskConfig
from fusionkit.tasks import create_task
from fusionkit.training import build_config
from fusionkit.training.metrics import higher_is_better, prediction_rows
from fusionkit.training.report import write_predictions

MOODS = ("happy", "meh", "sad")
FAST = ["--optim.batch_size", "8", "--run.progress", "false", "--run.plots", "false"]


def write_table(folder: Path, n: int = 24) -> Path:
    """`uid,txt,pic,mood,tags,score`: a class, a tag list and a number per row, with an image each."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "txt", "pic", "mood", "tags", "score"])
        for i in range(n):
            Image.fromarray(np.full((16, 16, 3), 40 * (i % 6), np.uint8)).save(folder / f"p{i}.png")
            w.writerow([f"u{i}", f"{MOODS[i % 3]} caption {i}", f"p{i}.png", MOODS[i % 3], ["a", "b", "a|b"][i % 3],
                        f"{(i % 7) / 7:.4f}"])  # fmt: skip
    return path


def train(table: Path, out: Path, name: str, tasks: list[dict], *extra: str) -> int:
    return main(["train", "--data.dataset", str(table), "--data.text_column", "txt", "--data.image_column", "pic",
                 "--data.id_column", "uid", "--model.tasks", json.dumps(tasks), "--run.output_dir", str(out),
                 "--run.name", name, "--data.cache_dir", str(out / "cache"), *FAST, *extra])  # fmt: skip


@pytest.mark.parametrize(
    ("tasks", "said"),
    [
        ([{"name": "mood"}, {"name": "id", "type": "regression", "column": "score"}], "task name 'id' is the id column"),
        ([{"name": "mood"}, {"name": "mood_prob", "type": "regression", "column": "score"}],
         "tasks 'mood' and 'mood_prob' would write the same prediction column"),
        ([{"name": "mood_prob_sad", "type": "regression", "column": "score"}, {"name": "mood"}],
         "tasks 'mood_prob_sad' and 'mood' would write the same prediction column"),
    ],
)  # fmt: skip
def test_a_task_named_like_another_tasks_prediction_column_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tasks: list[dict], said: str
) -> None:
    table = write_table(tmp_path / "d")
    assert train(table, tmp_path / "runs", "r", tasks, "--optim.max_steps", "1") == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run dir, no cache: refused before reading anything


def test_a_config_with_clashing_task_names_is_refused_wherever_it_is_built(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--print-config`, `tune` and Python callers validate the same config the trainer does."""
    tasks = [{"name": "mood"}, {"name": "mood_prob", "type": "regression", "column": "score"}]
    with pytest.raises(ConfigError, match="would write the same prediction column"):
        build_config(None, {"model.tasks": tasks})
    assert main(["train", "--model.tasks", json.dumps(tasks), "--print-config"]) == 2
    assert "would write the same prediction column" in capsys.readouterr().err


def test_prediction_rows_and_files_refuse_to_overwrite_a_key() -> None:
    """Tasks built past the config check (a plugin, an old model) still cannot overwrite a prediction."""
    mood = create_task(TaskConfig("mood", class_names=["sad", "happy"], num_classes=2))
    score = create_task(TaskConfig("id", type="regression", num_classes=1))
    result = {"ids": ["a", "b"], "outputs": {"mood": torch.zeros(2, 2), "id": torch.ones(2, 1)}}
    with pytest.raises(ConfigError, match=r"predicts \['id'\], which the prediction row already holds"):
        prediction_rows({"mood": mood, "id": score}, result)
    rows = [{"id": "a", "mood": "sad", "mood_prob": {"sad": 0.6, "happy": 0.4}, "mood_prob_sad": 1.0}]
    with pytest.raises(ValueError, match=r"\['mood_prob_sad'\] would be written twice"):
        write_predictions(Path("never-written.csv"), rows)
    assert not Path("never-written.csv").exists()


@pytest.mark.parametrize("name", ["mood/v2", "mood\\v2", "mood\x00", "\tmood"])
def test_a_task_name_that_is_no_file_name_is_refused_with_the_fix(name: str) -> None:
    with pytest.raises(ConfigError, match="cannot hold '/'") as e:
        build_config(None, {"model.tasks": [{"name": name}]})
    fixed = json.loads(str(e.value).split("keep its column: ")[1])
    assert build_config(None, {"model.tasks": [fixed]}).model.tasks[0].label_column == name


def test_a_metrics_direction_is_read_by_the_task_names() -> None:
    """`val/<task>/<metric>` is parsed by the model's task names, not by splitting on '/'."""
    tasks = {name: create_task(TaskConfig(name, type=type_)) for name, type_ in
             (("mood/v2", "classification"), ("mood", "classification"), ("score", "regression"))}  # fmt: skip
    assert higher_is_better("val/mood/v2/macro_f1", tasks) and higher_is_better("val/mood/macro_f1", tasks)
    assert not higher_is_better("val/mood/v2/loss", tasks) and not higher_is_better("val/score/mse", tasks)
    assert not higher_is_better("val/loss", tasks)
    with pytest.raises(ConfigError, match="names no task"):
        higher_is_better("val/topic/macro_f1", tasks)


def test_a_resume_names_task_changes_by_task_and_key_and_refuses_adding_a_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = write_table(tmp_path / "d")
    tasks = [{"name": "mood"}, {"name": "score", "type": "regression", "weight": 0.5}]
    assert train(table, tmp_path / "runs", "r", tasks, "--optim.max_steps", "2") == 0
    run = str(tmp_path / "runs" / "r")
    capsys.readouterr()
    # the tasks list it started from: the same config (classes and target statistics are the data's), not a change
    assert main(["train", "--resume", run, "--model.tasks", json.dumps(tasks)]) == 0
    assert "changed config" not in capsys.readouterr().err
    # one option of one task: that one line, not every task in full
    assert main(["train", "--resume", run, "--model.tasks.score.weight", "2"]) == 1
    err = capsys.readouterr().err
    assert "changed config: model.tasks.score.weight: 0.5 -> 2." in err and "class_names" not in err
    # another head: refused plainly before any weight is read, even with --accept-changes
    added = [*tasks, {"name": "tags", "type": "multilabel"}]
    assert main(["train", "--resume", run, "--model.tasks", json.dumps(added), "--accept-changes"]) == 1
    err = capsys.readouterr().err
    assert "a resume cannot add or remove tasks (added: tags)" in err and "missing keys" not in err
    assert main(["train", "--resume", run, "--model.tasks", json.dumps(tasks[:1]), "--accept-changes"]) == 1
    assert "(removed: score)" in capsys.readouterr().err


def test_eval_of_a_run_repeats_its_summarys_val_metrics_with_an_itm_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ITM's negatives are drawn from evaluation's own seed whatever the loader: `fusionkit eval` of a run gives the
    numbers its summary.json holds, ITM's loss and accuracy included (the CLI's loader, without a generator of
    its own, shifted the draws: 0.5833 vs 0.625)."""
    table = write_table(tmp_path / "d", n=48)
    tasks = [{"name": "mood"}, {"name": "itm", "type": "itm", "weight": 0.3}]
    assert train(table, tmp_path / "runs", "r", tasks, "--optim.max_steps", "6", "--optim.eval_batch_size", "8",
                 "--data.split_ratios", "[0.5, 0.5, 0.0]") == 0  # fmt: skip
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "summary.json").read_text())["val"]
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val", "--batch-size", "8", "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in scored.items() if k != "details"} == {k: v for k, v in summary.items() if k != "details"}


def test_uncertainty_weighting_logs_its_learned_weights_and_eval_says_an_empty_task_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    table = write_table(tmp_path / "d")
    tasks = [{"name": "mood"}, {"name": "score", "type": "regression"}]
    assert train(table, tmp_path / "runs", "u", tasks, "--optim.max_steps", "3", "--run.log_every", "1",
                 "--model.loss_weighting", "uncertainty", "--optim.lr", "0.05") == 0  # fmt: skip
    run = tmp_path / "runs" / "u"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = [(e["train/mood/weight"], e["train/score/weight"]) for e in logged if "train/loss" in e]
    assert len(weights) == 3 and weights[-1] != (1.0, 1.0)  # exp(-s_t): 1 at the start, learned since
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["task_weights"]) == {"mood", "score"} and summary["task_weights"]["mood"] != 1.0
    # a file whose score column is there but empty: scored for mood, and said that score is not
    rows = list(csv.DictReader(table.open()))
    empty = tmp_path / "d" / "noscore.csv"
    with empty.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "score": ""} for r in rows)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(empty), "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert "all/mood/accuracy" in scored and not any(k.startswith("all/score/") for k in scored)
    assert "has no label in column 'score': task score is not scored" in caplog.text
