"""Supervised contrastive task: the loss against a direct formula, unlabelled rows ignored, config errors, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusionkit.config import ConfigError, ModelConfig, TaskConfig
from fusionkit.models import MultiTaskLoss
from fusionkit.tasks import create_task
from fusionkit.training.config import build_config
from fusionkit.training.trainer import Trainer

SENTIMENT = TaskConfig("sentiment", num_classes=3)


def supcon(name: str = "supcon", weight: float = 1.0, **params) -> TaskConfig:
    return TaskConfig(name, "supcon", weight=weight, params={"labels_from": "sentiment", **params})


def reference_loss(z: torch.Tensor, y: list[int], other: torch.Tensor | None, t: float) -> float:
    """Khosla et al. (2020) eq. 2 written as loops: anchors z, candidates `other` (None: z without self)."""
    total, anchors = 0.0, 0
    cands = z if other is None else other
    for i in range(len(z)):
        idx = [a for a in range(len(cands)) if other is not None or a != i]
        pos = [p for p in idx if y[p] == y[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(z[i] @ cands[a]) / t) for a in idx)
        total += -sum(math.log(math.exp(float(z[i] @ cands[p]) / t) / denom) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


def test_joint_loss_matches_formula_and_ignores_unlabelled_rows() -> None:
    task = create_task(supcon(temperature=0.5))
    z = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    mask = torch.tensor([True, True, True, True, True, False])
    loss = task.loss(z, y, mask)
    # row 3 (class 2) has no positive: it is a candidate but not an anchor; row 5 is unlabelled
    expected = reference_loss(z[:5], y[:5].tolist(), None, 0.5)
    assert loss is not None and math.isclose(float(loss), expected, rel_tol=1e-9)
    # the unlabelled row's label and embedding change nothing
    z2, y2 = z.clone(), y.clone()
    z2[5], y2[5] = F.normalize(torch.randn(4, dtype=torch.float64), dim=0), 1
    assert math.isclose(float(task.loss(z2, y2, mask)), float(loss), rel_tol=1e-12)
    # nobody with a positive: no loss
    assert task.loss(z[:3], torch.tensor([0, 1, 2]), None) is None


def test_cross_loss_matches_formula_and_skips_unpaired_rows() -> None:
    task = create_task(supcon(views="cross", temperature=0.1))
    text = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    image = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 0, 2, 1])
    out = torch.stack([text, image], dim=1)
    out[4] = 0  # a row lacking a modality comes out of forward as zeros
    loss = task.loss(out, y, torch.ones(5, dtype=torch.bool))
    labels = y[:4].tolist()
    expected = 0.5 * (
        reference_loss(text[:4], labels, image[:4], 0.1) + reference_loss(image[:4], labels, text[:4], 0.1)
    )
    assert math.isclose(float(loss), expected, rel_tol=1e-9)


def test_multitask_loss_routes_the_source_labels() -> None:
    criterion = MultiTaskLoss([SENTIMENT, supcon(weight=0.5)])
    logits, z = torch.randn(4, 3), F.normalize(torch.randn(4, 8), dim=-1)
    y, mask = torch.tensor([0, 1, 0, 1]), torch.ones(4, dtype=torch.bool)
    out = criterion({"sentiment": logits, "supcon": z}, {"sentiment": y}, {"sentiment": mask})
    expected = F.cross_entropy(logits, y) + 0.5 * create_task(supcon()).loss(z, y, mask)
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({}, "labels_from"),
        ({"labels_from": "sentiment", "views": "both"}, "views"),
        ({"labels_from": "sentiment", "temperature": 0}, "temperature"),
        ({"labels_from": "sentiment", "temprature": 0.1}, "unknown params"),
    ],
)
def test_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig(tasks=[SENTIMENT, TaskConfig("s", "supcon", params=params)]).validate()


def test_params_of_a_task_type_that_reads_none_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown params \['temperature'\]: a classification task would ignore"):
        ModelConfig(tasks=[TaskConfig("sentiment", num_classes=3, params={"temperature": 0.1})]).validate()


def test_labels_from_must_name_a_labelled_task() -> None:
    with pytest.raises(ConfigError, match="'mood'.*labelled tasks: \\['sentiment'\\]"):
        MultiTaskLoss([SENTIMENT, TaskConfig("s", "supcon", params={"labels_from": "mood"})])


def test_labels_from_must_name_a_classification_task() -> None:
    score = TaskConfig("score", "regression")
    with pytest.raises(ConfigError, match="'s' takes its labels from task 'score' \\(regression\\).*classification"):
        MultiTaskLoss([score, TaskConfig("s", "supcon", params={"labels_from": "score"})])


def test_listed_first_it_does_not_become_the_selection_metric(tmp_path: Path) -> None:
    """supcon reports no metric: the default run.metric is the first task that reports one."""
    aux = {"name": "aux", "type": "supcon", "params": {"labels_from": "sentiment"}}
    cfg = build_config(None, {
        "data.dataset": "synthetic:48", "data.cache_dir": str(tmp_path / "cache"), "optim.max_steps": 1,
        "model.tasks": [aux, {"name": "sentiment"}], "run.output_dir": str(tmp_path), "run.name": "r",
        "run.progress": False, "run.plots": False,
    })  # fmt: skip
    assert Trainer(cfg).metric == "val/sentiment/macro_f1"


@pytest.mark.parametrize("views", ["joint", "cross"])
def test_trains_on_synthetic_data_without_a_label_column(tmp_path: Path, views: str) -> None:
    sentiment = {"name": "sentiment", "type": "classification"}
    aux = {
        "name": "supcon",
        "type": "supcon",
        "weight": 0.5,
        "params": {"labels_from": "sentiment", "views": views},
    }
    cfg = build_config(None, {
        "data.dataset": "synthetic:96", "data.cache_dir": str(tmp_path / "cache"), "model.tasks": [sentiment, aux],
        "optim.epochs": 2, "optim.batch_size": 16, "model.freeze": "encoders", "run.output_dir": str(tmp_path / "runs"), "run.name": views,
        "run.progress": False, "run.plots": False, "run.checkpoint_every": 0,
    })  # fmt: skip
    trainer = Trainer(cfg)
    assert "supcon" not in trainer.datasets["train"].label_names  # no label column of its own was bound
    losses = []
    criterion = trainer.model.criterion
    original = criterion.forward

    def record(outputs, labels=None, label_mask=None, **kwargs):
        out = original(outputs, labels, label_mask, **kwargs)
        if trainer.model.training:
            losses.append(float(out["supcon"]))
        return out

    criterion.forward = record  # type: ignore[method-assign]
    summary = trainer.fit()
    assert "val/sentiment/accuracy" in summary["val"] and math.isfinite(summary["val"]["val/loss"])
    per_epoch = len(losses) // 2
    first, last = sum(losses[:per_epoch]) / per_epoch, sum(losses[-per_epoch:]) / per_epoch
    assert last < first  # the auxiliary objective is optimised
