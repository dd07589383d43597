import numpy as np
import pytest
import torch

from fusionkit.config import ConfigError
from fusionkit.models import FusionModel, create_model, list_fusions

TASKS = [
    {"name": "sentiment", "type": "classification", "num_classes": 3},
    {"name": "tags", "type": "multilabel", "num_classes": 4},
    {"name": "score", "type": "regression", "num_classes": 1},
    {"name": "itm", "type": "itm"},
    {"name": "align", "type": "contrastive"},
]


def tiny_batch(model, captions=("what a lovely sunny day", "stormy and cold, awful", "ok")):
    tok = model.tokenizer(list(captions), padding=True, return_tensors="pt")
    h, w = model.image_preprocess.size
    return {
        "input_ids": tok["input_ids"],
        "attention_mask": tok["attention_mask"],
        "pixel_values": torch.randn(len(captions), 3, h, w),
    }


def labels_for(b):
    return (
        {"sentiment": torch.tensor([0, 2, 1]), "tags": torch.rand(b, 4).round(), "score": torch.randn(b, 1)},
        {"sentiment": torch.tensor([True, True, False])},
    )


@pytest.mark.parametrize("strategy", list_fusions())
def test_every_strategy_shapes_finite_and_gradients(strategy):
    model = create_model("tiny", fusion={"strategy": strategy}, tasks=TASKS)
    batch = tiny_batch(model)
    out = model(**batch)
    assert set(out) == {t["name"] for t in TASKS}
    assert out["sentiment"].shape == (3, 3)
    assert out["tags"].shape == (3, 4)
    assert out["score"].shape == (3, 1)
    assert out["itm"].shape == (3, 2)
    assert out["align"].shape == (3, 3)
    assert all(torch.isfinite(v).all() for v in out.values())
    losses = model.loss(out, *labels_for(3))
    assert set(losses) == {"loss", "sentiment", "tags", "score", "itm", "align"}
    losses["loss"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert missing == []
    joint = model.encode(**batch, normalize=True)
    assert joint.shape == (3, model.config.fusion.dim)
    torch.testing.assert_close(joint.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("strategy", ["text_only", "image_only"])
def test_unimodal_baselines_freeze_the_unused_encoder(strategy):
    model = create_model("tiny", fusion={"strategy": strategy})
    unused = model.image_encoder if strategy == "text_only" else model.text_encoder
    assert not any(p.requires_grad for p in unused.parameters())
    batch = tiny_batch(model)
    if strategy == "text_only":
        batch.pop("pixel_values")  # needs no image at all
    else:
        batch.pop("input_ids")
    model.loss(model(**batch), {"sentiment": torch.tensor([0, 1, 2])})["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_changing_padded_token_ids_does_not_change_output():
    model = create_model("tiny", fusion={"strategy": "cross_attention"}).eval()
    batch = tiny_batch(model)
    pad = batch["attention_mask"] == 0
    assert pad.any()
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(pad, 77))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)["sentiment"], model(**other)["sentiment"])
        torch.testing.assert_close(model.encode(**batch), model.encode(**other))


def test_late_fusion_averages_per_modality_heads():
    model = create_model("tiny", fusion={"strategy": "late"}).eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        views = model._views(**batch).views
        head = model.heads["sentiment"]
        expected = (head.views[0](views[:, 0]) + head.views[1](views[:, 1])) / 2
        torch.testing.assert_close(model(**batch)["sentiment"], expected)


def test_precomputed_features_give_the_same_outputs():
    model = create_model("tiny").eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        feats = {
            "text_features": model.text_encoder(batch["input_ids"], batch["attention_mask"]),
            "attention_mask": batch["attention_mask"],
            "image_features": model.image_encoder(batch["pixel_values"]),
        }
        torch.testing.assert_close(model(**batch)["sentiment"], model(**feats)["sentiment"])


def test_bad_inputs_give_clear_errors():
    model = create_model("tiny")
    batch = tiny_batch(model)
    with pytest.raises(ValueError, match=r"text batch size 3 != image batch size 2"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:2]))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq_len\]"):
        model(**dict(batch, input_ids=batch["input_ids"][0]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(**dict(batch, attention_mask=batch["attention_mask"][:, :2]))
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, 32, 32\]"):
        model(**dict(batch, pixel_values=torch.randn(3, 1, 32, 32)))
    with pytest.raises(ValueError, match="ImageTransform"):
        model(**dict(batch, pixel_values=torch.zeros(3, 3, 32, 32, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="image input missing"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="unknown fusion strategy 'sum'.*registered"):
        create_model("tiny", fusion={"strategy": "sum"})
    with pytest.raises(ConfigError, match="unknown task type"):
        create_model("tiny", tasks=[{"name": "x", "type": "segmentation"}])
    with pytest.raises(ConfigError, match="does not know its classes"):
        create_model("tiny", tasks=[{"name": "x"}])  # neither class_names nor num_classes nor data
    listed = create_model("tiny", tasks=[{"name": "x", "class_names": ["a", "b", "c"]}])  # listed: their count
    assert listed.heads["x"](torch.zeros(2, 1, listed.config.fusion.dim)).shape[-1] == 3


def test_freezing_policies():
    model = create_model("tiny", freeze="encoders")
    assert model.encoders_frozen
    assert all(p.requires_grad for p in model.fusion.parameters())
    model.train()
    assert not model.text_encoder.training and model.fusion.training  # frozen encoders stay in eval mode

    model.set_trainable("top_k", 1)
    text_layers = model.text_encoder.model.encoder.layer
    assert all(p.requires_grad for p in text_layers[-1].parameters())
    assert not any(p.requires_grad for p in text_layers[0].parameters())
    assert not any(p.requires_grad for p in model.text_encoder.model.embeddings.parameters())
    image_blocks = model.image_encoder.model.blocks
    assert all(p.requires_grad for p in image_blocks[-1].parameters())
    assert not any(p.requires_grad for p in image_blocks[0].parameters())
    assert all(p.requires_grad for p in model.image_encoder.model.norm.parameters())

    model.set_trainable("none")
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.endswith("mask_token"))
    with pytest.raises(ConfigError):
        model.set_trainable("some")


def test_num_parameters_counts_trainable_subset():
    model = create_model("tiny", freeze="encoders")
    assert 0 < model.num_parameters(trainable_only=True) < model.num_parameters()


def test_model_type_is_public():
    assert isinstance(create_model("tiny"), FusionModel)


def test_image_grid_pools_patches_and_keeps_cls():
    from fusionkit.models.fusion_model import pool_patch_grid

    tokens = torch.randn(2, 1 + 16 * 16, 8)
    pooled = pool_patch_grid(tokens, 4, (1, 16, 16))
    assert pooled.shape == (2, 1 + 16, 8)
    assert torch.equal(pooled[:, 0], tokens[:, 0])
    first_cell = tokens[:, 1:].reshape(2, 16, 16, 8)[:, :4, :4].mean(dim=(1, 2))
    torch.testing.assert_close(pooled[:, 1], first_cell)
    assert pool_patch_grid(tokens, 0, None) is tokens
    with pytest.raises(ValueError, match=r"45 image tokens, not the 1 prefix \+ 6x6 patch tokens"):
        pool_patch_grid(torch.randn(1, 45, 8), 2, (1, 6, 6))
    with pytest.raises(ValueError, match="needs the image encoder's token layout"):
        pool_patch_grid(tokens, 2, None)
    model = create_model("tiny", fusion={"image_grid": 2})  # tiny ViT: 4x4 patches + CLS -> 2x2 + CLS
    assert model.image_tokens(torch.randn(2, 3, 32, 32)).shape[1] == 5


def test_a_config_naming_saved_encoders_loads_their_weights(tmp_path, caplog) -> None:
    """On the default (tiny) preset, naming real encoders loads them; only `pretrained: false` builds them random."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTImageProcessor, ViTModel

    from fusionkit.models.tiny import tiny_tokenizer
    from fusionkit.training import build_config

    bert = BertModel(BertConfig(vocab_size=len(tiny_tokenizer()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32))  # fmt: skip
    bert.save_pretrained(tmp_path / "bert")
    tiny_tokenizer(32).save_pretrained(tmp_path / "bert")
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64), add_pooling_layer=False)  # fmt: skip
    vit.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    names = {"text": {"name": str(tmp_path / "bert"), "max_length": 32},
             "image": {"backend": "hf", "name": str(tmp_path / "vit")}}  # fmt: skip
    for pretrained in (None, False):
        sides = {k: {**v, "pretrained": pretrained} if pretrained is not None else v for k, v in names.items()}
        with caplog.at_level("WARNING", logger="fusionkit"):
            model = create_model(build_config({"model": sides}).model)
        assert "start random" not in caplog.text  # the ViT's pooler, saved without: fusionkit drops it unused
        for got, want in ((model.text_encoder.model, bert), (model.image_encoder.model, vit)):
            same = all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
            assert same is (pretrained is None), (type(want).__name__, pretrained)


def test_a_loss_without_a_task_it_knows_is_an_error_not_a_zero():
    model = create_model("tiny", tasks=TASKS)
    out = model(**tiny_batch(model))
    labels, mask = labels_for(3)
    assert model.loss(out, labels, mask)["loss"].item() > 0
    with pytest.raises(ValueError, match=r"labels \['sentimnt'\] name none of this model's labelled tasks"):
        model.loss(out, {"sentimnt": labels["sentiment"]})
    with pytest.raises(ValueError, match=r"\['sentimnt'\]"):  # a mask under a misspelled key masks nothing
        model.loss(out, labels, {"sentimnt": mask["sentiment"]})
    with pytest.raises(ValueError, match=r"task 'sentiment': labels must be class indices 0..2"):
        model.loss(out, {**labels, "sentiment": torch.tensor([0, 5, 1])})  # not torch's IndexError without a name
    only_sentiment = create_model("tiny")  # every task labelled: no labels at all would train nothing
    with pytest.raises(ValueError, match="pass labels="):
        only_sentiment.loss(only_sentiment(**tiny_batch(only_sentiment)))


def test_a_model_cast_to_bfloat16_takes_the_processors_pixels_and_checks_their_size():
    from PIL import Image

    import fusionkit

    model = create_model("tiny").eval()
    images = [Image.new("RGB", (30, 20), (200, 10, 10)), Image.new("RGB", (20, 30), (10, 10, 200))]
    reference = fusionkit.embed(model, ["a", "b"], images)
    cast = fusionkit.embed(model.to(torch.bfloat16), ["a", "b"], images)
    assert np.abs(np.asarray(cast, np.float32) - reference).max() < 0.05
    h, w = model.image_preprocess.size
    with pytest.raises(ValueError, match=rf"must be \[batch, 3, {h}, {w}\]"):
        model.encode_image(torch.zeros(1, 3, h * 2, w))


def test_encoders_take_a_tokenizer_or_processor_output_and_refuse_raw_inputs_clearly() -> None:
    """As open_clip / transformers users call them: a tokenizer's BatchEncoding (with BERT's all-zero
    token_type_ids) or a processor's output, whole or as keywords; captions, images and stray keys get an
    error naming what to do, not `'list' object has no attribute 'dim'` or a TypeError about `_views`."""
    from PIL import Image

    from fusionkit import FusionProcessor

    model = create_model("tiny").eval()
    inputs = FusionProcessor.from_model(model)(texts=["what a day", "ok"], images=[Image.new("RGB", (40, 30)), None])
    tokens = model.tokenizer(["what a day", "ok"], padding=True, return_tensors="pt")
    assert "token_type_ids" in tokens
    with torch.no_grad():
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        for same in (model.encode_text(tokens), model.encode_text(**tokens), model.encode_text(inputs)):
            torch.testing.assert_close(same, text)
        image = model.encode_image(inputs)  # row 1 has no image: NaN (its flag comes with the processor's output)
        torch.testing.assert_close(image[:1], model.encode_image(inputs["pixel_values"])[:1])
        assert torch.isnan(image[1]).all()
        batch = {**inputs, "labels": torch.zeros(2), "ids": ["a", "b"]}  # a collated batch: other keys left out
        torch.testing.assert_close(model.encode(batch, normalize=True), model.encode(**inputs, normalize=True))
        torch.testing.assert_close(model(batch)["sentiment"], model(**inputs)["sentiment"])
    hint = "FusionProcessor.from_model.*fusionkit.embed"
    with pytest.raises(TypeError, match=f"not captions or images.*{hint}"):
        model.encode_text(["what a day"])
    with pytest.raises(TypeError, match=f"not captions or images.*{hint}"):
        model.encode_image([Image.new("RGB", (8, 8))])
    with pytest.raises(TypeError, match=f"not a list: .*{hint}"):
        model.encode(["what a day"])
    with pytest.raises(TypeError, match=r"unexpected inputs \['labels'\].*encode\(batch\)"):
        model.encode(**inputs, labels=torch.zeros(2))
    with pytest.raises(TypeError, match="return_tensors='pt'"):
        model.encode_text(model.tokenizer(["what a day"]))
    with pytest.raises(ValueError, match="second segment"):
        model.encode_text(**{**tokens, "token_type_ids": torch.ones_like(tokens["input_ids"])})


def test_a_strategy_that_forgets_the_views_axis_is_named_with_the_shape_it_must_return(monkeypatch) -> None:
    """A plugin returning [B, dim] failed in the heads ("head built for 1 view(s), got 32"): the error now names
    the strategy, what it returned and [B, num_views, dim]; a strategy that returns that shape runs as before."""
    from fusionkit.models.fusion import FUSION_REGISTRY, FusionStrategy, masked_mean

    class Flat(FusionStrategy):
        name = "flat"

        def forward(self, text, text_mask, image, image_mask=None):
            return masked_mean(text, text_mask)  # [B, dim]: no views axis

    class Fixed(Flat):
        name = "fixed"

        def forward(self, text, text_mask, image, image_mask=None):
            return super().forward(text, text_mask, image, image_mask).unsqueeze(1)

    for cls in (Flat, Fixed):
        monkeypatch.setitem(FUSION_REGISTRY, cls.name, cls)
    model = create_model("tiny", fusion={"strategy": "flat"})
    with pytest.raises(ValueError, match=r"fusion strategy 'flat' returned shape \[3, 64\]; .*\[B, num_views, dim\] = "
                                         r"\[3, 1, 64\]"):  # fmt: skip
        model(**tiny_batch(model))
    model = create_model("tiny", fusion={"strategy": "fixed"})
    assert model(**tiny_batch(model))["sentiment"].shape == (3, 3)
