"""An HF encoder gets the pixels its `AutoImageProcessor` gives, or its folder is refused with the setting to change:
a `shortest_edge` resize without a center crop gives each image its own shape (it was cropped square silently), and
one followed by a non-square crop was scaled by timm's `ResizeKeepRatio` geometry (up to 16 of 255 levels off).
Transparent pixels are composited over white, as transformers' processors do (README says so)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionkit import FusionProcessor, create_model
from fusionkit.config import ConfigError
from fusionkit.export import serving_recipe

SIZES = [(70, 50), (50, 70), (61, 47), (20, 15)]  # (width, height): landscape, portrait, odd, enlarged


def _hf_folder(path: Path, **processor: object) -> Path:
    """A tiny DINOv2 with a BitImageProcessor (DINOv2's own) of these settings."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(path)  # fmt: skip
    BitImageProcessor(resample=2, do_convert_rgb=True, **processor).save_pretrained(path)
    return path


def _png(path: Path, size: tuple[int, int], alpha: bool = False) -> Path:
    """A gradient under noise (a one-pixel shift or another scale moves most pixels by many levels); with `alpha`,
    the left half transparent over a colour that is not white."""
    w, h = size
    ramp = np.linspace(0, 180, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    rgb = np.clip(ramp + np.random.default_rng(0).integers(-15, 16, (h, w, 3)), 0, 255).astype(np.uint8)
    if not alpha:
        Image.fromarray(rgb).save(path)
        return path
    a = np.full((h, w, 1), 255, np.uint8)
    a[:, : w // 2] = 0
    Image.fromarray(np.concatenate([rgb, a], axis=2), "RGBA").save(path)
    return path


def _levels(ours: torch.Tensor, theirs: torch.Tensor, std: tuple[float, ...]) -> float:
    """max |ours - theirs| of two normalized images, in 0..255 levels."""
    return float(((ours - theirs).abs() * torch.tensor(std).view(3, 1, 1) * 255).max())


def test_shortest_edge_then_a_non_square_crop_is_the_hf_processors(tmp_path: Path) -> None:
    """HF scales the shorter side to 44, then crops 32x40 from the center; it was scaled to cover 44x55 instead."""
    from transformers import AutoImageProcessor

    folder = _hf_folder(tmp_path / "enc", size={"shortest_edge": 44}, crop_size={"height": 32, "width": 40},
                        do_center_crop=True)  # fmt: skip
    model = create_model("tiny", image={"backend": "hf", "name": str(folder)})
    processor, hf = FusionProcessor.from_model(model), AutoImageProcessor.from_pretrained(folder)
    for size in SIZES:
        path = _png(tmp_path / f"{size}.png", size)
        ours = processor(images=[str(path)])["pixel_values"][0]
        theirs = hf(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 32, 40)
        assert _levels(ours, theirs, model.image_preprocess.std) <= 1.01, size
    steps = serving_recipe(processor, tmp_path)["image"]["steps"]  # export.json says the same
    assert any(s.startswith("resize the shorter side to 44 ") for s in steps), steps


def test_shortest_edge_without_a_center_crop_is_refused(tmp_path: Path) -> None:
    """HF keeps each image's aspect ratio (70x50 -> 44x32); a 32x32 center crop was taken instead, silently."""
    from transformers import AutoImageProcessor

    folder = _hf_folder(tmp_path / "enc", size={"shortest_edge": 32}, do_center_crop=False)
    theirs = AutoImageProcessor.from_pretrained(folder)(images=Image.open(_png(tmp_path / "a.png", (70, 50))))
    assert tuple(theirs["pixel_values"][0].shape) == (3, 32, 44)  # what no one-size batch holds
    with pytest.raises(ConfigError, match=r"shortest_edge.*do_center_crop: false.*crop_size") as e:
        create_model("tiny", image={"backend": "hf", "name": str(folder)})
    assert str(folder) in str(e.value) and "preprocessor_config.json" in str(e.value)


@pytest.mark.parametrize(
    ("size", "error"),
    [({"shortest_edge": 32}, r"shorter side to 32, then crops 32x40.*pads"),  # HF pads it with black
     ({"shortest_edge": 40, "longest_edge": 48}, r"shortest_edge alone")],  # HF caps the longer side
)  # fmt: skip
def test_an_hf_resize_fusionkit_cannot_reproduce_is_refused(tmp_path: Path, size: dict, error: str) -> None:
    """Both were followed as a plain shortest_edge resize (the crop enlarged, the cap ignored): other pixels."""
    folder = _hf_folder(tmp_path / "enc", size=size, crop_size={"height": 32, "width": 40}, do_center_crop=True)
    with pytest.raises(ConfigError, match=error):
        create_model("tiny", image={"backend": "hf", "name": str(folder)})


def test_transparent_pixels_are_white_as_the_hf_processors_make_them(tmp_path: Path) -> None:
    """Composited over white, as transformers' own `convert_to_rgb` does since 5.21 (before, and timm's loader:
    `convert("RGB")`, the hidden colour). The README and export.json say so."""
    import transformers
    from transformers import AutoImageProcessor

    folder = _hf_folder(tmp_path / "enc", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                        do_center_crop=True)  # fmt: skip
    model = create_model("tiny", image={"backend": "hf", "name": str(folder)})
    processor = FusionProcessor.from_model(model)
    path = _png(tmp_path / "rgba.png", (70, 50), alpha=True)
    ours = processor(images=[str(path)])["pixel_values"][0]
    white = (1 - torch.tensor(model.image_preprocess.mean)) / torch.tensor(model.image_preprocess.std)
    assert torch.allclose(ours[:, :, :8], white.view(3, 1, 1).expand(3, 32, 8), atol=1e-5)  # the transparent left
    assert "white" in serving_recipe(processor, tmp_path)["image"]["steps"][0]
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 21):
        theirs = AutoImageProcessor.from_pretrained(folder)(images=Image.open(path), return_tensors="pt")
        assert _levels(ours, theirs["pixel_values"][0], model.image_preprocess.std) <= 1.01
