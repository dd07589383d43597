"""Task losses and outputs computed by hand: weights with smoothing, zero weights, bf16 regression, full probabilities."""

import math

import pytest
import torch

from fusionkit.config import ConfigError, TaskConfig
from fusionkit.models import get_config
from fusionkit.tasks import create_task


def test_class_weights_with_label_smoothing_weight_each_row_by_its_true_class() -> None:
    """Targets (1 - eps) + eps/K on the true class and eps/K elsewhere; each row's loss times its true class's
    weight, over the sum of those weights (torch weights the smoothing term by every class's weight instead)."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 2])
    weights, eps = [0.5, 2.0, 4.0], 0.3
    task = create_task(TaskConfig("mood", num_classes=3, class_weights=weights, label_smoothing=eps))
    total = norm = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_p = [v - math.log(sum(math.exp(u) for u in row)) for v in row]
        targets = [(1 - eps) * (k == y) + eps / 3 for k in range(3)]
        total += weights[y] * -sum(t * lp for t, lp in zip(targets, log_p))
        norm += weights[y]
    assert float(task.loss(logits, labels, None)) == pytest.approx(total / norm, rel=1e-6)
    assert task.loss_normaliser(labels, None, 4) == pytest.approx(norm)  # what the trainer weighs batches by


def test_a_batch_of_zero_weight_rows_has_loss_zero_not_nan() -> None:
    """class_weights [1, 0]: a batch (or val split) holding only class-1 rows has nothing to learn: loss 0, not 0/0."""
    task = create_task(TaskConfig("mood", num_classes=2, class_weights=[1.0, 0.0], label_smoothing=0.1))
    logits = torch.randn(3, 2, requires_grad=True)
    loss = task.loss(logits, torch.tensor([1, 1, 1]), None)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0
    assert task.loss_normaliser(torch.tensor([1, 1, 1]), None, 3) == 0.0  # the trainer skips such a batch
    # "balanced" gives a class absent from train weight 1, so its val rows keep a finite, nonzero loss
    balanced = create_task(TaskConfig("mood", num_classes=2, class_weights="balanced")).fit_train_statistics([0, 0])
    assert balanced.class_weights == [0.5, 1.0]  # n / (k * count), and 1 for the absent class
    assert float(create_task(balanced).loss(logits.detach(), torch.tensor([1, 1, 1]), None)) > 0


def test_class_prior_of_unknown_length_reads_as_english() -> None:
    with pytest.raises(ConfigError, match=r"class_prior must be positive numbers, one per class"):
        get_config("tiny", tasks=[{"name": "a", "logit_adjustment": 1.0, "class_prior": [0.5, -0.5]}])
    with pytest.raises(ConfigError, match=r"class_prior must be 3 positive numbers, one per class"):
        get_config("tiny", tasks=[{"name": "a", "num_classes": 3, "logit_adjustment": 1.0, "class_prior": [0.5, 0.5]}])


def test_regression_under_bf16_autocast_keeps_large_targets_in_float32() -> None:
    """Targets around 1e5 (std 10): bf16 holds them only to within 512, so the de-standardized output and the loss
    are float32 under autocast; they differ from fp32's by the head's own bf16 noise only."""
    from fusionkit.tasks import FusionContext

    torch.manual_seed(0)
    task = create_task(TaskConfig("price", "regression", params={"target_mean": [1e5], "target_std": [10.0]}))
    head = task.build_head(16, 1, 0.0)
    ctx = FusionContext(views=torch.randn(32, 1, 16), text=None, text_mask=None, image=None, fuse=lambda *a: None)
    target = 1e5 + 10 * torch.randn(32, 1)
    fp32_out = task.forward(head, ctx)
    fp32_loss = task.loss(fp32_out, target, None)
    with torch.autocast("cpu", torch.bfloat16):
        bf16_out = task.forward(head, ctx)
        bf16_loss = task.loss(bf16_out, target, None)
    assert bf16_out.dtype == torch.float32 and bf16_loss.dtype == torch.float32
    torch.testing.assert_close(bf16_out, fp32_out, atol=0.5, rtol=0)  # 10 x bf16's error on z-scores of ~1
    assert float(bf16_loss) == pytest.approx(float(fp32_loss), rel=0.05)


def test_predicted_probabilities_are_not_rounded(tmp_path) -> None:
    """A probability of 2e-9 stays 2e-9 (rounded to 6 decimals it was 0.0, and log-loss downstream was inf), in
    `predict`'s rows and in a predictions CSV, as the shortest decimal of its float32."""
    import csv

    import numpy as np

    from fusionkit.training.report import write_predictions

    logits = torch.tensor([[20.0, 0.0], [0.0, 0.0]])
    cls = create_task(TaskConfig("mood", class_names=["a", "b"]))
    tags = create_task(TaskConfig("tags", "multilabel", class_names=["x", "y"]))
    rows = [{"id": str(i), **c, **t} for i, (c, t) in enumerate(zip(cls.predict(logits), tags.predict(-logits)))]
    tiny = rows[0]["mood_prob"]["b"]
    assert np.float32(tiny) == logits.softmax(-1)[0, 1].numpy() and str(tiny) == "2.0611537e-09"  # that float32
    assert np.float32(rows[0]["tags_prob"]["x"]) == torch.tensor(-20.0).sigmoid().numpy() > 0
    assert rows[1]["mood_prob"] == {"a": 0.5, "b": 0.5}  # short: not 0.5000000000000001 or float32's long decimal
    with open(write_predictions(tmp_path / "p.csv", rows)) as f:
        written = list(csv.DictReader(f))
    assert float(written[0]["mood_prob_b"]) == tiny and float(written[0]["tags_prob_x"]) == rows[0]["tags_prob"]["x"]


def test_a_multilabel_tag_holding_a_bar_is_refused_naming_its_row(tmp_path) -> None:
    """["x|y", "z"] in a JSONL list would be written "x|y|z" to a predictions CSV and read back as three tags."""
    import json

    from fusionkit.data import DataError, load_dataset
    from fusionkit.tasks import bind_labels

    path = tmp_path / "tags.jsonl"
    rows = [{"id": "r1", "text": "a", "tags": ["z"]}, {"id": "r2", "text": "b", "tags": ["x|y", "z"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(path, missing_image="keep")
    with pytest.raises(DataError, match=r"item r2: tag 'x\|y' of task 'tags' holds '\|'"):
        bind_labels(ds, [TaskConfig("tags", "multilabel")])
    bound, (cfg,) = bind_labels(ds, [TaskConfig("tags", "multilabel")], on_error="skip", report_path=tmp_path / "r")
    assert cfg.class_names == ["z"] and [ex.labels["tags"] for ex in bound] == [[0], None]  # the row stays
    with pytest.raises(ConfigError, match=r"tags \['x\|y'\] hold '\|'"):
        get_config("tiny", tasks=[{"name": "tags", "type": "multilabel", "class_names": ["x|y", "z"]}])


def test_a_multilabel_tag_in_every_or_no_train_row_is_said(caplog: pytest.LogCaptureFixture) -> None:
    task = create_task(TaskConfig("tags", "multilabel", class_names=["always", "never", "some"]))
    with caplog.at_level("WARNING", logger="fusionkit.tasks"):
        task.fit_train_statistics([[0], [0, 2], None, [0]])
    assert "tag(s) ['always'] are in every labelled train row (3 rows)" in caplog.text
    assert "tag(s) ['never'] are in no labelled train row (3 rows)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusionkit.tasks"):
        task.fit_train_statistics([[0], [1, 2], [2]])
    assert "train row" not in caplog.text


@pytest.mark.parametrize("kind", ["classification", "multilabel"])
def test_a_macro_average_over_fewer_classes_than_the_task_has_is_said(kind: str, caplog) -> None:
    """Class 'c' neither labelled nor predicted on test: macro_f1 averages 2 of 3 classes, said as on val, and kept
    in the details (summary.json, `fusionkit eval`'s output)."""
    from fusionkit.training.metrics import evaluation_metrics

    name = f"mood_{kind}"
    task = create_task(TaskConfig(name, kind, class_names=["a", "b", "c"]))
    logits = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0]])
    labels = torch.tensor([0, 1]) if kind == "classification" else torch.tensor([[1, 0, 0], [0, 1, 0]])
    result = {"outputs": {name: logits}, "labels": {name: labels}, "label_mask": {name: torch.tensor([True, True])}}
    with caplog.at_level("WARNING", logger="fusionkit"):
        flat, details = evaluation_metrics({name: task}, result, "test")
    assert f"task {name}: class(es) ['c'] have no labelled or predicted row in test: its macro_f1 averages 2 of 3" \
        in caplog.text
    assert details[name]["macro_avg_leaves_out"] == ["c"] and flat[f"test/{name}/macro_f1"] == 1.0


def test_tune_breaks_a_tie_on_the_metric_by_val_loss_as_training_does(tmp_path) -> None:
    """Three trials tie on macro-F1 (a tiny val split): best.yaml is the one of the lowest val/loss, not trial 0,
    and trials.md says they tie."""
    optuna = pytest.importorskip("optuna")
    import yaml

    from fusionkit.training.config import build_config
    from fusionkit.tune import write_results

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"dataset": "synthetic:16"}, "run": {"output_dir": str(tmp_path)}}))
    space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}
    study = optuna.create_study(direction="maximize")
    for value, loss, lr in ((0.5, 0.9, 1e-3), (0.5, 0.2, 2e-3), (0.4, 0.1, 3e-3), (0.5, 0.7, 4e-3)):
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"optim.lr": lr}, user_attrs={"val_loss": loss},
            distributions={"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}))  # fmt: skip
    assert write_results(study, tmp_path, "val/sentiment/macro_f1", space, build_config(cfg_path)) == 4
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["optim"]["lr"] == 2e-3
    md = (tmp_path / "trials.md").read_text()
    assert "3 trials (0, 1, 3) tie on val/sentiment/macro_f1 = 0.5000: the best is trial 1" in md
    assert [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and "|---" not in line][1:] \
        == ["| 1", "| 3", "| 0", "| 2"]  # best first, a tie by val/loss
    from fusionkit.tune import best_trial  # what `fusionkit.tune` returns as best_trial

    assert best_trial(study).number == 1


def test_the_default_search_space_tries_logit_adjustment_for_classification_only() -> None:
    """The rare-class lever is searched by default for a classification task (off or tau 1), not for multilabel."""
    from fusionkit.config import TaskConfig
    from fusionkit.tune import default_space

    space = default_space([TaskConfig("mood"), TaskConfig("tags", type="multilabel")])
    assert space["model.tasks.mood.logit_adjustment"] == {"type": "categorical", "choices": [0.0, 1.0]}
    assert not any(k.startswith("model.tasks.tags.") for k in space)
