"""Training knobs that must mean what they say: the direction of a task's own metric (checkpoint selection, early
stopping, `fusionkit tune`), gradient accumulation and a batch split over processes as one batch of that size, the
logged train loss, and settings that have nothing to act on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fusionkit
from fusionkit.tasks.regression import RegressionTask
from fusionkit.training.config import build_config
from fusionkit.training.metrics import higher_is_better
from fusionkit.training.trainer import Trainer

from .test_own_data_multitask import write_table


@fusionkit.register_task("knobs_rmse")
class RmseRegression(RegressionTask):
    """A plugin's own error metric: lower is better, which only its `lower_is_better` says."""

    default_metric = "rmse"
    metric_names = ("rmse",)
    lower_is_better = ("loss", "rmse")

    def metrics(self, outputs, labels, mask):  # type: ignore[no-untyped-def]
        m, d = super().metrics(outputs, labels, mask)
        return ({"rmse": m["mse"] ** 0.5} if m else {}), d


def table_config(tmp_path: Path, name: str, tasks: list[dict], **overrides: object):  # type: ignore[no-untyped-def]
    table = write_table(tmp_path / "d", 40)
    return build_config(None, {
        "data.dataset": str(table), "data.text_column": "txt", "data.image_column": "pic", "data.id_column": "uid",
        "data.cache_dir": str(tmp_path / "cache"), "model.tasks": tasks, "optim.batch_size": 8,
        "run.output_dir": str(tmp_path / "runs"), "run.name": name, "run.progress": False, "run.plots": False,
        **overrides,
    })  # fmt: skip


def test_a_tasks_own_lower_is_better_metric_selects_its_lowest_epoch(tmp_path: Path) -> None:
    """`rmse` of a plugin task that declares it lower-is-better: the best checkpoint is the epoch of the lowest val
    rmse (a fixed list of names, mse/mae/loss, kept the highest: the worst epoch), and a tuning study minimises it."""
    from fusionkit.tune import open_study

    tasks = [{"name": "score", "type": "knobs_rmse"}]
    cfg = table_config(tmp_path, "rmse", tasks, **{"optim.epochs": 4, "optim.lr": 3e-3})
    summary = Trainer(cfg).fit()
    epochs = [e for e in map(json.loads, (tmp_path / "runs" / "rmse" / "metrics.jsonl").read_text().splitlines())
              if e.get("epoch_end")]  # fmt: skip
    values = [e["val/score/rmse"] for e in epochs]
    assert len(set(values)) > 1, values  # the test means something only if the epochs differ
    assert summary["metric"] == "val/score/rmse" and summary["best"] == min(values), values
    (tmp_path / "tune").mkdir()
    study = open_study(tmp_path / "tune", cfg, {}, "val/score/rmse")
    assert study.direction.name == "MINIMIZE"
    tasks_by_name = {"score": RmseRegression(cfg.model.tasks[0])}
    assert not higher_is_better("val/loss", tasks_by_name) and not higher_is_better("val/score/loss", tasks_by_name)
    with pytest.raises(fusionkit.ConfigError, match="names no task"):
        higher_is_better("val/other/rmse", tasks_by_name)
