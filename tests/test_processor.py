"""`FusionProcessor`: raw captions/images -> model inputs, missing entries, save/load, training parity."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkit import FusionProcessor, ImageTransform, create_model, make_synthetic
from fusionkit.data import preprocess_image
from fusionkit.models.fusion_model import model_inputs


@pytest.fixture(scope="module")
def model():
    return create_model("tiny").eval()


@pytest.fixture(scope="module")
def pairs():
    ds = make_synthetic(6, image_size=48)
    return [ex.text for ex in ds], [ex.image for ex in ds]


def test_outputs_match_the_training_path(model, pairs) -> None:
    texts, images = pairs
    proc = FusionProcessor.from_model(model)
    out = proc(texts=texts, images=images)
    assert set(out) == {"input_ids", "attention_mask", "text_present", "pixel_values", "image_present"}
    tok = model.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert torch.equal(out["input_ids"], tok["input_ids"])
    assert torch.equal(out["attention_mask"], tok["attention_mask"])
    uint8 = torch.from_numpy(np.stack([preprocess_image(im, model.image_preprocess) for im in images]))
    expected = ImageTransform(model.image_preprocess, train=False)(uint8)
    assert out["pixel_values"].dtype == torch.float32 and out["pixel_values"].shape == (6, 3, 32, 32)
    torch.testing.assert_close(out["pixel_values"], expected)
    assert out["text_present"].all() and out["image_present"].all()


def test_paths_bytes_and_pil_give_the_same_pixels(model, pairs, tmp_path: Path) -> None:
    _, images = pairs
    path = tmp_path / "a.png"
    images[0].save(path)
    buf = io.BytesIO()
    images[0].save(buf, format="PNG")
    proc = FusionProcessor.from_model(model)
    px = proc(images=[images[0], str(path), path, buf.getvalue()])["pixel_values"]
    for i in range(1, 4):
        assert torch.equal(px[0], px[i])


def test_missing_entries_follow_the_batch_contract(model, pairs) -> None:
    texts, images = pairs
    proc = FusionProcessor.from_model(model)
    out = proc(texts=[texts[0], None, texts[2]], images=[None, images[1], images[2]])
    assert out["text_present"].tolist() == [True, False, True]
    assert out["image_present"].tolist() == [False, True, True]
    empty = model.tokenizer([""], return_tensors="pt")["input_ids"][0]
    assert torch.equal(out["input_ids"][1, : len(empty)], empty)  # a missing caption is tokenized ""
    zeros = ImageTransform(model.image_preprocess)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    torch.testing.assert_close(out["pixel_values"][:1], zeros)  # a missing image is zeros
    logits = model(**model_inputs(out))["sentiment"]
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    model.eval()
    for side, given in (("texts", texts[:3]), ("images", images[:3])):  # one side: the model runs on it as is
        inputs = proc(**{side: given})
        absent = "image_present" if side == "texts" else "text_present"
        assert inputs[absent].tolist() == [False] * 3
        expected = model.predict(**{side: given})
        probs = model(**inputs)["sentiment"].softmax(-1)
        assert [max(p["sentiment_prob"], key=p["sentiment_prob"].get) for p in expected] == [
            model.class_names["sentiment"][i] for i in probs.argmax(-1).tolist()
        ]


def test_save_and_load_beside_the_model(model, pairs, tmp_path: Path) -> None:
    texts, images = pairs
    proc = FusionProcessor.from_model(model)
    model.save_pretrained(tmp_path / "m")  # a model folder needs no extra processor files
    proc.save_pretrained(tmp_path / "p")
    expected = proc(texts=texts, images=images)
    for source in (tmp_path / "m", tmp_path / "p"):
        loaded = FusionProcessor.from_pretrained(source)
        assert loaded.max_length == 64 and loaded.image_preprocess == model.image_preprocess
        got = loaded(texts=texts, images=images)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key


def test_bad_inputs_are_clear_errors(model, pairs, tmp_path: Path) -> None:
    texts, images = pairs
    proc = FusionProcessor.from_model(model)
    with pytest.raises(ValueError, match="2 texts but 3 images"):
        proc(texts=texts[:2], images=images[:3])
    with pytest.raises(ValueError, match="needs texts, images or both"):
        proc()
    with pytest.raises(TypeError, match="not a single one"):
        proc(texts="one caption")
    with pytest.raises(TypeError, match="not a single one"):
        proc(images=images[0])
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        proc(texts=["ok", 3])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FusionProcessor.from_pretrained(tmp_path / "nowhere")


def test_tweet_normalization_is_part_of_the_tokenizer_everywhere(tmp_path: Path) -> None:
    """model.text.normalize="tweet": mentions and links tokenize as "@user" / "http" through the model's
    processor, after save/load of the model and of the processor, and the data cache key tells it apart."""
    from fusionkit import FusionModel, embed
    from fusionkit.config import ConfigError
    from fusionkit.data.cache import cache_key

    tweet = create_model("tiny", **{"text.normalize": "tweet"})
    plain = create_model("tiny")
    raw = ["RT @SomeOne_99: sunny day HTTPS://t.co/Ab12 #happy", "write to a@b.com, see www.x.org"]
    same = ["RT @user: sunny day http #happy", "write to a@b.com, see http"]

    def ids(processor: FusionProcessor, texts: list[str]) -> list[list[int]]:
        return processor(texts=texts)["input_ids"].tolist()

    p = FusionProcessor.from_model(tweet)
    assert ids(p, raw) == ids(p, same)
    assert ids(FusionProcessor.from_model(plain), raw) != ids(FusionProcessor.from_model(plain), same)
    tweet.save_pretrained(tmp_path / "m")
    again = FusionModel.from_pretrained(tmp_path / "m")
    assert ids(FusionProcessor.from_pretrained(tmp_path / "m"), raw) == ids(p, raw)
    p.save_pretrained(tmp_path / "p")
    assert ids(FusionProcessor.from_pretrained(tmp_path / "p"), raw) == ids(p, raw)
    from transformers import AutoTokenizer  # a served export read the Hugging Face way tokenizes the same

    hf = AutoTokenizer.from_pretrained(tmp_path / "p")
    assert hf(raw, padding=True, truncation=True, max_length=p.max_length)["input_ids"] == ids(p, raw)
    np.testing.assert_allclose(embed(again, texts=raw), embed(again, texts=same), atol=1e-6)
    ds, preprocess = make_synthetic(4, image_size=32), tweet.image_preprocess
    assert cache_key(ds, again.tokenizer, preprocess, 32) == cache_key(ds, tweet.tokenizer, preprocess, 32)
    assert cache_key(ds, tweet.tokenizer, preprocess, 32) != cache_key(ds, plain.tokenizer, preprocess, 32)
    with pytest.raises(ConfigError, match="text.normalize"):
        create_model("tiny", **{"text.normalize": "tweets"})


def test_one_lazily_opened_image_given_several_times_decodes_once(model, tmp_path: Path) -> None:
    """PIL loads a lazily opened image on first use; two threads doing that at once fail in its decoder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    proc = FusionProcessor.from_model(model)
    expected = proc.load_images([Image.open(tmp_path / "a.png")])[0][0]
    for _ in range(20):
        pixels, present = proc.load_images([Image.open(tmp_path / "a.png")] * 8)
        assert bool(present.all()) and all(torch.equal(p, expected) for p in pixels)
