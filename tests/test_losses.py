import math

import torch

from fusionkit.config import TaskConfig
from fusionkit.models import MultiTaskLoss
from fusionkit.models.heads import task_loss

CLS = TaskConfig("a", "classification", num_classes=3)


def test_uncertainty_weighting_learns_log_task_losses():
    tasks = [TaskConfig("a"), TaskConfig("b")]
    criterion = MultiTaskLoss(tasks, "uncertainty")
    opt = torch.optim.Adam(criterion.parameters(), lr=0.05)
    fixed = {"a": torch.tensor(4.0), "b": torch.tensor(0.25)}
    for _ in range(600):
        opt.zero_grad()
        criterion.combine(fixed)["loss"].backward()
        opt.step()
    # optimum of exp(-s) L + s is s = log L: the noisier task ends with the smaller weight
    torch.testing.assert_close(
        criterion.log_vars.detach(), torch.tensor([math.log(4.0), math.log(0.25)]), atol=0.02, rtol=0
    )
    w = criterion.task_weights()
    assert w["a"] < 1.0 < w["b"]


def test_static_weights_scale_task_losses():
    criterion = MultiTaskLoss([TaskConfig("a", weight=2.0), TaskConfig("b", weight=0.5)])
    out = criterion.combine({"a": torch.tensor(1.0), "b": torch.tensor(4.0)})
    assert float(out["loss"]) == 4.0
    assert float(out["a"]) == 1.0 and float(out["b"]) == 4.0


def test_masked_labels_are_ignored():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    mask = torch.tensor([True, False, True, False])
    garbage = labels.clone()
    garbage[~mask] = torch.tensor([2, 1])  # changing unlabeled rows' values changes nothing
    a = task_loss(CLS, logits, labels, mask)
    b = task_loss(CLS, logits, garbage, mask)
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(a, b)
    assert task_loss(CLS, logits, labels, torch.zeros(4, dtype=torch.bool)) is None
    # a task with no label in the batch leaves the total and the other task's term alone
    criterion = MultiTaskLoss([CLS, TaskConfig("b")])
    out = criterion(
        {"a": logits, "b": logits}, {"a": labels, "b": labels}, {"a": torch.zeros(4, dtype=torch.bool)}
    )
    assert "a" not in out
    torch.testing.assert_close(out["loss"], torch.nn.functional.cross_entropy(logits, labels))


def test_label_free_tasks():
    itm = TaskConfig("m", "itm")
    good = torch.tensor([[10.0, -10.0], [10.0, -10.0]])
    assert float(task_loss(itm, good, None, None)) < 1e-3
    assert float(task_loss(itm, -good, None, None)) > 5
    clip = TaskConfig("c", "contrastive")
    diag = torch.eye(3) * 20
    assert float(task_loss(clip, diag, None, None)) < 1e-3
    assert float(task_loss(clip, diag.flip(0), None, None)) > 5
    assert task_loss(clip, torch.zeros(1, 1), None, None) is None
