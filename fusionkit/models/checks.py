"""Checks of a built model against its config: each would otherwise fail mid-run or silently do less.

`FusionModel` runs them when it is built, so the Python API refuses what `fusionkit train` refuses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import ConfigError

log = logging.getLogger("fusionkit")


def check_model(model: Any) -> None:
    check_pad_token(model.tokenizer, model.config.text.name)
    check_max_length(model)
    warn_past_model_max_length(model)
    check_encoder_depths(model)
    check_image_grid(model)


def check_pad_token(tokenizer: Any, name: str) -> None:
    """Fail at start if the text tokenizer has no pad token: captions of different lengths could not be batched, and
    training would die at its first batch (after the cache build), predict/embed in transformers' padding error.
    No token is picked in the user's stead: which one pads is the encoder's business (GPT-2 style ones use eos)."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return
    eos = getattr(tokenizer, "eos_token", None)
    pad = repr(eos) if eos else "a token of its vocabulary"
    if Path(name).expanduser().is_dir():
        fix = f'add "pad_token": {pad} to {name}/tokenizer_config.json'
    else:
        fix = f"save a copy whose tokenizer has one (pad_token {pad}) and set model.text.name to its folder"
    raise ConfigError(
        f"the text encoder's tokenizer ({name}) has no pad token, so captions of different lengths cannot be "
        f"batched; {fix} (in Python: tokenizer.pad_token = tokenizer.eos_token; tokenizer.save_pretrained(folder))"
    )


def check_encoder_depths(model: Any) -> None:
    """Fail at start if a block count in the config exceeds an encoder's blocks, instead of silently
    training (or pooling) fewer than asked."""
    cfg = model.config
    for side, encoder, own in (("text", model.text_encoder, cfg.text), ("image", model.image_encoder, cfg.image)):
        depth, name = encoder.depth, f"the {side} encoder ({own.name})"
        if own.pool_layers > depth:
            raise ConfigError(f"model.{side}.pool_layers={own.pool_layers} exceeds {name}'s {depth} blocks")
        key, k = (f"model.{side}.trainable_layers", own.trainable_layers) if own.trainable_layers is not None else (
            "model.trainable_layers", cfg.trainable_layers)  # fmt: skip
        if cfg.freeze == "top_k" and k > depth:
            raise ConfigError(
                f"{key}={k} exceeds {name}'s {depth} blocks: set model.{side}.trainable_layers to at most "
                f"{depth} (each encoder has its own key), or freeze: none to train it whole"
            )


def check_image_grid(model: Any) -> None:
    """Fail at start if `fusion.image_grid` cannot pool the image encoder's patch grid: its token layout (prefix
    tokens, patch rows x columns) is unknown or not what it outputs, or the grid asks for more tokens per side
    than the patch grid has (pooling cannot add tokens, so it would silently keep the grid as it is)."""
    grid, encoder = model.config.fusion.image_grid, model.image_encoder
    if not grid:
        return
    layout, name = encoder.token_layout(), model.config.image.name
    if layout is None:
        raise ConfigError(
            f"model.fusion.image_grid={grid}: the image encoder ({name}, {type(encoder.model).__name__}) does not "
            "declare its token layout (how many CLS/register tokens precede its patches, and the patch grid's rows "
            "and columns), so its patches cannot be pooled; set model.fusion.image_grid: 0 to keep every token"
        )
    prefix, h, w = layout
    if not encoder.is_meta and (n := encoder.example_output().shape[1]) != prefix + h * w:
        raise ConfigError(
            f"model.fusion.image_grid={grid}: the image encoder ({name}) outputs {n} tokens, not the {prefix} prefix "
            f"+ {h}x{w} patch tokens its adapter declares, so its patches cannot be pooled; set "
            "model.fusion.image_grid: 0 to keep every token"
        )
    if grid > min(h, w):
        size = "x".join(map(str, encoder.preprocess.size))
        raise ConfigError(
            f"model.fusion.image_grid={grid} exceeds the image encoder's {h}x{w} patch grid ({size} px input): "
            f"pooling cannot add tokens; set it to at most {min(h, w)}, or 0 to keep every patch"
        )


def check_max_length(model: Any, max_length: int | None = None) -> None:
    """Fail at start if `max_length` exceeds the text encoder's position embeddings (it would crash mid-run).

    RoBERTa-family models and MPNet offset positions by padding_idx + 1, so they hold that many fewer tokens."""
    max_length = max_length or model.config.text.max_length
    hf_config = getattr(getattr(model.text_encoder, "model", None), "config", None)
    positions = getattr(hf_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return  # an encoder without learned absolute positions (rotary, relative): no limit to check
    embeddings = getattr(model.text_encoder.model, "embeddings", None)
    offset = getattr(embeddings, "padding_idx", None)  # RoBERTa, XLM-R, CamemBERT, MPNet: positions from pad + 1
    if isinstance(offset, int) or "roberta" in str(getattr(hf_config, "model_type", "")):
        positions -= (offset if isinstance(offset, int) else hf_config.pad_token_id or 0) + 1
    if max_length > positions:
        raise ConfigError(
            f"model.text.max_length={max_length} exceeds the text encoder's {positions} position embeddings "
            f"({model.config.text.name}); set model.text.max_length <= {positions}"
        )


_WARNED_LENGTHS: set[tuple[str, int]] = set()  # (text encoder, max_length) said in this process


def warn_past_model_max_length(model: Any) -> None:
    """Say once if `max_length` exceeds the text tokenizer's `model_max_length` where its author set one (1e30,
    transformers' default, is none): the positions fit (`check_max_length`), but the encoder was made for shorter
    inputs. The tiny preset's tokenizer is built with max_length as its model_max_length: nothing to say."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    max_length, name = model.config.text.max_length, model.config.text.name
    limit = getattr(model.tokenizer, "model_max_length", None)
    if name == "tiny" or not isinstance(limit, int) or max_length <= limit or limit >= VERY_LARGE_INTEGER:
        return
    if (name, max_length) not in _WARNED_LENGTHS:
        _WARNED_LENGTHS.add((name, max_length))
        log.warning("model.text.max_length=%d exceeds the model_max_length=%d of the text encoder's tokenizer (%s): "
                    "the encoder was made for at most %d tokens; set model.text.max_length <= %d unless it is known "
                    "to read longer captions", max_length, limit, name, limit, limit)  # fmt: skip
