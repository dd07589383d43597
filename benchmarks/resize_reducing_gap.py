"""`preprocess_image` (decode + resize + crop) with PIL's `reducing_gap=3.0` against `reducing_gap=None`, side by side.

`reducing_gap` first shrinks by an integer factor with a box filter, then resamples the rest: faster for images
shrunk several times, but its pixels differ from timm / torchvision / HF (which resample in one pass). This
measures what exactness costs end to end on real photos: 5 MVSA-Single images, sklearn's china.jpg scaled up to
1600x1200 and 4032x3024 (a phone photo's size) as JPEGs, and any `--big` photos; each as a file (decoded with JPEG
draft) and as a decoded PIL image (no draft).

    FUSIONKIT_SHARED=../shared python benchmarks/resize_reducing_gap.py [--big photo.jpg ...] [--repeat 30]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from bench_common import RESULTS, SHARED, cpu_model
from PIL import Image

from fusionkit.config import ImagePreprocess
from fusionkit.data.image import preprocess_image

PREPROCESS = {  # DINOv2 / timm ViT (resize 256 + center crop 224, bicubic) and an HF squash (224x224, bilinear)
    "center 224 bicubic": ImagePreprocess(size=(224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center"),
    "squash 224 bilinear": ImagePreprocess(size=(224, 224), interpolation="bilinear", crop_mode="squash"),
}


@contextlib.contextmanager
def reducing_gap(value: float | None) -> Iterator[None]:
    """Every `Image.resize` in the block with this `reducing_gap`, whatever fusionkit passes."""
    original = Image.Image.resize

    def resize(self, size, resample=None, box=None, reducing_gap=None):  # type: ignore[no-untyped-def]
        return original(self, size, resample, box, value)

    Image.Image.resize = resize  # type: ignore[method-assign]
    try:
        yield
    finally:
        Image.Image.resize = original  # type: ignore[method-assign]


def timed(run: Callable[[], np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    """Best-of-`repeat` milliseconds of `run` (decode included), and its pixels."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=Path, nargs="*", default=[], help="more (large) JPEG photos")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    mvsa = sorted((SHARED / "data" / "mvsa-single" / "data").glob("*.jpg"))[:5]
    from sklearn.datasets import load_sample_image

    tmp, china = Path(tempfile.mkdtemp()), Image.fromarray(load_sample_image("china.jpg"))
    files = [*mvsa, *args.big]
    for w, h in ((1600, 1200), (4032, 3024)):
        files.append(tmp / f"china_{w}x{h}.jpg")
        china.resize((w, h), Image.LANCZOS).save(files[-1], quality=90)
    rows = []
    for name, preprocess in PREPROCESS.items():
        for path in files:
            with Image.open(path) as im:
                size = im.size
            runs = {  # a path (JPEG draft decoding), or a PIL image the caller decoded in full (no draft)
                "file": lambda path=path, p=preprocess: preprocess_image(path, p),
                "PIL image": lambda path=path, p=preprocess: preprocess_image(Image.open(path).convert("RGB"), p),
            }
            for kind, run in runs.items():
                with reducing_gap(3.0):
                    fast, a = timed(run, args.repeat)
                with reducing_gap(None):
                    exact, b = timed(run, args.repeat)
                diff = np.abs(a.astype(int) - b.astype(int))
                rows.append((name, f"{path.name} {size[0]}x{size[1]}", kind, fast, exact, diff.max(), diff.mean()))
    lines = [
        "# PIL resize: reducing_gap=3.0 vs None (exact) in `preprocess_image`",
        "",
        f"CPU: {cpu_model()}, one thread; best of {args.repeat} per image; decode + resize + crop to uint8 (a PIL "
        "image: the caller's full decode included).",
        "",
        "| preprocess | image | input | gap 3.0 ms | None ms | None / 3.0 | max diff | mean diff |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {p} | {i} | {k} | {f:.2f} | {e:.2f} | {e / f:.2f}x | {m} | {d:.3f} |" for p, i, k, f, e, m, d in rows),
    ]
    total_fast, total_exact = sum(r[3] for r in rows), sum(r[4] for r in rows)
    lines += ["", f"All rows: {total_fast:.1f} ms with reducing_gap=3.0, {total_exact:.1f} ms exact "
              f"({total_exact / total_fast:.2f}x)."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resize_reducing_gap.md").write_text(text)


if __name__ == "__main__":
    main()
