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


def table_config(tmp_path: Path, name: str, tasks: list[dict], table: Path | None = None, **overrides: object):  # type: ignore[no-untyped-def]
    table = table or write_table(tmp_path / "d", 40)
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


def _imbalanced(i: int) -> str:
    return ("happy", "happy", "happy", "meh", "sad")[i % 5]


@pytest.mark.parametrize("case", ["class_weights", "missing_labels"])
def test_accumulated_micro_batches_train_like_one_batch_with_weighted_or_missing_labels(tmp_path: Path,
                                                                                       case: str) -> None:
    """Batch 15 vs 5 x 3 accumulation: cross-entropy with class weights divides by the weights' sum, and a task with
    missing labels by its labelled rows, per micro-batch; weighing micro-batches by rows left the weights 3e-3..7e-3
    apart. Each task's loss is now normalised over the whole window: the same step, and the same logged loss."""
    from safetensors.torch import load_file

    from fusionkit.training.rundir import follow_pointer

    mood = _imbalanced if case == "class_weights" else (lambda i: "" if i % 5 in (0, 3) else _imbalanced(i))
    table = write_table(tmp_path / "d", 40, mood=mood)
    tasks = [{"name": "mood", **({"class_weights": "balanced"} if case == "class_weights" else {})},
             {"name": "score", "type": "regression"}]  # fmt: skip
    same = {"data.split_ratios": [0.75, 0.25, 0.0], "data.augment": False,
            "model.freeze": "encoders", "model.fusion.dropout": 0.0, "optim.epochs": 2, "optim.grad_clip": None,
            "optim.eps": 1e-6, "run.precision": "fp32", "run.log_every": 1}  # fmt: skip
    weights, logged = {}, {}
    for name, batch, accum in (("whole", 15, 1), ("accumulated", 5, 3)):
        cfg = table_config(tmp_path, name, tasks, table, **same,
                           **{"optim.batch_size": batch, "optim.accumulation_steps": accum})  # fmt: skip
        trainer = Trainer(cfg)
        assert len(trainer.datasets["train"]) == 30 and trainer.total_steps == 4
        trainer.fit()
        weights[name] = load_file(follow_pointer(trainer.run_dir / "last") / "model.safetensors")
        logged[name] = [e for e in map(json.loads, (trainer.run_dir / "metrics.jsonl").read_text().splitlines())
                        if "train/loss" in e]  # fmt: skip
    worst = max(float((weights["accumulated"][k] - v).abs().max()) for k, v in weights["whole"].items())
    assert worst < 1e-5
    for key in ("train/loss", "train/mood/loss", "train/score/loss"):
        assert [e[key] for e in logged["accumulated"]] == pytest.approx([e[key] for e in logged["whole"]], rel=1e-5)


def test_a_loss_over_micro_batches_scaled_by_their_normalisers_is_the_whole_batchs() -> None:
    """The loss itself: class weights, label smoothing and missing labels, split 3 ways at uneven places."""
    import torch

    from fusionkit.config import TaskConfig
    from fusionkit.models.heads import MultiTaskLoss

    criterion = MultiTaskLoss([TaskConfig(name="mood", num_classes=3, class_names=["a", "b", "c"],
                                          class_weights=[0.5, 2.0, 1.3], label_smoothing=0.1)])  # fmt: skip
    task = criterion.tasks["mood"]
    logits, target = torch.randn(12, 3), torch.randint(0, 3, (12,))
    mask = torch.tensor([True, False, True, True, False, True, True, True, False, True, True, True])
    whole = criterion({"mood": logits}, {"mood": target}, {"mood": mask})["loss"]
    parts = [slice(0, 2), slice(2, 7), slice(7, 12)]
    counts = [task.loss_normaliser(target[p], mask[p], len(target[p])) for p in parts]
    split = sum(criterion({"mood": logits[p]}, {"mood": target[p]}, {"mood": mask[p]},
                          scales={"mood": n / sum(counts)})["loss"] for p, n in zip(parts, counts))  # fmt: skip
    assert float(split) == pytest.approx(float(whole), rel=1e-6)


def test_patience_and_metric_without_a_val_split_are_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = table_config(tmp_path, "noval", [{"name": "mood"}], **{"data.split_ratios": [1.0, 0.0, 0.0],
                                                                 "run.patience": 2, "run.metric": "val/mood/accuracy"})
    with caplog.at_level("WARNING", logger="fusionkit"):
        Trainer(cfg)
    assert "run.patience and run.metric set, but there is no val split" in caplog.text


def test_a_splits_loss_with_class_weights_is_the_same_at_any_batch_size(tmp_path: Path) -> None:
    """`fusionkit eval` of a class-weighted task: the split's loss is one weighted mean (batches weighed by their
    class weights' sum, as training weighs micro-batches); weighed by row counts it moved with the batch size."""
    from fusionkit.cli import main

    table = write_table(tmp_path / "d", 40, mood=_imbalanced)
    cfg = table_config(tmp_path, "cw", [{"name": "mood", "class_weights": [0.2, 1.0, 5.0]}], table,
                       **{"data.split_ratios": [0.5, 0.5, 0.0], "optim.epochs": 1})  # fmt: skip
    Trainer(cfg).fit()
    losses = []
    for batch in (3, 64):
        out = tmp_path / f"eval{batch}.json"
        assert main(["eval", str(tmp_path / "runs" / "cw"), "--split", "val", "--batch-size", str(batch),
                     "--output", str(out), "--no-progress"]) == 0  # fmt: skip
        losses.append(json.loads(out.read_text())["val/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_an_epoch_whose_val_rows_have_no_labels_says_so_and_a_log_gets_no_bars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The epoch line names what it could not score, not an empty `epoch 1: `."""
    import pandas as pd

    from fusionkit.data import make_synthetic

    rows = make_synthetic(40, seed=0, image_size=32).examples
    frame = pd.DataFrame({"text": [r.text for r in rows], "image": [r.image for r in rows],
                          "sentiment": [r.labels["sentiment"] if i < 30 or i >= 35 else None
                                        for i, r in enumerate(rows)]})  # fmt: skip
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [str(i) for i in range(30)], "val": [str(i) for i in range(30, 35)],
                                 "test": [str(i) for i in range(35, 40)]}))  # fmt: skip
    fusionkit.train({"data": {"split_file": str(split), "cache_dir": str(tmp_path / "cache")}, "optim": {"epochs": 1},
                     "run": {"output_dir": str(tmp_path / "runs"), "progress": True, "plots": False}}, data=frame)  # fmt: skip
    captured = capsys.readouterr()
    assert "epoch 1: no val scores (no labelled val rows)" in captured.out
    assert "it/s" not in captured.err  # progress bars on a terminal (or notebook) only: none in a redirected log
