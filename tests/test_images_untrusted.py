"""Image files as a hostile or careless user hands them over: foreign formats under image names, strip
shapes that pass a pixel count, decoders failing in their own ways. Each is one bad item, reported or
raised with its name; nothing runs an external program; nothing but the interpreter's own failures
(MemoryError, KeyboardInterrupt) gets past `on_error="skip"`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

import fusionkit.data.cache as cache_mod
import fusionkit.data.image as image_mod
from fusionkit.config import ImagePreprocess
from fusionkit.data import DataError, Example, MultimodalDataset, build_cache, load_image, preprocess_image
from fusionkit.models.tiny import tiny_tokenizer
from tests.reliability_utils import tally

PRE = ImagePreprocess(size=(16, 16))
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def no_ghostscript(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records every attempt to hand a file to Ghostscript (the test then asserts there was none)."""
    calls: list[object] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError("Ghostscript was invoked on a dataset file")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    return calls


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("header", [EPS, b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"])
def test_postscript_named_jpg_is_refused_without_ghostscript(
    tmp_path: Path, header: bytes, no_ghostscript: list[object]
) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(header)
    with pytest.raises(DataError, match="not an image file in a decoded format") as e:
        load_image(path)
    assert str(path) in str(e.value) and no_ghostscript == []
    with pytest.raises(DataError):
        load_image(header)  # the same as bytes (HF datasets, parquet)
    assert no_ghostscript == []


def test_binary_eps_and_lazily_opened_pil_eps_are_refused(
    tmp_path: Path, no_ghostscript: list[object]
) -> None:
    # DOS EPS: a binary header pointing at the PostScript section
    binary = (
        b"\xc5\xd0\xd3\xc6" + struct.pack("<6I", 32, len(EPS), 0, 0, 0, 0) + b"\xff\xff" + b"\0" * 2 + EPS
    )
    (tmp_path / "b.png").write_bytes(binary)
    with pytest.raises(DataError):
        load_image(tmp_path / "b.png")
    # A PIL image opened elsewhere without an allow-list (e.g. by a dataset library) is not loaded either.
    (tmp_path / "a.eps").write_bytes(EPS)
    lazy = Image.open(tmp_path / "a.eps")
    assert lazy.format == "EPS"
    with pytest.raises(DataError, match="EPS images are not decoded"):
        load_image(lazy)
    assert MultimodalDataset([Example("e", "t", lazy, {})], {}).fingerprint  # a cache key never loads it
    assert no_ghostscript == []


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "SGI", "PPM", "DDS", "QOI", "XBM"])
def test_formats_outside_the_allow_list_are_one_bad_item(fmt: str) -> None:
    im = Image.new("1" if fmt == "XBM" else "RGB", (8, 8))
    with pytest.raises(DataError, match="not an image file in a decoded format"):
        load_image(_encode(im, fmt))


@pytest.mark.parametrize("fmt", image_mod.IMAGE_FORMATS)
def test_allowed_formats_decode(fmt: str) -> None:
    im = Image.new("RGB", (20, 12), (200, 30, 40))
    out = load_image(_encode(im, fmt))
    assert out.size == (20, 12) and out.mode == "RGB"
    assert abs(int(np.asarray(out)[6, 10, 0]) - 200) < 8


# ------------------------------------------------------------------------------------------------ shapes


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the size of every image whose pixel data starts being decoded."""
    calls: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def recording_load(self: ImageFile.ImageFile) -> object:
        calls.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return calls


@pytest.mark.parametrize("size", [(2_000_000, 1), (1, 2_000_000)])
def test_strip_image_fails_before_decoding_and_allocates_little(
    size: tuple[int, int], decode_calls: list[tuple[int, int]]
) -> None:
    data = _encode(Image.new("L", size), "PNG", optimize=True)
    assert len(data) < 4_000  # 2 MP that compress to about 2 KB
    load_image(_encode(Image.new("L", (4, 4)), "PNG"))  # first use imports Pillow's plugins: not measured
    decode_calls.clear()
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="aspect ratio"):
            preprocess_image(data, ImagePreprocess(size=(224, 224)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak:,} bytes allocated to refuse a 2 KB file"
    assert decode_calls == []  # refused from the header: no pixel was decoded


@pytest.mark.parametrize(
    "size,ok",
    [((20_000, 1_000), False), ((3_000, 90), False), ((640, 20), True), ((20, 640), True), ((1, 1), True)],
)
def test_side_and_aspect_limits(size: tuple[int, int], ok: bool) -> None:
    data = _encode(Image.new("RGB", size), "PNG")
    if ok:
        assert preprocess_image(data, PRE).shape == (3, 16, 16)
    else:
        with pytest.raises(DataError, match="aspect ratio"):
            load_image(data)


def test_extreme_allowed_aspect_resizes_only_the_crop() -> None:
    """The resize works on the center crop, so its output (not a 32:1 strip scaled up) is all it makes."""
    im = Image.new("RGB", (3_200, 100), (0, 0, 255))
    im.paste((255, 0, 0), (1_550, 0, 1_650, 100))  # the centre square is red, the rest blue
    out = preprocess_image(im, ImagePreprocess(size=(64, 64), crop_pct=1.0))
    assert out.shape == (3, 64, 64) and out[0].min() > 200 and out[2].max() < 60


# ------------------------------------------------------------------------------------------------ decoders


DECODER_FAILURES = [
    NotImplementedError("unsupported DDS variant"),
    struct.error("unpack requires a buffer of 4 bytes"),
    EOFError("no more images"),
    IndexError("tuple index out of range"),
    ZeroDivisionError("division by zero"),
    RuntimeError("decoder state"),
]


def _mixed_dataset(tmp_path: Path) -> MultimodalDataset:
    good = [tmp_path / f"good{i}.png" for i in range(2)]
    for i, p in enumerate(good):
        Image.new("RGB", (20, 20), (i * 90, 10, 10)).save(p)
    (tmp_path / "hostile.png").write_bytes(b"\x89PNG\r\n\x1a\n-hostile")  # patched to fail below
    rows = [("a", good[0]), ("hostile", tmp_path / "hostile.png"), ("b", good[1])]
    return MultimodalDataset([Example(i, "text", str(p), {}) for i, p in rows], {}, name="mixed")


def _fail_on_hostile(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    real_open = image_mod._open

    def hostile_open(src: object) -> Image.Image:
        if str(src).endswith("hostile.png"):
            raise exc
        return real_open(src)  # type: ignore[arg-type]

    monkeypatch.setattr(image_mod, "_open", hostile_open)


@pytest.mark.parametrize("exc", DECODER_FAILURES, ids=lambda e: type(e).__name__)
def test_any_decoder_exception_is_one_reported_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    ds = _mixed_dataset(tmp_path)
    _fail_on_hostile(monkeypatch, exc)
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=f"item hostile: corrupt image.*{type(exc).__name__}"):
        build_cache(ds, tok, PRE, tmp_path / "cache", num_proc=1)
    cached = build_cache(ds, tok, PRE, tmp_path / "cache", num_proc=1, on_error="skip")
    assert cached.ids == ["a", "b"]
    report = [json.loads(line) for line in cached.skip_report.read_text().splitlines()]
    assert [r["item"] for r in report] == ["hostile"] and type(exc).__name__ in report[0]["problem"]
    tally("images/decoder_errors", rows_tried=3, rows_reported=len(report), rows_kept=len(cached.ids))


@pytest.mark.parametrize("exc", [MemoryError(), KeyboardInterrupt()], ids=lambda e: type(e).__name__)
def test_interpreter_failures_are_not_swallowed_by_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    ds = _mixed_dataset(tmp_path)
    _fail_on_hostile(monkeypatch, exc)
    with pytest.raises(type(exc)):
        build_cache(ds, tiny_tokenizer(), PRE, tmp_path / "cache", num_proc=1, on_error="skip")
    assert list((tmp_path / "cache").iterdir()) == []  # and the interrupted build left nothing


def test_decoder_crashing_its_process_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cache_mod.preprocess_image
    crash = _encode(Image.new("RGB", (9, 9)), "PNG")
    monkeypatch.setattr(  # forked workers inherit the patch: item 100 kills its process like a segfault
        cache_mod,
        "preprocess_image",
        lambda src, pre: os._exit(139) if src == crash else real(src, pre),
    )
    images = [crash if i == 100 else _encode(Image.new("RGB", (8, 8)), "PNG") for i in range(130)]
    ds = MultimodalDataset([Example(f"i{i}", "t", im, {}) for i, im in enumerate(images)], {}, name="crash")
    with pytest.raises(RuntimeError, match="crashed a worker process at or after row (0|64)"):
        build_cache(ds, tiny_tokenizer(), PRE, tmp_path / "cache", num_proc=2, on_error="skip")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt metadata it skips
@pytest.mark.parametrize("fmt", image_mod.IMAGE_FORMATS)
def test_corrupted_bytes_decode_or_raise_data_error(fmt: str) -> None:
    """Byte flips and truncations of a valid file in every allowed format: a picture or a DataError."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    clean = np.frombuffer(_encode(im, fmt), dtype=np.uint8)
    outcomes = {"decoded": 0, "refused": 0}
    for trial in range(60):
        data = clean.copy()
        flips = rng.integers(0, len(data), size=1 + trial % 8)
        data[flips] = rng.integers(0, 256, size=len(flips), dtype=np.uint8)
        if trial % 3 == 0:
            data = data[: rng.integers(1, len(data))]
        try:
            preprocess_image(data.tobytes(), PRE)
            outcomes["decoded"] += 1
        except DataError:
            outcomes["refused"] += 1
    assert sum(outcomes.values()) == 60 and outcomes["refused"] > 0
    tally("images/corrupted_bytes", files=60, **outcomes)


def test_an_array_or_a_folder_as_an_image_says_what_an_image_may_be(tmp_path: Path) -> None:
    import torch

    for value in (np.zeros((8, 8, 3), np.uint8), torch.zeros(3, 8, 8)):
        with pytest.raises(DataError, match=r"must be a path, bytes or a PIL image, not a .*fromarray") as e:
            load_image(value)
        assert len(str(e.value)) < 300  # the type, not the array's repr
    with pytest.raises(DataError, match="is a folder"):
        load_image(tmp_path)


def test_a_huge_file_is_refused_before_it_is_read_or_hashed(tmp_path: Path) -> None:
    from fusionkit.data.image import MAX_IMAGE_BYTES, image_digest

    path = tmp_path / "huge.jpg"
    with path.open("wb") as f:  # sparse: costs no disk
        f.truncate(MAX_IMAGE_BYTES + 1)
    with pytest.raises(DataError, match="GiB limit"):
        load_image(path)
    assert image_digest(str(path)).startswith(b"<too large>")  # not 1 GiB read to hash it


def test_deep_grey_images_have_a_fixed_scale_per_mode() -> None:
    """One bright pixel must not rescale the rest: 32-bit "I" reads as 16-bit like "I;16", "F" as [0, 1]."""
    ramp = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # 0 .. 61,380
    as16 = np.asarray(load_image(Image.fromarray(ramp)))
    as32 = Image.fromarray(ramp.astype(np.int32))
    assert as32.mode == "I" and np.array_equal(np.asarray(load_image(as32)), as16)
    dark = (ramp // 300).astype(np.int32)  # 0 .. 204: dark in 16 bits, and it stays dark ...
    bright = dark.copy()
    bright[0, 0] = 70_000  # ... when one pixel goes past 16 bits (clipped to white)
    a, b = np.asarray(load_image(Image.fromarray(dark))), np.asarray(load_image(Image.fromarray(bright)))
    assert a.max() <= 1 and b[0, 0].tolist() == [255] * 3 and np.array_equal(a[1:], b[1:])
    half = np.asarray(load_image(Image.fromarray(np.full((4, 4), 0.5, np.float32))))
    hot = np.full((4, 4), 0.5, np.float32)
    hot[0, 0] = 3.0
    assert half[0, 0, 0] == 128 and np.array_equal(np.asarray(load_image(Image.fromarray(hot)))[1:], half[1:])


def test_every_way_of_writing_a_transparent_pixel_is_composited_on_white() -> None:
    """RGBA, a palette's transparent index, and one RGB or grey colour marked transparent (PNG tRNS, as
    optimisers write it) are one picture: the hidden colour under the transparent pixels never shows."""
    rgb = np.full((8, 8, 3), 90, np.uint8)
    rgb[:, 4:] = (1, 2, 3)  # the colour that is transparent
    rgba = np.dstack([rgb, np.where((rgb == (1, 2, 3)).all(-1), 0, 255).astype(np.uint8)])
    want = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert want[0, 6].tolist() == [255, 255, 255]
    as_trns = Image.open(io.BytesIO(_encode(Image.fromarray(rgb), "PNG", transparency=(1, 2, 3))))
    grey = np.where(rgb[..., 0] == 1, 7, 90).astype(np.uint8)
    grey_trns = Image.open(io.BytesIO(_encode(Image.fromarray(grey, "L"), "PNG", transparency=7)))
    assert np.array_equal(np.asarray(load_image(as_trns)), want)
    assert np.asarray(load_image(grey_trns))[:, 6].tolist() == [[255] * 3] * 8
    assert np.asarray(load_image(grey_trns))[0, 0].tolist() == [90] * 3


def test_an_in_memory_image_is_keyed_by_what_decoding_reads_not_only_its_pixels() -> None:
    """A lossless EXIF rotation, another palette or a transparent colour change the decoded picture, so they
    must change the cache key; two different undecodable images must not share one."""
    from fusionkit.data.image import image_digest

    pixels = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8))
    upright = Image.open(io.BytesIO(_encode(pixels.convert("RGB"), "JPEG")))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    turned = Image.open(io.BytesIO(_encode(pixels.convert("RGB"), "JPEG", exif=exif)))
    assert image_digest(upright) != image_digest(turned)
    pal = pixels.convert("P")
    other = pal.copy()
    other.putpalette([255 - v for v in pal.getpalette()])
    trns = Image.open(io.BytesIO(_encode(pal, "PNG", transparency=3)))
    assert len({image_digest(pal), image_digest(other), image_digest(trns)}) == 3
    with (
        Image.open(io.BytesIO(_encode(pixels, "PNG"))) as a,
        Image.open(io.BytesIO(_encode(pixels.resize((4, 4)), "PNG"))) as b,
    ):
        pass  # closed: both undecodable, in their own ways
    assert image_digest(a) != image_digest(b)
    with pytest.raises(DataError, match="closed before it was read"):
        load_image(a)


def test_bytes_like_images_and_empty_bytes_and_pil_bomb_messages(tmp_path: Path) -> None:
    png = _encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG")
    for value in (bytearray(png), memoryview(png)):  # what table readers hand over, accepted from Python too
        assert load_image(value).getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(DataError, match=r"empty \(0 bytes\)"):
        load_image(b"")
    # a header past PIL's own limit (2 x 89.5 MP) says fusionkit's limit and what to do, like one past ours
    huge = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(huge)
    with pytest.raises(DataError, match=r"above the limit of 40,000,000 pixels .*downscale it"):
        load_image(huge)


def test_a_truncated_lazily_opened_pil_image_among_many_is_one_skipped_item_with_workers(tmp_path: Path) -> None:
    """PIL images are decoded in this process (pickling one to a worker would decode it outside the per-item
    guard, and a truncated one would stop the whole build with a raw OSError)."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good = _encode(Image.fromarray(noise), "JPEG")  # its header opens; the scan data stops short
    images = [Image.open(io.BytesIO(good[: len(good) * 3 // 4] if i == 70 else good)) for i in range(72)]
    ds = MultimodalDataset([Example(f"i{i}", "t", im, {}) for i, im in enumerate(images)], {}, name="lazy")
    cached = build_cache(ds, tiny_tokenizer(), PRE, tmp_path / "cache", num_proc=2, on_error="skip")
    report = [json.loads(line) for line in cached.skip_report.read_text().splitlines()]
    assert [r["item"] for r in report] == ["i70"] and len(cached.ids) == 71
