import math

import torch

from fusionkit.config import TaskConfig
from fusionkit.models import MultiTaskLoss
from fusionkit.tasks import create_task

CLS = TaskConfig("a", "classification", num_classes=3)


def task_loss(cfg, output, target, mask):
    return create_task(cfg).loss(output, target, mask)


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


def test_label_smoothing_and_class_weights_change_the_classification_loss():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 0, 0])
    plain = task_loss(CLS, logits, labels, None)
    smooth = task_loss(TaskConfig("a", num_classes=3, label_smoothing=0.2), logits, labels, None)
    torch.testing.assert_close(smooth, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2))
    assert not torch.allclose(plain, smooth)
    # "balanced" weights come from the training labels: n / (k * count)
    cfg = create_task(TaskConfig("a", num_classes=3, class_weights="balanced")).fit_train_statistics(
        [0, 0, 0, 0, 1, 2]
    )
    assert cfg.class_weights == [0.5, 2.0, 2.0]
    weighted = task_loss(cfg, logits, labels, None)
    torch.testing.assert_close(
        weighted, torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor([0.5, 2.0, 2.0]))
    )


def test_logit_adjustment_trains_on_prior_shifted_logits_from_the_train_labels():
    """Menon et al. (2021): the loss sees logits + tau * log(prior); the prior is the train label frequency."""
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 0, 0])
    cfg = create_task(TaskConfig("a", num_classes=3, logit_adjustment=1.5)).fit_train_statistics([0, 0, 0, 0, 1, 2])
    assert cfg.class_prior == [0.666667, 0.166667, 0.166667]
    shifted = logits + 1.5 * torch.tensor(cfg.class_prior).log()
    torch.testing.assert_close(task_loss(cfg, logits, labels, None), torch.nn.functional.cross_entropy(shifted, labels))
    # a class missing from train counts once (finite log-prior); a given prior is kept
    absent = create_task(TaskConfig("a", num_classes=3, logit_adjustment=1.0)).fit_train_statistics([0, 0, 1])
    assert absent.class_prior == [0.666667, 0.333333, 0.333333]
    given = TaskConfig("a", num_classes=3, logit_adjustment=1.0, class_prior=[0.5, 0.25, 0.25])
    assert create_task(given).fit_train_statistics([0, 0, 1]).class_prior == [0.5, 0.25, 0.25]
    # off by default: no prior is fitted and the loss is plain cross-entropy
    assert create_task(CLS).fit_train_statistics([0, 0, 1]).class_prior is None


def test_logit_adjustment_options_are_checked():
    import pytest

    from fusionkit.config import ConfigError
    from fusionkit.models import get_config

    bad = [
        {"logit_adjustment": -1.0},
        {"logit_adjustment": 1.0, "class_prior": [0.5, 0.5]},  # 2 priors for 3 classes
        {"logit_adjustment": 1.0, "class_prior": [0.5, 0.5, 0.0]},
        {"type": "multilabel", "logit_adjustment": 1.0},
        {"class_prior": [0.5, 0.3, 0.2]},  # a prior nothing reads: logit_adjustment is 0
    ]
    for extra in bad:
        with pytest.raises(ConfigError, match="logit_adjustment|class_prior"):
            get_config("tiny", tasks=[{"name": "a", "num_classes": 3, **extra}])
    get_config("tiny", tasks=[{"name": "a", "num_classes": 3, "logit_adjustment": 1.0, "class_prior": [0.5, 0.3, 0.2]}])


def test_a_batch_with_no_scorable_task_gives_a_zero_loss_that_backpropagates():
    criterion = MultiTaskLoss([CLS])
    logits = torch.randn(4, 3, requires_grad=True)
    out = criterion({"a": logits}, {"a": torch.zeros(4, dtype=torch.long)}, {"a": torch.zeros(4, dtype=torch.bool)})
    assert float(out["loss"].detach()) == 0.0 and set(out) == {"loss"}
    out["loss"].backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_loss_options_a_task_type_does_not_read_are_refused():
    """class_weights / label_smoothing / logit_adjustment on a regression or multilabel task would be saved
    as if used and change nothing; and all-zero task weights would learn nothing."""
    import pytest

    from fusionkit.config import ConfigError
    from fusionkit.models import get_config
    from fusionkit.tune import default_space

    for task in ({"name": "score", "type": "regression", "label_smoothing": 0.1},
                 {"name": "score", "type": "regression", "class_weights": "balanced"},
                 {"name": "tags", "type": "multilabel", "num_classes": 3, "class_weights": [1.0, 2.0, 1.0]},
                 {"name": "tags", "type": "multilabel", "num_classes": 3, "label_smoothing": 0.1}):  # fmt: skip
        with pytest.raises(ConfigError, match=f"would be ignored by a {task['type']} task"):
            get_config("tiny", tasks=[task])
    with pytest.raises(ConfigError, match="every task has weight 0"):
        get_config("tiny", tasks=[{"name": "a", "num_classes": 3, "weight": 0.0}])
    get_config("tiny", tasks=[{"name": "a", "num_classes": 3, "weight": 0.0},
                              {"name": "b", "num_classes": 2, "label_smoothing": 0.1}])  # fmt: skip
    space = default_space(get_config("tiny", tasks=[{"name": "tags", "type": "multilabel", "num_classes": 3}]).tasks)
    assert not any(k.startswith("model.tasks.tags.") for k in space)  # nothing a multilabel task reads


def test_macro_f1_leaves_out_a_declared_class_absent_from_labels_and_predictions() -> None:
    """A split without any "neutral" row, predicted perfectly, scores macro-F1 1, not 2/3."""
    task = create_task(TaskConfig("s", class_names=["positive", "neutral", "negative"]))
    labels = torch.tensor([0, 2, 0, 2])
    perfect = torch.nn.functional.one_hot(labels, 3).float() * 5
    flat, details = task.metrics(perfect, labels, torch.ones(4, dtype=torch.bool))
    assert flat["macro_f1"] == 1.0 and flat["accuracy"] == 1.0
    assert "neutral" in details["report"]  # still listed, with support 0
    wrong = torch.nn.functional.one_hot(torch.tensor([1, 2, 0, 2]), 3).float() * 5  # a false "neutral" counts
    assert task.metrics(wrong, labels, torch.ones(4, dtype=torch.bool))[0]["macro_f1"] < 0.8
