"""Image loading edge cases, the preprocessing cache, the collator and the on-device image transform."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fusionkit.data.cache as cache_mod
from fusionkit.config import ImagePreprocess
from fusionkit.data import (
    Collator,
    DataError,
    Example,
    ImageTransform,
    MultimodalDataset,
    build_cache,
    load_image,
    make_synthetic,
    move_batch,
    preprocess_image,
)
from fusionkit.models.tiny import tiny_tokenizer

PRE = ImagePreprocess(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _png(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize(
    "mode,value",
    [("L", 128), ("P", 3), ("RGBA", (255, 0, 0, 255)), ("CMYK", (0, 255, 255, 0)), ("LA", (128, 255))],
)
def test_load_image_modes_become_rgb(mode: str, value: object) -> None:
    im = Image.new(mode, (5, 4), value)
    out = load_image(_png(im) if mode != "CMYK" else im)
    assert out.mode == "RGB" and out.size == (5, 4)


def test_16bit_is_rescaled_not_clipped_and_alpha_is_composited_on_white() -> None:
    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(load_image(_png(grey)))[0, 0, 0] == 128  # PIL's convert("RGB") would give 255
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(load_image(_png(clear)))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (10, 30)


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, "JPEG")
    cases = {
        "missing": (b"", "image file not found"),
        "zero-byte": (b"", "empty (0 bytes)"),
        "not an image": (b"<html>404 not found</html>", "not an image"),
        "truncated": (good.getvalue()[:300], "corrupt or truncated"),
    }
    cases["bomb"] = (_png(Image.new("1", (12_000, 12_000))), "decompression bomb")  # 144 MP in a few KB
    out = {}
    for name, (data, msg) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jpg"
        if name != "missing":
            path.write_bytes(data)
        out[name] = (path, msg)
    return out


def test_bad_image_files_raise_precise_errors(tmp_path: Path) -> None:
    for path, msg in _bad_files(tmp_path).values():
        with pytest.raises(DataError, match=re.escape(msg)) as e:
            load_image(path)
        assert str(path) in str(e.value)


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(DataError, match="above the limit"):
        load_image(_png(Image.new("RGB", (100, 100))), max_pixels=5_000)


def test_preprocess_resizes_shorter_side_and_center_crops() -> None:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 255, 0), (0, 0, 10, 20))  # green left quarter: cropped away by a centre crop
    out = preprocess_image(im, ImagePreprocess(size=(10, 10), interpolation="bilinear"))
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    assert out[0].min() > 200 and out[1].max() < 60


def test_squash_scales_each_side_on_the_cpu_and_on_the_device() -> None:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 255, 0), (0, 0, 10, 20))  # green left quarter: kept when squashed, cropped away when centred
    squash = ImagePreprocess(size=(10, 10), interpolation="bilinear", crop_mode="squash", mean=(0, 0, 0), std=(1, 1, 1))
    out = preprocess_image(im, squash)
    assert out.shape == (3, 10, 10) and out[1, :, :2].min() > 200 and out[0, :, -3:].min() > 200
    raw = torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())[None]  # uint8 of another size: resized there
    on_device = ImageTransform(squash)(raw)[0] * 255
    assert on_device[1, :, :2].min() > 200 and on_device[0, :, -3:].min() > 200
    centred = ImageTransform(dataclasses.replace(squash, crop_mode="center"))(raw)[0] * 255
    assert centred[1].max() < 60  # what preprocess_image's centre crop gives (test above)
    with pytest.raises(ValueError, match="crop_mode"):
        ImagePreprocess(crop_mode="border")


# ------------------------------------------------------------------------------------------------ cache


def _tiny_ds(n: int = 6) -> MultimodalDataset:
    return make_synthetic(n, seed=1, image_size=24)


def test_cache_items_and_second_build_decodes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = tiny_tokenizer()
    ds = _tiny_ds()
    cached = build_cache(ds, tok, PRE, tmp_path, max_length=5, num_proc=1)
    item = cached[2]
    assert item["id"] == ds[2].id and item["labels"] == ds[2].labels
    assert item["input_ids"].dtype == torch.long and len(item["input_ids"]) <= 5
    assert item["input_ids"].tolist() == tok(ds[2].text, truncation=True, max_length=5)["input_ids"]
    assert item["pixel_values"].dtype == torch.uint8 and item["pixel_values"].shape == (3, 16, 16)
    assert torch.equal(item["pixel_values"], torch.from_numpy(preprocess_image(ds[2].image, PRE)))
    assert cached.ids == ds.ids and cached.label_names == ds.label_names

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("an image was decoded on a cache hit")

    monkeypatch.setattr(cache_mod, "preprocess_image", boom)
    again = build_cache(_tiny_ds(), tok, PRE, tmp_path, max_length=5)
    assert again.path == cached.path and torch.equal(again[2]["pixel_values"], item["pixel_values"])
    with pytest.raises(AssertionError, match="decoded"):  # a new preprocessing config is a new key
        build_cache(ds, tok, ImagePreprocess(size=(8, 8)), tmp_path, num_proc=1)
    with pytest.raises(AssertionError, match="decoded"):  # squashed pixels are not the center-cropped ones
        build_cache(ds, tok, dataclasses.replace(PRE, crop_mode="squash"), tmp_path, num_proc=1)


def test_cache_parallel_build_matches_serial(tmp_path: Path) -> None:
    ds = make_synthetic(150, seed=2, image_size=24)
    serial = build_cache(ds, tiny_tokenizer(), PRE, tmp_path / "a", num_proc=1)
    parallel = build_cache(ds, tiny_tokenizer(), PRE, tmp_path / "b", num_proc=2)
    assert np.array_equal(np.load(serial.path / "pixels.npy"), np.load(parallel.path / "pixels.npy"))


def test_cache_bad_images_raise_or_skip_with_report(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path)
    good = _tiny_ds(2)
    examples = list(good) + [
        Example(f"bad{i}", "some text", str(p), {"sentiment": 0}) for i, (p, _) in enumerate(bad.values())
    ]
    ds = MultimodalDataset(examples, good.label_names, name="mixed")
    with pytest.raises(DataError, match="item bad0: image file not found"):
        build_cache(ds, tiny_tokenizer(), PRE, tmp_path / "c", num_proc=1)
    assert not any((tmp_path / "c").iterdir())  # the failed build left no half-written cache
    cached = build_cache(ds, tiny_tokenizer(), PRE, tmp_path / "c", num_proc=1, on_error="skip")
    assert cached.ids == good.ids and len(cached) == 2
    report = [json.loads(x) for x in cached.skip_report.read_text().splitlines()]
    assert [r["item"] for r in report] == [f"bad{i}" for i in range(len(bad))]
    assert [msg in r["problem"] for r, (_, msg) in zip(report, bad.values())] == [True] * len(bad)


def test_megabyte_caption_is_truncated_at_tokenization(tmp_path: Path) -> None:
    ds = MultimodalDataset(
        [Example("long", "great day " * 9_000, Image.new("RGB", (8, 8)), {"sentiment": 0})],
        {"sentiment": ["a"]},
    )
    assert len(build_cache(ds, tiny_tokenizer(), PRE, tmp_path, max_length=32)[0]["input_ids"]) == 32


# ------------------------------------------------------------------------------------------------ collator


def _item(n: int, labels: dict) -> dict:
    return {
        "id": f"i{n}",
        "input_ids": torch.arange(1, n + 1),
        "pixel_values": torch.full((3, 4, 4), n, dtype=torch.uint8),
        "labels": labels,
    }


def test_collator_pads_to_longest_and_masks_labels() -> None:
    names = {"sentiment": ["p", "u", "n"], "tags": ["a", "b", "c"], "score": []}
    kinds = {"sentiment": "classification", "tags": "multilabel", "score": "regression"}
    items = [
        _item(3, {"sentiment": 2, "tags": [0, 2], "score": 0.5}),
        _item(5, {"sentiment": None, "tags": None, "score": None}),
    ]
    batch = Collator(pad_token_id=0, tasks=names, task_types=kinds)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (2, 3, 4, 4)
    assert (
        batch["labels"]["sentiment"].tolist() == [2, 0] and batch["labels"]["sentiment"].dtype == torch.long
    )
    assert batch["labels"]["tags"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert batch["labels"]["score"].dtype == torch.float32
    assert {k: v.tolist() for k, v in batch["label_mask"].items()} == {t: [True, False] for t in names}
    assert batch["ids"] == ["i3", "i5"]


def test_dataloader_end_to_end(tmp_path: Path) -> None:
    from fusionkit.config import TaskConfig
    from fusionkit.tasks import bind_labels

    tok = tiny_tokenizer()
    raw = make_synthetic(10, image_size=24)  # raw class names; binding encodes them in declared order
    ds, _ = bind_labels(raw, [TaskConfig("sentiment")])
    names = raw.label_names["sentiment"]
    assert [names[ex.labels["sentiment"]] for ex in ds] == [ex.labels["sentiment"] for ex in raw]
    cached = build_cache(ds, tok, PRE, tmp_path, num_proc=1)
    loader = torch.utils.data.DataLoader(
        cached, batch_size=4, collate_fn=Collator(tok.pad_token_id, cached.label_names)
    )
    batch = move_batch(next(iter(loader)), "cpu", ImageTransform(PRE, train=False))
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())  # dynamic padding


# ------------------------------------------------------------------------------------------------ transform


def test_image_transform_normalizes_and_resizes() -> None:
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 16, 16).contiguous()
    out = ImageTransform(PRE)(x)
    expected = (torch.tensor([0, 128, 255]) / 255 - 0.5) / 0.25
    assert out.dtype == torch.float32 and torch.allclose(out[0, :, 5, 5], expected, atol=1e-5)
    resized = ImageTransform(PRE)(x[:, :, :8, :8].contiguous())  # smaller cache size -> resized
    assert resized.shape == (2, 3, 16, 16) and torch.allclose(resized, out, atol=1e-4)


def test_train_augmentation_is_random_eval_is_deterministic() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    ev = ImageTransform(PRE, train=False)
    assert torch.equal(ev(x), ev(x))
    tr = ImageTransform(PRE, train=True)
    a, b = tr(x), tr(x)
    assert a.shape == (8, 3, 16, 16) and not torch.allclose(a, b) and not torch.allclose(a, ev(x))
    assert a.min() >= ev(x).min() - 1e-4 and a.max() <= ev(x).max() + 1e-4  # bilinear stays in range
    tr.eval()  # the module's eval mode switches augmentation off
    assert torch.equal(tr(x), ev(x))


def test_flip_only_augmentation_mirrors() -> None:
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 1, 16).expand(1, 3, 16, 16).contiguous()
    tr = ImageTransform(PRE, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(tr(x), ImageTransform(PRE)(x.flip(-1)), atol=1e-4)


def test_move_batch_recurses_into_labels() -> None:
    batch = Collator(0, {"s": ["a", "b"]})([_item(2, {"s": 1}), _item(3, {"s": None})])
    moved = move_batch(batch, torch.device("cpu"), ImageTransform(PRE))
    assert moved["labels"]["s"].tolist() == [1, 0] and moved["label_mask"]["s"].tolist() == [True, False]
    assert moved["pixel_values"].dtype == torch.float32 and moved["ids"] == ["i2", "i3"]
    assert batch["pixel_values"].dtype == torch.uint8  # the input batch is not modified


def test_the_synthetic_data_cards_split_table_is_what_split_dataset_gives() -> None:
    """data_cards/synthetic.md states the built-in dataset's split sizes and class counts: they must stay true."""
    from collections import Counter

    from fusionkit.data import make_synthetic, split_dataset

    card = (Path(__file__).parents[1] / "data_cards" / "synthetic.md").read_text()
    for split, part in split_dataset(make_synthetic(2000)).items():
        counts = Counter(ex.labels["sentiment"] for ex in part)
        row = f"| {split} | {len(part):,} | {counts['positive']} | {counts['neutral']} | {counts['negative']} |"
        assert row in card, row
