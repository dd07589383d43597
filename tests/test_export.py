"""Export and fast CPU inference: ONNX graphs (fp32, int8) and int8 PyTorch match the model within stated tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkit import FusionProcessor, create_model, embed, make_synthetic
from fusionkit.cli import main
from fusionkit.export import FP32_ATOL, INT8_MIN_COSINE, OUTPUT_READS, PARTS, quantize_dynamic

# Tolerances asserted here (the export itself refuses graphs outside FP32_ATOL / INT8_MIN_COSINE):
# fp32 ONNX vs PyTorch: max |diff| <= 1e-4 on logits and normalized vectors (measured ~3e-7);
# int8 (ONNX Runtime or torch dynamic quantization): cosine to fp32 >= 0.98 (measured >= 0.9999 on tiny).


@pytest.fixture(scope="module")
def model():
    return create_model("tiny").eval()


@pytest.fixture(scope="module")
def batch(model):
    ds = make_synthetic(5, image_size=48)
    return FusionProcessor.from_model(model)(texts=[ex.text for ex in ds], images=[ex.image for ex in ds])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _onnx_vs_torch(model, batch, out: Path, parts: list[str]) -> None:
    from fusionkit.export import OnnxModel

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        expected = {
            "model": model(**inputs)["sentiment"],
            "encode": model.encode(**inputs, normalize=True),
            "encode_text": model.encode_text(inputs["input_ids"], inputs["attention_mask"], normalize=True),
            "encode_image": model.encode_image(inputs["pixel_values"], normalize=True),
        }
    for part in parts:
        for suffix in (".onnx", ".int8.onnx"):
            if not (out / f"{part}{suffix}").is_file():
                continue
            session = OnnxModel(out / f"{part}{suffix}")
            got = next(iter(session(**inputs).values()))
            ref = expected[part].numpy()
            assert got.shape == ref.shape  # batch 5 and this sequence length: not the export example's
            if suffix == ".onnx":
                np.testing.assert_allclose(got, ref, atol=FP32_ATOL)
            else:
                assert _cosine(got, ref).min() >= INT8_MIN_COSINE


def test_onnx_model_graph_matches_pytorch(model, batch, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fusionkit.export import export_onnx

    report = export_onnx(model, tmp_path, parts=["model"])
    entry = report["parts"]["model"]["fp32"]
    assert entry["inputs"] == ["input_ids", "attention_mask", "pixel_values"]
    assert entry["outputs"] == ["logits_sentiment"] and entry["parity"]["max_abs_diff"] <= FP32_ATOL
    assert entry["parity"]["per_output"]["logits_sentiment"]["max_abs_diff"] == entry["parity"]["max_abs_diff"]
    saved = json.loads((tmp_path / "export.json").read_text())
    assert saved["parts"]["model"]["fp32"]["file"] == "model.onnx"
    # the logits' columns are named: label strings in the model's order, no run dir needed
    assert saved["tasks"]["sentiment"] == {"type": "classification", "output": "logits_sentiment",
                                           "class_names": model.tasks["sentiment"].class_names,
                                           "reads": OUTPUT_READS["classification"]}  # fmt: skip
    assert saved["tasks"]["sentiment"]["class_names"]
    assert (tmp_path / "processor_config.json").is_file()  # the folder serves on its own
    _onnx_vs_torch(model, batch, tmp_path, ["model"])
    # a row without its image: refused, not silently scored on the placeholder pixels as a real image
    from fusionkit.export import OnnxModel

    ds = make_synthetic(3, image_size=48)
    partial = FusionProcessor.from_model(model)(texts=[ex.text for ex in ds], images=[ds[0].image, None, ds[2].image])
    with pytest.raises(ValueError, match=r"rows \[1\] have no image, which model.onnx reads in every row"):
        OnnxModel(tmp_path / "model.onnx")(**partial)


def test_cli_exports_fp32_and_int8_that_match(tmp_path: Path, model, batch, capsys) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "onnx"
    argv = [
        "export",
        str(tmp_path / "m"),
        "--format",
        "onnx",
        "--int8",
        "--output",
        str(out),
        "--parts",
        "encode",
    ]
    assert main(argv) == 0
    assert {"encode.onnx", "encode.int8.onnx"} <= {p.name for p in out.iterdir()}
    assert "min cosine" in capsys.readouterr().out
    _onnx_vs_torch(model, batch, out, ["encode"])
    assert main(["export", str(tmp_path / "m"), "--output", str(out), "--parts", "bogus"]) == 2
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", str(tmp_path / "m"), "--output", str(out), "--parts", "model"]) == 1  # an earlier export
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (
        main(["export", str(tmp_path / "m"), "--output", str(tmp_path / "m" / "x")]) == 2
    )  # inside the model
    mine = tmp_path / "mine"  # a user's folder holding files of the names export writes
    mine.mkdir()
    (mine / "tokenizer.json").write_text('{"my": "tokenizer"}')
    assert main(["export", str(tmp_path / "m"), "--output", str(mine), "--parts", "encode_text"]) == 1
    assert [p.name for p in mine.iterdir()] == ["tokenizer.json"] and "my" in (mine / "tokenizer.json").read_text()
    assert "is not empty (tokenizer.json)" in capsys.readouterr().err


@pytest.mark.slow
def test_every_part_fp32_and_int8(model, batch, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fusionkit.export import export_onnx

    export_onnx(model, tmp_path, parts=PARTS, int8=True)
    _onnx_vs_torch(model, batch, tmp_path, list(PARTS))


def test_int8_pytorch_matches_fp32(model, batch) -> None:
    quantized = quantize_dynamic(model)
    linear = quantized.text_encoder.model.encoder.layer[0].attention.self.query
    assert "quantized" in type(linear).__module__ and isinstance(model.text_proj, torch.nn.Linear)  # a copy
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        ref = model.encode(**inputs, normalize=True).numpy()
        got = quantized.encode(**inputs, normalize=True).numpy()
        logits = quantized(**inputs)["sentiment"]
    assert _cosine(got, ref).min() >= INT8_MIN_COSINE
    assert logits.shape == (5, 3) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_compiled_embed_matches_eager(batch) -> None:
    model = create_model("tiny").eval()
    ds = make_synthetic(6, image_size=32)
    texts, images = [ex.text for ex in ds], [ex.image for ex in ds]
    eager = embed(model, texts, images, batch_size=4, precision="fp32")
    compiled = embed(model, texts, images, batch_size=4, precision="fp32", compile=True)
    np.testing.assert_allclose(compiled, eager, atol=1e-5)


def test_a_regression_in_the_thousands_exports_and_a_failed_export_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """float32 steps of an output near 5,000 are ~5e-4: parity is relative beyond magnitude 1. A graph that
    fails its check leaves no half folder that would block the retry."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import fusionkit.export as export_mod

    tasks = [{"name": "mood", "num_classes": 2, "class_names": ["a", "b"]},
             {"name": "likes", "type": "regression", "params": {"target_mean": [5000.0], "target_std": [1500.0]}}]  # fmt: skip
    model = create_model("tiny", tasks=tasks)
    report = export_mod.export_onnx(model, tmp_path / "ok", parts=["model"])
    parity = report["parts"]["model"]["fp32"]["parity"]
    assert parity["max_scaled_diff"] <= FP32_ATOL and (tmp_path / "ok" / "export.json").is_file()
    monkeypatch.setattr(export_mod, "FP32_ATOL", -1.0)  # every graph "differs"
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_mod.export_onnx(model, tmp_path / "bad", parts=["model"])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_export_json_keeps_a_multilabel_tasks_thresholds(tmp_path: Path) -> None:
    """An ONNX user applies the thresholds `fusionkit predict` applies, not 0.5 by default."""
    pytest.importorskip("onnxscript")
    from fusionkit.export import export_onnx

    tags = {"name": "tags", "type": "multilabel", "num_classes": 3, "class_names": ["a", "b", "c"],
            "params": {"threshold": [0.3, 0.5, 0.7]}}  # fmt: skip
    model = create_model("tiny", tasks=[{"name": "sentiment", "num_classes": 3}, tags]).eval()
    export_onnx(model, tmp_path, parts=["model"])
    saved = json.loads((tmp_path / "export.json").read_text())["tasks"]
    assert saved["tags"]["threshold"] == [0.3, 0.5, 0.7] and "threshold" not in saved["sentiment"]
