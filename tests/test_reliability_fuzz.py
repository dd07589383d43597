"""Property-based fuzzing of `read_table`, `build_cache` and `Collator` (hypothesis).

The only outcomes allowed: a dataset/batch that matches its input, or a documented error
(`DataError`, or `ConfigError` for bad settings). Anything else (KeyError, UnicodeError, a crash in
PIL or numpy) is a bug. `FUSIONKIT_FUZZ_EXAMPLES` sets the budget (default small; more under slow).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fusionkit.config import ImagePreprocess
from fusionkit.data import MAX_TEXT_CHARS, Collator, DataError, build_cache, read_table
from fusionkit.data.image import MAX_ASPECT_RATIO
from fusionkit.models.tiny import tiny_tokenizer
from tests.reliability_utils import record

EXAMPLES = int(os.environ.get("FUSIONKIT_FUZZ_EXAMPLES", "25"))
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TOKENIZER = tiny_tokenizer()
PREPROCESS = ImagePreprocess(size=(16, 16))
_counts: dict[str, dict[str, int]] = {}


def _count(case: str, outcome: str) -> None:
    c = _counts.setdefault(case, {})
    c[outcome] = c.get(outcome, 0) + 1


captions = st.one_of(
    st.text(max_size=200),  # any unicode incl. control characters, surrogates excluded by hypothesis
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=40).map(
        lambda s: s * 2500
    ),  # ~0..100k
    st.sampled_from(["", " ", "\x00", "\r\n", '"', "a,b", "\u202e\u200b", "😀" * 3]),
)
modes = st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F", "YCbCr"])
label_cells = st.one_of(
    st.sampled_from(["pos", "neg", "neu", "", " pos ", "POS", "3", "-1"]), st.text(max_size=5)
)


def _image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I;16",):
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 1 << 20, (h, w)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32))
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return base.convert(mode)


rows = st.lists(
    st.tuples(captions, label_cells, st.booleans()),  # caption, label, image present
    min_size=0,
    max_size=6,
)


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(rows=rows, fmt=st.sampled_from(["csv", "jsonl"]), on_error=st.sampled_from(["raise", "skip"]))
def test_read_table_fuzz(rows: list[tuple[str, str, bool]], fmt: str, on_error: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        Image.new("RGB", (4, 4)).save(root / "ok.png")
        records = [{"id": f"r{i}", "text": c, "image": "ok.png" if present else "gone.png", "y": y}
                   for i, (c, y, present) in enumerate(rows)]  # fmt: skip
        path = root / f"t.{fmt}"
        if fmt == "csv":
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, ["id", "text", "image", "y"])
            w.writeheader()
            w.writerows(records)
            path.write_text(buf.getvalue(), encoding="utf-8", errors="surrogatepass", newline="")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        try:
            ds = read_table(path, label_columns=["y"], on_error=on_error)
        except DataError:
            # skip never raises per row; no rows -> no columns; no image path naming a file -> said whole (the
            # paths are relative to another folder?), not an empty dataset
            assert on_error == "raise" or not rows or not any(present for _, _, present in rows)
            _count("read_table", "DataError")
            return
        _count("read_table", "dataset")
        by_id = {r["id"]: r for r in records}
        for ex in ds:
            src = by_id[ex.id]
            assert src["image"] == "ok.png" and ex.text and len(ex.text) <= MAX_TEXT_CHARS
            assert ex.text == src["text"].strip()[:MAX_TEXT_CHARS].rstrip() or fmt == "csv"  # csv normalises \r\n
            y, cell = ex.labels["y"], src["y"].strip()  # raw: stripped, empty/"nan" = missing
            assert y == (None if not cell or cell.lower().lstrip("+-") == "nan" else cell)
        if on_error == "skip" and ds.skip_report is not None:
            skipped = [json.loads(x)["item"] for x in ds.skip_report.read_text().splitlines()]
            assert sorted(skipped + ds.ids) == sorted(by_id)  # every row either kept or reported


items = st.lists(
    st.tuples(captions, modes, st.integers(1, 300), st.integers(1, 300), st.sampled_from([0, 1, 2, None])),
    min_size=1,
    max_size=4,
)


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(items=items, max_length=st.integers(2, 64))
def test_build_cache_and_collator_fuzz(
    items: list[tuple[str, str, int, int, int | None]], max_length: int
) -> None:
    from fusionkit.data import Example, MultimodalDataset

    examples = [Example(f"e{i}", c, _image(m, w, h, i), {"y": y}) for i, (c, m, w, h, y) in enumerate(items)]
    ds = MultimodalDataset(examples, {"y": ["a", "b", "c"]})
    # Strips beyond the aspect limit are bad items (refused from the header); every other shape is cached.
    kept = [i for i, (_, _, w, h, _) in enumerate(items) if max(w, h) <= MAX_ASPECT_RATIO * min(w, h)]
    with tempfile.TemporaryDirectory() as d:
        data = build_cache(ds, TOKENIZER, PREPROCESS, d, max_length=max_length, num_proc=1, on_error="skip")
        assert data.ids == [f"e{i}" for i in kept]
        if not kept:
            _count("build_cache+Collator", "all refused")
            return
        batch = Collator(TOKENIZER.pad_token_id, data.label_names, data.task_types)(
            [data[i] for i in range(len(data))]
        )
    items = [items[i] for i in kept]
    b = len(items)
    assert batch["pixel_values"].shape == (b, 3, 16, 16) and str(batch["pixel_values"].dtype) == "torch.uint8"
    assert batch["input_ids"].shape[0] == b and batch["input_ids"].shape[1] <= max_length
    assert batch["attention_mask"].sum(1).min() >= 1  # [CLS] at least, even for an empty caption
    assert batch["label_mask"]["y"].tolist() == [y is not None for *_, y in items]
    assert batch["labels"]["y"].tolist() == [y or 0 for *_, y in items]
    _count("build_cache+Collator", "batch")


@pytest.fixture(scope="module", autouse=True)
def _report() -> None:
    yield
    for case, outcomes in sorted(_counts.items()):
        record(f"fuzz/{case}", examples=sum(outcomes.values()), outcomes=outcomes, max_examples=EXAMPLES)
