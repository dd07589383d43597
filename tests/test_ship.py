"""Shipping a model: a saved folder's config.json and processor_config.json agree; export.json says how to serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fusionkit import FusionModel, FusionProcessor, create_model
from fusionkit.config import ConfigError


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ship") / "saved"
    create_model("tiny").save_pretrained(folder)
    return folder


def _edit(folder: Path, name: str, change) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda m: m["model"]["text"].update(max_length=8), "model.text.max_length = 8 in config.json, max_length = 64"),
        (lambda m: m["image_preprocess"].update(crop_pct=0.5), "image_preprocess.crop_pct = 0.5 in config.json"),
    ],
)
def test_a_hand_edited_config_json_is_refused_by_model_and_processor(saved: Path, tmp_path: Path, change, said) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    _edit(folder, "config.json", change)
    for load in (FusionModel.from_pretrained, FusionProcessor.from_pretrained):
        with pytest.raises(ConfigError, match="processor_config.json disagree") as err:
            load(folder)
        assert said in str(err.value) and "save_pretrained" in str(err.value)


def test_an_older_processor_config_lacking_a_key_still_loads(saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    _edit(folder, "processor_config.json", lambda p: (p.pop("text_normalize"), p["image_preprocess"].pop("crop_offset")))
    FusionModel.from_pretrained(folder)
    assert FusionProcessor.from_pretrained(folder).max_length == 64


def test_export_json_says_how_to_read_each_output_and_preprocess_without_fusionkit(tmp_path: Path) -> None:
    """Following export.json's fields with PIL, numpy and tokenizers alone gives the processor's exact inputs."""
    pytest.importorskip("onnxscript")
    import numpy as np
    from PIL import Image
    from tokenizers import Tokenizer

    from fusionkit.export import export_onnx

    tasks = [{"name": "mood", "num_classes": 2, "class_names": ["a", "b"]},
             {"name": "tags", "type": "multilabel", "num_classes": 2, "class_names": ["x", "y"]},
             {"name": "score", "type": "regression"}]  # fmt: skip
    model = create_model("tiny", tasks=tasks).eval()
    export_onnx(model, tmp_path / "onnx", parts=["model"], check=False)
    saved = json.loads((tmp_path / "onnx" / "export.json").read_text())
    reads = {name: task["reads"] for name, task in saved["tasks"].items()}
    assert "softmax over class_names" in reads["mood"] and "sigmoid" in reads["tags"] and "threshold" in reads["tags"]
    assert "de-standardized" in reads["score"]

    image, text = saved["preprocess"]["image"], saved["preprocess"]["text"]
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    (h, w), short = image["size"], int(image["size"][0] / image["crop_pct"])  # a square size: "center" mode
    resized = im.resize((int(short * 80 / 50), short), getattr(Image.Resampling, image["interpolation"].upper()))
    offset = (lambda margin: round(margin / 2)) if image["crop_offset"] == "round" else (lambda margin: margin // 2)
    top, left = offset(short - h), offset(resized.width - w)
    crop = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 255
    pixels = ((crop - image["mean"]) / image["std"]).transpose(2, 0, 1)
    processor = FusionProcessor.from_pretrained(tmp_path / "onnx")
    np.testing.assert_allclose(processor(images=[im])["pixel_values"][0].numpy(), pixels, atol=1e-5)

    assert "tokenizer.json" in text["tokenizer_files"] and text["max_length"] == model.config.text.max_length
    tokenizer = Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json"))
    caption = " ".join(["word"] * 200)
    assert tokenizer.encode(caption).ids == processor(texts=[caption])["input_ids"][0].tolist()
