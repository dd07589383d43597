"""A PIL image the caller passes in is read, never changed: the processor, `predict` and `embed` used to shrink a
lazily opened JPEG in place (JPEG draft mode: a 1600x1200 photo became 200x150 in the caller's hands)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fusionkit
from fusionkit import FusionProcessor, create_model


@pytest.fixture(scope="module")
def model():
    return create_model("tiny").eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A big JPEG (the draft would shrink it), one stored on its side (EXIF orientation 6) and a 16-bit grey PNG."""
    folder = tmp_path_factory.mktemp("caller")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    photo.save(folder / "big.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.resize((400, 300)).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 65536, (90, 120), dtype=np.uint16)).save(folder / "grey16.png")
    return [folder / "big.jpg", folder / "rotated.jpg", folder / "grey16.png"]


def _state(im: Image.Image) -> tuple:
    return im.size, im.mode, im.getexif().get(0x0112), im.tobytes()


def test_processor_predict_and_embed_leave_the_callers_image_as_it_was(model, files: list[Path]) -> None:
    proc = FusionProcessor.from_model(model)
    for path in files:
        with Image.open(path) as fresh:
            expected_state = _state(fresh)
            expected_pixels = proc(images=[fresh])["pixel_values"]
            expected_pred = model.predict(texts=["a"], images=[fresh])
            expected_emb = fusionkit.embed(model, texts=["a"], images=[fresh], progress=False)
        runs = {
            "processor": lambda im: proc(images=[im])["pixel_values"],
            "predict": lambda im: model.predict(texts=["a"], images=[im]),
            "embed": lambda im: fusionkit.embed(model, texts=["a"], images=[im], progress=False),
        }
        for name, run in runs.items():
            im = Image.open(path)  # lazily opened, as a user or a HF dataset passes it
            run(im)
            assert _state(im) == expected_state, f"{name} changed the caller's {path.name}"
            again = run(im)  # the same object, read a second time: the same result as a fresh copy
            expected = {"processor": expected_pixels, "predict": expected_pred, "embed": expected_emb}[name]
            if isinstance(again, torch.Tensor):
                assert torch.equal(again, expected), f"{name}: {path.name}"
            else:
                assert _same(again, expected), f"{name}: {path.name}"


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor | np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)  # type: ignore[union-attr]
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b
