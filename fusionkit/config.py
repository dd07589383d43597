"""Nested dataclass configs and the strict dict <-> dataclass conversion they share.

Configs are plain dataclasses so they are readable, typed and JSON-round-trippable. `from_dict` is
strict (unknown keys and wrong types raise) because a typo in a config should fail loudly, not train
the wrong model for an hour.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MISSING_POLICIES = ("error", "skip", "keep")


class ConfigError(ValueError):
    """A config has an unknown key, a wrong type or an impossible value."""


# metadata of a str field whose legal values include "none": a YAML/command-line null there means "none"
# (`--model.freeze none` reads as null). Any other str field refuses null: it would become a folder "none".
NONE_IS_A_VALUE = {"none_is_a_value": True}


CROP_MODES = ("center", "squash")
TIMM_LOCAL_DIR = "local-dir:"  # timm's prefix of a model folder (config.json + weights) as model.image.name


@dataclass
class ImagePreprocess:
    """How an image encoder wants its input: read from the encoder's own config, never hard-coded."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0  # the image is scaled to size / crop_pct, then center-cropped to size
    # how it is scaled (timm's names): "center" keeps the aspect ratio (the shorter side fits: timm, CLIP, DINOv2);
    # "squash" scales each side on its own (HF ViT, SigLIP, BEiT resize to height x width and do not crop)
    crop_mode: str = "center"
    # whose geometry: "floor" (HF processors: the shorter side scaled to size / crop_pct, an odd margin's crop
    # starting at its floor) or "round" (timm: ResizeKeepRatio for a non-square crop, torchvision's CenterCrop
    # rounding half to even); a pixel or a zoom apart, so each encoder gets its own
    crop_offset: str = "floor"

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ConfigError(f"image preprocessing crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.crop_offset not in ("floor", "round"):
            raise ConfigError(f"image preprocessing crop_offset must be 'floor' or 'round', got {self.crop_offset!r}")


@dataclass
class TextEncoderConfig:
    """A BERT-family encoder through `transformers.AutoModel`: hub name, local dir, or "tiny"."""

    name: str = "tiny"
    pretrained: bool = True  # load weights; False builds the architecture from its config only
    max_length: int = 128
    config_overrides: dict[str, Any] = field(default_factory=dict)
    trainable_layers: int | None = None  # freeze="top_k": this encoder's own k (None = model.trainable_layers)
    pool_layers: int = 1  # output = mean of the last n blocks' outputs (each through the final norm)
    normalize: str = field(default="none", metadata=NONE_IS_A_VALUE)  # "tweet": @mentions -> "@user", links -> "http" before tokenizing (TweetEval's rule)


# model.text.normalize: (pattern, replacement) rules run inside the tokenizer, before its own normalizer
TEXT_NORMALIZATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "none": (),
    # a word that starts with "@" (not an e-mail's), and a link in any case (the rules run before lower-casing)
    "tweet": ((r"(?<!\S)@\w+", "@user"), (r"(?i)(?:https?://|www\.)\S+", "http")),
}


@dataclass
class ImageEncoderConfig:
    """A ViT through timm (`backend="timm"`) or transformers `AutoModel` (`backend="hf"`: ViT, DINOv2)."""

    backend: str = "timm"
    name: str = "tiny"
    pretrained: bool = True
    checkpoint_path: str | None = None  # timm: a local weights file instead of the hub
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    trainable_layers: int | None = None  # freeze="top_k": this encoder's own k (None = model.trainable_layers)
    pool_layers: int = 1  # output = mean of the last n blocks' outputs (each through the final norm)

    def __post_init__(self) -> None:
        # timm's `local-dir:FOLDER`: absolute, so the run's config.yaml still names it from another directory
        if not isinstance(self.name, str):  # validate()'s type check names the key; a number has no folder
            return
        folder = self.name.removeprefix(TIMM_LOCAL_DIR)
        if self.name.startswith(TIMM_LOCAL_DIR) and not Path(folder).expanduser().is_absolute():
            self.name = TIMM_LOCAL_DIR + str(Path(folder).expanduser().resolve())


@dataclass
class FusionConfig:
    strategy: str = "cross_attention"
    dim: int = 256  # common width both encoders are projected to
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    # Average-pool the image patch grid to image_grid x image_grid tokens before fusion (0 = keep all).
    # DINOv2-S at 224 px gives 16x16 patches; a 4x4 grid cuts fusion cost ~10x on CPU for little accuracy.
    image_grid: int = 0
    # Training only: this fraction of the complete pairs loses its caption (half of them) or its image
    # (the other half) each step, so the model also learns to predict from either side alone.
    # Applies to strategies that read both sides (not to the text_only / image_only baselines).
    modality_dropout: float = 0.0


@dataclass
class TaskConfig:
    """One task: its head, loss, label schema and metrics come from the task type (`fusionkit.tasks`).

    `column` is the data column holding its labels (default: the task name). Class names come from the
    config, the data, or both reconciled by name; `num_classes` is then filled in (None = not known yet).
    `params` holds options of a particular task type (see its class in `fusionkit/tasks/`).
    """

    name: str
    type: str = "classification"
    num_classes: int | None = None
    weight: float = 1.0
    class_names: list[str] | None = None
    column: str | None = None
    label_smoothing: float = 0.0  # classification: soften one-hot targets (Szegedy et al., 2016)
    class_weights: str | list[float] | None = None  # classification: "balanced" (from train labels) or a list
    # classification: logit adjustment (Menon et al., 2021): the loss sees logits + tau * log(class prior) and
    # predictions the raw logits, so a rare class (MVSA's neutral) is not under-predicted; tau = this value
    logit_adjustment: float = 0.0
    class_prior: list[float] | None = None  # for logit_adjustment; None = the train split's label frequencies
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label_column(self) -> str:
        return self.column or self.name


@dataclass
class ModelConfig:
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    tasks: list[TaskConfig] = field(default_factory=lambda: [TaskConfig("sentiment")])
    loss_weighting: str = "static"  # "static" | "uncertainty" (Kendall et al., 2018)
    freeze: str = field(default="none", metadata=NONE_IS_A_VALUE)  # "none" | "encoders" | "top_k"
    # freeze="top_k": encoder blocks left trainable, from the top (text/image.trainable_layers override it).
    # With the feature cache, the hidden states entering those blocks are computed once and cached.
    trainable_layers: int = 0

    def validate(self) -> ModelConfig:
        check_types(self)
        names = [t.name for t in self.tasks]
        if not names:
            raise ConfigError("a model needs at least one task")
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}")
        from .tasks import check_task_names, create_task, get_task_class  # tasks validate their own options

        for t in self.tasks:
            get_task_class(t.type).validate_config(t)
        check_task_names([create_task(t) for t in self.tasks])  # predictions that would overwrite each other
        if all(t.weight == 0 for t in self.tasks):
            raise ConfigError(f"every task has weight 0 ({names}): the loss would be 0 and nothing would be learned; "
                              "give at least one task a weight > 0")  # fmt: skip
        if self.loss_weighting not in ("static", "uncertainty"):
            raise ConfigError(
                f"loss_weighting must be 'static' or 'uncertainty', got {self.loss_weighting!r}"
            )
        if self.freeze not in ("none", "encoders", "top_k"):
            raise ConfigError(f"freeze must be 'none', 'encoders' or 'top_k', got {self.freeze!r}")
        from .models.encoders import IMAGE_BACKENDS  # one adapter per backend
        from .models.fusion import FUSION_REGISTRY

        # "unknown image backend / fusion strategy ...; registered: [...]", after importing the user's plugins
        IMAGE_BACKENDS.get_class(self.image.backend)
        FUSION_REGISTRY.get_class(self.fusion.strategy)
        f = self.fusion
        for ok, what in (
            (f.dim > 0, f"model.fusion.dim must be positive, got {f.dim}"),
            (f.num_heads > 0, f"model.fusion.num_heads must be positive, got {f.num_heads}"),
            (f.depth >= 1, f"model.fusion.depth must be at least 1, got {f.depth}"),
            (math.isfinite(f.mlp_ratio) and f.dim * f.mlp_ratio >= 1,  # an MLP of at least one hidden unit
             f"model.fusion.mlp_ratio must be finite and give the MLP at least one hidden unit (dim x ratio >= 1), got "
             f"{f.mlp_ratio}"),
            (0 <= f.dropout < 1, f"model.fusion.dropout must be in [0, 1), got {f.dropout}"),
            (0 <= f.modality_dropout <= 1, f"model.fusion.modality_dropout must be in [0, 1], got {f.modality_dropout}"),
            (f.image_grid >= 0, f"model.fusion.image_grid must be >= 0 (0 = keep all patches), got {f.image_grid}"),
            (self.text.max_length > 0, f"model.text.max_length must be positive, got {self.text.max_length}"),
            (self.trainable_layers >= 0, f"model.trainable_layers must be >= 0, got {self.trainable_layers}"),
            ((self.text.trainable_layers or 0) >= 0,
             f"model.text.trainable_layers must be >= 0, got {self.text.trainable_layers}"),
            ((self.image.trainable_layers or 0) >= 0,
             f"model.image.trainable_layers must be >= 0, got {self.image.trainable_layers}"),
            (self.text.pool_layers >= 1, f"model.text.pool_layers must be >= 1, got {self.text.pool_layers}"),
            (self.text.normalize in TEXT_NORMALIZATIONS,
             f"model.text.normalize must be one of {sorted(TEXT_NORMALIZATIONS)}, got {self.text.normalize!r}"),
            (self.image.pool_layers >= 1, f"model.image.pool_layers must be >= 1, got {self.image.pool_layers}"),
        ):
            if not ok:
                raise ConfigError(what)
        if self.fusion.dim % self.fusion.num_heads:
            heads, dim = self.fusion.num_heads, self.fusion.dim
            near = sorted({max(heads, dim // heads * heads), (dim // heads + 1) * heads})
            raise ConfigError(
                f"model.fusion.dim={dim} is not divisible by model.fusion.num_heads={heads} (each head takes an "
                f"equal share of the width): set model.fusion.dim to a multiple of {heads}, e.g. "
                + " or ".join(map(str, near))
            )
        return self


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> Any:
    """A JSON-safe copy of a (nested) dataclass config; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _short(value: Any) -> str:
    """A bounded repr: a YAML alias bomb (a few lines that expand to billions of items) must not be spelled out."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 6, 6, 80, 80
    return r.repr(value)


class _IntText(int):
    """An int read from text (a YAML file, the command line) that keeps that text: a str setting (`run.name:
    1.10`, `1:30`, `1e3`) takes it as written, not the number's own spelling."""

    text: str


class _FloatText(float):
    text: str


def _with_text(value: Any, text: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    out = (_IntText if isinstance(value, int) else _FloatText)(value)
    out.text = text
    return out


def _kind(value: Any) -> str:
    """What a value is, as its writer sees it: 'the number' (not `_FloatText`), 'the text', 'a list'..."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "the number"
    return {str: "the text", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


# `[tensorboard, wandb]`: a list of bare words (no quotes, colons or brackets in them): YAML reads it as a list of
# strings, and so do list settings (`--run.report_to [tensorboard]`); a str setting keeps the text as written
_BARE_LIST = re.compile(r"\[\s*[^\s\[\]{}\"',:]+(\s*,\s*[^\s\[\]{}\"',:]+)*\s*\]")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # `str | None`: the str's own reason
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {_short(value)} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # a config built in code: its own fields by these rules
            return check_types(value, where)
        if value is None:  # `optim:` with all its keys commented out: an empty section
            value = {}
        if not isinstance(value, dict):
            key = dataclasses.fields(tp)[0].name
            raise ConfigError(f"{where} is a section, not a value: set its keys (--{where}.{key} VALUE on the "
                              f"command line, {key}: under {where}: in a file), got {_short(value)}")  # fmt: skip
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str) and _BARE_LIST.fullmatch(value.strip()):  # `[tensorboard]`, as YAML reads it
            value = [w.strip() for w in value.strip()[1:-1].split(",")]
        if not isinstance(value, list | tuple):
            shown = value.text if hasattr(value, "text") else value
            raise ConfigError(f"{where}: expected a list, got {_kind(value)} {_short(value)}; write a list in brackets, "
                              f"e.g. [{shown}]")  # fmt: skip
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_kind(value)} {_short(value)}")
        return dict(value)
    if tp is str and value is None:  # (a field whose values include "none" maps null there: `from_dict`)
        raise ConfigError(f"{where}: empty (null); give a value or remove the key (the default applies)")
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        if hasattr(value, "text"):  # `--run.name 1.10`: a name that looks like a number is still a name, as written
            return value.text
        if isinstance(value, float):  # its text is lost: 1.10 would become "1.1"
            raise ConfigError(f"{where}: expected text, got the number {value}; quote it")
        return str(value)
    if type(value) in (_IntText, _FloatText):  # a number setting: a plain number from here on
        value = float(value) if isinstance(value, float) else int(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and "_" not in value:  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, str) and _DECIMAL_INT.fullmatch(value):  # `dim: "32"`, as a float's "1e-4"
        return int(value)
    if tp in (int, float) and isinstance(value, str) and (_NUMBER_LIKE.fullmatch(value) or _ODD_FLOAT.fullmatch(value)):
        raise ConfigError(f"{where}: {value!r} is not a plain decimal number (YAML 1.1 would read 010 as octal 8, "
                          f"0x10 as 16, 1_0 as 10): write it in decimal without leading zeros{_decimal_hint(value)}")  # fmt: skip
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            hint = ("; YAML reads NO / yes / on / off (any case) as booleans: quote it ('NO')"
                    if tp is str and isinstance(value, bool) else "")  # fmt: skip
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}{hint}")
        return value
    return value


# Keys older versions wrote that fusionkit no longer reads: dotted key -> where its setting lives now.
REMOVED_KEYS = {
    "data.max_length": "model.text.max_length sets the text length (data.max_length: null meant that value)",
}


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        gone = {k: REMOVED_KEYS[f"{where}.{k}"] for k in unknown if f"{where}.{k}" in REMOVED_KEYS}
        if gone:  # a config saved by an older fusionkit (a run dir's config.yaml): say so, and where it went
            raise ConfigError("; ".join(f"{where}.{k} was removed in fusionkit 0.2: {why}" for k, why in gone.items())
                              + ": this config was written by an older fusionkit; delete that key from it")
        keys, prefix = config_keys(cls), f"{where}." if where else ""
        close = {k: prefix + c for k in unknown if (c := close_key(str(k), keys))}
        hint = "" if not close else (f" (did you mean {next(iter(close.values()))}?)" if len(unknown) == 1 else
                                     f" (did you mean {', '.join(f'{c} for {k}' for k, c in close.items())}?)")  # fmt: skip
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}{hint}; known keys are {sorted(fields)}")
    kwargs = {k: _coerce_field(fields[k], v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def config_keys(cls: type) -> list[str]:
    """Every dotted key of dataclass config `cls`, a nested section's as `section.key`."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        out += [f"{f.name}.{k}" for k in config_keys(tp)] if dataclasses.is_dataclass(tp) else [f.name]
    return out


def close_key(key: str, known: Iterable[str]) -> str | None:
    """The known dotted key a mistyped `key` most likely meant, for a did-you-mean: the same with `_` for `-`,
    one of the same name in another section (`epochs` -> `optim.epochs`), or a near spelling; else None."""
    known = list(known)
    key = key.replace("-", "_")
    name = key.rpartition(".")[2]
    same_name = [k for k in known if k.rpartition(".")[2] == name]
    if same_name:  # `seed`: run.seed; `data.seed`: run.seed too, the closest of those so named
        return difflib.get_close_matches(key, same_name, n=1, cutoff=0)[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_name = {k.rpartition(".")[2]: k for k in reversed(known)}  # a name in two sections: the first one
    close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.75)  # `lrr` -> optim.lr
    return by_name[close[0]] if close else None


def _coerce_field(f: dataclasses.Field[Any], value: Any, tp: Any, where: str) -> Any:
    """`_coerce` for a field: null in a str field whose values include "none" means "none"."""
    return "none" if value is None and f.metadata.get("none_is_a_value") else _coerce(value, tp, where)


def check_types(cfg: T, where: str = "") -> T:
    """`cfg` (a dataclass config, nested ones too) with each field coerced and checked by the rules `from_dict`
    applies to a file's values (`"1e-3"` for a float is 0.001; `"sad"` for a list is an error naming the key),
    so a config built in code fails as clearly as a file, not with a TypeError deep in training. In place."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        key = f"{where}.{f.name}" if where else f.name
        setattr(cfg, f.name, _coerce_field(f, getattr(cfg, f.name), hints[f.name], key))
    return cfg


def check_seed(seed: Any, key: str) -> int:
    """A seed as numpy and torch take it (an int in [0, 2**32)), else a ConfigError naming `key`."""
    seed = _coerce(seed, int, key)
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{key} must be in [0, 2**32 - 1] (what numpy and torch seed from), got {seed}")
    return seed


def check_split(ratios: Any, seed: Any, keys: tuple[str, str] = ("data.split_ratios", "data.split_seed")
                ) -> tuple[tuple[float, float, float], int]:  # fmt: skip
    """Split ratios and seed by the config's rule (`data.split_ratios`, `data.split_seed`; `split_dataset`'s
    arguments too): three non-negative fractions that sum to 1, and a seed; else a ConfigError naming the key."""
    ratios = _coerce(ratios, tuple[float, float, float], keys[0])
    if not (all(r >= 0 for r in ratios) and math.isclose(sum(ratios), 1.0, abs_tol=1e-6)):
        raise ConfigError(f"{keys[0]} must be three non-negative fractions (train, val, test) that sum to 1, got "
                          f"{list(ratios)}")  # fmt: skip
    return ratios, check_seed(seed, keys[1])


def parse_value(text: str) -> Any:
    """Parse a command-line override value: JSON where it parses (numbers, bools, lists), else a string.
    A value that starts like a JSON list or object, and holds its punctuation (quotes, ':' or ','), must be one: its
    mistake is said, not read as text. Text in brackets alone (`--run.name "[draft]"`) stays text, and so do
    bare words in brackets (`[tensorboard, wandb]`), which a list setting reads as a list of strings (`_coerce`)."""
    bare = _BARE_LIST.fullmatch(text.strip())
    if text.lstrip()[:1] in ("[", "{") and (any(c in text for c in "\"':,") or text.strip() in ("[]", "{}")) and not bare:
        hint = "; JSON wants double quotes around names and text" if "'" in text else ""
        try:
            return _load_json(text, "")
        except ConfigError as e:
            raise ConfigError(f"{text!r} is not a valid JSON list or mapping: {str(e).lstrip(', ')}{hint}") from None
    try:
        return _with_text(json.loads(text), text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def merge(cfg: T, overrides: dict[str, Any]) -> T:
    """A new config with `overrides` applied. Keys may be dotted (`"fusion.strategy"`) or nested dicts."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is not a config section")
            node = node[part]
        last = parts[-1]
        if (
            isinstance(value, dict)
            and isinstance(node.get(last), dict)
            and last not in ("config_overrides", "model_kwargs")
        ):
            node[last] = {**node[last], **value}
        else:
            node[last] = value
    out = from_dict(type(cfg), data)
    return out.validate() if hasattr(out, "validate") else out


def load_config_file(path: str | Path, number_text: bool = False) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (YAML is a superset of JSON).

    `number_text`: numbers keep the text they were written as, for `from_dict` to give a str setting
    (YAML reads `name: 1:30` as 90).

    A syntax error or a key given twice is an error naming the file and line: YAML would keep the
    last duplicate silently, so half of what the user wrote would be ignored.
    """

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the YAML/JSON file in it")
    if not path.exists():  # /dev/null or a shell's <(...) is no regular file, but reads as one
        raise ConfigError(f"config file {path} does not exist")
    text = _read_text(path)
    if path.suffix.lower() == ".json":  # JSON's own rules: `010` or `0x10` is an error there, not octal or hex
        data = _load_json(text, path, number_text)
    else:
        data = _load_yaml(text, path, number_text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping (section: keys), got {_short(data)}")
    return data


def _read_text(path: Path) -> str:
    """A config's text: UTF-8, or UTF-16 with its BOM (what PowerShell's `>` writes); else an error naming it."""
    raw = path.read_bytes()
    encoding = "utf-16" if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a key given twice is an error, as in YAML (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key {key!r} is given twice; keep one")
        out[key] = value
    return out


def _load_json(text: str, where: Path | str, number_text: bool = False) -> Any:
    """JSON with a key given twice refused; `number_text` as in `load_config_file`."""
    def keep(kind: type) -> Any:
        return (lambda t: _with_text(kind(t), t)) if number_text else kind

    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=keep(int), parse_float=keep(float))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}, line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def _load_yaml(text: str, path: Path, number_text: bool) -> Any:
    import yaml

    try:
        data = yaml.load(text, Loader=_unique_key_loader(number_text))
        if data is None and yaml.compose(text) is None:  # an empty file (or comments only): all defaults
            data = {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        if "given twice" not in problem:
            problem += "; fix the file (it is read as YAML, a superset of JSON)"
        raise ConfigError(f"{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return data


def _unique_key_loader(number_text: bool = False) -> type:
    """A SafeLoader that refuses a mapping key given twice (built on use: `import fusionkit` skips yaml);
    `number_text`: its numbers keep their text (see `load_config_file`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys are defaults, this map's win
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one",
                        key_node.start_mark,
                    )
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    def number(loader: Any, node: Any, plain: Callable[..., Any]) -> Any:
        if (node.tag.endswith(":int") and not _DECIMAL_INT.fullmatch(node.value)) or any(c in node.value for c in "_:"):
            return node.value  # YAML 1.1's 010 (octal 8), 0x10, 1_0, 1:30 (90), 1_0.5: text, as on the command line
        return _with_text(plain(loader, node), node.value) if number_text else plain(loader, node)

    for tag in ("int", "float"):
        plain = Loader.yaml_constructors[f"tag:yaml.org,2002:{tag}"]
        Loader.add_constructor(f"tag:yaml.org,2002:{tag}", lambda loader, node, plain=plain: number(loader, node, plain))
    return Loader


_NUMBER_LIKE = re.compile(r"[-+]?(0[xXoObB][0-9a-fA-F_]+|[0-9][0-9_:]*)")  # an int written other than in decimal
def _decimal_hint(text: str) -> str:
    """', e.g. 10.5' for 1_0.5: the number the text most likely meant, in decimal ('' when unclear)."""
    try:
        value = float(text.replace("_", "")) if "_" in text and ":" not in text else int(text, 0)
    except ValueError:
        return ""
    return f", e.g. {value:g}" if isinstance(value, float) else f", e.g. {value}"


_ODD_FLOAT = re.compile(r"(?=[^_:]*[_:])[-+]?[0-9][0-9_:]*(\.[0-9_]*)?([eE][-+]?[0-9_]+)?")  # 1_0.5, 1e-0_3, 1:30.5
_DECIMAL_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")  # an int as JSON and the command line write it

