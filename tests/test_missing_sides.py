"""A row without a caption or an image, read the same way everywhere: encoders, embed, export, readers, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkit import FusionProcessor, embed
from fusionkit.data import make_synthetic
from fusionkit.models import create_model


@pytest.fixture(scope="module")
def images() -> list:
    return [ex.image for ex in make_synthetic(3, image_size=32)]


def test_encode_text_and_encode_image_give_nan_for_an_absent_side_as_embed_does(images) -> None:
    """The processor's presence flags used to be dropped: a row without a caption got the vector of "" (finite)."""
    model = create_model("tiny").eval()
    inputs = FusionProcessor.from_model(model)(texts=[None, "hate it", "fine"], images=[images[0], None, images[2]])
    with torch.no_grad():
        text, image = model.encode_text(inputs, normalize=True), model.encode_image(inputs, normalize=True)
    assert torch.isnan(text[0]).all() and torch.isfinite(text[1:]).all()
    assert torch.isnan(image[1]).all() and torch.isfinite(image[[0, 2]]).all()
    both = embed(model, [None, "hate it", "fine"], [images[0], None, images[2]], modalities=("text", "image"))
    np.testing.assert_allclose(both["text"], text.numpy(), atol=1e-5)  # NaN where the other is NaN
    np.testing.assert_allclose(both["image"], image.numpy(), atol=1e-5)
    # without flags (a tokenizer's output) every row is present, as before
    tokens = model.tokenizer(["a", "b"], padding=True, return_tensors="pt")
    assert torch.isfinite(model.encode_text(tokens)).all()


@pytest.mark.parametrize("strategy", ["text_only", "image_only"])
def test_a_unimodal_baselines_onnx_graphs_take_only_the_side_it_reads(strategy: str, images, tmp_path: Path) -> None:
    """Its graphs used to ask for input_ids, attention_mask and pixel_values alike, and refused a caption-only row."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fusionkit.export import OnnxModel, export_onnx

    model = create_model("tiny", fusion={"strategy": strategy}).eval()
    report = export_onnx(model, tmp_path / "onnx", parts=["model"])  # encode.onnx takes the same inputs
    reads = ["input_ids", "attention_mask"] if strategy == "text_only" else ["pixel_values"]
    assert report["parts"]["model"]["fp32"]["inputs"] == reads
    processor = FusionProcessor.from_model(model)
    given = {"texts": ["what a day", "meh"]} if strategy == "text_only" else {"images": images[:2]}
    inputs = processor(**given)  # one side only: the other's flags say it is absent in every row
    got = OnnxModel(tmp_path / "onnx" / "model.onnx")(**inputs)["logits_sentiment"]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**inputs)["sentiment"].numpy(), atol=1e-4)


def test_a_caption_spelled_like_a_missing_value_is_missing_everywhere_as_in_training(images, tmp_path: Path) -> None:
    """The readers read a caption "nan" or "None" as missing (training); predict, the processor and embed of a
    DataFrame used to read it as text, so one row got two predictions (0.995 vs 0.931)."""
    import pandas as pd

    from fusionkit.data import load_dataset

    model = create_model("tiny", fusion={"modality_dropout": 0.3}).eval()
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for im, path in zip(images, paths):
        im.save(path)
    frame = pd.DataFrame({"id": ["a", "b", "c"], "text": ["nan", "None", "a sunny day"], "image": paths})
    assert model.predict(texts=["nan", " NULL "], images=paths[:2]) == model.predict(images=paths[:2])
    assert not FusionProcessor.from_model(model)(texts=["N/A", "ok"])["text_present"][0]
    read = load_dataset(frame, missing_text="keep")
    assert [ex.text for ex in read] == [None, None, "a sunny day"]
    vectors = embed(model, frame, modalities=("joint", "text"))
    np.testing.assert_allclose(vectors["joint"], embed(model, read, modalities="joint"), atol=1e-6)
    assert np.isnan(vectors["text"][:2]).all() and np.isfinite(vectors["text"][2]).all()


def test_a_caption_cell_none_and_a_folder_as_image_say_what_they_are_and_how_to_go_on(tmp_path: Path) -> None:
    """A caption 'None' failed as "caption is empty"; a folder as the image path did not say how to skip the row."""
    from fusionkit.data import DataError, load_dataset

    (tmp_path / "pics").mkdir()
    (tmp_path / "none.csv").write_text("id,text,image\na,None,\nb,ok,\n")
    with pytest.raises(DataError, match=r"none.csv:2, item a: caption 'None' is a missing-value spelling.*"
                                        r"read as an empty cell.*missing_text=keep"):  # fmt: skip
        load_dataset(str(tmp_path / "none.csv"), missing_image="keep")
    (tmp_path / "folder.csv").write_text("id,text,image\na,hello,pics\n")
    for missing_image in ("keep", "skip"):
        with pytest.raises(DataError, match=r"item a: image path 'pics' is not a file.*data.on_error: skip"):
            load_dataset(str(tmp_path / "folder.csv"), missing_image=missing_image)
    assert len(load_dataset(str(tmp_path / "folder.csv"), on_error="skip", report_path=tmp_path / "r.jsonl")) == 0


def test_cli_embed_on_error_skip_keeps_a_row_with_neither_side_as_nan_like_python(images, tmp_path: Path) -> None:
    """The reader used to drop it before embedding, so the command line wrote fewer rows than fusionkit.embed."""
    import pandas as pd

    from fusionkit.cli import main
    from fusionkit.models import FusionModel

    model_dir = create_model("tiny").save_pretrained(tmp_path / "model")
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for im, path in zip(images, paths):
        im.save(path)
    pd.DataFrame({"id": ["a", "b", "c"], "text": ["sunny", None, "rain"], "image": [paths[0], None, paths[1]]}).to_csv(
        tmp_path / "rows.csv", index=False)  # fmt: skip
    argv = ["embed", str(model_dir), "--data", str(tmp_path / "rows.csv"), "--output", str(tmp_path / "v.npy"),
            "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    assert main(argv) != 0  # by default the row is named, not embedded
    assert main([*argv, "--on-error", "skip"]) == 0
    vectors, ids = np.load(tmp_path / "v.npy"), json.loads((tmp_path / "v.ids.json").read_text())
    assert ids == ["a", "b", "c"] and np.isnan(vectors[1]).all() and np.isfinite(vectors[[0, 2]]).all()
    python = embed(FusionModel.from_pretrained(model_dir), pd.read_csv(tmp_path / "rows.csv"), precision="fp32",
                   on_error="skip")  # fmt: skip
    np.testing.assert_allclose(vectors, python, atol=1e-5)  # NaN in the same place
