"""fusionkit's resize + center crop gives the encoder the pixels its own preprocessing would: timm's
`create_transform`, transformers' image processors (built here in code, nothing from the hub). Sizes used to be
rounded to nearest where both round down (timm: `floor(size / crop_pct)`; the longer side: `int(...)`), so the
image was scaled one pixel larger and every pixel moved (up to 94 of 255 levels off on a noisy photo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionkit import ImageTransform, create_model
from fusionkit.config import ImagePreprocess
from fusionkit.data import preprocess_image
from fusionkit.data.image import resize_geometry

SIZES = [(640, 427), (37, 91), (300, 300), (120, 61), (17, 45)]  # (width, height); 17 wide: enlarged
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def _image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A gradient under noise: a one-pixel shift or another scale changes most pixels by many levels."""
    w, h = size
    ramp = np.linspace(0, 180, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    noise = np.random.default_rng(seed).integers(-15, 16, (h, w, 3))
    Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("parity")
    return [_image(folder / f"{w}x{h}.png", (w, h)) for w, h in SIZES]


def _ours(path: Path, pre: ImagePreprocess) -> torch.Tensor:
    return ImageTransform(pre)(torch.from_numpy(preprocess_image(path, pre))[None])[0]


def _levels(a: torch.Tensor, b: torch.Tensor, pre: ImagePreprocess) -> torch.Tensor:
    """|a - b| of two normalized images, in 0..255 levels."""
    return (a - b).abs() * torch.tensor(pre.std).view(3, 1, 1) * 255


def _timm(crop_pct: float) -> tuple[ImagePreprocess, object]:
    import timm.data

    model = create_model("tiny", image={"name": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": {
        **TINY_VIT, "pretrained_cfg_overlay": {"crop_pct": crop_pct}}})  # fmt: skip
    cfg = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=model.image_encoder.model)
    assert cfg["crop_pct"] == crop_pct
    return model.image_preprocess, timm.data.create_transform(**cfg)


@pytest.mark.parametrize("crop_pct", [0.9, 0.95])
def test_resize_is_timms(pngs: list[Path], crop_pct: float) -> None:
    """timm's Resize, to the pixel; its CenterCrop's offset is compared below, on its own."""
    pre, transform = _timm(crop_pct)
    resize, normalize = transform.transforms[0], transform.transforms[-1]
    for path in pngs:
        resized = resize(Image.open(path).convert("RGB"))
        rh, rw, top, left = resize_geometry(*Image.open(path).size[::-1], pre)
        assert (rw, rh) == resized.size, path.name
        crop = resized.crop((left, top, left + pre.size[1], top + pre.size[0]))
        theirs = normalize(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1))
        assert _levels(_ours(path, pre), theirs, pre).max() <= 1.01, path.name


@pytest.mark.parametrize("crop_pct", [0.9, 0.95])
def test_center_crop_is_timms_where_timm_rounds_half_up(pngs: list[Path], crop_pct: float) -> None:
    """torchvision's CenterCrop (timm's) rounds a half-pixel offset to even, HF floors it: each encoder its own."""
    pre, transform = _timm(crop_pct)  # 0.9: 32 / 0.9 -> 35: 3 pixels to crop, 1.5 on each side
    for path in pngs:
        assert _levels(_ours(path, pre), transform(Image.open(path).convert("RGB")), pre).max() <= 1.01, path.name


def _hf_folder(path: Path, processor: str, resample: int = 3) -> Path:
    """A DINOv2-like encoder folder: shortest edge 40, then a 32x32 center crop (DINOv2's own is 256 -> 224)."""
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(path)  # fmt: skip
    getattr(transformers, processor)(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True, resample=resample,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


@pytest.mark.parametrize("processor", ["BitImageProcessor", "CLIPImageProcessor"])
def test_pixels_are_the_hf_image_processors(pngs: list[Path], tmp_path: Path, processor: str) -> None:
    from transformers import AutoImageProcessor

    folder = _hf_folder(tmp_path, processor)
    pre = create_model("tiny", image={"backend": "hf", "name": str(folder)}).image_preprocess
    proc = AutoImageProcessor.from_pretrained(folder)
    for path in pngs:
        theirs = proc(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert _levels(_ours(path, pre), theirs, pre).max() <= 1.01, path.name


@pytest.mark.parametrize(("resample", "name"), [(0, "nearest"), (3, "bicubic")])
def test_an_hf_processors_resample_filter_is_its_own(pngs: list[Path], tmp_path: Path, resample: int, name: str) -> None:
    """PIL's 0 is NEAREST, not "unset": it was read as bicubic (up to 169 levels off)."""
    from transformers import AutoImageProcessor

    folder = _hf_folder(tmp_path, "BitImageProcessor", resample=resample)
    pre = create_model("tiny", image={"backend": "hf", "name": str(folder)}).image_preprocess
    assert pre.interpolation == name
    proc = AutoImageProcessor.from_pretrained(folder)
    for path in pngs:
        theirs = proc(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert _levels(_ours(path, pre), theirs, pre).max() <= 1.01, path.name


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_on_device_transform_resizes_as_preprocess_image_does(pngs: list[Path], crop_mode: str, size: tuple) -> None:
    """A uint8 image of another size, resized on the device, matches the cache's PIL resize."""
    pre = ImagePreprocess(size=size, crop_pct=0.9, crop_mode=crop_mode)
    for path in pngs:
        full = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        on_device = ImageTransform(pre)(full[None])[0]
        assert on_device.shape == (3, *size)
        assert _levels(on_device, _ours(path, pre), pre).max() <= 2.01, path.name  # PIL rounds between its passes


def test_a_jpeg_is_decoded_in_full_unless_far_larger_than_the_input(tmp_path: Path) -> None:
    """Shrink-on-decode (JPEG draft) was used down to 1x the resized size, and moved pixels by several levels:
    a JPEG below 8x it now has timm's pixels; a far larger one stays close on average."""
    pre, transform = _timm(0.95)  # resized to 33 px
    for size, close in (((260, 200), False), ((1600, 1100), True)):
        jpg = tmp_path / f"{size}.jpg"
        Image.open(_image(tmp_path / "a.png", size, seed=1)).save(jpg, quality=95)
        diff = _levels(_ours(jpg, pre), transform(Image.open(jpg).convert("RGB")), pre)  # timm decodes in full
        if close:
            assert diff.mean() < 3.0, size  # DCT-scaled decode of a noisy ramp: ~2 levels on average
        else:
            assert diff.max() <= 1.01, size


def test_an_enlarged_image_has_timms_pixels_at_the_crops_edges(tmp_path: Path) -> None:
    """A box resize clamps the filter at the crop's edges: fine when shrinking, levels off when enlarging."""
    pre, transform = _timm(0.9)  # 17 px wide -> 35, then 32 cropped
    noise = np.random.default_rng(0).integers(0, 256, (45, 17, 3), dtype=np.uint8)  # sharp edges everywhere
    Image.fromarray(noise).save(tmp_path / "small.png")
    theirs = transform(Image.open(tmp_path / "small.png").convert("RGB"))
    assert _levels(_ours(tmp_path / "small.png", pre), theirs, pre).max() <= 1.01
