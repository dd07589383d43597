"""Robust image loading and the one-time resize + center-crop that the cache stores as uint8."""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from fusionkit.config import ImagePreprocess
from fusionkit.data.errors import DataError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

# The only formats a dataset file may be decoded as, passed to `Image.open(formats=...)`: all decoded in
# process by Pillow's bundled libraries. Anything else (EPS/PS would run Ghostscript on the file; exotic
# decoders are rarely fuzzed) is "not an image" however it is named. JPEG includes MPO (phone photos).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Limits read from the header, before any pixel is decoded. 40 MP: far above any photo in a social-media
# dataset (MVSA's are <= 600 px), far below the ~1 GB a decompression bomb would allocate. Side and aspect
# bound the shapes a pixel count lets through (a 2,000,000 x 1 strip is 2 MP); a 32:1 image center-cropped
# to a square keeps 3% of itself, so nothing a model can use is refused. PIL's global limit is not touched.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 1 << 30  # no photo's file is this large: refused before it is read (or hashed for a cache key)
MAX_IMAGE_SIDE = 16_384
MAX_ASPECT_RATIO = 32.0

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _describe(src: ImageSource) -> str:
    if isinstance(src, bytes | bytearray | memoryview):
        return f"<{len(src)} image bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.size}>"
    if not isinstance(src, str | os.PathLike):
        return f"<{type(src).__module__}.{type(src).__name__}>"
    return str(src)


@functools.cache
def _formats() -> tuple[str, ...]:
    """`IMAGE_FORMATS` this Pillow build can open (WEBP needs libwebp): `Image.open` rejects unknown names."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def _type_hint(src: object) -> str:
    """How to turn a value that is no image source into one (a file object's bytes, an array's image)."""
    if hasattr(src, "read"):
        return "pass its bytes (buf.getvalue(), f.read()) or a PIL image (PIL.Image.open(f))"
    if hasattr(src, "__array__"):
        return "convert an array with PIL.Image.fromarray(a) (uint8 HxWxC)"
    return "pass a file path, the file's bytes or a PIL image"


def _open(src: ImageSource) -> Image.Image:
    if isinstance(src, Image.Image):  # e.g. lazily opened by a HF dataset: never load a foreign format
        if src.format is not None and src.format not in (*_formats(), "MPO"):
            raise DataError(f"{src.format} images are not decoded", source=_describe(src),
                            hint=f"convert it to one of {', '.join(_formats())}")  # fmt: skip
        return src
    if isinstance(src, Mapping) and src and set(src) <= {"bytes", "path"}:  # HF Image(decode=False), as tables take it
        inner = src.get("bytes") if src.get("bytes") is not None else src.get("path")  # (rows.RowReader.image)
        if inner is None:
            raise DataError("the image dict holds neither bytes nor a path", source=_describe(src),
                            hint="pass None for a missing image")  # fmt: skip
        return _open(inner)
    if isinstance(src, bytes | bytearray | memoryview):
        if not len(src):
            raise DataError("image data is empty (0 bytes)", source=_describe(src))
        return Image.open(io.BytesIO(src), formats=_formats())
    if not isinstance(src, str | os.PathLike):
        raise DataError(f"an image must be a path, bytes or a PIL image, not a {type(src).__name__}",
                        source=_describe(src), hint=_type_hint(src))  # fmt: skip
    if isinstance(src, str) and src[:7].lower() == "file://":  # a local file, named as a URL: refused as the
        plain = url2pathname(urlsplit(src).path)  # table readers refuse it, with the path to write instead
        raise DataError("image paths are read from local files only, not URLs", source=src,
                        hint=f"a file:// URL names a local file: pass its plain path, {plain}")  # fmt: skip
    if isinstance(src, str) and URL.match(src):  # Path() would collapse its "//" into a local path never there
        raise DataError("image paths are read from local files only, not URLs", source=src,
                        hint="download the image first and pass its local path or its bytes")  # fmt: skip
    path = Path(src)
    if path.is_dir():
        raise DataError("image path is a folder, not a file", source=str(path), hint="name the image file in it")
    if not path.is_file():
        if str(src).startswith(("~", "$")):  # as the table readers say: only a shell expands these
            expand = "os.path.expanduser" if str(src)[0] == "~" else "os.path.expandvars"
            raise DataError(f"image file not found: a path's leading {str(src)[0]!r} is not expanded (only a shell "
                            "does that)", source=str(path), hint=f"write the full path, or {expand}(path)")  # fmt: skip
        raise DataError("image file not found", source=str(path), hint="check the path")  # callers add their own way out
    size = path.stat().st_size
    if size == 0:
        raise DataError("image file is empty (0 bytes)", source=str(path), hint="re-download it")
    if size > MAX_IMAGE_BYTES:
        raise DataError(f"image file is {size / 2**30:.1f} GiB, above the {MAX_IMAGE_BYTES >> 30} GiB limit",
                        source=str(path), hint="downscale or compress it, or leave it out")  # fmt: skip
    return Image.open(path, formats=_formats())


_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}  # fmt: skip


def _signature_format(src: ImageSource) -> str | None:
    """The decoded format whose signature (first bytes) `src` has, if any: tells a damaged image from a non-image."""
    try:
        if isinstance(src, bytes | bytearray | memoryview):
            head = bytes(src[:12])
        elif isinstance(src, str | os.PathLike):
            with open(src, "rb") as f:
                head = f.read(12)
        else:
            return None
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in _SIGNATURES.items() if head.startswith(sig)), None)


TOO_MANY_PIXELS = ("if it is a genuine photo, downscale it (no encoder reads more than a few hundred pixels a side), "
                   "or skip it (data.on_error: skip); load_image(max_pixels=...) raises the limit in Python")


def _check_shape(im: Image.Image, max_pixels: int, where: str) -> None:
    """Refuse, from the header alone, shapes whose decode or resize would cost more than any photo."""
    w, h = im.size
    if w < 1 or h < 1:
        raise DataError(f"image has an empty size {w}x{h}", source=where, hint="replace or remove it")
    if w * h > max_pixels:
        raise DataError(f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} (decompression "
                        "bomb?)", source=where, hint=TOO_MANY_PIXELS)  # fmt: skip
    if max(w, h) > MAX_IMAGE_SIDE or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise DataError(
            f"image is {w}x{h}: a side above {MAX_IMAGE_SIDE:,} px or an aspect ratio above "
            f"{MAX_ASPECT_RATIO:g}:1 (a strip, not a picture)",
            source=where,
            hint="crop or resize it, or leave it out",
        )


def image_digest(src: ImageSource | None) -> bytes:
    """Content hash of an image source, for cache keys: a file's BYTES, not its name, size or mtime
    (`cp -p`, `rsync -a`, `tar -x` keep those across a replacement). Moving a dataset keeps its keys."""
    if src is None:
        return b"<no image>"
    if isinstance(src, bytes | bytearray | memoryview):
        return hashlib.sha256(src).digest()
    if isinstance(src, Image.Image):  # maybe lazily opened: the same guards as decoding before tobytes()
        try:
            _check_shape(_open(src), MAX_IMAGE_PIXELS, _describe(src))
            # and what `load_image` reads besides the pixels: the EXIF rotation, the palette, a transparent colour
            extra = (src.getexif().get(ExifTags.Base.Orientation), src.getpalette(), src.info.get("transparency"))
            return hashlib.sha256(f"{src.mode}|{src.size}|{extra}|".encode() + src.tobytes()).digest()
        except MemoryError:
            raise
        except Exception as e:  # refused or undecodable: the build reports it per item (under its own key, so
            return f"<bad image>{type(e).__name__}: {e}|{src.mode}|{src.size}".encode()  # another one is rebuilt)
    try:
        st = os.stat(src)
    except (OSError, ValueError):  # missing, or a NUL in the path: the build reports it per item
        return b"<missing>"
    if st.st_size > MAX_IMAGE_BYTES:  # refused when decoded: not worth reading gigabytes to hash it first
        return b"<too large>" + str((st.st_size, st.st_mtime_ns)).encode()
    return _file_digest(os.fspath(src), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def legacy_image_digest(src: ImageSource | None) -> bytes:
    """`image_digest` as fusionkit 0.1 computed it (fingerprint scheme 1, see `training.rundir`): an in-memory
    PIL image by its mode, size and pixels only. Kept so a run recorded then is still checked, not refused."""
    if not isinstance(src, Image.Image):
        return image_digest(src)
    try:
        _check_shape(_open(src), MAX_IMAGE_PIXELS, _describe(src))
        return hashlib.sha256(f"{src.mode}|{src.size}|".encode() + src.tobytes()).digest()
    except MemoryError:
        raise
    except Exception:
        return b"<bad image>"


@functools.lru_cache(maxsize=1 << 18)
def _file_digest(path: str, *stat: int) -> bytes:
    """Memoized per process by inode and ctime as well: ctime is set by the kernel on every change and no
    copy tool can restore it, so an unchanged stat means unchanged bytes (splits re-fingerprint subsets)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()  # SHA-NI: ~2x blake2b here
    except OSError:
        return b"<unreadable>"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Integer grey ("I;16", "I") is read as 16-bit, float grey ("F") as [0, 1],
    and clipped beyond: a fixed scale per mode, so one bright pixel cannot darken the whole image
    (PIL's own convert would clip 16-bit values at 255)."""
    if "transparency" in im.info and im.mode in ("RGB", "L", "1", "P"):  # a colour marked transparent (PNG
        im = im.convert("RGBA")  # tRNS, GIF): composited as an alpha channel is, below
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im)  # the native integer/float32 pixels: no float64 copy of a 40 MP image
        top = 1.0 if im.mode == "F" else 65535.0
        grey = np.empty(arr.shape, dtype=np.uint8)
        for r in range(0, arr.shape[0], 512):  # float32 blocks bound the scratch memory
            block = arr[r : r + 512].astype(np.float32)
            block *= 255.0 / top
            block += 0.5
            grey[r : r + 512] = np.clip(block, 0, 255, out=block)
        return Image.fromarray(grey, "L").convert("RGB")
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

    Only `IMAGE_FORMATS` are decoded, and the size limits are checked on the header, before decoding,
    so a decompression bomb or a 2,000,000 x 1 strip fails fast. Any exception of a decoder (corrupt
    files raise OSError, struct.error, EOFError, NotImplementedError, ...) becomes a `DataError`: one bad
    file is one bad item. `MemoryError` and `KeyboardInterrupt` propagate. `draft_size` (W, H) lets the
    JPEG decoder downscale by DCT scaling (several times faster for big photos); the result is still at
    least that size. A PIL image passed in is never changed (no draft, no in-place rotation): the caller
    may use it again, at another size.
    """
    where = _describe(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = _open(src)
            _check_shape(im, max_pixels, where)
            if draft_size is not None and im.format in ("JPEG", "MPO") and im is not src:  # the caller's is theirs
                im.draft("RGB", draft_size)
            im.load()
            im = ImageOps.exif_transpose(im)  # a new image (`src` keeps its size, mode and pixels); the decoded one
            return _to_rgb(im)  # is freed here, before the conversion's own copies
    except (DataError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's own, larger limit
        raise DataError(f"image is above the limit of {max_pixels:,} pixels (decompression bomb?): {e}", source=where,
                        hint=TOO_MANY_PIXELS) from None  # fmt: skip
    except UnidentifiedImageError:
        fmt = _signature_format(src)
        if fmt is not None:  # Pillow refuses a file it cannot parse as "unidentified", a damaged one too
            raise DataError(f"the file starts as a {fmt} does (its signature) but cannot be decoded: it is damaged "
                            "(a corrupted chunk or header)", source=where, hint="re-download or re-export it, or "
                            "leave it out (data.on_error: skip)") from None  # fmt: skip
        raise DataError(
            f"not an image file in a decoded format ({', '.join(_formats())})",
            source=where,
            hint="convert or remove it",
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise DataError(f"corrupt or truncated image ({e})", source=where, hint="re-download it") from None
    except Exception as e:  # a decoder's own failure on hostile bytes: still one bad item
        if isinstance(src, Image.Image) and getattr(src, "fp", True) is None and isinstance(e, AssertionError):
            raise DataError("the PIL image was closed before it was read (a `with Image.open(...)` block ended)",
                            source=where, hint="keep the file open, or call image.load() inside the block") from None  # fmt: skip
        raise DataError(
            f"corrupt image: the decoder failed with {type(e).__name__}: {e}",
            source=where,
            hint="re-download it",
        ) from None


# A JPEG is decoded shrunk (DCT scaling, `Image.draft`: 1/2, 1/4 or 1/8, several times faster) only to at least
# this many times the size it is then resized to; an image below 8x that is decoded in full, as timm and HF decode
# it, so its pixels are theirs. Far above, the shrink still shows a little (measured: 0.5-1.7 of 255 levels on
# average, a few levels at sharp colour edges); with no margin it was up to 13 levels on a 1600x1200 photo at 224.
DRAFT_MARGIN = 4


def _scaled_side(side: int, crop_pct: float) -> int:
    """`side / crop_pct` rounded down, as timm does (`math.floor(img_size / crop_pct)`). The 6-digit rounding
    first undoes float error: HF's crop_pct is crop / shortest_edge, and 17 / (17 / 25) is 24.999999999999996."""
    return math.floor(round(side / crop_pct, 6))


def shorter_side(preprocess: ImagePreprocess) -> int | None:
    """The length a "center" resize scales the shorter side to (the aspect ratio kept, the longer side truncated), or
    None where another geometry applies ("squash"; timm's `ResizeKeepRatio` for a non-square size). HF's
    `shortest_edge` (`crop_offset` "floor") is this for any crop, `floor(min(size) / crop_pct)`; timm
    (`crop_offset` "round") only where `floor(size / crop_pct)` is square (torchvision's `Resize(int)`)."""
    if preprocess.crop_mode != "center":
        return None
    th, tw = preprocess.size
    if preprocess.crop_offset == "floor":
        return _scaled_side(min(th, tw), preprocess.crop_pct)
    sh, sw = _scaled_side(th, preprocess.crop_pct), _scaled_side(tw, preprocess.crop_pct)
    return sh if sh == sw else None


def resize_geometry(height: int, width: int, preprocess: ImagePreprocess) -> tuple[int, int, int, int]:
    """(height, width) an image of this size is resized to, and the (top, left) of the center crop, with the
    encoders' own rounding so the pixels are theirs: "squash" resizes each side to `size / crop_pct`
    (timm); "center" resizes the shorter side to `shorter_side` and truncates the longer one,
    `int(short' * long / short)` (torchvision's `Resize(int)`, which timm uses, and HF's `shortest_edge`), or for
    timm's non-square size keeps the ratio as its `ResizeKeepRatio` does. The crop starts at `(resized - size) // 2`
    (`crop_offset` "floor": HF) or at that half rounded to even ("round": torchvision's `CenterCrop`, timm's), one
    pixel apart when the difference is 4k + 3."""
    th, tw = preprocess.size
    sh, sw = _scaled_side(th, preprocess.crop_pct), _scaled_side(tw, preprocess.crop_pct)
    short_to = shorter_side(preprocess)
    if preprocess.crop_mode == "squash":
        rh, rw = sh, sw
    elif short_to is not None:
        long_to = int(short_to * max(height, width) / min(height, width))
        rh, rw = (short_to, long_to) if height <= width else (long_to, short_to)
    else:
        ratio = min(height / sh, width / sw)
        rh, rw = round(height / ratio), round(width / ratio)
    rh, rw = max(th, rh), max(tw, rw)  # crop_pct > 1 or a sliver of float error: the crop still fits
    if preprocess.crop_offset == "round":
        return rh, rw, int(round((rh - th) / 2)), int(round((rw - tw) / 2))
    return rh, rw, (rh - th) // 2, (rw - tw) // 2


def preprocess_image(src: ImageSource, preprocess: ImagePreprocess, **load_kw: object) -> np.ndarray:
    """Decode, scale to `size / crop_pct` (`crop_mode` "center": aspect kept, the shorter side fits; "squash": each
    side on its own, as HF's height x width processors do) and center-crop, as `resize_geometry` says.

    Shrinking and cropping are one `resize(box=...)` of the crop region, so the work is the output's size
    whatever the input's shape; an enlarged image is resized whole, then cropped (a box would clamp the filter at
    its edges). Returns uint8 [3, H, W]: the encoder's exact input size, so nothing is
    resized again per epoch.
    """
    try:
        resample = _RESAMPLE[preprocess.interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {preprocess.interpolation!r}; use one of {list(_RESAMPLE)}"
        ) from None
    th, tw = preprocess.size
    side = DRAFT_MARGIN * _scaled_side(max(th, tw), preprocess.crop_pct)  # square: EXIF rotation may swap the axes
    im = load_image(src, draft_size=(side, side), **load_kw)  # type: ignore[arg-type]
    rh, rw, top, left = resize_geometry(im.height, im.width, preprocess)
    if (rw, rh) == im.size:
        im = im.crop((left, top, left + tw, top + th))
    elif rw >= im.width or rh >= im.height:  # enlarged: a box's edges would clamp the filter (up to 3+ levels off)
        im = im.resize((rw, rh), resample).crop((left, top, left + tw, top + th))  # small: about the output's size
    else:  # the same pixels as resizing the whole image then cropping, computed for the crop only
        sx, sy = rw / im.width, rh / im.height
        box = (left / sx, top / sy, min(im.width, (left + tw) / sx), min(im.height, (top + th) / sy))
        im = im.resize((tw, th), resample, box=box)  # one pass, as timm/torchvision/HF (no reducing_gap)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
