"""Robust image loading and the one-time resize + center-crop that the cache stores as uint8."""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fusionkit.config import ImagePreprocess
from fusionkit.data.errors import DataError

ImageSource = str | os.PathLike | bytes | Image.Image

# 40 MP: far above any photo in a social-media dataset (MVSA's are <= 600 px), far below the ~1 GB
# a decompression bomb would allocate. PIL's own global limit is not touched.
MAX_IMAGE_PIXELS = 40_000_000

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def _describe(src: ImageSource) -> str:
    if isinstance(src, bytes):
        return f"<{len(src)} image bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.size}>"
    return str(src)


def _open(src: ImageSource) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, bytes):
        if not src:
            raise DataError("image data is empty (0 bytes)", source=_describe(src))
        return Image.open(io.BytesIO(src))
    path = Path(src)
    if not path.is_file():
        raise DataError(
            "image file not found", source=str(path), hint="check the path or use on_error='skip'"
        )
    if path.stat().st_size == 0:
        raise DataError("image file is empty (0 bytes)", source=str(path), hint="re-download it")
    return Image.open(path)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit grey is rescaled (PIL's convert would clip it to 255)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels of web images often hide garbage colors: composite over white.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(
    src: ImageSource,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Open a path / bytes / PIL image as an upright 8-bit RGB image, or raise `DataError` saying why.

    The pixel limit is checked on the header, before decoding, so a decompression bomb fails fast.
    `draft_size` (W, H) lets the JPEG decoder downscale by DCT scaling (several times faster for
    big photos); the result is still at least that size.
    """
    where = _describe(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = _open(src)
            if im.width * im.height > max_pixels:
                raise DataError(
                    f"image is {im.width}x{im.height} = {im.width * im.height:,} pixels, above the "
                    f"limit of {max_pixels:,} (decompression bomb?)",
                    source=where,
                    hint="raise max_pixels if the image is genuine",
                )
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", draft_size)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"decompression bomb: {e}", source=where) from None
    except UnidentifiedImageError:
        raise DataError("not an image file PIL can read", source=where, hint="replace or remove it") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise DataError(f"corrupt or truncated image ({e})", source=where, hint="re-download it") from None


def preprocess_image(src: ImageSource, preprocess: ImagePreprocess, **load_kw: object) -> np.ndarray:
    """Decode, resize so the target fits at `size / crop_pct` (aspect kept) and center-crop.

    Returns uint8 [3, H, W]: the encoder's exact input size, so nothing is resized again per epoch.
    """
    th, tw = preprocess.size
    side = math.ceil(max(th, tw) / preprocess.crop_pct)  # square: EXIF rotation may swap the axes
    im = load_image(src, draft_size=(side, side), **load_kw)  # type: ignore[arg-type]
    scale = max(th / im.height, tw / im.width) / preprocess.crop_pct
    rh, rw = max(th, round(im.height * scale)), max(tw, round(im.width * scale))
    if (rw, rh) != im.size:
        try:
            resample = _RESAMPLE[preprocess.interpolation]
        except KeyError:
            raise ValueError(
                f"unknown interpolation {preprocess.interpolation!r}; use one of {list(_RESAMPLE)}"
            ) from None
        im = im.resize((rw, rh), resample, reducing_gap=3.0)
    top, left = (rh - th) // 2, (rw - tw) // 2
    im = im.crop((left, top, left + tw, top + th))
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
