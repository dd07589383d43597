"""What the worst image files cost: memory allocated by `preprocess_image` (the per-item work of
`build_cache`) for shapes at and past the limits of fusionkit.data.image.

Measured in a fresh interpreter, one case after another: the resident-set high-water mark is reset
before each case (`/proc/self/clear_refs`), so a figure is that case's own peak above what was already
resident. Pillow's pixel buffers are not seen by tracemalloc (only numpy's are), so peak RSS is the
figure to trust; tracemalloc's is reported beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusionkit.data.image import MAX_IMAGE_PIXELS
from tests.reliability_utils import REPO, record

SIDE_40MP = 6_324  # 6,324 x 6,324 = 39,992,976 px: the largest square under MAX_IMAGE_PIXELS
assert SIDE_40MP**2 <= MAX_IMAGE_PIXELS < (SIDE_40MP + 1) ** 2

# name -> (PIL mode, (width, height), format, refused?). Each file is a few KB to a few MB on disk.
CASES: dict[str, tuple[str, tuple[int, int], str, bool]] = {
    "strip_2000000x1_png": ("L", (2_000_000, 1), "PNG", True),
    "strip_1x2000000_png": ("L", (1, 2_000_000), "PNG", True),
    "over_limit_41mp_png": ("1", (6_500, 6_400), "PNG", True),
    "40mp_rgb_jpeg": ("RGB", (SIDE_40MP, SIDE_40MP), "JPEG", False),
    "40mp_palette_png": ("P", (SIDE_40MP, SIDE_40MP), "PNG", False),
    "40mp_rgb_png": ("RGB", (SIDE_40MP, SIDE_40MP), "PNG", False),
    "40mp_rgba_png": ("RGBA", (SIDE_40MP, SIDE_40MP), "PNG", False),
    "40mp_16bit_grey_png": ("I;16", (SIDE_40MP, SIDE_40MP), "PNG", False),
}

_CHILD = """
import io, json, sys, time, tracemalloc
from PIL import Image
from fusionkit.config import ImagePreprocess
from fusionkit.data import DataError, preprocess_image

def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) * 1024

def encode(mode, size, fmt):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt)
    return buf.getvalue()

pre = ImagePreprocess(size=(224, 224))
preprocess_image(encode("RGB", (8, 8), "PNG"), pre)  # imports Pillow's plugins before any measurement
for name, (mode, size, fmt) in json.loads(sys.argv[1]).items():
    data = encode(mode, tuple(size), fmt)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        preprocess_image(data, pre)
        outcome = "decoded"
    except DataError as e:
        outcome = "refused: " + str(e).split(": ", 1)[1][:90]
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = status("VmHWM") - before
    print("CASE", json.dumps({"name": name, "file_bytes": len(data), "outcome": outcome, "seconds": seconds,
                              "peak_rss_bytes": peak, "traced_bytes": traced}), flush=True)
"""


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, object]]:
    arg = json.dumps({k: [mode, size, fmt] for k, (mode, size, fmt, _) in CASES.items()})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, arg], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line[5:]) for line in out.stdout.splitlines() if line.startswith("CASE ")]
    return {r.pop("name"): r for r in rows}


def test_strips_and_bombs_are_refused_before_allocating(measured: dict[str, dict[str, object]]) -> None:
    for name, (*_, refused) in CASES.items():
        assert measured[name]["outcome"].startswith("refused") == refused, (name, measured[name])
        if refused:  # refused from the header: no pixel buffer (a 2 MP strip would be 2 MB, 41 MP 5 MB+)
            assert measured[name]["peak_rss_bytes"] < 1 << 20, (name, measured[name])
            assert measured[name]["traced_bytes"] < 1 << 20, (name, measured[name])


def test_largest_accepted_image_costs_a_bounded_number_of_bytes_per_pixel(
    measured: dict[str, dict[str, object]],
) -> None:
    """The worst accepted file bounds a cache worker's memory: record it per pixel, and guard it."""
    pixels = SIDE_40MP**2
    accepted = {k: v for k, v in measured.items() if not CASES[k][3]}
    worst = max(accepted, key=lambda k: accepted[k]["peak_rss_bytes"])
    per_pixel = {k: round(v["peak_rss_bytes"] / pixels, 1) for k, v in accepted.items()}
    assert measured["40mp_rgb_jpeg"]["peak_rss_bytes"] < 64 << 20  # DCT-scaled decode: a fraction of 40 MP
    assert per_pixel[worst] <= 20, per_pixel  # RGBA composite ~16 B/pixel; 16-bit grey ~9 (float32 blocks)
    for name, m in measured.items():
        record(f"images/allocation/{name}", result=m["outcome"], file_bytes=m["file_bytes"],
               peak_rss_bytes=m["peak_rss_bytes"], traced_bytes=m["traced_bytes"],
               seconds=round(m["seconds"], 2))  # fmt: skip
    record("images/allocation/worst_accepted", image=worst, pixels=pixels,
           peak_rss_bytes=accepted[worst]["peak_rss_bytes"], bytes_per_pixel=per_pixel)  # fmt: skip
