"""Rows without a caption or without an image: placeholders, masks, late-fusion views, modality dropout."""

import json
from pathlib import Path

import pytest
import torch

from fusionkit.config import ConfigError
from fusionkit.models import create_model, list_fusions

TASKS = [
    {"name": "sentiment", "type": "classification", "num_classes": 3},
    {"name": "itm", "type": "itm"},
    {"name": "align", "type": "contrastive"},
]
# rows: complete, no caption, no image, complete, complete
TEXT_PRESENT = torch.tensor([True, False, True, True, True])
IMAGE_PRESENT = torch.tensor([True, True, False, True, True])


def ragged_batch(model):
    captions = ["a lovely sunny day", "", "stormy and cold", "ok", "fine weather for a walk today"]
    tok = model.tokenizer(captions, padding=True, return_tensors="pt")
    h, w = model.image_preprocess.size
    pixels = torch.randn(len(captions), 3, h, w)
    pixels[2] = 0  # the collator stores a missing image as zeros
    return {
        "input_ids": tok["input_ids"],
        "attention_mask": tok["attention_mask"],
        "pixel_values": pixels,
        "text_present": TEXT_PRESENT,
        "image_present": IMAGE_PRESENT,
    }


def run(model, batch):
    torch.manual_seed(1)  # ITM draws its negatives
    return model(**batch)


@pytest.mark.parametrize("strategy", list_fusions())
def test_absent_side_is_finite_trainable_and_ignores_its_dummy_input(strategy):
    model = create_model("tiny", fusion={"strategy": strategy}, tasks=TASKS).eval()
    batch = ragged_batch(model)
    out = run(model, batch)
    assert out["sentiment"].shape == (5, 3)
    assert out["align"].shape[:2] == (3, 2)  # only the complete rows are matched (eval: their pair embeddings)
    assert all(torch.isfinite(v).all() for v in out.values())

    labels = {"sentiment": torch.tensor([0, 1, 2, 0, 1])}
    model.loss(out, labels)["loss"].backward()
    params = dict(model.named_parameters())
    for side in ("text", "image"):
        if getattr(model.fusion, f"uses_{side}"):
            assert params[f"{side}_proj.weight"].grad.abs().sum() > 0
            # late fusion leaves an absent side's view out instead of scoring a placeholder
            assert (params[f"{side}_placeholder"].grad.abs().sum() > 0) == (strategy != "late"), side
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)

    with torch.no_grad():
        other = dict(batch, pixel_values=batch["pixel_values"].clone(), input_ids=batch["input_ids"].clone())
        other["input_ids"][1] = torch.randint(1, 100, other["input_ids"][1].shape)  # dummy caption
        other["pixel_values"][2] = 100 * torch.randn_like(other["pixel_values"][2])  # dummy image
        changed = run(model, other)
        for name, value in run(model, batch).items():
            torch.testing.assert_close(changed[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("strategy", list_fusions())
def test_complete_rows_do_not_depend_on_incomplete_rows_in_the_batch(strategy):
    model = create_model("tiny", fusion={"strategy": strategy}).eval()
    batch = ragged_batch(model)
    complete = [0, 3, 4]
    only_complete = {k: batch[k][complete] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        mixed = model(**batch)["sentiment"][complete]
        alone = model(**only_complete)["sentiment"]
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["cross_attention", "merged_attention", "late"])
def test_a_batch_without_one_side_skips_its_encoder(strategy):
    """One-sided rows give the same output alone (encoder skipped) as among complete rows."""
    model = create_model("tiny", fusion={"strategy": strategy}).eval()
    batch = ragged_batch(model)
    calls = []
    model.text_encoder.register_forward_hook(lambda *_: calls.append("text"))
    model.image_encoder.register_forward_hook(lambda *_: calls.append("image"))
    absent = torch.tensor([False])
    with torch.no_grad():
        image_only = model(pixel_values=batch["pixel_values"][[1]], text_present=absent)["sentiment"]
        text_only = model(
            input_ids=batch["input_ids"][[2]], attention_mask=batch["attention_mask"][[2]], image_present=absent
        )["sentiment"]
        assert calls == ["image", "text"]
        mixed = model(**batch)["sentiment"]
    torch.testing.assert_close(image_only, mixed[[1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_only, mixed[[2]], rtol=1e-5, atol=1e-5)


def test_late_fusion_scores_the_present_view_alone():
    """The placeholder is no view of its own in late fusion: moving it leaves incomplete rows unchanged."""
    for strategy, moves in (("late", False), ("concat", True)):
        model = create_model("tiny", fusion={"strategy": strategy}).eval()
        batch = ragged_batch(model)
        with torch.no_grad():
            before = model(**batch)["sentiment"]
            model.text_placeholder.add_(1.0)
            model.image_placeholder.add_(1.0)
            after = model(**batch)["sentiment"]
        incomplete = (~TEXT_PRESENT) | (~IMAGE_PRESENT)
        torch.testing.assert_close(after[~incomplete], before[~incomplete])
        assert torch.allclose(after[incomplete], before[incomplete]) != moves, strategy


def test_modality_dropout_rate_in_training_and_off_in_eval():
    rate, n = 0.4, 4000
    model = create_model("tiny", fusion={"strategy": "concat", "modality_dropout": rate})
    feats = {"text_features": torch.randn(n, 4, 64), "image_features": torch.randn(n, 5, 64)}
    text_present = torch.rand(n) > 0.1  # ~10% of rows come without a caption: never dropped further
    with torch.no_grad():
        model.eval()
        full = model.encode(**feats, text_present=text_present)
        no_text = model.encode(**feats, text_present=torch.zeros(n, dtype=torch.bool))
        no_image = model.encode(**feats, image_present=torch.zeros(n, dtype=torch.bool))
        assert torch.equal(model.encode(**feats, text_present=text_present), full)  # off in eval
        model.train()
        dropped = model.encode(**feats, text_present=text_present)

    def same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.isclose(a, b, rtol=1e-5, atol=1e-5).all(dim=1)

    lost_text = same(dropped, no_text) & text_present
    lost_image = same(dropped, no_image)
    kept = same(dropped, full)
    assert bool((lost_text | lost_image | kept).all())  # every row is one of the three
    assert not bool((lost_image & ~text_present).any())  # never both sides
    complete = int(text_present.sum())
    assert abs(int(lost_text.sum()) / complete - rate / 2) < 0.03
    assert abs(int(lost_image.sum()) / complete - rate / 2) < 0.03


def test_bad_presence_and_dropout_settings_are_named():
    with pytest.raises(ConfigError, match="model.fusion.modality_dropout"):
        create_model("tiny", fusion={"modality_dropout": 1.5})
    model = create_model("tiny")
    batch = ragged_batch(model)
    with pytest.raises(ValueError, match=r"text_present must be a bool vector of the batch size \[5\]"):
        model(**dict(batch, text_present=torch.ones(4, dtype=torch.bool)))


def test_eval_of_a_file_scores_one_sided_rows_as_predict_reads_them(tmp_path: Path) -> None:
    """A file with empty caption or image cells (or no image column: --image-column '') is scored from the
    side each row has, as predict predicts it; before, eval stopped at the first empty cell."""
    import csv

    from fusionkit.cli import main

    runs = tmp_path / "runs"
    assert main(["train", "--data.dataset", "synthetic:60", "--optim.max_steps", "2", "--run.output_dir", str(runs),
                 "--run.name", "md", "--model.fusion.modality_dropout", "0.3", "--data.cache_dir",
                 str(tmp_path / "cache"), "--run.progress", "false", "--run.plots", "false"]) == 0  # fmt: skip
    from fusionkit.data import make_synthetic

    rows = []
    for i, ex in enumerate(make_synthetic(12, image_size=32)):
        ex.image.save(tmp_path / f"{i}.png")
        rows.append({"id": f"r{i}", "text": "" if i % 4 == 0 else ex.text, "image": "" if i % 4 == 1 else f"{i}.png",
                     "sentiment": ex.labels["sentiment"]})  # fmt: skip
    table = tmp_path / "gaps.csv"
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "m.json"
    assert main(["eval", str(runs / "md"), "--data", str(table), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["details"]["sentiment"]["report"]["macro avg"]["support"] == 12
    with table.open("w", newline="") as f:  # every caption there, no image column read: captions alone
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["text"])
    assert main(["eval", str(runs / "md"), "--data", str(table), "--image-column", "", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["details"]["sentiment"]["report"]["macro avg"]["support"] == 9
