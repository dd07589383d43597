"""A saved model folder loads as exactly the model written there, with its processor and tokenizer, or is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusionkit import FusionModel, FusionProcessor, create_model
from fusionkit.config import ConfigError

from .test_save_load import _save_tiny_hf_encoders


@pytest.mark.parametrize("gone", ["tokenizer*.json", "tokenizer.json"])
def test_a_saved_model_whose_tokenizer_is_gone_is_refused_naming_its_text_encoder(tmp_path: Path, gone: str) -> None:
    """transformers builds a 5-token stub tokenizer from what is left: every word [UNK], predictions changed."""
    model = tmp_path / "m"
    create_model("tiny").save_pretrained(model)
    for path in (model / "text_encoder").glob(gone):
        path.unlink()
    with pytest.raises(ConfigError, match=r"m/text_encoder has no tokenizer \(none of tokenizer.json"):
        FusionModel.from_pretrained(model)
    for path in model.glob(gone):  # the processor's copy beside the model, where a save writes one
        path.unlink()
    with pytest.raises(ConfigError, match=r"m(/text_encoder)? has no tokenizer .*copy the saved folder whole"):
        FusionProcessor.from_pretrained(model)


def test_a_model_saved_over_an_earlier_save_loads_as_itself_with_its_processor(tmp_path: Path) -> None:
    """model.save_pretrained(D); processor.save_pretrained(D) (the transformers idiom), then another model saved
    to D: its processor files, tokenizer and an image_encoder/ of another backend are the new model's or gone."""
    from transformers import AutoProcessor, AutoTokenizer

    import fusionkit.hf  # noqa: F401  (AutoProcessor)

    _save_tiny_hf_encoders(tmp_path)
    a = create_model("tiny", text={"max_length": 24, "normalize": "tweet"},
                     image={"backend": "hf", "name": str(tmp_path / "vit"), "pretrained": True})  # fmt: skip
    folder = tmp_path / "m"
    a.save_pretrained(folder)
    FusionProcessor.from_model(a).save_pretrained(folder)
    (folder / "README.md").write_text("my model card")
    b = create_model("tiny", text={"max_length": 40})
    assert b.image_preprocess != a.image_preprocess
    b.save_pretrained(folder)

    assert not (folder / "image_encoder").exists()  # a's ViT config: b's timm encoder saves none
    assert (folder / "README.md").read_text() == "my model card"  # not a file of fusionkit's: kept
    ids = b.tokenizer(["@anna look"])["input_ids"]
    for processor in (FusionProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)):
        assert (processor.max_length, processor.image_preprocess) == (40, b.image_preprocess)
        assert processor.tokenize(["@anna look"])["input_ids"].tolist() == ids  # not a's "@user" rule
    assert AutoTokenizer.from_pretrained(folder)(["@anna look"])["input_ids"] == ids
    assert FusionModel.from_pretrained(folder).config == b.config


def test_save_pretrained_refuses_an_export_or_files_no_fusionkit_save_wrote(tmp_path: Path) -> None:
    model = create_model("tiny")
    export = tmp_path / "export"
    FusionProcessor.from_model(model).save_pretrained(export)
    (export / "export.json").write_text("{}")
    (export / "model.onnx").write_bytes(b"graph")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    with pytest.raises(FileExistsError, match="export holds an ONNX export; save_pretrained would replace"):
        model.save_pretrained(export)
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    other = tmp_path / "other"  # someone's weights and tokenizer, no config of fusionkit's
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"theirs")
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds model.safetensors, tokenizer.json but no fusionkit model"):
        model.save_pretrained(other)
    assert (other / "model.safetensors").read_bytes() == b"theirs"
    hub_clone = tmp_path / "clone"  # a hub repo cloned to save into: its files stay
    hub_clone.mkdir()
    (hub_clone / ".gitattributes").write_text("*.safetensors filter=lfs")
    model.save_pretrained(hub_clone)
    assert (hub_clone / ".gitattributes").is_file() and (hub_clone / "config.json").is_file()


def test_a_saved_tokenizer_truncates_at_the_models_max_length_in_transformers(tmp_path: Path) -> None:
    """tokenizer_config.json said model_max_length 1e30: AutoTokenizer(truncation=True) kept every token."""
    from transformers import AutoTokenizer

    from fusionkit.models.tiny import tiny_tokenizer

    model = create_model("tiny")
    hub_like = tiny_tokenizer(int(1e30))  # what transformers gives a tokenizer saved without a limit
    FusionProcessor(hub_like, model.image_preprocess, max_length=12).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "tokenizer_config.json").read_text())["model_max_length"] == 12
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "p")
    assert len(tokenizer("a caption " * 30, truncation=True)["input_ids"]) == 12


def test_an_image_shrunk_many_times_has_the_pixels_of_a_one_pass_resize() -> None:
    """PIL's reducing_gap=3.0 box-filtered first: 2-5 grey levels off timm / torchvision / HF (one pass) at 6x+,
    which an ONNX user rebuilding the preprocessing could not match."""
    import numpy as np
    from PIL import Image

    from fusionkit.config import ImagePreprocess
    from fusionkit.data.image import preprocess_image

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    squash = ImagePreprocess(size=(224, 224), interpolation="bilinear", crop_mode="squash")
    expected = np.asarray(photo.resize((224, 224), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(preprocess_image(photo, squash), expected)


def test_loading_takes_cli_dtype_names_warns_of_a_newer_fusionkit_and_checks_a_hand_edited_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import torch

    folder = tmp_path / "m"
    create_model("tiny").save_pretrained(folder)
    assert next(FusionModel.from_pretrained(folder, dtype="fp16").parameters()).dtype == torch.float16
    assert next(FusionModel.from_pretrained(folder, dtype="bf16").parameters()).dtype == torch.bfloat16
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "fusionkit_version": "99.0"}))
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        FusionModel.from_pretrained(folder)
        FusionModel.read_config(folder)
    assert caplog.text.count("written by fusionkit 99.0, this is") == 1  # once per folder
    meta["image_preprocess"]["size"] = [37, 37]
    (folder / "config.json").write_text(json.dumps(meta))
    processor = json.loads((folder / "processor_config.json").read_text())  # edited alike: else the two disagree
    processor["image_preprocess"]["size"] = [37, 37]
    (folder / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ConfigError, match=r"m/config.json: image_preprocess.size \[37, 37\] is not an image size"):
        FusionModel.from_pretrained(folder)


def test_int8_quantization_does_not_print_onnxruntimes_preprocessing_hint(tmp_path: Path, caplog) -> None:
    """onnxruntime logs it from the root logger once per graph; it is about static quantization, not ours."""
    pytest.importorskip("onnxruntime")
    from fusionkit.export import export_onnx

    with caplog.at_level("INFO"):
        export_onnx(create_model("tiny").eval(), tmp_path / "onnx", parts=["encode_text"], int8=True, check=False)
    assert (tmp_path / "onnx" / "encode_text.int8.onnx").is_file()
    assert "pre-processing before quantization" not in caplog.text


def test_a_saved_models_processor_loads_without_transformers_model_type_warning(tmp_path: Path) -> None:
    """The processor's tokenizer sits beside the model's config.json (model_type fusionkit), no text model's."""
    import subprocess
    import sys

    create_model("tiny").save_pretrained(tmp_path / "m")
    code = f"import fusionkit; print(fusionkit.FusionProcessor.from_pretrained({str(tmp_path / 'm')!r}).max_length)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "64" and "to instantiate a model of type" not in run.stderr


def test_a_model_folders_encoder_tokenizer_truncates_at_the_models_max_length(tmp_path: Path) -> None:
    """transformers pointed at the saved text_encoder/ itself truncates where the model does."""
    from transformers import AutoTokenizer

    import fusionkit

    fusionkit.create_model("tiny", text={"max_length": 12}).save_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m" / "text_encoder")
    assert tok.model_max_length == 12  # what truncation=True cuts at when tokenizer.json sets no truncation
    assert len(tok(" ".join(["word"] * 40), truncation=True)["input_ids"]) == 12


def test_encode_normalized_is_embeds_joint_vector(tmp_path: Path) -> None:
    """README: after .eval(), model.encode(inputs, normalize=True) gives fusionkit.embed's vectors."""
    import numpy as np
    import torch
    from PIL import Image

    import fusionkit

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    model = fusionkit.create_model("tiny", fusion={"strategy": "gated"}).eval()
    inputs = fusionkit.FusionProcessor.from_model(model)(texts=["what a day"], images=[str(tmp_path / "p.png")])
    vecs = torch.as_tensor(fusionkit.embed(model, texts=["what a day"], images=[str(tmp_path / "p.png")]))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(inputs, normalize=True), vecs, rtol=1e-5, atol=1e-6)
