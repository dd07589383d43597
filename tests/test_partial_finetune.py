"""Fine-tuning the top encoder blocks on cached hidden states (model.freeze top_k + the feature cache).

The encoders split at any block: the hidden state entering block s plus the blocks from s reproduce
the encoder's forward exactly, for BERT-family text encoders and timm / HF (ViT, DINOv2) image ones.
The trainer caches the frozen bottom once and trains the top on it, which must match end-to-end top-k
training; the cache key covers the frozen bottom only (a resumed run finds it); layer-wise lr decay
scales each block's rate.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusionkit.config import ConfigError, ImageEncoderConfig, TextEncoderConfig
from fusionkit.models import create_model
from fusionkit.models.encoders import ImageEncoder, TextEncoder
from fusionkit.training.config import build_config
from fusionkit.training.feature_cache import encoder_key
from fusionkit.training.optim import param_groups
from fusionkit.training.trainer import Trainer


def _hf_vision(kind: str, tmp_path: Path) -> ImageEncoder:
    import transformers as T

    cls, config = {"dinov2": (T.Dinov2Model, T.Dinov2Config), "vit": (T.ViTModel, T.ViTConfig),
                   "siglip": (T.SiglipVisionModel, T.SiglipVisionConfig),
                   "clip": (T.CLIPVisionModel, T.CLIPVisionConfig)}[kind]  # fmt: skip
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                 image_size=28, patch_size=14)  # fmt: skip
    cls(config(**small)).save_pretrained(tmp_path / kind)
    return ImageEncoder.from_config(ImageEncoderConfig(backend="hf", name=str(tmp_path / kind)))


def _hf_text(kind: str, tmp_path: Path, **config) -> TextEncoder:
    """A tiny random BERT-family model saved with a tokenizer, as a user's local folder."""
    from transformers import MPNetConfig, MPNetModel

    create_model("tiny").text_encoder.tokenizer.save_pretrained(tmp_path / kind)
    MPNetModel(MPNetConfig(vocab_size=512, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64, **config)).save_pretrained(tmp_path / kind)  # fmt: skip
    return TextEncoder.from_config(TextEncoderConfig(name=str(tmp_path / kind)))


def test_encoders_whose_blocks_need_more_than_the_hidden_state_are_refused_for_top_k(tmp_path: Path) -> None:
    """ModernBERT's layers want rotary tables (they crashed with a TypeError); EVA's timm blocks take `rope`, whose
    absence hides within the tolerance at random init and then trained another function than predict runs."""
    from transformers import ModernBertConfig, ModernBertModel

    create_model("tiny").text_encoder.tokenizer.save_pretrained(tmp_path / "mb")
    ModernBertModel(ModernBertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, pad_token_id=0, bos_token_id=1, cls_token_id=1,
                                     sep_token_id=2)).save_pretrained(tmp_path / "mb")  # fmt: skip
    text = TextEncoder.from_config(TextEncoderConfig(name=str(tmp_path / "mb")))
    with pytest.raises(ConfigError, match=r"ModernBertModel: its top 1 block\(s\): running them apart fails"):
        text.check_split(2)
    small = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}
    eva = ImageEncoder.from_config(ImageEncoderConfig(name="eva02_tiny_patch14_224", pretrained=False, model_kwargs=small))
    with pytest.raises(ConfigError, match=r"Eva: its top 1 block\(s\): its blocks are given \['rope'\]"):
        eva.check_split(2)
    ImageEncoder.from_config(ImageEncoderConfig(name="vit_tiny_patch16_224", pretrained=False, model_kwargs=small)).check_split(2)


def test_a_backbone_returning_feature_maps_is_refused_when_built(tmp_path: Path) -> None:
    """ConvNeXt / Swin give [B, C, H, W] or [B, H, W, C]: the first training step crashed after the cache was built."""
    from transformers import ConvNextConfig, ConvNextModel

    with pytest.raises(ConfigError, match=r"convnext_atto: its features have shape \(1, 16, 7, 7\), not tokens"):
        ImageEncoder.from_config(ImageEncoderConfig(name="convnext_atto", pretrained=False,
                                                    model_kwargs={"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}))  # fmt: skip
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1])).save_pretrained(tmp_path / "cnx")
    with pytest.raises(ConfigError, match="ConvNextModel declares no hidden_size"):
        ImageEncoder.from_config(ImageEncoderConfig(backend="hf", name=str(tmp_path / "cnx")))


def test_mpnet_positions_start_after_its_padding_index(tmp_path: Path) -> None:
    """MPNet numbers positions from pad + 1 as RoBERTa does: 32 position embeddings hold 30 tokens (31 crashed
    midway with an IndexError)."""
    from fusionkit.models.checks import check_max_length

    _hf_text("mpnet", tmp_path, max_position_embeddings=32, pad_token_id=1)
    model = create_model({"text": {"name": str(tmp_path / "mpnet"), "max_length": 30},
                          "tasks": [{"name": "s", "class_names": ["a", "b"]}]})
    check_max_length(model, 30)
    with pytest.raises(ConfigError, match="max_length=31 exceeds the text encoder's 30 position embeddings"):
        check_max_length(model, 31)


@pytest.mark.parametrize("kind", ["text", "mpnet", "timm", "dinov2", "vit"])
def test_split_at_any_block_reproduces_the_forward(kind: str, tmp_path: Path) -> None:
    model = create_model("tiny")
    if kind in ("text", "mpnet"):  # MPNet: its layers also take a relative-position bias
        encoder = (model.text_encoder if kind == "text" else _hf_text(kind, tmp_path)).eval()
        ids = torch.randint(5, 100, (3, 9))
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0  # a padded caption: the top blocks must get the same attention mask
        inputs, kw = (ids, mask), {"attention_mask": mask}
    else:
        encoder = (model.image_encoder if kind == "timm" else _hf_vision(kind, tmp_path)).eval()
        inputs, kw = (torch.randn(2, 3, *encoder.preprocess.size),), {}
    full = encoder(*inputs)
    keep = mask.bool() if kind in ("text", "mpnet") else torch.ones(full.shape[:2], dtype=torch.bool)
    assert encoder.depth >= 2
    calls: list[int] = []
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(encoder.blocks)]
    for start in range(encoder.depth + 1):
        calls.clear()
        hidden = encoder.hidden_before(start, *inputs)
        assert calls == list(range(start)) or start == encoder.depth  # the blocks above never ran
        out = encoder.forward_from(hidden, start, **kw)
        torch.testing.assert_close(out[keep], full[keep], rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()


def test_top_k_refuses_blocks_that_do_not_reproduce_the_encoder(tmp_path: Path) -> None:
    """An adapter whose layers need more than it passes them would train one function and predict another."""

    class NoBias(TextEncoder):  # an adapter that forgets MPNet's relative-position bias
        def run_blocks(self, hidden, start, attention_mask):
            return [layer(hidden, None)[0] for layer in list(self.blocks)[start:]][-1:]

    text = _hf_text("mpnet", tmp_path)
    text.check_split(2)  # the shipped adapter: passes
    broken = NoBias(text.model, text.tokenizer)
    broken.check_split(broken.depth)  # frozen: nothing runs apart
    with pytest.raises(ConfigError, match=r"MPNetModel.*top 1 block.*model.freeze: encoders"):
        broken.check_split(2)


def _cfg(tmp_path: Path, name: str, **overrides):
    base = {
        "data.dataset": "synthetic:96",
        "data.cache_dir": str(tmp_path / "cache"),
        "data.augment": False,
        "model.freeze": "top_k",
        "model.trainable_layers": 1,
        "model.fusion.dropout": 0.0,
        "optim.epochs": 2,
        "optim.batch_size": 16,
        "optim.encoder_lr_scale": 1.0,
        "run.output_dir": str(tmp_path / "runs"),
        "run.name": name,
        "run.checkpoint_every": 0,
        "run.progress": False,
        "run.plots": False,
    }
    return build_config(None, {**base, **overrides})


def test_top_blocks_train_on_cached_hidden_states_like_end_to_end(tmp_path: Path) -> None:
    cached = Trainer(_cfg(tmp_path, "cached"))
    direct = Trainer(_cfg(tmp_path, "direct", **{"data.feature_cache": False}))
    assert cached.use_features and not direct.use_features
    before = {k: v.clone() for k, v in cached.model.state_dict().items()}
    s_cached, s_direct = cached.fit(), direct.fit()
    # float16 hidden states in the cache: close to, not bitwise, the end-to-end run
    for key in ("val/loss", "val/sentiment/accuracy"):
        assert s_cached["val"][key] == pytest.approx(s_direct["val"][key], rel=2e-2, abs=2e-2), key
    after = cached.model.state_dict()
    text = cached.model.text_encoder
    top, bottom = len(text.blocks) - 1, 0
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(f"text_encoder.model.encoder.layer.{top}.") for k in moved)
    assert not any(k.startswith(f"text_encoder.model.encoder.layer.{bottom}.") for k in moved)
    assert not any(k.startswith("text_encoder.model.embeddings.") for k in moved)
    stores = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("features-"))
    assert len(stores) == 2  # (text, image) hidden states of all splits' rows, built once
    # the cache key ignores the trained top blocks, so resuming this run finds the same stores
    resumed = Trainer(_cfg(tmp_path, "cached", **{"optim.epochs": 3}), resume=True, accept_changes=True)
    resumed.fit()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("features-")) == stores


def test_cache_key_follows_the_frozen_bottom_only() -> None:
    model = create_model("tiny", freeze="top_k", trainable_layers=1)
    key = encoder_key(model)
    with torch.no_grad():
        next(model.text_encoder.blocks[-1].parameters()).add_(1.0)  # trainable top block
        assert encoder_key(model) == key
        next(model.image_encoder.blocks[0].parameters()).add_(1.0)  # frozen bottom block
        assert encoder_key(model) != key
    frozen = create_model("tiny", freeze="encoders")
    deeper = create_model("tiny", freeze="top_k", trainable_layers=2)
    assert len({encoder_key(frozen), encoder_key(deeper), encoder_key(create_model("tiny", freeze="top_k",
                                                                                   trainable_layers=1))}) == 3


def test_layer_decay_scales_each_block_and_spares_position_embeddings() -> None:
    model = create_model("tiny")  # freeze none: every block and the embeddings train
    cfg = build_config(None, {"optim.lr": 1.0, "optim.encoder_lr_scale": 0.5, "optim.layer_decay": 0.5}).optim
    lr_of = {}
    for g in param_groups(model, cfg):
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    text = model.text_encoder
    depth = text.depth
    for i, block in enumerate(text.blocks):
        for p in block.parameters():
            assert lr_of[id(p)][0] == pytest.approx(0.5 * 0.5 ** (depth - 1 - i))
    for p in text.model.embeddings.parameters():
        assert lr_of[id(p)][0] == pytest.approx(0.5 * 0.5**depth)
    for p in model.fusion.parameters():
        assert lr_of[id(p)][0] == 1.0
    assert lr_of[id(model.image_encoder.model.pos_embed)][1] == 0.0  # a 3-d tensor, but never decayed
    without = build_config(None, {"optim.lr": 1.0, "optim.encoder_lr_scale": 0.5}).optim
    assert {g["lr"] for g in param_groups(model, without)} == {1.0, 0.5}


def test_rows_without_a_caption_stay_finite_through_the_trainable_top() -> None:
    model = create_model("tiny", freeze="top_k", trainable_layers=1).train()
    split_t, split_i = model.feature_splits
    ids = torch.randint(5, 100, (4, 7))
    mask = torch.ones_like(ids)
    mask[2:] = 0  # rows 2 and 3 have no caption: all-masked, zero hidden states, as the cache stores them
    hidden = model.text_encoder.hidden_before(split_t, ids, mask).detach()
    hidden[2:] = 0
    image = model.image_encoder.hidden_before(split_i, torch.randn(4, 3, *model.image_preprocess.size)).detach()
    present = torch.tensor([True, True, False, False])
    out = model(text_features=hidden, attention_mask=mask, image_features=image, text_present=present)
    loss = model.loss(out, {"sentiment": torch.tensor([0, 1, 2, 0])})["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.text_encoder.blocks[-1].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_pooling_the_last_layers_matches_the_backbone_hidden_states() -> None:
    from fusionkit.config import ConfigError

    model = create_model("tiny", text={"pool_layers": 2}, image={"pool_layers": 2}).eval()
    text, image = model.text_encoder, model.image_encoder
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.ones_like(ids)
    states = text.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(text(ids, mask), (states[-1] + states[-2]) / 2)
    assert not torch.allclose(text(ids, mask), states[-1])
    torch.testing.assert_close(text.forward_from(text.hidden_before(0, ids, mask), 0, mask), text(ids, mask))
    pixels = torch.randn(2, 3, *model.image_preprocess.size)
    torch.testing.assert_close(image.forward_from(image.hidden_before(0, pixels), 0), image(pixels))
    # pooling a layer below the trainable top cannot run on the cached hidden states entering that top
    with pytest.raises(ConfigError, match="pool_layers=2"):
        text.forward_from(text.hidden_before(text.depth - 1, ids, mask), text.depth - 1, mask)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_siglip_pools_through_its_post_layernorm_and_pooling_only_layers_are_frozen(kind: str, tmp_path: Path) -> None:
    encoder = _hf_vision(kind, tmp_path).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        states = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        norm = encoder.model.post_layernorm if kind == "siglip" else torch.nn.Identity()  # CLIP's: the pooled token only
        encoder.pool_layers = 2
        torch.testing.assert_close(encoder(pixels), (norm(states[-1]) + norm(states[-2])) / 2)
    encoder.pool_layers = 1
    encoder.check_split(encoder.depth - 1)  # model.freeze top_k: the top block run apart gives the output
    encoder.train()(pixels).sum().backward()  # model.freeze none: no weight trains without a gradient
    assert [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None] == []


def test_top_k_with_no_block_to_train_is_refused_but_a_saved_model_still_loads(tmp_path: Path, capsys) -> None:
    """`freeze: top_k` without any trainable_layers trained fully frozen, silently (the reverse mistake warns)."""
    from fusionkit.cli import main
    from fusionkit.models import FusionModel, get_config

    argv = ["train", "--data.dataset", "synthetic:48", "--model.freeze", "top_k", "--optim.max_steps", "1",
            "--run.output_dir", str(tmp_path / "runs"), "--data.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trains no encoder block" in err and "model.text.trainable_layers" in err and "freeze: encoders" in err
    with pytest.raises(ConfigError, match="trains no encoder block"):
        create_model("tiny", freeze="top_k", trainable_layers=2, text={"trainable_layers": 0},
                     image={"trainable_layers": 0})  # fmt: skip
    assert create_model("tiny", freeze="top_k", image={"trainable_layers": 1}).feature_splits == (2, 1)
    FusionModel(get_config("tiny", freeze="top_k")).save_pretrained(tmp_path / "old")  # one made before the check
    assert FusionModel.from_pretrained(tmp_path / "old").config.freeze == "top_k"


def test_a_folder_without_an_image_processor_is_warned_about_once(tmp_path: Path, caplog) -> None:
    """Said once per folder, not again for every run of a comparison or every trial of a search."""
    with caplog.at_level("WARNING", logger="fusionkit"):
        _hf_vision("vit", tmp_path)
        ImageEncoder.from_config(ImageEncoderConfig(backend="hf", name=str(tmp_path / "vit")))
    assert caplog.text.count("has no image processor config") == 1


def test_top_k_pooling_below_the_trainable_blocks_says_so_not_to_change_the_freeze(tmp_path: Path, capsys) -> None:
    """The pool_layers error was wrapped in 'cannot train them on cached hidden states; use model.freeze: encoders',
    which is the wrong fix: the user is to train more blocks or pool fewer layers."""
    from fusionkit.cli import main

    argv = ["train", "--data.dataset", "synthetic:48", "--model.freeze", "top_k", "--optim.max_steps", "1",
            "--model.text.trainable_layers", "1", "--model.image.trainable_layers", "1",
            "--model.text.pool_layers", "2", "--model.image.pool_layers", "2",
            "--run.output_dir", str(tmp_path / "runs"), "--data.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.text.pool_layers=2 reaches below the 1 trainable top blocks" in err
    assert "set model.text.trainable_layers to at least 2" in err
    assert "running them apart fails" not in err and "model.freeze: encoders" not in err


def test_albert_shared_layers_refuse_per_layer_pooling_and_top_k_saying_why(tmp_path: Path) -> None:
    from transformers import AlbertConfig, AlbertModel

    create_model("tiny").text_encoder.tokenizer.save_pretrained(tmp_path / "albert")
    AlbertModel(AlbertConfig(vocab_size=512, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                             num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "albert")  # fmt: skip
    text = {"name": str(tmp_path / "albert")}
    shared = "AlbertModel shares its weights across its 3 layers"
    with pytest.raises(ConfigError, match=f"model.text.pool_layers=2: {shared}"):
        create_model("tiny", text={**text, "pool_layers": 2})
    with pytest.raises(ConfigError, match=f"model.freeze: top_k: {shared}"):
        create_model("tiny", text={**text, "trainable_layers": 2}, freeze="top_k")
    create_model("tiny", text=text, freeze="none")  # whole, it trains as before
