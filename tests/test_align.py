"""`fusionkit align`: label-free alignment on unlabelled pairs makes text->image retrieval beat chance."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fusionkit.cli import main
from fusionkit.data import make_synthetic


def test_align_on_unlabelled_pairs_beats_chance(tmp_path: Path, capsys) -> None:
    ds = make_synthetic(480, seed=1, image_size=32, describe_scene=True)  # captions name their scene
    with open(tmp_path / "pairs.csv", "w", newline="") as f:  # no label column at all
        w = csv.writer(f)
        w.writerow(["id", "caption", "photo"])
        for ex in ds:
            ex.image.save(tmp_path / f"{ex.id}.png")
            w.writerow([ex.id, ex.text, f"{ex.id}.png"])
    args = ["align", str(tmp_path / "pairs.csv"), "--data.text_column", "caption", "--data.image_column", "photo",
            "--optim.epochs", "6", "--optim.lr", "3e-3", "--run.output_dir", str(tmp_path / "runs"),
            "--run.name", "a", "--data.cache_dir", str(tmp_path / "c"), "--run.progress", "false",
            "--run.plots", "false"]  # fmt: skip
    assert main(args) == 0
    recall = json.loads((tmp_path / "runs" / "a" / "retrieval.json").read_text())
    assert recall["pairs"] == 48 and "R@5" in capsys.readouterr().out
    # three scenes: an aligned model ranks the caption's own scene first (~1/3 of the pairs share it)
    assert recall["t2i_r@5"] >= 2 * recall["chance_r@5"], recall
    assert recall["i2t_r@5"] >= 2 * recall["chance_r@5"], recall
    # its default export is the encoder graphs (no labelled task: no logits); `--parts model` says why not
    pytest.importorskip("onnx")
    assert main(["export", str(tmp_path / "runs" / "a"), "--output", str(tmp_path / "onnx")]) == 0
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == ["encode.onnx", "encode_image.onnx",
                                                                          "encode_text.onnx"]  # fmt: skip
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "a"), "--output", str(tmp_path / "onnx2"), "--parts", "model"]) == 2
    assert "has no labelled task" in capsys.readouterr().err


def test_align_without_a_contrastive_task_is_refused_before_training(tmp_path: Path, capsys) -> None:
    """Only a contrastive task puts text and image vectors in one space: align with ITM alone (or a class task)
    would train, then report retrieval at chance as if it were an aligned model."""
    args = ["align", "synthetic:40", "--model.tasks", '[{"name": "match", "type": "itm"}]', "--run.output_dir",
            str(tmp_path / "runs")]  # fmt: skip
    assert main(args) == 2
    assert "lacks: add one" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_predict_on_an_alignment_model_says_it_has_nothing_to_predict() -> None:
    """Its tasks learn no labels: predict gave one empty dict per row without a word; its outputs are vectors."""
    import pytest

    from fusionkit import create_model

    model = create_model("tiny", tasks=[{"name": "match", "type": "itm"}, {"name": "clip", "type": "contrastive"}])
    with pytest.raises(ValueError, match=r"learn no labels to predict .*fusionkit.embed"):
        model.predict(texts=["a red square"], images=[None])
