"""`FusionModel`: two encoders, projections to a common width, a fusion strategy and task heads.

Data flow (shapes for batch B):

    input_ids, attention_mask [B, T] --TextEncoder--> [B, T, Wt] --text_proj--> [B, T, dim] --.
                                                                                             |--fusion--> views [B, V, dim]
    pixel_values [B, 3, H, W] ------ImageEncoder--> [B, P, Wi] --image_proj-> [B, P, dim] --'        |
                                                                                       heads: {task: logits}

Encoder outputs can be passed in directly (`text_features=`, `image_features=`), which is how the
trainer's frozen-encoder feature cache trains many fusion strategies on one encoder pass.

A row may lack its caption or its image (`text_present=` / `image_present=`, bool [B]): the projected
tokens of the absent side are replaced by a learned placeholder before fusion (the dummy encoder
input of that row has no influence), and a batch lacking one side entirely skips that encoder.
`model.fusion.modality_dropout` hides one side of some complete pairs during training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..config import ConfigError, ImagePreprocess, ModelConfig, from_dict, to_dict
from ..store import replace_file
from ..tasks import FusionContext, Task
from .checks import check_model
from .encoders import TOKENIZER_FILES, Encoder, ImageEncoder, TextEncoder, drop_unused_heads
from .fusion import create_fusion, drop_modalities, masked_mean, sides_read
from .heads import MultiTaskLoss

log = logging.getLogger("fusionkit")

CONFIG_NAME = "config.json"
DATA_COLUMNS = ("text_column", "image_column", "id_column")  # the `data` keys a model keeps from its training run
WEIGHTS_NAME = "model.safetensors"
PROCESSOR_NAME = "processor_config.json"
DTYPE_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # the CLI's precision names
ENCODER_FOLDERS = ("text_encoder", "image_encoder")
# the files a save writes beside (and in) its encoder folders: an earlier save's are removed before a new one
SAVED_FILES = (CONFIG_NAME, WEIGHTS_NAME, PROCESSOR_NAME, *TOKENIZER_FILES, "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja")  # fmt: skip
# Parameters a fusionkit 0.1 checkpoint lacks (the missing-modality placeholders): loaded with a warning.
ADDED_SINCE_0_1 = frozenset({"text_placeholder", "image_placeholder"})
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "text_features",
    "image_features",
    "text_present",
    "image_present",
)


TEXT_INPUTS = ("input_ids", "attention_mask")
# what encode_text / encode_image read from a processor's output or a batch: the presence flag makes an absent side NaN
TEXT_ENCODE_INPUTS = (*TEXT_INPUTS, "text_features", "text_present")
IMAGE_ENCODE_INPUTS = ("pixel_values", "image_features", "image_present")
TENSOR_INPUTS = ("input_ids", "attention_mask", "pixel_values", "text_features", "image_features")
RAW_INPUT_HINT = ("tokenize captions and load images first: fusionkit.FusionProcessor.from_model(model)(texts=[...], "
                  "images=[...]) gives these tensors, or fusionkit.embed(model, texts, images) gives vectors from "
                  "captions and images directly")  # fmt: skip


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a collated batch that `FusionModel.forward` takes (labels, ids etc. left out)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def gather_inputs(where: str, given: Mapping[str, Any], accepted: Sequence[str]) -> dict[str, Any]:
    """The model inputs of a call, checked, as open_clip / transformers users pass them: a mapping among
    `given` (a tokenizer's `BatchEncoding`, a processor's output, a collated batch) supplies its `accepted`
    keys; raw captions or images, unknown keywords and two-segment `token_type_ids` get an error saying
    what to do (rather than `'list' object has no attribute 'dim'` from deep inside)."""
    inputs = {k: v for k, v in given.items() if v is not None}
    for key in [k for k, v in inputs.items() if isinstance(v, Mapping)]:
        batch = inputs.pop(key)
        twice = sorted(k for k in batch if k in inputs)
        if twice:
            raise TypeError(f"{where}() got {twice} both in the mapping and as arguments: pass them once")
        inputs.update({k: v for k, v in batch.items() if k in (*accepted, "token_type_ids") and v is not None})
        if not any(k in batch for k in accepted):
            raise TypeError(f"{where}() got a mapping without any of {list(accepted)} (it has {sorted(batch)}): "
                            + RAW_INPUT_HINT)  # fmt: skip
    unknown = sorted(set(inputs) - {*accepted, "token_type_ids"})
    if unknown:
        raise TypeError(f"{where}() got unexpected inputs {unknown}; it takes {list(accepted)} (a batch with other "
                        f"keys, such as labels, can be passed whole as one mapping: {where}(batch))")  # fmt: skip
    for name in TENSOR_INPUTS:
        if name in inputs and not isinstance(inputs[name], torch.Tensor):
            value = inputs[name]
            item = value[0] if isinstance(value, list | tuple) and value else value
            if isinstance(item, str | bytes | os.PathLike) or type(item).__module__.startswith("PIL."):
                raise TypeError(f"{where}() takes tensors, not captions or images ({name} is a "
                                f"{type(value).__name__} of {type(item).__name__}): {RAW_INPUT_HINT}")  # fmt: skip
            raise TypeError(f"{where}(): {name} must be a torch.Tensor, got a {type(value).__name__} (a tokenizer "
                            "gives tensors with return_tensors='pt')")  # fmt: skip
    segments = inputs.pop("token_type_ids", None)  # BERT's one-segment ids are all 0, the encoder's default
    if segments is not None and torch.as_tensor(segments).any():
        raise ValueError(f"{where}(): token_type_ids mark a second segment (a text pair); fusionkit encodes one "
                         "caption per row: tokenize each caption alone")  # fmt: skip
    return inputs


def hf_label_maps(config: ModelConfig) -> dict[str, dict]:
    """`id2label` / `label2id` of a single-task model with class names, as transformers writes them: what HF
    pipelines, the hub's widget and `config.id2label` readers show instead of LABEL_0, LABEL_1, ...
    A multi-task model has no one label set, so it writes none (its names stay under `model.tasks`)."""
    tasks = config.tasks
    if len(tasks) != 1 or not tasks[0].class_names:
        return {}
    names = tasks[0].class_names
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


class FusionModel(nn.Module):
    """Text encoder + image encoder -> fusion strategy -> one head per task: the whole model, one interface.

    `encode_text` / `encode_image` / `encode` give embeddings (NaN for a row without that side), `forward` the
    task outputs, `predict` label names from raw pairs; `save_pretrained` / `from_pretrained` round-trip a folder
    (safetensors + config.json). Build one with `fusionkit.create_model(...)`; losses live in `criterion`.
    """

    def __init__(
        self,
        config: ModelConfig,
        text_encoder: TextEncoder | None = None,
        image_encoder: ImageEncoder | None = None,
    ) -> None:
        super().__init__()
        self.config = config.validate()
        self.text_encoder = text_encoder or TextEncoder.from_config(config.text)
        self.image_encoder = image_encoder or ImageEncoder.from_config(config.image)
        dim = config.fusion.dim
        self.text_proj = nn.Linear(self.text_encoder.width, dim)
        self.image_proj = nn.Linear(self.image_encoder.width, dim)
        # Learned stand-ins, in the projected space, for a caption or an image a row does not have.
        # sides ("caption", "image") the training rows were allowed to lack (data.missing_*: keep): saved with
        # the model, so a reloaded one does not warn that it never learned to predict without them
        self.trained_without: tuple[str, ...] = ()
        self._warned_sides: set[str] = set()  # sides whose untrained projection encode_text/encode_image named
        # the columns its training run read ({"text_column": "caption", ...}): saved with the model, so predict,
        # eval and embed of a model folder read a new file by them, as they do with the run dir's config
        self.data_columns: dict[str, str | None] = {}
        self.text_placeholder = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=0.02))
        self.image_placeholder = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=0.02))
        self.fusion = create_fusion(config.fusion)
        self.criterion = MultiTaskLoss(config.tasks, config.loss_weighting)
        heads = {name: task.build_head(dim, self.fusion.num_views, config.fusion.dropout) for name, task in self.tasks.items()}
        for name, head in heads.items():  # a plugin's mistake, said at build time, not as a TypeError in forward
            if not isinstance(head, nn.Module):
                raise TypeError(f"{self.tasks[name].describe()}: build_head must return an nn.Module, got {head!r}")
        self.heads = nn.ModuleDict(heads)
        self.set_trainable(config.freeze, config.trainable_layers)
        check_model(self)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self.text_encoder.tokenizer

    @property
    def image_preprocess(self) -> ImagePreprocess:
        return self.image_encoder.preprocess

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def tasks(self) -> dict[str, Task]:
        """Task objects by name (`fusionkit.tasks`): schema, loss, metrics and predictions of each."""
        return self.criterion.tasks

    @property
    def class_names(self) -> dict[str, list[str]]:
        """Class names per classification-like task, in the order of the logits."""
        return {name: list(t.class_names) for name, t in self.tasks.items() if t.class_names}

    @property
    def needs_text(self) -> bool:
        return self.fusion.uses_text or any(not t.needs_labels for t in self.tasks.values())

    @property
    def needs_image(self) -> bool:
        return self.fusion.uses_image or any(not t.needs_labels for t in self.tasks.values())

    # ------------------------------------------------------------------ freezing
    def set_trainable(self, freeze: str = "none", trainable_layers: int = 0) -> None:
        """`none`: train all; `encoders`: train fusion + heads only; `top_k`: also the top k encoder blocks
        (`model.text.trainable_layers` / `model.image.trainable_layers` set k per encoder)."""
        if freeze not in ("none", "encoders", "top_k"):
            raise ConfigError(f"freeze must be 'none', 'encoders' or 'top_k', got {freeze!r}")
        self.config.freeze, self.config.trainable_layers = freeze, trainable_layers
        self.requires_grad_(True)
        for encoder in (self.text_encoder, self.image_encoder):
            if freeze == "encoders":
                encoder.requires_grad_(False)
            elif freeze == "top_k":
                encoder.check_split(self._split(encoder))
                encoder.set_top_trainable(encoder.depth - self._split(encoder))
            drop_unused_heads(encoder.model)  # unused mask tokens stay frozen whatever the policy
        # An encoder the strategy never reads (unimodal baselines) is frozen: it gets no gradient anyway.
        if not self.needs_text:
            self.text_encoder.requires_grad_(False)
            self.text_proj.requires_grad_(False)
            self.text_placeholder.requires_grad_(False)
        if not self.needs_image:
            self.image_encoder.requires_grad_(False)
            self.image_proj.requires_grad_(False)
            self.image_placeholder.requires_grad_(False)
        if self.config.loss_weighting == "static":  # a task at weight 0 is scored, not trained: its head stays
            for t in self.config.tasks:  # as initialised and out of the gradient norm that clipping reads
                if t.weight == 0 and t.name in self.heads:
                    self.heads[t.name].requires_grad_(False)
        self.train(self.training)

    def _split(self, encoder: Encoder) -> int:
        own = (self.config.text if encoder is self.text_encoder else self.config.image).trainable_layers
        k = self.config.trainable_layers if own is None else own
        return encoder.split(self.config.freeze, k)

    @property
    def feature_splits(self) -> tuple[int, int] | None:
        """(text, image) block index where the trainable top of each encoder starts, when the part below
        is frozen (`freeze` "encoders" or "top_k"); None when encoders train end to end.

        Cached or passed-in `text_features` / `image_features` are the hidden states entering those blocks
        (the encoders' outputs when the index equals their depth, as with frozen encoders).
        """
        if self.config.freeze == "none":
            return None
        return self._split(self.text_encoder), self._split(self.image_encoder)

    @property
    def encoders_frozen(self) -> bool:
        return not any(
            p.requires_grad for enc in (self.text_encoder, self.image_encoder) for p in enc.parameters()
        )

    def train(self, mode: bool = True) -> FusionModel:
        """Frozen parts of the encoders stay in eval mode (no dropout): their outputs then match the
        feature cache, which computed them once in eval mode."""
        super().train(mode)
        for encoder in (self.text_encoder, self.image_encoder):
            _eval_frozen(encoder)
        return self

    # ------------------------------------------------------------------ encoding
    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:  # padding is not content: without a mask a padded row would embed its pads
            pad = getattr(self.tokenizer, "pad_token_id", None)
            attention_mask = (input_ids != pad).long() if pad is not None else torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        self._check_token_ids(input_ids)
        return attention_mask

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """The encoder's own failures name neither limit ("expanded size ... (512)", a bare IndexError). The ids'
        values are checked on CPU only (elsewhere a sync per batch); nothing is checked while tracing or compiling."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # no guards on the shapes of an exported graph
            return
        config = self.text_encoder.model.config
        limit, vocab = getattr(config, "max_position_embeddings", None), config.vocab_size
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than the {limit} positions of this "
                             f"model's text encoder: truncate them (FusionProcessor and model.tokenizer(texts, "
                             f"truncation=True, max_length={self.config.text.max_length}) do)")  # fmt: skip
        if input_ids.device.type != "cpu" or not input_ids.numel():
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids holds token id {low if low < 0 else high}, outside this model's vocabulary "
                             f"of {vocab} (ids 0..{vocab - 1}): tokenize with this model's own tokenizer "
                             "(model.tokenizer or FusionProcessor.from_model(model))")  # fmt: skip

    def _check_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pixels as the image encoder takes them: [B, 3, H, W] at its size, in its dtype (a model cast
        with `.to(torch.bfloat16)` still takes the processor's float32 pixels)."""
        h, w = self.image_preprocess.size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (h, w):
            raise ValueError(
                f"pixel_values must be [batch, 3, {h}, {w}] (this model's image size; FusionProcessor resizes "
                f"images to it), got shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                "pixel_values must be normalized floats; uint8 images go through fusionkit.data.ImageTransform first"
            )
        return pixel_values.to(next(self.image_encoder.parameters()).dtype)

    def text_tokens(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text tokens [B, T, dim] and their boolean mask [B, T]."""
        if text_features is None:
            if input_ids is None:
                raise ValueError(
                    "text input missing: pass input_ids (+ attention_mask) or text_features, "
                    "or text_present=False for rows without a caption"
                )
            attention_mask = self._check_text(input_ids, attention_mask)
            text_features = self.text_encoder(input_ids, attention_mask)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(
                    text_features.shape[:2], dtype=torch.long, device=text_features.device
                )
            text_features = self.text_encoder.forward_from(text_features, self._feature_split(0), attention_mask)
        return self.text_proj(text_features), attention_mask.bool()

    def image_tokens(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected image tokens [B, P, dim]."""
        if image_features is None:
            if pixel_values is None:
                raise ValueError(
                    "image input missing: pass pixel_values or image_features, "
                    "or image_present=False for rows without an image"
                )
            image_features = self.image_encoder(self._check_image(pixel_values))
        else:
            image_features = self.image_encoder.forward_from(image_features, self._feature_split(1))
        grid = self.config.fusion.image_grid
        layout = self.image_encoder.token_layout() if grid else None
        return self.image_proj(pool_patch_grid(image_features, grid, layout))

    def encoder_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(text, image) features as `text_features=` / `image_features=` take them: the hidden states
        entering each encoder's trainable top (`feature_splits`; the outputs when none trains). One pass of
        each encoder then serves several encodings of a batch (`embed` with several modalities)."""
        text = image = None
        if input_ids is not None:
            mask = self._check_text(input_ids, attention_mask)
            text = self.text_encoder.hidden_before(self._feature_split(0), input_ids, mask)
        if pixel_values is not None:
            image = self.image_encoder.hidden_before(self._feature_split(1), self._check_image(pixel_values))
        return text, image

    def _feature_split(self, side: int) -> int:
        """Where passed-in features of a side enter its encoder (its depth = they are its output)."""
        splits = self.feature_splits
        if splits is None:
            return (self.text_encoder, self.image_encoder)[side].depth
        return splits[side]

    def encode_text(
        self,
        input_ids: torch.Tensor | Mapping[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = False,
        token_type_ids: torch.Tensor | None = None,
        *,
        text_features: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text-only embedding [B, dim]: masked mean of the projected text tokens.

        `input_ids` may be a tokenizer's output (`model.tokenizer(texts, return_tensors="pt")`) or a
        `FusionProcessor`'s: its input_ids, attention_mask and text_present are used. Captions go through one of
        those first (or `fusionkit.embed(model, texts)`). A row whose `text_present` is False has no caption, so no
        text vector: NaN, as `fusionkit.embed` gives it (its dummy input's vector would pass for a real one)."""
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "text_features": text_features, "text_present": text_present}  # fmt: skip
        inputs = gather_inputs("encode_text", given, TEXT_ENCODE_INPUTS)
        self._warn_untrained_side("caption", self.fusion.uses_text, "encode_text")
        tokens, mask = self.text_tokens(inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("text_features"))
        return _absent_as_nan(masked_mean(tokens, mask), inputs.get("text_present"), normalize, "text_present")

    def encode_image(
        self,
        pixel_values: torch.Tensor | Mapping[str, Any] | None = None,
        normalize: bool = False,
        *,
        image_features: torch.Tensor | None = None,
        image_present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-only embedding [B, dim]: mean of the projected patch tokens. `pixel_values` may be a
        `FusionProcessor`'s output (its pixel_values and image_present are used); images go through it first.
        A row whose `image_present` is False has no image: NaN, as in `encode_text`."""
        given = {"pixel_values": pixel_values, "image_features": image_features, "image_present": image_present}
        inputs = gather_inputs("encode_image", given, IMAGE_ENCODE_INPUTS)
        self._warn_untrained_side("image", self.fusion.uses_image, "encode_image")
        emb = self.image_tokens(inputs.get("pixel_values"), inputs.get("image_features")).mean(1)
        return _absent_as_nan(emb, inputs.get("image_present"), normalize, "image_present")

    def _warn_untrained_side(self, side: str, trained: bool, method: str) -> None:
        """A unimodal baseline never trains the other side's projection (no label-free task reads it): its
        vectors are those of random weights, which a comparison of strategies' embeddings must not take as real."""
        if trained or side in self._warned_sides or any(t.reads_sides_apart for t in self.tasks.values()):
            return  # an itm task does not count: it reads the pairs through the fusion, which ignores that side
        self._warned_sides.add(side)
        logging.getLogger("fusionkit").warning(
            "%s: this %s model reads no %s, so the projection behind these vectors never trained (random weights): "
            "embed what it reads, or pairs (encode)", method, self.config.fusion.strategy, side)  # fmt: skip

    def _fuse(
        self,
        text: torch.Tensor | None,
        mask: torch.Tensor | None,
        image: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_same_batch(text, image)
        return self.fusion(text, mask, image, image_mask)

    def encode(
        self, batch: Mapping[str, Any] | None = None, /, normalize: bool = False, **inputs: torch.Tensor
    ) -> torch.Tensor:
        """Joint embedding [B, dim] of image-text pairs: the mean of the fusion's (present) views.

        The inputs as keywords (`encode(**processor(texts=..., images=...))`) or as one mapping
        (`encode(processor(...))`, a collated batch: its keys other than model inputs are left out)."""
        if batch is not None and not isinstance(batch, Mapping):
            raise TypeError(f"encode() takes its inputs as keywords or as one mapping, not a {type(batch).__name__}: "
                            + RAW_INPUT_HINT)  # fmt: skip
        ctx = self._views(**gather_inputs("encode", {"batch": batch, **inputs}, MODEL_INPUTS))
        emb = masked_mean(ctx.views, ctx.view_mask)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _presence(
        self, text_present: Any, image_present: Any, batch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Presence flags [B] after modality dropout, and [any text, any image, all text, all image].

        Those four decide which encoders run at all and whether masks are needed: one host sync,
        none when the caller passes no flags and no dropout applies (all present).
        """
        complete = text_present is None and image_present is None
        text_present = _as_flags(text_present, batch, device, "text_present")
        image_present = _as_flags(image_present, batch, device, "image_present")
        rate = self.config.fusion.modality_dropout
        if self.training and rate > 0 and self.fusion.uses_text and self.fusion.uses_image:
            text_present, image_present = drop_modalities(text_present, image_present, rate)
            complete = False
        if complete:
            return text_present, image_present, [True] * 4
        flags = [text_present.any(), image_present.any(), text_present.all(), image_present.all()]
        return text_present, image_present, torch.stack(flags).tolist()

    def _views(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        image_present: torch.Tensor | None = None,
    ) -> FusionContext:
        """Encode both sides, swap in the placeholders for absent ones (+ modality dropout), then fuse."""
        batch, device = _batch_size(
            input_ids, text_features, pixel_values, image_features, text_present, image_present
        )
        text_present, image_present, (any_text, any_image, all_text, all_image) = self._presence(
            text_present, image_present, batch, device
        )
        text = mask = image = image_mask = None
        if self.needs_text and any_text:
            text, mask = self.text_tokens(input_ids, attention_mask, text_features)
        if self.needs_image and any_image:
            image = self.image_tokens(pixel_values, image_features)
        _check_same_batch(text, image)
        if self.needs_text:
            text, mask = _fill_absent(text, mask, text_present, self.text_placeholder, all_text)
        if self.needs_image:
            image, image_mask = _fill_absent(image, None, image_present, self.image_placeholder, all_image)
        everything = all_text and all_image
        return FusionContext(
            self._fuse(text, mask, image, image_mask),
            text,
            mask,
            image,
            self._fuse,
            paired=None if everything else text_present & image_present,
            view_mask=None if everything else self.fusion.view_mask(text_present, image_present),
        )

    # ------------------------------------------------------------------ forward / loss
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        image_present: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-task outputs: `{task: logits}`. ITM gives [B, 2] (true pair, a shuffled pair: a random draw, seeded
        only in evaluation loops); contrastive [B, B] similarities in training, its [B, 2, D] (text, image) pair
        embeddings in eval mode, so a split is scored against every one of its images, whatever the batch.

        `text_present` / `image_present` (bool [B], None = all) mark the rows that have a caption / an
        image; an absent side is replaced by a learned placeholder, and its dummy input is ignored.
        The inputs may also come as one mapping (`model(processor(...))`, as `encode` takes them).
        """
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                 "text_features": text_features, "image_features": image_features, "text_present": text_present,
                 "image_present": image_present, "token_type_ids": token_type_ids}  # fmt: skip
        ctx = self._views(**gather_inputs("forward", given, MODEL_INPUTS))
        return {name: task.forward(self.heads[name], ctx) for name, task in self.tasks.items()}

    def loss(
        self,
        outputs: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor] | None = None,
        label_mask: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`{"loss": weighted total, task: task loss}`; unlabeled examples are masked out per task."""
        return self.criterion(outputs, labels, label_mask)

    @property
    def sides_read(self) -> tuple[str, ...]:
        """The sides ("caption", "image") whose absence changes this model's output (a unimodal baseline reads one)."""
        return sides_read(self.fusion)

    def warn_one_sided(
        self, no_text: int, no_image: int, total: int, where: str, trained_without: Any = (), said: set | None = None
    ) -> None:
        """Say so when pairs lack a side this model reads but never learned to do without (modality dropout 0;
        `trained_without`: the sides, "caption" / "image", its training rows were allowed to lack).
        `said`: messages already given (an ensemble's members read the same rows): each is said once."""
        if len(self.sides_read) == 1:  # a unimodal baseline: without its one input there is nothing to go on
            absent = no_text if self.sides_read == ("caption",) else no_image
            messages = [f"{absent} of {total} pairs of {where} have no {self.sides_read[0]}, the only input of this "
                        f"{self.config.fusion.strategy} model: each of them gets the same prediction, the model's "
                        "answer to an empty input"] if absent else []  # fmt: skip
        elif self.config.fusion.modality_dropout > 0:
            messages = []
        else:
            messages = [f"{absent} of {total} pairs of {where} have no {side}: they are predicted from the other side "
                        "alone, which this model was not trained for (model.fusion.modality_dropout 0)"
                        for side, absent in (("caption", no_text), ("image", no_image))
                        if absent and side in self.sides_read and side not in (*trained_without, *self.trained_without)]  # fmt: skip
        for message in messages:
            if said is None or message not in said:
                logging.getLogger("fusionkit").warning("%s", message)
            if said is not None:
                said.add(message)

    @torch.inference_mode()
    def predict(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[Any] | None = None,
        batch_size: int = 64,
        precision: str = "auto",
        ensemble: FusionModel | Sequence[FusionModel] = (),
        where: str = "predict()",
    ) -> list[dict[str, Any]]:
        """Predictions for raw pairs: per example and task, the label name(s) and class probabilities
        (regression: the value). Captions are strings, images paths / PIL images / bytes; either list may
        be left out or hold None entries (a missing caption or image). A caption is missing as a training
        table's cell is: None, NaN, blank, or spelled like a missing value ("nan", "None", "NA", ...). `precision`: "auto" (bf16 where
        the hardware runs it natively, see `fusionkit.precision`), "fp32", "bf16" or "fp16" (CUDA only: elsewhere
        fp32, said, as training does). `ensemble`: another model, or a list of them, of the same tasks (e.g. other
        seeds) whose outputs are averaged with this one's (classes by name); each model once.
        `where`: how warnings name the input (the CLI's single pair is "--text/--image").

            model.predict(texts=["what a day"], images=["photo.jpg"])
            # [{"sentiment": "positive", "sentiment_prob": {"positive": 0.91, ...}}]
        """
        from PIL import Image

        from ..data.dataset import missing_caption, missing_value
        from ..embedding import check_batch_size
        from ..precision import inference_precision
        from ..processor import FusionProcessor, check_captions

        if texts is None and images is None:
            raise ValueError("predict() needs texts, images or both")
        if not any(t.needs_labels for t in self.tasks.values()):  # every row would be {}: nothing to predict
            raise ValueError(f"this model's tasks ({', '.join(self.tasks)}) learn no labels to predict (an alignment "
                             "model): its outputs are vectors, fusionkit.embed(model, texts=..., images=...)")  # fmt: skip
        if isinstance(texts, str) or isinstance(images, str | bytes | Path | Image.Image):
            raise TypeError("predict() takes lists: texts=[caption, ...], images=[image, ...] (one pair: a list of one)")
        if any(type(x).__module__.startswith("pandas") and hasattr(x, "columns") for x in (texts, images)):
            raise TypeError("predict() takes lists, not a DataFrame: texts=list(df['caption']), images=list(df['photo'])")
        # a dict or DatasetDict would give its keys ("train", "test") as captions, a Dataset its rows as dicts
        tables = [x for x in (texts, images) if isinstance(x, Mapping) or type(x).__module__.startswith("datasets.")]
        if tables:
            raise TypeError(f"predict() takes lists, not a {type(tables[0]).__name__}: texts=list(ds['caption']), "
                            "images=list(ds['image']) (of a DatasetDict, one split: ds = dd['test'])")  # fmt: skip
        check_batch_size(batch_size)
        members = [ensemble] if isinstance(ensemble, FusionModel) else ensemble  # one more model: a list of one
        odd = [m for m in members if not isinstance(m, FusionModel)] if isinstance(members, list | tuple) else [members]
        if odd:
            raise TypeError(f"ensemble takes another FusionModel or a list of them, got "
                            f"{', '.join(type(m).__name__ for m in odd)} (a saved model: FusionModel.from_pretrained(path))")  # fmt: skip
        models = [self, *members]
        if any(m is other for i, m in enumerate(models) for other in models[:i]):
            raise ValueError("ensemble: a model is listed twice (or is this model itself): it would count twice in "
                             "the average; pass each other model once")  # fmt: skip
        amp = inference_precision(precision, self.device, "precision")  # "auto": bf16 where the hardware runs it natively
        n = len(texts) if texts is not None else len(images)  # type: ignore[arg-type]
        texts = [None if missing_caption(t) else t for t in texts] if texts is not None else [None] * n
        images = ([None if missing_value(i) or (isinstance(i, str) and not i.strip()) else i for i in images]
                  if images is not None else [None] * n)  # fmt: skip
        if len(texts) != len(images):
            raise ValueError(f"got {len(texts)} texts but {len(images)} images: one of each per pair")
        check_captions(texts)  # before any warning about the pairs: they are not pairs yet
        given = {"caption": texts, "image": images}
        empty = [k for k in range(n) if all(given[side][k] is None for side in self.sides_read)]
        if empty:
            what = ("neither a caption nor an image" if len(self.sides_read) == 2 else
                    f"no {self.sides_read[0]}, the only input of this {self.config.fusion.strategy} model")  # fmt: skip
            raise ValueError(f"pairs {empty[:5]} have {what}: there is nothing to predict from")
        said: set[str] = set()  # every member is asked: one trained without modality dropout is said, once
        for m in models:
            m.warn_one_sided(sum(t is None for t in texts), sum(i is None for i in images), n, where, said=said)
        schema = {t.name: sorted(t.class_names or []) for t in self.config.tasks}
        for k, member in enumerate(models[1:]):
            theirs = {t.name: sorted(t.class_names or []) for t in member.config.tasks}
            if theirs != schema:
                differ = {name: (schema.get(name, "no such task"), theirs.get(name, "no such task"))
                          for name in {*schema, *theirs} if schema.get(name) != theirs.get(name)}  # fmt: skip
                said = "; ".join(f"{name}: {mine} here, {other} in it" for name, (mine, other) in sorted(differ.items()))
                raise ValueError(f"ensemble: every model needs the same tasks and classes as this one; ensemble[{k}] "
                                 f"differs ({said})")  # fmt: skip
        processors = [FusionProcessor.from_model(m) for m in models]
        modes = [m.training for m in models]
        rows: list[dict[str, Any]] = []
        try:
            for m in models:
                m.eval()
            for s in range(0, n, batch_size):
                outs = []
                for m, processor in zip(models, processors):
                    inputs = processor(texts=texts[s : s + batch_size], images=images[s : s + batch_size],
                                       device=m.device)  # fmt: skip
                    with amp.autocast(m.device.type):
                        out = {k: v.float().cpu() for k, v in m(**model_inputs(inputs)).items()}
                    outs.append(align_classes(m, self, out))
                batch_rows: list[dict[str, Any]] = [{} for _ in range(len(inputs["input_ids"]))]
                for name, task in self.tasks.items():
                    if task.needs_labels:
                        value = outs[0][name] if len(outs) == 1 else task.combine([o[name] for o in outs])
                        for row, pred in zip(batch_rows, task.predict(value)):
                            row.update(pred)
                rows += batch_rows
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)
        return rows

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, *, frozen_weights: str | Path | None = None) -> Path:
        """Write config.json, model.safetensors, the encoders' own configs + tokenizer and the processor's files
        (processor_config.json + tokenizer, read by `AutoProcessor` / `AutoTokenizer`); no pickle.

        A folder holding an earlier fusionkit save (model or processor) is written over, as transformers
        does: the files of that save this one does not write are removed, so the folder loads as this model
        alone; other files (README.md, .git) stay. A run dir (or anything inside one), an ONNX export and
        a folder holding a config.json, weights or tokenizer that no fusionkit save wrote are refused.

        `frozen_weights`: a file shared by a run's checkpoints. The frozen encoders' weights (never
        changed by training) are written there once and this folder's model.safetensors names it,
        so a checkpoint costs only the trainable weights (a MiniLM + DINOv2 run: 224 MB each before).
        """
        from ..processor import FusionProcessor

        directory = Path(directory).expanduser()  # never a folder named "~" in the working directory
        check_save_dir(directory)
        _remove_earlier_save(directory)
        self._write_pretrained(directory, frozen_weights=frozen_weights)
        FusionProcessor.from_model(self).save_pretrained(directory)
        return directory

    def _write_pretrained(self, directory: str | Path, *, frozen_weights: str | Path | None = None) -> Path:
        """`save_pretrained` without the folder check: how the trainer writes checkpoints into its own run dir.

        The weights' header records the tasks and classes they were trained for and a SHA-256 of their tensors,
        so a config.json or model.safetensors of another model, or a damaged file, is refused at load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save(directory / "text_encoder", self.config.text.max_length)
        self.image_encoder.save(directory / "image_encoder")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", "fusionkit": __version__, TASKS_KEY: json.dumps(_task_schema(self.config))}
        frozen = self._frozen_encoder_keys() if frozen_weights is not None else set()
        if frozen:
            shared = Path(frozen_weights)  # type: ignore[arg-type]
            shared_id = _frozen_id(shared) if shared.is_file() and _saved_keys(shared) == frozen else None
            if shared_id is None:  # none yet, other tensors, or written before ids: (re)written with a new id
                shared_id = uuid.uuid4().hex
                _save_weights({k: state[k] for k in sorted(frozen)}, shared, {"format": "pt", FROZEN_ID_KEY: shared_id})
            state = {k: v for k, v in state.items() if k not in frozen}
            # the path is relative (a moved run dir still loads); the id tells this run's file from another's
            metadata.update({FROZEN_WEIGHTS_KEY: os.path.relpath(shared, directory), FROZEN_ID_KEY: shared_id})
        _save_weights(state, directory / WEIGHTS_NAME, metadata)
        meta = {
            "model_type": "fusionkit",  # AutoConfig/AutoModel load this folder once fusionkit.hf is imported
            "fusionkit_version": __version__,
            "model": to_dict(self.config),
            "image_preprocess": to_dict(self.image_preprocess),
            "trained_without": list(self.trained_without),
            "data_columns": dict(self.data_columns),
            **hf_label_maps(self.config),
        }
        replace_file(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)), "another folder")
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
    ) -> FusionModel:
        """Rebuild from `save_pretrained` output, a run directory holding one, or a hub id ("org/name").

        Returned in eval mode (no dropout), as transformers does: `.train()` before fine-tuning it. The weights
        must be those saved with the config (the tasks and classes recorded in their header, the tensors' SHA-256):
        another model's config.json or model.safetensors copied in, or a damaged file, is refused (~0.1 s per 100 MB).
        `dtype`: float32 by default (bf16 matmuls are ~500x slower on CPUs without AMX), a torch dtype, or "auto" for
        the dtype the weights were saved in (as transformers' `dtype="auto"`)."""
        if isinstance(dtype, str) and dtype != "auto":  # "bfloat16", as transformers takes it; "bf16", as the CLI
            name = dtype.removeprefix("torch.")
            dtype = getattr(torch, DTYPE_ALIASES.get(name, name), dtype)
        if not (dtype is None or dtype == "auto" or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
            raise TypeError(f"dtype must be a floating torch dtype (torch.bfloat16, 'bfloat16' or 'bf16'), 'auto' or "
                            f"None, got {dtype!r}")
        directory, meta, config = cls._saved_config(directory)
        check_processor_agrees(directory)
        if not (directory / "text_encoder").is_dir():  # transformers would read the path as a hub id
            raise FileNotFoundError(f"{directory} has no text_encoder/ folder (the text encoder's config and "
                                    "tokenizer): copy the whole model folder")  # fmt: skip

        def build() -> FusionModel:
            return cls._build_on_saved_encoders(directory, config, meta)

        check_saved_for(directory / WEIGHTS_NAME, config, directory / CONFIG_NAME)
        check_saved_shapes(directory / WEIGHTS_NAME, build)  # before allocating: configs may be tampered
        model = build()
        model.load_weights(directory / WEIGHTS_NAME)
        model.trained_without = tuple(meta.get("trained_without", ()))
        model.data_columns = {k: v for k, v in meta.get("data_columns", {}).items() if k in DATA_COLUMNS}
        saved = _saved_float_dtype(directory / WEIGHTS_NAME)
        if dtype == "auto":
            dtype = saved
        elif dtype is None and saved not in (None, torch.float32):
            log.info("%s holds %s weights; they are loaded as float32 (from_pretrained(dtype='auto') keeps %s)",
                     directory, saved, saved)  # fmt: skip
        return model.to(device=map_location, dtype=dtype).eval()

    @classmethod
    def on_saved_encoders(cls, directory: str | Path, config: ModelConfig | None = None) -> FusionModel:
        """A model of `config` (default: the saved one) on the encoders saved in `directory`, weights not loaded.

        The encoders' configs, tokenizer and image preprocessing are the saved ones, never those of the
        folders or hub ids the config names (which may hold something else by now): how a resumed run
        continues with what it trained on."""
        directory, meta, saved = cls._saved_config(directory)
        return cls._build_on_saved_encoders(directory, config or saved, meta)

    @classmethod
    def _build_on_saved_encoders(cls, directory: Path, config: ModelConfig, meta: Mapping[str, Any]) -> FusionModel:
        if not directory.is_dir():  # else transformers reads its encoder paths as hub ids ("Repo id must be ...")
            raise FileNotFoundError(f"{directory} is not there any more: the model folder was moved, pruned or deleted "
                                    "while it was read; load it again from where it is now")  # fmt: skip
        text = TextEncoder.from_config(config.text, saved_dir=directory / "text_encoder")
        # timm rebuilds from its name alone; a saved_dir still tells it not to fetch pretrained weights
        image = ImageEncoder.from_config(config.image, saved_dir=directory / "image_encoder")
        if "image_preprocess" in meta:
            saved = from_dict(ImagePreprocess, meta["image_preprocess"])
            if tuple(saved.size) != tuple(image.preprocess.size):  # a hand edit? HF says so only at predict
                _check_image_size(image, tuple(saved.size), directory / CONFIG_NAME)
            image.preprocess = saved
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(config, text, image)

    @classmethod
    def read_config(cls, directory: str | Path) -> ModelConfig:
        """The saved model's config alone (tasks, class names, encoders): no weights are read."""
        return cls._saved_config(directory)[2]

    @staticmethod
    def _saved_config(directory: str | Path) -> tuple[Path, dict[str, Any], ModelConfig]:
        from ..hub import resolve_pretrained_dir

        directory = _find_checkpoint_dir(resolve_pretrained_dir(directory))
        try:
            meta = json.loads((directory / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{directory / CONFIG_NAME} is not valid JSON ({e}); restore the file from the "
                              "saved model") from None  # fmt: skip
        if "model" not in meta:
            raise ConfigError(f"{directory / CONFIG_NAME} is not a fusionkit model config (no 'model' key)")
        _warn_if_newer(directory / CONFIG_NAME, meta.get("fusionkit_version"))
        return directory, meta, from_dict(ModelConfig, meta["model"]).validate()

    def _frozen_encoder_keys(self) -> set[str]:
        return {f"{prefix}.{k}" for prefix in ("text_encoder", "image_encoder")
                for k, p in getattr(self, prefix).named_parameters() if not p.requires_grad}  # fmt: skip

    def load_weights(self, path: str | Path) -> None:
        """Load a safetensors state dict, failing with the mismatching keys/shapes if it is from another config."""
        path = Path(path)
        state = _read_weights(path)
        own = self.state_dict()
        if (set(own) - set(state)) and (set(own) - set(state)) <= ADDED_SINCE_0_1:
            warnings.warn(f"{path} predates missing-modality support: its placeholders start untrained",
                          stacklevel=2)  # fmt: skip
            state = {**{k: own[k] for k in ADDED_SINCE_0_1}, **state}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} does not match this model's config: {len(missing)} missing keys {missing[:5]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]}. "
                "Load it with the config.json saved beside it."
            )
        self.load_state_dict(state)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def pool_patch_grid(tokens: torch.Tensor, grid: int, layout: tuple[int, int, int] | None) -> torch.Tensor:
    """Average-pool the h x w patch grid of [B, prefix + h*w, D] tokens to at most grid x grid; the prefix tokens
    (CLS, registers) are kept as they are. `layout` is (prefix, h, w), the encoder's `token_layout()`: a grid
    guessed from the token count would pool CLS or registers with patches, or rows across each other."""
    if grid <= 0:
        return tokens
    if layout is None:
        raise ValueError("image_grid needs the image encoder's token layout (prefix tokens, patch rows x columns)")
    prefix, h, w = layout
    if tokens.shape[1] != prefix + h * w:
        raise ValueError(f"image_grid: {tokens.shape[1]} image tokens, not the {prefix} prefix + {h}x{w} patch "
                         "tokens the image encoder declares")  # fmt: skip
    if h <= grid and w <= grid:
        return tokens
    b, _, d = tokens.shape
    patches = tokens[:, prefix:].transpose(1, 2).reshape(b, d, h, w)
    pooled = F.adaptive_avg_pool2d(patches, (min(grid, h), min(grid, w)))
    return torch.cat([tokens[:, :prefix], pooled.flatten(2).transpose(1, 2)], dim=1)


def _batch_size(*inputs: Any) -> tuple[int, torch.device]:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.shape[0], x.device
    raise ValueError("no model input: pass input_ids/text_features and/or pixel_values/image_features")


def _check_same_batch(text: torch.Tensor | None, image: torch.Tensor | None) -> None:
    if text is not None and image is not None and text.shape[0] != image.shape[0]:
        raise ValueError(f"text batch size {text.shape[0]} != image batch size {image.shape[0]}")


def _as_flags(flags: Any, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """bool [B] on the inputs' device; None means every row has that modality."""
    if flags is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    flags = torch.as_tensor(flags, device=device).bool()
    if flags.shape != (batch,):
        raise ValueError(f"{name} must be a bool vector of the batch size [{batch}], got {tuple(flags.shape)}")
    return flags


def _absent_as_nan(emb: torch.Tensor, present: Any, normalize: bool, name: str) -> torch.Tensor:
    """`emb` (normalized if asked) with NaN rows where `present` is False: a side that is not there has no vector."""
    emb = F.normalize(emb, dim=-1) if normalize else emb
    if present is None:
        return emb
    return emb.masked_fill(~_as_flags(present, len(emb), emb.device, name)[:, None], float("nan"))


def _fill_absent(
    tokens: torch.Tensor | None,
    mask: torch.Tensor | None,
    present: torch.Tensor,
    placeholder: torch.Tensor,
    all_present: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Absent rows hold the placeholder at every position and show only the first (no empty attention row).

    `tokens` None: no row has this modality (its encoder did not run), so one placeholder token each.
    The `where` also runs on complete batches: the placeholder is then in every step's graph (a zero
    gradient), as distributed training wants of every trainable parameter.
    """
    if tokens is None:
        b = present.shape[0]
        return placeholder.expand(b, 1, -1), torch.ones(b, 1, dtype=torch.bool, device=present.device)
    tokens = torch.where(present[:, None, None], tokens, placeholder.to(tokens.dtype))
    if all_present:
        return tokens, mask
    first = torch.arange(tokens.shape[1], device=tokens.device) == 0
    if mask is None:
        return tokens, present[:, None] | first
    return tokens, torch.where(present[:, None], mask, first)


class _TooLarge(ValueError):
    """A config describes a model far larger than its weights file."""


class _CreationBudget(torch.overrides.TorchFunctionMode):
    """Stops a meta-device build that creates far more tensors or elements than the weights file holds
    (a config claiming `depth = 10**6` would otherwise spend hours building empty layers)."""

    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                           torch.randint, torch.tensor, torch.empty_strided, torch.arange, torch.eye})  # fmt: skip

    def __init__(self, saved: Mapping[str, tuple[int, ...]], weights: Path) -> None:
        super().__init__()
        self.weights = weights
        self.tensors_left = 4 * len(saved) + 10_000
        self.elements_left = 4 * sum(math.prod(s) for s in saved.values()) + 100_000_000

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES and isinstance(out, torch.Tensor):
            self.tensors_left -= 1
            self.elements_left -= out.numel()
            if self.tensors_left < 0 or self.elements_left < 0:
                raise _TooLarge(
                    f"the configs in {self.weights.parent} describe a model far larger than {self.weights.name} "
                    "(meta build stopped); the config was edited or belongs to another checkpoint"
                )
        return out


FROZEN_WEIGHTS_KEY = "fusionkit_frozen_weights"  # metadata: the shared file holding the frozen encoders
FROZEN_ID_KEY = "fusionkit_frozen_id"  # metadata of that file, and of each checkpoint naming it: which one it is
TASKS_KEY = "fusionkit_tasks"  # metadata: the tasks and classes the weights were trained for (config.json's)
DIGEST_KEY = "fusionkit_sha256"  # metadata: SHA-256 of the file's tensors (`_tensors_digest`)


def _saved_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _header_metadata(path: Path) -> dict[str, str]:
    """The metadata in a safetensors file's header (nothing else is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e


def _frozen_id(path: Path) -> str | None:
    """The id a shared frozen-encoder file was written with (its header only: nothing is hashed)."""
    return _header_metadata(path).get(FROZEN_ID_KEY)


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, and the run's shared frozen-encoder file it names (if any)."""
    meta = _header_metadata(path)
    shared, expected = meta.get(FROZEN_WEIGHTS_KEY), meta.get(FROZEN_ID_KEY)
    if shared is None:
        return [path]
    # first the path as the user reached it (a symlinked checkpoints/ on another disk: resolve() would follow the
    # link before the `..`), then the real one (a checkpoint reached through a link to it)
    candidates = (Path(os.path.normpath(path.parent / shared)), (path.parent / shared).resolve())
    other = next((c for c in candidates if c.is_file()), candidates[0])
    if not other.is_file():
        raise FileNotFoundError(
            f"{path} keeps its frozen encoder weights in {other}, written once per run, which is missing. "
            "Copy the whole run directory, or save a standalone model with FusionModel.save_pretrained"
        )
    found = _frozen_id(other) if expected is not None else None  # saved before ids: nothing to compare
    if expected is not None and found != expected:
        raise ValueError(
            f"{path} was saved with the frozen encoder weights of another run: {other} is not the file it was "
            f"saved with (id {found} there, {expected} expected), so its encoders would load another run's weights. "
            "The checkpoint was copied into another run dir, or that file replaced: copy the checkpoint together "
            "with its own run's file (the whole run directory), or load it where its run saved it"
        )
    return [path, other]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `path` (and of the frozen-encoder file it names), each file checked against its SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
        recorded = _header_metadata(file).get(DIGEST_KEY)  # None: saved before digests were written
        if recorded is not None and _tensors_digest(tensors) != recorded:
            raise ValueError(f"{file} is damaged: its tensors are not the ones it was saved with (their SHA-256 "
                             "differs from the one recorded in its header: bytes changed on disk or in a copy). "
                             "Restore the file from the place it was saved or a backup, or use another "
                             "checkpoint")  # fmt: skip
        state.update(tensors)
    return state


def _save_weights(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Write `state` to `path` through a temp file (a reader never sees half a file), its SHA-256 in the header."""
    from safetensors.torch import save_file

    metadata = {**metadata, DIGEST_KEY: _tensors_digest(state)}

    def write(tmp: Path) -> None:
        save_file(dict(state), str(tmp), metadata=metadata)
        follow_umask(tmp)

    replace_file(path, write, elsewhere="another folder")


def _tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of tensors by name, dtype, shape and bytes: the same for the dict saved and the dict loaded,
    whatever the file's layout (~60 ms per 100 MB, about what reading them from disk costs)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _task_schema(config: ModelConfig) -> list[list[Any]]:
    """What a model's outputs mean: per task its name, type and class names in output order."""
    return [[t.name, t.type, list(t.class_names or [])] for t in config.tasks]


def check_saved_for(weights: Path, config: ModelConfig, config_path: Path) -> None:
    """Refuse weights saved for other tasks or classes than `config` (read from `config_path`) names: another
    model's model.safetensors or config.json copied in would predict under the wrong class names, confidently.
    Weights saved before the schema was recorded are not checked."""
    saved = _header_metadata(weights).get(TASKS_KEY)
    if saved is None:
        return
    try:
        theirs = {name: (kind, classes) for name, kind, classes in json.loads(saved)}
    except (ValueError, TypeError) as e:
        raise ValueError(f"{weights} is damaged: the task list in its header is unreadable ({e}); restore the "
                         "file from the place it was saved") from None  # fmt: skip
    ours = {name: (kind, classes) for name, kind, classes in _task_schema(config)}
    if theirs == ours:
        return

    def said(entry: tuple[str, list[str]] | None) -> str:
        return "no such task" if entry is None else f"{entry[0]} {entry[1]}" if entry[1] else entry[0]

    differ = "; ".join(f"{name}: {said(theirs.get(name))} in {weights.name}, {said(ours.get(name))} in "
                       f"{config_path.name}" for name in sorted({*theirs, *ours}) if theirs.get(name) != ours.get(name))  # fmt: skip
    raise ValueError(
        f"{weights} and {config_path} are not from the same model: the weights were trained for other tasks or "
        f"classes than the config names ({differ}), so their outputs would be read under the wrong names. One of "
        "the two files was copied from another model or run: put back the pair that was saved together (copy a "
        "model's whole folder, never single files)"
    )


def _saved_float_dtype(weights: Path) -> torch.dtype | None:
    """The floating dtype of a safetensors checkpoint's tensors (its header only; None: none, or mixed)."""
    from safetensors import safe_open

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    found = set()
    for file in _weight_files(weights):
        with safe_open(str(file), "pt") as f:
            found |= {names[d] for d in (f.get_slice(k).get_dtype() for k in f.keys()) if d in names}
    return found.pop() if len(found) == 1 else None


def check_saved_shapes(weights: Path, build: Callable[[], nn.Module]) -> None:
    """Refuse a checkpoint whose configs do not describe its weights, before any memory is allocated.

    `build` runs on the meta device (shapes only, no storage) and every tensor shape is compared with
    the safetensors header, so a tampered `config.json` (`fusion.dim = 2**20`) fails in milliseconds
    instead of asking for terabytes."""
    from safetensors import SafetensorError, safe_open

    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    files = _weight_files(weights)
    try:
        saved = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                saved.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
    try:
        with torch.device("meta"), _CreationBudget(saved, weights):
            expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except (NotImplementedError, RuntimeError) as e:  # an encoder whose __init__ reads tensor values
        if "meta" not in str(e):
            raise
        warnings.warn(f"cannot check {weights.parent}'s configs before loading ({e})", stacklevel=3)
        return
    problems = [f"{k}: config gives {expected[k]}, weights hold {saved[k]}"
                for k in expected if k in saved and expected[k] != saved[k]]  # fmt: skip
    problems += [f"missing from the weights: {k}" for k in sorted(set(expected) - set(saved) - ADDED_SINCE_0_1)]
    problems += [f"not in the model: {k}" for k in sorted(set(saved) - set(expected))]
    if problems:
        raise ValueError(
            f"the configs in {weights.parent} do not match {weights.name} ({len(problems)} tensors differ, e.g. "
            + "; ".join(problems[:4]) + "); the config was edited or belongs to another checkpoint"
        )


def align_classes(model: FusionModel, reference: FusionModel, outputs: dict[str, Any]) -> dict[str, Any]:
    """`model`'s outputs with each task's class columns in `reference`'s order (classes matched by name)."""
    for name, names in model.class_names.items():
        if names != reference.class_names[name]:
            outputs[name] = outputs[name][..., [names.index(c) for c in reference.class_names[name]]]
    return outputs


def follow_umask(path: Path) -> None:
    """Give a file (0666) or folder (0777) written through a private temp (safetensors, `mkdtemp`: 0600/0700)
    the mode the umask gives any new file, so a model in a shared folder is readable by whoever reads the rest."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def is_model_folder(folder: Path) -> bool:
    """A folder of one model's files, which outputs must not join: config.json beside weights (an encoder,
    `save_pretrained`, a checkpoint) or an ONNX export (its export.json)."""
    weights = (WEIGHTS_NAME, "pytorch_model.bin", "model.safetensors.index.json")
    return ((folder / CONFIG_NAME).is_file() and any((folder / w).is_file() for w in weights)) or (
        folder / "export.json").is_file()


def check_save_dir(directory: Path) -> None:
    """Refuse a `save_pretrained` folder whose files are not a saved model's to replace: a run dir or a
    folder inside one (its config.json is the training config that eval, predict and --resume read),
    or a folder whose config.json is someone else's."""
    from ..training.rundir import run_dir_holding

    run = run_dir_holding(directory)
    if run is not None:
        where = "is the run dir" if run == directory.resolve() else f"is inside the run dir {run}"
        raise FileExistsError(
            f"{directory} {where}; saving a model there would replace the run's own files (its training config, "
            f"checkpoints and pointers, read by eval, predict and --resume). Save it to a folder outside the run, "
            f"e.g. {run.parent / (run.name + '-model')}"
        )
    if (directory / "export.json").is_file() or any(directory.glob("*.onnx")):
        raise FileExistsError(f"{directory} holds an ONNX export; save_pretrained would replace its processor and "
                              "tokenizer files (the graphs' own): save the model to a new folder")  # fmt: skip
    config = directory / CONFIG_NAME
    if config.is_file() and not _is_model_config(config):
        raise FileExistsError(f"{config} exists and is not a fusionkit model's config; save_pretrained would "
                              "overwrite it: save the model to a new folder")  # fmt: skip
    if not (config.is_file() or _is_processor_config(directory / PROCESSOR_NAME)):
        held = [name for name in (*SAVED_FILES, *ENCODER_FOLDERS) if (directory / name).exists()]
        if held:
            raise FileExistsError(f"{directory} holds {', '.join(held[:5])} but no fusionkit model or processor "
                                  "config: save_pretrained would overwrite them; save the model to a new or empty "
                                  "folder")  # fmt: skip


@torch.no_grad()
def _check_image_size(image: ImageEncoder, size: tuple[int, ...], config: Path) -> None:
    """One image of the saved `image_preprocess.size` through the encoder (ViT, DINOv2 and others take several)."""
    if image.is_meta:  # the shapes-only build of `check_saved_shapes`: the real one checks
        return
    try:
        image.eval().backbone(torch.zeros(1, 3, *size))
    except Exception as e:  # HF: "Input image size (64*64) doesn't match model (32*32)"; timm: an assertion
        raise ConfigError(f"{config}: image_preprocess.size {list(size)} is not an image size the image encoder "
                          f"takes ({type(e).__name__}: {str(e).strip()[:200]}); restore the size the model was "
                          f"saved with (its encoder's: {list(image.preprocess.size)})") from None  # fmt: skip


_WARNED_NEWER: set[Path] = set()


def _warn_if_newer(config: Path, written_by: Any) -> None:
    """Once per folder: a model saved by a newer fusionkit may use keys or weights this one does not know."""
    from packaging.version import InvalidVersion, Version

    try:
        newer = Version(str(written_by)) > Version(__version__)
    except InvalidVersion:
        return
    if newer and config.resolve() not in _WARNED_NEWER:
        _WARNED_NEWER.add(config.resolve())
        log.warning("%s was written by fusionkit %s, this is %s: upgrade fusionkit if loading fails", config,
                    written_by, __version__)  # fmt: skip


def _is_processor_config(path: Path) -> bool:
    """A `FusionProcessor.save_pretrained` processor_config.json (an export's too)."""
    try:
        return json.loads(path.read_text()).get("processor_class") == "FusionProcessor"
    except (OSError, ValueError, AttributeError):
        return False


def _remove_earlier_save(directory: Path) -> None:
    """Remove what an earlier save may have left in `directory` (checked by `check_save_dir`): its model,
    processor and tokenizer files, and those in its encoder folders. One this save does not write would outlive
    it and load instead of the new model (a processor_config.json, an image_encoder/ of another backend)."""
    for folder in (directory / name for name in ENCODER_FOLDERS):
        if folder.is_dir():
            for name in SAVED_FILES:
                (folder / name).unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()
    for name in SAVED_FILES:
        if (directory / name).is_file():
            (directory / name).unlink()


def _is_model_config(path: Path) -> bool:
    """A saved model's config.json (a "model" section, no training sections: a run's config has "run")."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model" in meta and "run" not in meta


# what a model folder's config.json and processor_config.json both hold: (config.json key, processor_config.json key)
SHARED_WITH_PROCESSOR = (("model.text.max_length", "max_length"), ("model.text.normalize", "text_normalize"),
                         ("image_preprocess", "image_preprocess"))  # fmt: skip


def check_processor_agrees(directory: Path) -> None:
    """Refuse a model folder whose config.json and processor_config.json disagree (one edited by hand): the model
    and its processor (`AutoProcessor` too) would load with another max_length, image size or mean/std, and the
    model would see inputs unlike its training's. A key one file lacks (an older save) is no disagreement."""
    model_path, processor_path = directory / CONFIG_NAME, directory / PROCESSOR_NAME
    if not (_is_model_config(model_path) and _is_processor_config(processor_path)):
        return
    meta, processor = json.loads(model_path.read_text()), json.loads(processor_path.read_text())
    differ = [f"{model_key}{sub} = {a!r} in {CONFIG_NAME}, {processor_key}{sub} = {b!r} in {PROCESSOR_NAME}"
              for model_key, processor_key in SHARED_WITH_PROCESSOR
              for sub, a, b in _differences(_lookup(meta, model_key), processor.get(processor_key))]  # fmt: skip
    if differ:
        raise ConfigError(f"{model_path} and {processor_path} disagree: {'; '.join(differ)}. The model and its "
                          "processor would read inputs differently (a file edited by hand?): put back the value the "
                          "model was saved with; to change it, load the model, set it there (model.config.text, "
                          "model.image_encoder.preprocess) and save it again with save_pretrained, which writes both "
                          "files and the tokenizer's")  # fmt: skip


def _lookup(data: Any, dotted: str) -> Any:
    """`data["a"]["b"]` for "a.b"; None where a level is missing."""
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _differences(a: Any, b: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """(".key" path, a's value, b's value) where both hold a value and they differ; dicts compared key by key."""
    if a is None or b is None:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a if k in b for d in _differences(a[k], b[k], f"{where}.{k}")]
    return [] if a == b else [(where, a, b)]


_WARNED_NO_BEST: set[Path] = set()


def _find_checkpoint_dir(directory: Path) -> Path:
    """Accept a model directory, a `last`/`best` pointer, or a run directory with the model in `best` or `last`."""
    from ..training.rundir import (
        checkpoint_step,
        damaged_checkpoint,
        follow_pointer,
        is_run_dir,
        missing_files,
    )

    if directory.is_file():  # a run dir's `best`/`last` pointer file
        if directory.name not in ("best", "last", "model"):
            raise FileNotFoundError(f"{directory} is a file; pass the model folder or run dir that holds it "
                                    f"({directory.parent}), not the file itself")  # fmt: skip
        directory = follow_pointer(directory)
    # a run dir's own root is never its model (a copy saved there by older versions must not shadow `best`)
    run = is_run_dir(directory)
    best = directory / "best"
    if run and (best.is_file() or best.is_symlink()):  # a damaged best is said, never replaced by another checkpoint
        named, needed = follow_pointer(best), (CONFIG_NAME, WEIGHTS_NAME)
        missing = missing_files(named, needed)
        if missing:
            raise FileNotFoundError(f"{directory} holds no usable model: "
                                    + damaged_checkpoint(directory, "best", named, missing, needed))
    for candidate in ((), (directory,))[not run] + (directory / "best", directory / "model", directory / "last"):
        if candidate.is_file():
            candidate = follow_pointer(candidate)
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            if run and candidate == follow_pointer(directory / "last") and not (directory / "best").exists():
                if candidate not in _WARNED_NO_BEST:  # once per process (a command reads a run more than once)
                    _WARNED_NO_BEST.add(candidate)
                    step = checkpoint_step(candidate)
                    log.warning("%s has no `best` pointer (a run stopped before its first evaluation, or the file "
                                "was deleted): using last, step %s (%s)", directory, "?" if step is None else step,
                                candidate)  # fmt: skip
            if run:
                _check_run_classes(directory, candidate)
            return candidate
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    raise FileNotFoundError(
        f"{directory} holds no fusionkit model ({CONFIG_NAME} + {WEIGHTS_NAME}, directly or in the checkpoint its "
        "`best` or `last` pointer file names)"
    )


def _check_run_classes(run: Path, checkpoint: Path) -> None:
    """Refuse a run's checkpoint whose classes are not those of the data the run trained on (its
    data_fingerprint.json): a checkpoint of another run copied in would be used and scored as this run's."""
    try:
        recorded = json.loads((run / "data_fingerprint.json").read_text())["label_schema"]
        saved = json.loads((checkpoint / CONFIG_NAME).read_text())["model"]["tasks"]
        classes = {t["name"]: list(t.get("class_names") or []) for t in saved}  # in order: the outputs' order
        trained = {task: list(entry.get("classes") or []) for task, entry in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none (an older run), or a broken file
        return
    differ = [f"{task}: {names} in the run's data, "
              + (f"{classes[task]} in the checkpoint" if task in classes else "no such task in the checkpoint")
              for task, names in sorted(trained.items()) if classes.get(task) != names]  # fmt: skip
    if differ:
        raise ValueError(
            f"{checkpoint} does not predict the classes {run} trained on ({'; '.join(differ)}, by "
            f"{run / 'data_fingerprint.json'}): it is another run's checkpoint, copied or linked into this run dir. "
            f"Put this run's own checkpoint back, or load the other model by its own folder ({checkpoint})"
        )


def _eval_frozen(module: nn.Module) -> None:
    """Put every submodule whose parameters are all frozen in eval mode (dropout inside trainable ones stays)."""
    params = list(module.parameters(recurse=True))
    if not params:
        return
    if not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _eval_frozen(child)
