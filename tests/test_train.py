"""Trainer: config errors, optimizer groups, exact resume (exception and SIGTERM), NaN stop, feature cache."""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkit.config import ConfigError
from fusionkit.models import create_model
from fusionkit.training.config import build_config
from fusionkit.training.optim import param_groups
from fusionkit.training.rundir import follow_pointer
from fusionkit.training.trainer import NonFiniteLossError, Trainer, TrainingInterrupted


def tiny_config(tmp_path: Path, name: str = "run", **overrides):
    base = {
        "data.dataset": "synthetic:100",
        "data.cache_dir": str(tmp_path / "cache"),
        "optim.epochs": 2,
        "optim.batch_size": 16,
        "run.output_dir": str(tmp_path / "runs"),
        "run.name": name,
        "run.checkpoint_every": 2,
        "run.log_every": 3,  # log lines that span a checkpoint: their loss average must survive a resume
        "run.progress": False,
        "run.plots": False,
    }
    return build_config(None, {**base, **overrides})


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_config_errors_and_nested_merge(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        build_config(None, {"optim.lrr": 1.0})
    with pytest.raises(ConfigError, match="expected int"):
        build_config(None, {"optim.epochs": "ten"})
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  fusion:\n    strategy: gated\noptim:\n  lr: 0.01\n")
    cfg = build_config(path, {"model.fusion.depth": 3})
    assert (cfg.model.fusion.strategy, cfg.model.fusion.depth, cfg.optim.lr) == ("gated", 3, 0.01)
    assert cfg.model.fusion.dim == 64  # the tiny preset's value survives a partial `fusion:` section
    path.write_text("data:\n  datasett: x\n")
    with pytest.raises(ConfigError, match="datasett"):
        build_config(path)


def test_param_groups_decay_and_encoder_lr() -> None:
    model = create_model("tiny")
    cfg = build_config(None, {"optim.lr": 1e-3, "optim.encoder_lr_scale": 0.1}).optim
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"encoder/decay", "encoder/no_decay", "fusion/decay", "fusion/no_decay"}
    assert groups["encoder/decay"]["lr"] == pytest.approx(1e-4) and groups["fusion/decay"]["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {f"{side}.{n}" for side in ("text_encoder", "image_encoder") for n in getattr(model, side).no_weight_decay()}
    assert "image_encoder.model.pos_embed" in exempt  # timm declares it; a 3-d matrix that must not decay
    assert "text_encoder.model.embeddings.position_embeddings.weight" not in exempt  # BERT's recipe decays it
    for name, g in groups.items():
        assert all((p.ndim >= 2 and names[id(p)] not in exempt) == name.endswith("/decay") for p in g["params"])
        assert g["weight_decay"] == (cfg.weight_decay if name.endswith("/decay") else 0.0)
    no_decay = {
        names[id(p)] for p in groups["fusion/no_decay"]["params"] + groups["encoder/no_decay"]["params"]
    }
    assert any(n.endswith("bias") for n in no_decay) and any("norm" in n.lower() for n in no_decay)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable


def test_train_writes_run_dir(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, **{"run.plots": True, "optim.epochs": 1})
    summary = Trainer(cfg).fit()
    run = Path(summary["run_dir"])
    for name in ("config.yaml", "split.json", "metrics.jsonl", "summary.json", "curves.png",
                 "confusion_val_sentiment.png", "predictions_test.csv", "best", "last"):  # fmt: skip
        assert (run / name).exists(), name
    assert (follow_pointer(run / "best") / "model.safetensors").is_file()
    assert 0.0 <= summary["val"]["val/sentiment/macro_f1"] <= 1.0
    assert "report" in summary["val"]["details"]["sentiment"]
    state = torch.load(follow_pointer(run / "last") / "trainer_state.pt", weights_only=True)  # no pickled objects
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 0


TWO_TASKS = [{"name": "sentiment"}, {"name": "aux", "type": "itm", "weight": 0.5}]


@pytest.mark.parametrize("how, grouped, tasks", [("exception", False, None), ("sigterm", False, None),
                                                 ("exception", True, None), ("exception", False, TWO_TASKS)])
def test_interrupted_run_resumes_bitwise(tmp_path: Path, how: str, grouped: bool, tasks: list | None) -> None:
    """Also with two tasks, whose per-task train losses are averaged over log lines that span a checkpoint."""
    config = functools.partial(tiny_config, **{"data.group_by_length": grouped},
                               **({"model.tasks": tasks} if tasks else {}))  # fmt: skip
    reference = Trainer(config(tmp_path, "reference"))
    ref_summary = reference.fit()
    assert reference.step == 10  # 80 train examples / 16 = 5 steps per epoch, 2 epochs

    def interrupt_at_step_3(trainer: Trainer) -> None:  # a step callback: after the optimizer step
        if trainer.step == 3:  # mid-epoch 1, one step after the step-2 checkpoint
            if how == "exception":
                raise RuntimeError("simulated crash")
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = Trainer(config(tmp_path, "interrupted"))
    interrupted.step_callbacks.append(interrupt_at_step_3)
    expected = RuntimeError if how == "exception" else TrainingInterrupted
    with pytest.raises(expected):
        interrupted.fit()
    run = tmp_path / "runs" / "interrupted"
    assert follow_pointer(run / "last").name == ("step-00000002" if how == "exception" else "step-00000003")

    resumed = Trainer(config(tmp_path, "interrupted"), resume=True)
    summary = resumed.fit()
    ref_w, res_w = weights(reference), weights(resumed)
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)
    assert summary["val"] == ref_summary["val"] and summary["best"] == ref_summary["best"]
    ref_log = (tmp_path / "runs" / "reference" / "metrics.jsonl").read_text()
    assert (run / "metrics.jsonl").read_text() == ref_log
    assert ('"train/aux/loss"' in ref_log) == bool(tasks) and ('"val/aux/loss"' in ref_log) == bool(tasks)


def crash_at_step_3(trainer: Trainer) -> None:
    """Fit `trainer` until a simulated crash after its third optimizer step (its step-2 checkpoint is `last`)."""

    def crash(t: Trainer) -> None:
        if t.step == 3:
            raise RuntimeError("simulated crash")

    trainer.step_callbacks.append(crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit()


def test_a_resume_after_the_encoder_folder_moved_uses_the_runs_saved_encoders(tmp_path: Path, caplog) -> None:
    from transformers import BertModel

    from fusionkit.models.tiny import tiny_bert_config, tiny_tokenizer

    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    config = functools.partial(tiny_config, **{"model.text.name": str(tmp_path / "bert"), "model.text.pretrained": True})
    reference = Trainer(config(tmp_path, "reference"))
    reference.fit()

    crash_at_step_3(Trainer(config(tmp_path, "moved")))
    shutil.rmtree(tmp_path / "bert")
    with pytest.raises(ConfigError, match="encoder folder .*bert does not exist"):
        Trainer(config(tmp_path, "new"))  # a new run cannot start without it ...
    with caplog.at_level("WARNING"):
        resumed = Trainer(config(tmp_path, "moved"), resume=True)  # ... a resume has its checkpoint's copy
    assert "bert is gone or holds no config.json; the resume uses the encoders saved in" in caplog.text
    resumed.fit()
    ref_w, res_w = weights(reference), weights(resumed)
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w)


def _tiny_bert_folder(folder: Path, shuffled: bool = False) -> None:
    """A tiny BERT + its tokenizer; `shuffled`: another tokenizer for the same architecture (words renumbered)."""
    from transformers import BertModel, BertTokenizerFast

    from fusionkit.models.tiny import tiny_bert_config, tiny_vocab

    BertModel(tiny_bert_config()).save_pretrained(folder)
    tokens = list(tiny_vocab())
    tokens = tokens[:5] + tokens[:4:-1] if shuffled else tokens  # the special tokens keep their ids
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True).save_pretrained(folder)


def test_a_resume_uses_its_checkpoints_tokenizer_whatever_the_encoder_folder_holds_now(tmp_path: Path, caplog) -> None:
    """The folder refilled with another tokenizer (same architecture) between crash and resume: the resumed run
    ends as an uninterrupted one (it read the folder's tokenizer before), says that the folder differs, and a
    finished run resumed keeps its results as written (they were rewritten with the other tokenizer's numbers)."""
    _tiny_bert_folder(tmp_path / "bert")
    config = functools.partial(tiny_config, **{"model.text.name": str(tmp_path / "bert"), "model.text.pretrained": True})
    reference = Trainer(config(tmp_path, "reference")).fit()

    crash_at_step_3(Trainer(config(tmp_path, "swapped")))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "bert" / name).unlink(missing_ok=True)
    _tiny_bert_folder(tmp_path / "bert", shuffled=True)
    with caplog.at_level("WARNING"):
        resumed = Trainer(config(tmp_path, "swapped"), resume=True).fit()
    assert "bert now holds another tokenizer than the run trained with" in caplog.text
    assert resumed["test"] == reference["test"] and resumed["best"] == reference["best"]

    run = tmp_path / "runs" / "reference"
    written = {name: (run / name).read_bytes() for name in ("summary.json", "predictions_val.csv", "predictions_test.csv")}
    again = Trainer(config(tmp_path, "reference"), resume=True).fit()
    assert again["test"] == reference["test"]
    assert all((run / name).read_bytes() == data for name, data in written.items())


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(tiny_config(tmp_path))
    original = trainer.model.criterion.forward

    def poisoned(*args, **kwargs):
        losses = original(*args, **kwargs)
        if trainer.step == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.model.criterion, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 4.*batch ids: \['syn-") as info:
        trainer.fit()
    assert "step-00000002" in str(info.value)
    last = follow_pointer(tmp_path / "runs" / "run" / "last")
    assert last.name == "step-00000002"
    assert torch.load(last / "trainer_state.pt", weights_only=True)["step"] == 2


def test_a_full_disk_while_checkpointing_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """torch's zip writer reports a full disk as a RuntimeError ("unexpected pos"): the CLI says what happened in
    one line, with the free space, the intact earlier checkpoint and the resume command; no temp dir is left."""
    from fusionkit.cli import main

    real_save = torch.save

    def disk_fills_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 60544 vs 60432")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_step_4)
    args = ["train", "--data.dataset", "synthetic:100", "--run.output_dir", str(tmp_path / "runs"), "--run.name",
            "full", "--run.checkpoint_every", "2", "--optim.batch_size", "16", "--run.progress", "false"]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "could not write the checkpoint for step 4" in err and "MiB free there" in err
    assert "step-00000002 is intact" in err and "--resume" in err and "Traceback" not in err
    run = tmp_path / "runs" / "full"
    assert follow_pointer(run / "last").name == "step-00000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_unwritable_output_dir_fails_up_front(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="not writable"):
        Trainer(tiny_config(tmp_path, **{"run.output_dir": str(blocker)}))


def test_resume_without_checkpoint_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(tiny_config(tmp_path), resume=True)


def test_feature_cache_is_shared_across_trainers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = {"model.freeze": "encoders", "optim.epochs": 1}
    first = Trainer(tiny_config(tmp_path, "a", **frozen))
    assert first.use_features
    first.fit()
    features = sorted(p.name for p in (tmp_path / "cache").glob("features-*"))
    assert len(features) == 2  # one store per encoder, for all splits' rows together

    def never(*args, **kwargs):
        raise AssertionError("encoder called although its features are cached")

    # Another fusion strategy (and seed-equal encoders): same cache, no encoder pass.
    second = Trainer(tiny_config(tmp_path, "b", **frozen, **{"model.fusion.strategy": "concat"}))
    monkeypatch.setattr(second.model.text_encoder, "forward", never)
    monkeypatch.setattr(second.model.image_encoder, "forward", never)
    summary = second.fit()
    assert summary["feature_cache"] and 0.0 <= summary["val"]["val/sentiment/accuracy"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "cache").glob("features-*")) == features
    assert (
        json.loads((tmp_path / "runs" / "b" / "config.json").read_text())["model"]["fusion"]["strategy"]
        == "concat"
    )


def test_another_split_of_the_same_rows_reuses_the_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeds of splits, other ratios, k folds: one cache for the rows, each split a view of it."""
    frozen = {"model.freeze": "encoders", "optim.epochs": 1}
    first = Trainer(tiny_config(tmp_path, "a", **frozen))
    first.fit()
    stores = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}

    def never(*args, **kwargs):
        raise AssertionError("encoder called although the rows' features are cached")

    other = {"data.split_seed": 7, "data.split_ratios": [0.6, 0.3, 0.1]}
    second = Trainer(tiny_config(tmp_path, "b", **frozen, **other))
    monkeypatch.setattr(second.model.text_encoder, "forward", never)
    monkeypatch.setattr(second.model.image_encoder, "forward", never)
    summary = second.fit()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == stores
    split_a, split_b = (json.loads((tmp_path / "runs" / r / "split.json").read_text()) for r in "ab")
    assert split_a["train"] != split_b["train"] and len(split_b["val"]) > len(split_a["val"])
    # each split is scored on its own rows: the val predictions list exactly the new val split
    rows = list(csv.DictReader((tmp_path / "runs" / "b" / "predictions_val.csv").open()))
    assert sorted(r["id"] for r in rows) == sorted(split_b["val"]) and summary["feature_cache"]


def test_changing_the_text_side_reuses_the_image_features(tmp_path: Path) -> None:
    """The image pass is the expensive one: another text split (or text encoder) must not redo it."""

    def stores(side: str) -> dict[str, float]:
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob(f"features-*-{side}-*")}

    Trainer(tiny_config(tmp_path, "frozen", **{"model.freeze": "encoders", "optim.epochs": 1})).fit()
    image, text = stores("image"), stores("text")
    top = {"model.freeze": "top_k", "model.text.trainable_layers": 1, "model.image.trainable_layers": 0}
    summary = Trainer(tiny_config(tmp_path, "top", **top, **{"optim.epochs": 1})).fit()
    assert summary["feature_cache"]
    assert stores("image") == image and len(image) == 1  # the same store, not rebuilt
    assert len(stores("text")) == 2 and set(text) < set(stores("text"))  # the text hidden states at the new split
    # another tokenization (a text normalization: another data cache) still reuses the image features
    normalized = {"model.freeze": "encoders", "model.text.normalize": "tweet", "optim.epochs": 1}
    assert Trainer(tiny_config(tmp_path, "tweet", **normalized)).fit()["feature_cache"]
    assert stores("image") == image and len(stores("text")) == 3


def test_an_edited_caption_or_label_reuses_the_image_features(tmp_path: Path) -> None:
    """The image features depend on the ids and images alone: editing a caption or a label in the file (a new data
    cache, new text features), or saving it under another name, must not redo the image pass."""
    from PIL import Image

    rows = []
    for i in range(24):
        Image.new("RGB", (16, 16), (10 * i, 80, 200 - 5 * i)).save(tmp_path / f"p{i}.png")
        rows.append({"id": f"r{i}", "text": f"caption {i}", "image": f"p{i}.png", "sentiment": "ab"[i % 2]})

    def train(name: str, file: str = "d.csv") -> None:
        with (tmp_path / file).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        cfg = tiny_config(tmp_path, name, **{"data.dataset": str(tmp_path / file), "model.freeze": "encoders",
                                             "optim.epochs": 1, "model.tasks": [{"name": "sentiment"}]})  # fmt: skip
        assert Trainer(cfg).fit()["feature_cache"]

    def stores(side: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / "cache").glob(f"features-*-{side}-*"))

    train("a")
    image = stores("image")
    rows[3]["text"], rows[5]["sentiment"] = "an edited caption", "a"
    train("b")
    assert stores("image") == image and len(image) == 1 and len(stores("text")) == 2
    train("b2", "tweets_v2.csv")  # the same rows saved under another name
    assert stores("image") == image
    rows[4]["image"] = "p7.png"  # another image in a row: its features are computed again
    train("c")
    assert len(stores("image")) == 2


def test_resaving_a_step_never_unlinks_last(tmp_path):
    """Saving the same step twice (epoch end after a periodic save) keeps `last` valid at every moment."""
    from fusionkit.models import create_model
    from fusionkit.training import checkpoint as ckpt

    model = create_model("tiny")
    first = ckpt.save_checkpoint(tmp_path, 3, model, {"step": 3})
    second = ckpt.save_checkpoint(tmp_path, 3, model, {"step": 3, "again": True})
    assert first != second and first.exists()  # the first is only pruned later, never replaced in place
    assert follow_pointer(tmp_path / "last") == second
    assert ckpt.load_state(tmp_path / "last")["again"] is True


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """run.compile: the same losses as eager training (without dropout) within float tolerance.

    Compilation takes minutes on CPU, hence slow."""
    losses = {}
    for compile_ in (False, True):
        cfg = build_config(None, {"data.dataset": "synthetic:64", "optim.max_steps": 3, "optim.batch_size": 16,
                                  "run.log_every": 1, "run.compile": compile_, "run.progress": False,
                                  "data.augment": False,  # no randomness: compiled dropout draws other numbers
                                  "model.text.config_overrides": {"hidden_dropout_prob": 0.0,
                                                                  "attention_probs_dropout_prob": 0.0},
                                  "run.plots": False, "run.output_dir": str(tmp_path), "run.name": f"c{compile_}",
                                  "data.cache_dir": str(tmp_path / "cache")})  # fmt: skip
        Trainer(cfg).fit()
        history = [json.loads(x) for x in (tmp_path / f"c{compile_}" / "metrics.jsonl").read_text().splitlines()]
        losses[compile_] = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_a_raised_max_steps_on_resume_trains_to_the_new_total(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """max_steps 2 ends the first epoch early (5 batches per epoch); resumed with max_steps 9 (an accepted
    change) the run must make all 9 steps, not stop where the first run's epoch count would."""
    first = Trainer(tiny_config(tmp_path, **{"optim.max_steps": 2}))
    assert first.steps_per_epoch == 5
    done = first.fit()
    assert done["steps"] == 2
    first_seconds = done["train_seconds"]
    summary = Trainer(tiny_config(tmp_path, **{"optim.max_steps": 9}), resume=True, accept_changes=True).fit()
    assert summary["steps"] == 9
    # training time counts every session; resuming the finished run adds nothing and keeps it
    assert summary["train_seconds"] > first_seconds > 0
    with caplog.at_level("WARNING", logger="fusionkit"):
        again = Trainer(tiny_config(tmp_path, **{"optim.max_steps": 9}), resume=True).fit()
    assert again["steps"] == 9 and again["train_seconds"] > first_seconds  # (as of the last checkpoint)
    assert "had finished (step 9 of 9)" in caplog.text  # said, rather than seeming to train


def test_accumulated_micro_batches_train_like_one_batch_also_in_a_short_last_window(tmp_path: Path) -> None:
    """Batch 4 x 4 accumulation steps = batch 16, on 40 train rows: each epoch ends with a window of 2 micro-batches
    (8 rows), whose gradient is their mean (not half of it, as dividing every micro-batch by 4 gave)."""
    from safetensors.torch import load_file

    same = {"data.dataset": "synthetic:50", "data.split_ratios": [0.8, 0.1, 0.1], "data.augment": False,
            "model.freeze": "encoders", "model.fusion.dropout": 0.0, "optim.epochs": 2, "optim.grad_clip": None,
            "optim.eps": 1e-6, "run.precision": "fp32"}  # fmt: skip
    weights = {}
    for name, batch, accum in (("whole", 16, 1), ("accumulated", 4, 4)):
        trainer = Trainer(tiny_config(tmp_path, name, **same, **{"optim.batch_size": batch,
                                                                  "optim.accumulation_steps": accum}))  # fmt: skip
        assert len(trainer.datasets["train"]) == 40 and trainer.total_steps == 6
        trainer.fit()
        weights[name] = load_file(follow_pointer(trainer.run_dir / "last") / "model.safetensors")
    moved = [k for k in weights["whole"] if k.startswith("heads.")]
    assert moved
    worst = max(float((weights["accumulated"][k] - v).abs().max()) for k, v in weights["whole"].items())
    assert worst < 1e-4  # float noise of the order of summation


def test_early_stopping_is_said_and_recorded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A learning rate too small to move any weight: val accuracy never improves, patience 1 ends the run after
    its second epoch, and the log and summary.json say so (with the precision the run used)."""
    import logging

    cfg = tiny_config(tmp_path, "patient", **{"data.dataset": "synthetic:40", "optim.epochs": 4, "optim.lr": 1e-12,
                                              "optim.warmup_ratio": 0.0, "run.patience": 1,
                                              "run.metric": "val/sentiment/accuracy"})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        summary = Trainer(cfg).fit()
    assert summary["epochs"] == 2 and summary["stopped_early"] and summary["precision"] in ("fp32", "bf16")
    assert "stopped early after epoch 2 of 4" in caplog.text
    assert json.loads((tmp_path / "runs" / "patient" / "summary.json").read_text())["stopped_early"] is True


def test_a_tasks_own_val_loss_can_select_checkpoints_when_there_are_several(tmp_path: Path) -> None:
    """With several tasks each one's val loss is logged (`val/<task>/loss`) and is a valid run.metric; with one
    task it would equal val/loss and is not reported, so naming it is refused before training."""
    trainer = Trainer(tiny_config(tmp_path, "two", **{"model.tasks": TWO_TASKS, "run.metric": "val/aux/loss",
                                                      "optim.epochs": 1}))  # fmt: skip
    summary = trainer.fit()
    assert summary["metric"] == "val/aux/loss" and summary["best"] == summary["val"]["val/aux/loss"]
    with pytest.raises(ConfigError, match="val/sentiment/loss"):
        Trainer(tiny_config(tmp_path, "one", **{"run.metric": "val/sentiment/loss"}))


def test_train_takes_overrides_from_python_as_the_command_line_does(tmp_path: Path) -> None:
    """`fusionkit.train(config, overrides={...})`: dotted keys (a task's option too) over a file, dict or TrainConfig."""
    import yaml

    import fusionkit

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "synthetic:60"}, "optim": {"epochs": 3},
                                    "run": {"output_dir": str(tmp_path / "runs"), "progress": False, "plots": False}}))  # fmt: skip
    overrides = {"optim.epochs": 1, "run.name": "o", "model.tasks.sentiment.label_smoothing": 0.1}
    fusionkit.train(str(path), overrides=overrides)
    saved = yaml.safe_load((tmp_path / "runs" / "o" / "config.yaml").read_text())
    assert saved["optim"]["epochs"] == 1 and saved["model"]["tasks"][0]["label_smoothing"] == 0.1
    fusionkit.train(build_config(path), overrides={"run.name": "o2", "optim.max_steps": 2})
    saved = yaml.safe_load((tmp_path / "runs" / "o2" / "config.yaml").read_text())
    assert saved["optim"]["max_steps"] == 2 and saved["optim"]["epochs"] == 3


def test_a_summary_names_its_run_dir_absolute_whatever_the_working_directory(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A relative run.output_dir gave 'runs/r' in summary.json (a resume wrote it absolute): valid nowhere else."""
    monkeypatch.chdir(tmp_path)
    summary = Trainer(tiny_config(tmp_path, "r", **{"run.output_dir": "runs", "optim.max_steps": 1})).fit()
    saved = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert saved["run_dir"] == summary["run_dir"] == str(tmp_path / "runs" / "r")
    assert Path(saved["best_checkpoint"]).is_absolute() and Path(saved["best_checkpoint"]).is_dir()
