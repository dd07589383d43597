"""Several tasks on a user's own file: a class column, a tag column, a score column, each with gaps.

What a user gets wrong in such files (a score column left as the default classification task, an empty
column, `n/a` cells, tags joined with `;`, a file labelled for only some tasks) is said before training,
or scored for what is there, never trained into nonsense.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fusionkit.cli import main

MOODS = ("happy", "meh", "sad")
FAST = ["--optim.max_steps", "2", "--optim.batch_size", "16", "--run.progress", "false", "--run.plots", "false"]


def write_table(folder: Path, n: int = 48, **columns: object) -> Path:
    """`uid,txt,pic,mood,tags,score` (or `columns` given as callables of the row number, None = leave out)."""
    folder.mkdir(parents=True, exist_ok=True)
    default = {"mood": lambda i: MOODS[i % 3], "tags": lambda i: ["a", "b", "a|b", "[]"][i % 4],
               "score": lambda i: f"{(i % 7) / 7:.4f}"}  # fmt: skip
    default.update(columns)
    rows = []
    for i in range(n):
        img = folder / f"p{i}.png"
        if not img.exists():
            Image.fromarray(np.full((16, 16, 3), 40 * (i % 6), np.uint8)).save(img)
        row = {"uid": f"u{i}", "txt": f"{MOODS[i % 3]} caption {i}", "pic": img.name}
        rows.append({**row, **{k: f(i) for k, f in default.items() if f is not None}})
    path = folder / "data.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def train(table: Path, out: Path, name: str, tasks: list[dict], *extra: str) -> int:
    return main(["train", "--data.dataset", str(table), "--data.text_column", "txt", "--data.image_column", "pic",
                 "--data.id_column", "uid", "--model.tasks", json.dumps(tasks), "--run.output_dir", str(out),
                 "--run.name", name, "--data.cache_dir", str(out / "cache"), *FAST, *extra])  # fmt: skip


def test_a_score_column_left_as_classification_is_refused_before_training(tmp_path: Path, capsys) -> None:
    table = write_table(tmp_path / "d", score=lambda i: f"{i / 47:.4f}")
    assert train(table, tmp_path / "runs", "r", [{"name": "score"}]) == 2
    err = capsys.readouterr().err
    assert "48 distinct numbers" in err and '"type": "regression"' in err
    assert not (tmp_path / "runs" / "cache").exists()  # nothing expensive ran
    # listed as class names, they are classes: the user said so
    names = sorted({f"{i / 47:.4f}" for i in range(48)})
    assert train(table, tmp_path / "runs", "r2", [{"name": "score", "class_names": names}]) == 0


def test_an_empty_task_column_is_refused_and_missing_spellings_are_said(tmp_path: Path, capsys, caplog) -> None:
    table = write_table(tmp_path / "d", score=lambda i: "")
    tasks = [{"name": "mood"}, {"name": "score", "type": "regression"}]
    assert train(table, tmp_path / "runs", "r", tasks) == 2
    assert "task 'score' has no labelled row in the train split" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "cache").exists()
    empty_classes = write_table(tmp_path / "d0", mood=lambda i: "")
    assert train(empty_classes, tmp_path / "runs", "r0", [{"name": "mood"}]) == 2
    assert "the column 'mood' has no labels" in capsys.readouterr().err
    # "n/a" / "NA" are missing (as "None" is), said once; tags joined with ';' are said to be one tag
    table = write_table(tmp_path / "d2", mood=lambda i: ["n/a", "NA"][i % 2] if i < 4 else MOODS[i % 3],
                        tags=lambda i: "a;b" if i % 5 == 0 else "a")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert train(table, tmp_path / "runs", "r2", [{"name": "mood"}, {"name": "tags", "type": "multilabel"}]) == 0
    assert "4 labels ['NA', 'n/a']" in caplog.text and "are read as missing" in caplog.text
    assert "tags ['a;b']" in caplog.text and "separates its tags with '|'" in caplog.text
    saved = json.loads((tmp_path / "runs" / "r2" / "config.json").read_text())["model"]["tasks"]
    assert saved[0]["class_names"] == list(MOODS)


def test_a_task_without_labelled_val_rows_is_said_before_training(tmp_path: Path, caplog) -> None:
    table = write_table(tmp_path / "d", n=60, mood=lambda i: MOODS[i % 3] if i < 6 else "")
    split = tmp_path / "split.json"  # the few labelled rows all in train
    split.write_text(json.dumps({"train": [f"u{i}" for i in range(40)], "val": [f"u{i}" for i in range(40, 50)],
                                 "test": [f"u{i}" for i in range(50, 60)]}))  # fmt: skip
    tasks = [{"name": "mood"}, {"name": "score", "type": "regression"}]
    with caplog.at_level(logging.INFO):
        assert train(table, tmp_path / "runs", "r", tasks, "--data.split_file", str(split)) == 0
    first = caplog.text.index("task mood has no labelled row among the 10 rows of the val split")
    assert "val/mood/macro_f1 (run.metric) cannot select a checkpoint" in caplog.text
    assert first < caplog.text.index("run dir")  # before the first step


def test_eval_scores_the_tasks_a_file_labels_and_predictions_round_trip_empty_tags(tmp_path: Path, caplog) -> None:
    table = write_table(tmp_path / "d")
    tasks = [{"name": "mood"}, {"name": "tags", "type": "multilabel"}, {"name": "score", "type": "regression"}]
    assert train(table, tmp_path / "runs", "r", tasks) == 0
    run = str(tmp_path / "runs" / "r")
    rows = list(csv.DictReader(table.open()))
    by_id = {r["uid"]: r for r in rows}  # the run's predictions files write each row's labels beside its predictions
    for r in csv.DictReader((tmp_path / "runs" / "r" / "predictions_test.csv").open()):
        assert (r["mood_true"], r["tags_true"]) == (by_id[r["id"]]["mood"], by_id[r["id"]]["tags"])
        assert float(r["score_true"]) == pytest.approx(float(by_id[r["id"]]["score"]))
    subset = tmp_path / "mood_only.csv"
    with subset.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uid", "txt", "pic", "mood"])
        w.writeheader()
        w.writerows({k: r[k] if k != "pic" else str(table.parent / r["pic"]) for k in w.fieldnames} for r in rows)
    out = tmp_path / "m.json"
    with caplog.at_level(logging.WARNING):
        assert main(["eval", run, "--data", str(subset), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert "all/mood/accuracy" in metrics and not any(k.startswith(("all/tags/", "all/score/")) for k in metrics)
    assert "has no column 'tags': task tags is not scored" in caplog.text
    # a prediction of no tag is written as "[]", which reads back as "no tag", not as a missing label
    preds = tmp_path / "p.csv"
    assert main(["predict", run, "--data", str(table), "--output", str(preds)]) == 0
    written = [r["tags"] for r in csv.DictReader(preds.open())]
    assert "" not in written and all(t == "[]" or set(t.split("|")) <= {"a", "b"} for t in written)


def test_the_reports_macro_average_is_the_metrics_macro_f1() -> None:
    import torch

    from fusionkit.config import TaskConfig
    from fusionkit.tasks import create_task

    task = create_task(TaskConfig("mood", class_names=["a", "b", "c", "d"], num_classes=4))
    labels = torch.tensor([0, 0, 1, 1, 1])  # classes c and d absent from labels and predictions
    outputs = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0]), 4).float()
    flat, details = task.metrics(outputs, labels, torch.ones(5, dtype=torch.bool))
    assert flat["macro_f1"] == pytest.approx(details["report"]["macro avg"]["f1-score"])
    assert flat["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)  # F1 of a and b; c and d have none
    assert details["report"]["c"] == {"precision": None, "recall": None, "f1-score": None, "support": 0}
    assert details["report"]["b"]["precision"] == pytest.approx(2 / 3)  # a class labelled but wrong keeps its 0s


def test_multilabel_macro_f1_leaves_out_tags_neither_labelled_nor_predicted() -> None:
    import torch

    from fusionkit.config import TaskConfig
    from fusionkit.tasks import create_task

    task = create_task(TaskConfig("tags", type="multilabel", class_names=["food", "sports", "travel"], num_classes=3))
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]])  # nobody here travels
    perfect = (labels.float() * 2 - 1) * 10  # logits: every row's tags exactly
    flat, details = task.metrics(perfect, labels, torch.ones(3, dtype=torch.bool))
    assert flat == {"micro_f1": 1.0, "macro_f1": 1.0}  # was 2/3: travel counted as an F1 of 0
    # the report beside it says the same: its macro average over the same tags, travel without a score
    assert details["report"]["macro avg"]["f1-score"] == 1.0
    assert details["report"]["travel"] == {"precision": None, "recall": None, "f1-score": None, "support": 0}
    wrong = perfect.clone()
    wrong[0, 2] = 10.0  # travel predicted once, never labelled: it counts, with its 0
    flat, _ = task.metrics(wrong, labels, torch.ones(3, dtype=torch.bool))
    assert flat["macro_f1"] == pytest.approx(2 / 3)


def test_multilabel_threshold_decides_tags_and_each_tag_is_reported() -> None:
    """`params.threshold` (one number, or one per tag) decides which tags are predicted, in metrics and in
    predictions alike; the details report each tag's precision, recall, F1 and support."""
    from fusionkit.config import ConfigError, TaskConfig
    from fusionkit.tasks import create_task
    from fusionkit.training.config import build_config

    names = ["food", "sports", "travel"]
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 1]])
    logits = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.6, 0.1], [0.6, 0.9, 0.4]]).logit()  # probabilities, as logits
    mask = torch.ones(3, dtype=torch.bool)

    def task(threshold=None):
        params = {} if threshold is None else {"threshold": threshold}
        return create_task(TaskConfig("tags", type="multilabel", class_names=names, num_classes=3, params=params))

    default, strict, per_tag = task(), task(0.7), task([0.5, 0.5, 0.3])
    assert [r["tags"] for r in default.predict(logits)] == [["food"], ["sports"], ["food", "sports"]]
    assert [r["tags"] for r in strict.predict(logits)] == [["food"], [], ["sports"]]
    assert [r["tags"] for r in per_tag.predict(logits)] == [["food"], ["sports"], ["food", "sports", "travel"]]
    assert per_tag.metrics(logits, labels, mask)[0] == {"micro_f1": 1.0, "macro_f1": 1.0}
    flat, details = strict.metrics(logits, labels, mask)
    assert flat["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 3))  # 2 right, none wrong, 3 missed
    report = details["report"]
    assert report["food"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1-score": 2 / 3, "support": 2})
    assert report["travel"]["support"] == 1 and report["travel"]["recall"] == 0.0 and details["threshold"] == 0.7
    assert details["class_names"] == names
    for bad in (0, 1.5, "high", [0.5, 0.5], True):
        tags = {"name": "tags", "type": "multilabel", "class_names": names, "params": {"threshold": bad}}
        with pytest.raises(ConfigError, match="params.threshold"):
            build_config(None, {"model.tasks": [tags]})


@pytest.mark.parametrize("name", ["type", "eval", "half", "a.b", "loss"])
def test_a_task_named_like_a_model_part_is_refused_with_the_fix(name: str) -> None:
    from fusionkit.config import ConfigError
    from fusionkit.training.config import build_config

    with pytest.raises(ConfigError, match=f"task name '{name}' cannot name a model part") as e:
        build_config(None, {"model.tasks": [{"name": name}]})
    fixed = json.loads(str(e.value).split("keep its column: ")[1])
    assert build_config(None, {"model.tasks": [fixed]}).model.tasks[0].label_column == name


def test_a_unimodal_model_refuses_a_file_without_its_one_side(tmp_path: Path, capsys) -> None:
    table = write_table(tmp_path / "d", tags=None, score=None)
    assert train(table, tmp_path / "runs", "t", [{"name": "mood"}], "--model.fusion.strategy", "text_only") == 0
    pics = tmp_path / "pics.csv"
    rows = list(csv.DictReader(table.open()))
    pics.write_text("uid,pic\n" + "".join(f"{r['uid']},{table.parent / r['pic']}\n" for r in rows))
    argv = ["predict", str(tmp_path / "runs" / "t"), "--data", str(pics), "--output", str(tmp_path / "p.csv")]
    assert main(argv) == 1 and "no column 'txt'" in capsys.readouterr().err
    assert main([*argv, "--text-column", ""]) == 2
    assert "only input of this text_only model" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    # the side it does not read may be absent: captions alone are all it needs
    caps = tmp_path / "caps.csv"
    caps.write_text("uid,txt\n" + "".join(f"{r['uid']},{r['txt']}\n" for r in rows))
    assert main([*argv[:3], str(caps), *argv[4:]]) == 0


def test_eval_scores_a_model_without_a_classification_task(tmp_path: Path, caplog) -> None:
    table = write_table(tmp_path / "d", mood=None, score=lambda i: ["", "n/a"][i % 2] if i < 4 else f"{i / 48:.3f}")
    tasks = [{"name": "score", "type": "regression"}, {"name": "tags", "type": "multilabel"}]
    with caplog.at_level(logging.WARNING):
        assert train(table, tmp_path / "runs", "r", tasks, "--run.metric", "val/score/mae") == 0
    assert "task score: 2 labels ['n/a'] in" in caplog.text  # a regression column says so too
    out = tmp_path / "m.json"
    assert main(["eval", str(tmp_path / "runs" / "r"), "--split", "test", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"test/score/mae", "test/tags/micro_f1"} <= set(metrics)


def train_mood_and_price(tmp_path: Path, epochs: int) -> tuple[Path, Path]:
    """(table, run dir) of a run of mood + a price of 1,000-3,000 read off the caption's mood."""
    price = {"happy": 3000.0, "meh": 2000.0, "sad": 1000.0}
    table = write_table(tmp_path / "d", 60, price=lambda i: f"{price[MOODS[i % 3]]:.0f}", tags=None, score=None)
    tasks = [{"name": "mood"}, {"name": "price", "type": "regression"}]
    assert train(table, tmp_path / "runs", "r", tasks, "--optim.max_steps", "null", "--optim.epochs", str(epochs),
                 "--optim.lr", "3e-3") == 0  # fmt: skip
    return table, tmp_path / "runs" / "r"


def test_a_target_in_the_thousands_is_learned_on_its_own_scale(tmp_path: Path) -> None:
    """Prices of 1,000-3,000 read off the caption's mood: standardized by the train split's mean and std, the
    model predicts them in a few epochs (raw MSE would start the head 2,000 off and swamp the mood task)."""
    table, run = train_mood_and_price(tmp_path, epochs=12)
    cfg = json.loads((run / "summary.json").read_text())
    [saved] = [t for t in yaml.safe_load((run / "config.yaml").read_text())["model"]["tasks"] if t["name"] == "price"]
    assert saved["params"]["target_mean"] == [pytest.approx(2000.0, rel=0.1)]
    assert cfg["test"]["test/price/mae"] < 400  # a mean predictor is off by ~667; an unscaled head by ~2,000
    assert main(["predict", str(run), "--data", str(table), "--output", str(tmp_path / "p.csv")]) == 0
    predicted = [float(r["price"]) for r in csv.DictReader((tmp_path / "p.csv").open())]
    assert 1000 < np.mean(predicted) < 3000


def test_val_loss_is_one_number_whatever_the_eval_batch_size(tmp_path: Path) -> None:
    """With labels missing for some tasks, each task's loss is averaged over its own labelled rows and then
    weighted: the same model and rows give the same val/loss at batch size 1 and 64 (it moved by 30%)."""
    table = write_table(tmp_path / "d", 48, mood=lambda i: "" if i % 4 == 0 else MOODS[i % 3],
                        score=lambda i: "" if i % 3 else f"{(i % 7) / 7:.4f}")  # fmt: skip
    tasks = [{"name": "mood"}, {"name": "tags", "type": "multilabel", "weight": 0.3},
             {"name": "score", "type": "regression", "weight": 5.0}]  # fmt: skip
    assert train(table, tmp_path / "runs", "r", tasks, "--data.split_ratios", "[0.5, 0.5, 0.0]") == 0
    losses = []
    for batch in ("1", "5", "64"):
        out = tmp_path / f"m{batch}.json"
        assert main(["eval", str(tmp_path / "runs" / "r"), "--batch-size", batch, "--output", str(out)]) == 0
        losses.append(json.loads(out.read_text())["val/loss"])
    assert losses == pytest.approx([losses[-1]] * 3, rel=1e-5)
    # each task's own val loss is reported, and the total is their weighted sum
    scores = json.loads(out.read_text())
    weights = {"mood": 1.0, "tags": 0.3, "score": 5.0}
    assert sum(w * scores[f"val/{t}/loss"] for t, w in weights.items()) == pytest.approx(scores["val/loss"], rel=1e-5)
    logged = [json.loads(line) for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(f"train/{t}/loss" in e for e in logged if "train/loss" in e for t in ("mood", "score"))


def test_an_ensemble_of_models_with_an_itm_head_is_scored(tmp_path: Path) -> None:
    """ITM's evaluation output is a decision (right/wrong); an ensemble scores the share of members right."""
    table = write_table(tmp_path / "d", 36, tags=None, score=None)
    tasks = [{"name": "mood"}, {"name": "aux", "type": "itm"}]
    for seed in ("0", "1"):
        assert train(table, tmp_path / "runs", f"s{seed}", tasks, "--run.seed", seed) == 0
    out = tmp_path / "m.json"
    assert main(["eval", str(tmp_path / "runs" / "s0"), "--ensemble", str(tmp_path / "runs" / "s1"),
                 "--output", str(out)]) == 0  # fmt: skip
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["val/aux/accuracy"] <= 1.0 and "val/mood/accuracy" in metrics


def test_a_tie_of_run_metric_goes_to_the_lower_val_loss(tmp_path: Path) -> None:
    """mood's macro-F1 saturates on a small val split while price still learns: the checkpoint kept is the
    tied epoch with the lowest val/loss, not the first epoch that reached the score."""
    _, run = train_mood_and_price(tmp_path, epochs=10)
    epochs = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e.get("epoch_end")]
    top = max(e["val/mood/macro_f1"] for e in epochs)
    expected = min((e for e in epochs if e["val/mood/macro_f1"] == top), key=lambda e: e["val/loss"])
    best = (run / "best").read_text().strip()
    assert best.endswith(f"step-{expected['step']:08d}"), (best, expected["step"])


def test_a_task_at_weight_zero_leaves_the_other_tasks_training_as_it_was(tmp_path: Path) -> None:
    """An ablation 'task absent' vs 'task at weight 0' compares like with like: the tiny preset trains its
    encoders with dropout, whose draws must not shift with the extra head's initialisation."""
    from safetensors.torch import load_file

    from fusionkit.training.rundir import follow_pointer

    table = write_table(tmp_path / "d")
    runs = tmp_path / "runs"
    assert train(table, runs, "alone", [{"name": "mood"}]) == 0
    assert train(table, runs, "probe", [{"name": "mood"}, {"name": "score", "type": "regression", "weight": 0}]) == 0
    alone, probe = (load_file(follow_pointer(runs / n / "last") / "model.safetensors") for n in ("alone", "probe"))
    assert set(probe) - set(alone) and all(k.startswith("heads.score.") for k in set(probe) - set(alone))
    assert all(torch.equal(alone[k], probe[k]) for k in alone), [k for k in alone if not torch.equal(alone[k], probe[k])]


def test_the_best_checkpoint_is_chosen_on_the_first_classification_task_whatever_the_order(tmp_path: Path) -> None:
    """README: run.metric defaults to the first classification task's macro-F1; a regression or tag task listed
    first must not take over checkpoint selection (and early stopping)."""
    table = write_table(tmp_path / "d")
    tasks = [{"name": "score", "type": "regression"}, {"name": "tags", "type": "multilabel"}, {"name": "mood"}]
    assert train(table, tmp_path / "runs", "order", tasks) == 0
    assert json.loads((tmp_path / "runs" / "order" / "summary.json").read_text())["metric"] == "val/mood/macro_f1"


def test_an_ensemble_of_members_with_other_tag_thresholds_says_whose_applies(tmp_path: Path, caplog) -> None:
    table = write_table(tmp_path / "d", 24, score=None)
    for name, threshold in (("lo", 0.3), ("hi", 0.9)):
        tags = {"name": "tags", "type": "multilabel", "params": {"threshold": threshold}}
        assert train(table, tmp_path / "runs", name, [{"name": "mood"}, tags]) == 0
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        assert main(["eval", str(tmp_path / "runs" / "lo"), "--ensemble", str(tmp_path / "runs" / "hi"),
                     "--output", str(tmp_path / "m.json")]) == 0  # fmt: skip
    assert "task tags of" in caplog.text and "has threshold 0.9" in caplog.text and "(the first model's)" in caplog.text
