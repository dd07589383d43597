"""Hugging Face native: Auto* round trips, hub ids through snapshot_download, push_to_hub, the HF Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fusionkit.hf as fhf  # (registers the Auto classes)
from fusionkit import FusionModel, FusionProcessor, create_model, make_synthetic
from fusionkit.models.fusion_model import model_inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "model"
    torch.manual_seed(0)  # its initial weights, not whatever the tests before it left the global RNG at
    create_model("tiny").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch(saved: Path) -> dict[str, torch.Tensor]:
    ds = make_synthetic(5, image_size=32)
    return FusionProcessor.from_pretrained(saved)(
        texts=[ex.text for ex in ds][:4] + [None], images=[None] + [ex.image for ex in ds][1:]
    )


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**model_inputs(batch))
    return (out.logits if hasattr(out, "logits") else out)["sentiment"]


def test_auto_classes_round_trip(saved: Path, batch, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel, AutoProcessor

    config = AutoConfig.from_pretrained(saved)
    assert isinstance(config, fhf.FusionkitConfig) and config.model_config().fusion.dim == 64
    names = ["positive", "neutral", "negative"]  # the one task's class names, where HF readers look for them
    assert config.id2label == dict(enumerate(names)) and config.label2id == {n: i for i, n in enumerate(names)}
    model = AutoModel.from_pretrained(saved)
    assert isinstance(model, fhf.FusionkitModel) and not model.training
    assert isinstance(AutoProcessor.from_pretrained(saved), FusionProcessor)
    FusionProcessor.from_pretrained(saved).save_pretrained(tmp_path / "processor")  # a processor on its own
    assert isinstance(AutoProcessor.from_pretrained(tmp_path / "processor"), FusionProcessor)
    reference = _logits(FusionModel.from_pretrained(saved).eval(), batch)
    torch.testing.assert_close(_logits(model, batch), reference)

    model.save_pretrained(tmp_path / "again")  # HF save -> same folder format, safetensors only
    files = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["model_type"] == "fusionkit" and written["id2label"] == {"0": "positive", "1": "neutral", "2": "negative"}
    for reload in (
        AutoModel.from_pretrained(tmp_path / "again"),
        FusionModel.from_pretrained(tmp_path / "again"),
    ):
        torch.testing.assert_close(_logits(reload.eval(), batch), reference)
    assert isinstance(AutoModel.from_config(config), fhf.FusionkitModel)  # random weights, same architecture
    # transformers' keywords, on a local folder too: subfolder= picks that folder, dtype= (or torch_dtype=) casts
    again = fhf.FusionkitModel.from_pretrained(tmp_path, subfolder="again", dtype=torch.bfloat16)
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fhf.FusionkitModel.from_pretrained(tmp_path / "again", torch_dtype="auto").parameters()} == {
        torch.float32}  # fmt: skip
    with pytest.raises(FileNotFoundError, match="has no subfolder 'nope'"):
        fhf.FusionkitModel.from_pretrained(tmp_path, subfolder="nope")
    import fusionkit

    assert fusionkit.FusionkitModel is fhf.FusionkitModel and fusionkit.FusionkitConfig is fhf.FusionkitConfig


def test_a_multi_task_model_writes_no_label_maps(tmp_path: Path) -> None:
    """HF's `id2label` is one label set; a model with two tasks has none to give (the names stay in `model.tasks`)."""
    from transformers import AutoConfig

    tasks = [{"name": "mood", "class_names": ["a", "b"]}, {"name": "topic", "class_names": ["x", "y", "z"]}]
    create_model("tiny", tasks=tasks).save_pretrained(tmp_path / "m")
    assert "id2label" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert [t["class_names"] for t in AutoConfig.from_pretrained(tmp_path / "m").model["tasks"]] == [["a", "b"], ["x", "y", "z"]]


def test_hub_ids_go_through_snapshot_download(saved: Path, batch, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict] = []

    def fake_download(repo_id: str, **kwargs) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    reference = _logits(FusionModel.from_pretrained(saved).eval(), batch)
    torch.testing.assert_close(
        _logits(FusionModel.from_pretrained("someorg/tiny-fusion").eval(), batch), reference
    )
    loaded = fhf.FusionkitModel.from_pretrained("someorg/tiny-fusion", revision="v1")
    torch.testing.assert_close(_logits(loaded, batch), reference)
    assert isinstance(FusionProcessor.from_pretrained("someorg/tiny-fusion"), FusionProcessor)
    assert [c["repo_id"] for c in calls] == ["someorg/tiny-fusion"] * 3
    assert all("*.bin" not in c["allow_patterns"] for c in calls)  # no pickled weights fetched
    assert calls[1]["revision"] == "v1"


def test_auto_classes_load_a_hub_id_from_the_hub_cache(saved: Path, batch, tmp_path: Path) -> None:
    """The real huggingface_hub code path, served from a pre-filled cache (no network here)."""
    import shutil

    from transformers import AutoConfig, AutoModel, AutoProcessor

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-fusion"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hub = dict(cache_dir=str(tmp_path / "hub"), local_files_only=True)
    assert isinstance(AutoConfig.from_pretrained("someorg/tiny-fusion", **hub), fhf.FusionkitConfig)
    assert isinstance(AutoProcessor.from_pretrained("someorg/tiny-fusion", **hub), FusionProcessor)
    model = AutoModel.from_pretrained("someorg/tiny-fusion", **hub)
    torch.testing.assert_close(
        _logits(model, batch), _logits(FusionModel.from_pretrained(saved).eval(), batch)
    )


def test_unreachable_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    def offline(repo_id: str, **kwargs) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="not a local folder.*no network"):
        FusionModel.from_pretrained("someorg/missing")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # a mistyped local run dir is not sent to the hub
    with pytest.raises(FileNotFoundError, match="runs/typo does not exist"):
        FusionModel.from_pretrained("runs/typo")


def test_push_to_hub_uploads_a_loadable_folder(saved: Path, batch, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModel

    uploaded: dict[str, set[str]] = {}

    class FakeApi:
        def create_repo(self, repo_id: str, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def fake_upload(self, working_dir, repo_id, **kwargs):
        folder = Path(working_dir)
        uploaded[repo_id] = {p.name for p in folder.iterdir()}
        reloaded = AutoModel.from_pretrained(folder)
        torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch))

    import transformers.utils.hub as hub_utils

    monkeypatch.setattr(hub_utils, "hf_api", lambda: FakeApi(), raising=False)
    monkeypatch.setattr(hub_utils, "create_and_tag_model_card", lambda *a, **k: _Card(), raising=False)
    monkeypatch.setattr(fhf.FusionkitModel, "_upload_modified_files", fake_upload)
    model = AutoModel.from_pretrained(saved)
    model.push_to_hub("someorg/pushed")
    assert {"config.json", "model.safetensors", "text_encoder"} <= uploaded["someorg/pushed"]


class _Card:
    def save(self, path: str) -> None:
        Path(path).write_text("# model card\n")


def test_labels_give_a_loss_hf_style_and_fusionkit_style(saved: Path, batch) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(saved)
    inputs = model_inputs(batch)
    out = model(**inputs, labels=torch.tensor([0, 1, 2, -100, 1]))
    per_task = model(
        **inputs,
        labels={"sentiment": torch.tensor([0, 1, 2, 0, 1])},
        label_mask={"sentiment": torch.tensor([True, True, True, False, True])},
    )
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, per_task.loss)
    assert model(**inputs).loss is None
    uint8 = torch.randint(
        0, 256, (5, 3, 32, 32), dtype=torch.uint8
    )  # fusionkit cache batches: normalized inside
    assert model(**{**inputs, "pixel_values": uint8}).logits["sentiment"].shape == (5, 3)


def test_hf_trainer_trains_it_unchanged(saved: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")  # the HF Trainer needs it
    from transformers import AutoModel, Trainer, TrainingArguments, default_data_collator

    model = AutoModel.from_pretrained(saved)
    classes = model.fusion_model.class_names["sentiment"]
    ds = make_synthetic(32, image_size=32, seed=1)
    inputs = FusionProcessor.from_pretrained(saved)(
        texts=[ex.text for ex in ds], images=[ex.image for ex in ds]
    )
    labels = torch.tensor([classes.index(ex.labels["sentiment"]) for ex in ds])
    rows = [{**{k: v[i] for k, v in inputs.items()}, "labels": labels[i]} for i in range(len(ds))]

    def data_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**inputs, labels=labels).loss)

    before = data_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=16,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=default_data_collator
    )
    trainer.train()
    after = data_loss()
    assert after < 0.7 * before, (before, after)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(after, rel=1e-4)  # labels found, loss reported


# ---------------------------------------------------------------- the HF Trainer's own paths
def _no_dropout(path: Path, **overrides) -> Path:
    """A tiny model without dropout (runs compare exactly) saved at `path`."""
    create_model(
        "tiny",
        text={"config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        fusion={"dropout": 0.0},
        **overrides,
    ).save_pretrained(path)
    return path


def _rows(model_dir: Path, n: int, labelled: bool = True) -> list[dict[str, torch.Tensor]]:
    """`n` preprocessed rows (padded together: any batching of them sees the same tensors)."""
    ds = make_synthetic(n, image_size=32, seed=2)
    inputs = FusionProcessor.from_pretrained(model_dir)(
        texts=[ex.text for ex in ds], images=[ex.image for ex in ds]
    )
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(n)]
    if labelled:
        for row, ex in zip(rows, ds):
            row["labels"] = torch.tensor(["positive", "neutral", "negative"].index(ex.labels["sentiment"]))
    return rows


def _args(tmp_path: Path, **kwargs):
    from transformers import TrainingArguments

    defaults = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=3e-3, report_to=[],
                    use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, data_seed=0)  # fmt: skip
    return TrainingArguments(output_dir=str(tmp_path), **{**defaults, **kwargs})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_hf_trainer_reloads_its_checkpoints(tmp_path: Path) -> None:
    """`resume_from_checkpoint` and `load_best_model_at_end` load the weights (saved without the HF model's
    `fusion_model.` key prefix, they once loaded nothing: training went on from the weights in memory)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModel, Trainer, default_data_collator

    saved = _no_dropout(tmp_path / "model")
    rows = _rows(saved, 16)
    every_2 = dict(save_strategy="steps", save_steps=2)
    full = AutoModel.from_pretrained(saved)
    Trainer(model=full, args=_args(tmp_path / "full", max_steps=4, **every_2), train_dataset=rows,
            data_collator=default_data_collator).train()  # fmt: skip
    resumed = AutoModel.from_pretrained(saved)
    Trainer(model=resumed, args=_args(tmp_path / "resumed", max_steps=4), train_dataset=rows,
            data_collator=default_data_collator).train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))  # fmt: skip
    assert _max_diff(_weights(resumed), _weights(full)) < 1e-6
    assert _max_diff(_weights(resumed), _weights(AutoModel.from_pretrained(saved))) > 1e-3  # it did train

    # the best checkpoint by the highest eval loss: an early one, not the last
    model = AutoModel.from_pretrained(saved)
    args = _args(tmp_path / "best", max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", greater_is_better=True, **every_2)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8],
                      data_collator=default_data_collator)  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    assert _max_diff(_weights(model.fusion_model), _weights(FusionModel.from_pretrained(best))) == 0.0
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-5)


def test_hf_trainer_gradient_accumulation_matches_one_batch(tmp_path: Path) -> None:
    """8x1, 4x2 and 2x4 (batch x accumulation) take the same step and log the same loss (not N times it)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModel, Trainer, default_data_collator

    saved = _no_dropout(tmp_path / "model")
    rows = _rows(saved, 8)
    results = []
    for batch, accumulate in ((8, 1), (4, 2), (2, 4)):
        model = AutoModel.from_pretrained(saved)
        before = _weights(model)
        args = _args(tmp_path / f"ga{accumulate}", max_steps=1, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulate, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                     lr_scheduler_type="constant", logging_steps=1)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
        loss = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
        step = {k: v - before[k] for k, v in _weights(model).items()}  # SGD, lr 1: minus the gradient
        results.append((loss, step))
    (loss, step), *others = results
    for other_loss, other_step in others:
        assert other_loss == pytest.approx(loss, rel=1e-4)
        assert _max_diff(other_step, step) < 1e-5 * max(float(v.abs().max()) for v in step.values())


def test_hf_trainer_trains_a_label_free_model(tmp_path: Path) -> None:
    """An align model (contrastive + itm) needs no labels: its forward gives a loss without them."""
    pytest.importorskip("accelerate")
    from transformers import AutoModel, Trainer, default_data_collator

    tasks = [{"name": "align", "type": "contrastive"}, {"name": "match", "type": "itm"}]
    saved = _no_dropout(tmp_path / "model", tasks=tasks)
    rows = _rows(saved, 16, labelled=False)
    model = AutoModel.from_pretrained(saved)
    out = model(**default_data_collator(rows[:4]))
    assert out.loss is not None and set(out.task_losses) == {"align", "match"}
    trainer = Trainer(model=model, args=_args(tmp_path / "out", max_steps=2), train_dataset=rows,
                      data_collator=default_data_collator)  # fmt: skip
    trainer.train()
    assert _max_diff(_weights(model), _weights(AutoModel.from_pretrained(saved))) > 1e-4
    trainer = Trainer(
        model=model,
        args=_args(tmp_path / "eval"),
        eval_dataset=rows[:8],  # HF's evaluate scores a batch only when it has labels: {} for none
        data_collator=lambda rows: {**default_data_collator(rows), "labels": {}},
    )
    assert trainer.evaluate()["eval_loss"] > 0
    labelled = AutoModel.from_pretrained(_no_dropout(tmp_path / "sentiment"))
    assert labelled(**default_data_collator(rows[:4])).loss is None  # labelled tasks only: no labels, no loss


def test_auto_model_dtype_and_device_map(tmp_path: Path) -> None:
    from transformers import AutoModel

    create_model("tiny").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for dtype in ("auto", torch.bfloat16, "bfloat16"):
        assert {p.dtype for p in AutoModel.from_pretrained(tmp_path / "bf16", dtype=dtype).parameters()} == {
            torch.bfloat16}  # fmt: skip
    assert {p.dtype for p in AutoModel.from_pretrained(tmp_path / "bf16").parameters()} == {torch.float32}
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert (
        next(AutoModel.from_pretrained(tmp_path / "bf16", device_map="auto").parameters()).device.type
        == expected
    )
    assert (
        next(AutoModel.from_pretrained(tmp_path / "bf16", device_map={"": "cpu"}).parameters()).device.type
        == "cpu"
    )
    with pytest.raises(ValueError, match="splits the model across devices"):
        AutoModel.from_pretrained(tmp_path / "bf16", device_map={"fusion": "cpu", "heads": "cuda:1"})
    with pytest.raises(ValueError, match="is not a device"):
        AutoModel.from_pretrained(tmp_path / "bf16", device_map="balanced")


def test_readme_hf_trainer_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's HF Trainer lines run as written, and its compute_metrics note says what arrives."""
    pytest.importorskip("accelerate")
    import numpy as np

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("import fusionkit.hf, torch, transformers")
    code = readme[start : readme.index("\n", readme.index("trainer.train()", start))]
    monkeypatch.chdir(tmp_path)
    create_model("tiny").save_pretrained(tmp_path / "my-model")
    classes = ["positive", "neutral", "negative"]
    rows = [{"text": ex.text, "image": ex.image, "sentiment": classes.index(ex.labels["sentiment"])}
            for ex in make_synthetic(20, image_size=32)]  # fmt: skip
    scope = {"rows": rows[:10], "val_rows": rows[10:]}
    exec(compile(code, "README.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step > 0

    def compute_metrics(p) -> dict[str, float]:
        logits, task_losses = p.predictions
        assert logits["sentiment"].shape == (10, 3) and p.label_ids["sentiment"].shape == (10,)
        assert task_losses["sentiment"].shape == (2,)  # one per eval batch (of 8)
        return {"accuracy": float(np.mean(logits["sentiment"].argmax(-1) == p.label_ids["sentiment"]))}

    trainer.compute_metrics = compute_metrics
    assert 0 <= trainer.evaluate()["eval_accuracy"] <= 1
