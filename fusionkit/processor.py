"""`FusionProcessor`: raw captions and images -> the model's input tensors (in the spirit of `CLIPProcessor`).

One object owns the tokenizer and the image preprocessing of a model's two encoders, so inference
sees exactly what training saw: images go through the training cache's decode + resize + center-crop
(`preprocess_image`) and the same on-device normalization (`ImageTransform`); captions through the
text encoder's tokenizer with the model's one `max_length`. Missing entries follow the batch
contract: a `None` caption is tokenized as "" and a `None` image is zeros, each with its presence
flag False. A caption is missing by the readers' rule (`fusionkit.data.dataset.missing_caption`): None,
NaN, a blank string, or one spelled like a missing value ("nan", "None", "NA", ...), as a training table's
cell is read, so a row predicts as it trained.

    model = fusionkit.create_model("tiny").eval()         # or FusionModel.from_pretrained(model_dir)
    processor = FusionProcessor.from_model(model)          # or .from_pretrained(model_dir_or_hub_id)
    inputs = processor(texts=["a sunny day", None], images=["a.jpg", pil_image])
    outputs = model(**inputs)                              # {task name: logits [2, num_classes]}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .config import ConfigError, ImagePreprocess, from_dict, to_dict
from .data.collate import ImageTransform
from .data.dataset import clean_text, missing_caption, missing_value
from .data.image import ImageSource, preprocess_image
from .models.fusion_model import CONFIG_NAME as MODEL_CONFIG_NAME
from .models.fusion_model import PROCESSOR_NAME, check_processor_agrees

if TYPE_CHECKING:
    from .models import FusionModel


class FusionProcessor:
    """Tokenizer + image preprocessing of one `FusionModel`; `__call__` returns its input tensors."""

    def __init__(
        self, tokenizer: Any, image_preprocess: ImagePreprocess, max_length: int, num_workers: int = 4
    ) -> None:
        self.tokenizer = tokenizer
        self.image_preprocess = image_preprocess
        self.max_length = int(max_length)
        self.num_workers = num_workers  # PIL decoding releases the GIL: a few threads decode in parallel
        self._transforms: dict[torch.device, ImageTransform] = {}

    def __repr__(self) -> str:
        p = self.image_preprocess
        return (
            f"FusionProcessor(tokenizer={type(self.tokenizer).__name__}, max_length={self.max_length}, "
            f"image_size={tuple(p.size)}, mean={tuple(p.mean)}, std={tuple(p.std)})"
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: FusionModel) -> FusionProcessor:
        """The processor a model was trained with (its text encoder's tokenizer and image preprocess)."""
        return cls(model.tokenizer, model.image_preprocess, model.config.text.max_length)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `processor_config.json` and the tokenizer files (plain JSON/text: nothing executable)."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        from .models.encoders import save_tokenizer

        save_tokenizer(self.tokenizer, directory, max_length=self.max_length)  # AutoTokenizer truncates there too
        config = {
            "processor_class": type(self).__name__,
            "max_length": self.max_length,
            "text_normalize": getattr(self.tokenizer, "fusionkit_normalize", "none"),
            "image_preprocess": to_dict(self.image_preprocess),
        }
        (directory / PROCESSOR_NAME).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **hub_kwargs: Any) -> FusionProcessor:
        """Load from a processor folder, a saved model folder, a run dir, or a hub id (downloaded once).

        A model folder needs no separate processor files: the tokenizer is in `text_encoder/` and the
        image preprocessing in `config.json`.
        """
        from .hub import resolve_pretrained_dir
        from .models.encoders import load_saved_tokenizer

        hub_kwargs.pop("trust_remote_code", None)  # passed by AutoProcessor; no remote code is ever run
        directory = resolve_pretrained_dir(name_or_path, **hub_kwargs)
        check_processor_agrees(directory)  # a model folder's config.json edited by hand: refused, as the model is
        if (directory / PROCESSOR_NAME).is_file():
            cfg = _read_json(directory / PROCESSOR_NAME)
            _require(cfg, ("max_length", "image_preprocess"), directory / PROCESSOR_NAME)
            tokenizer_dir = directory
            preprocess, max_length = cfg["image_preprocess"], cfg["max_length"]
            normalize = cfg.get("text_normalize", "none")
        else:
            from .models.fusion_model import _find_checkpoint_dir

            directory = _find_checkpoint_dir(directory)
            meta = _read_json(directory / MODEL_CONFIG_NAME)
            _require(meta, ("model", "image_preprocess"), directory / MODEL_CONFIG_NAME)
            tokenizer_dir = directory / "text_encoder"
            preprocess, max_length = meta["image_preprocess"], meta["model"]["text"]["max_length"]
            normalize = meta["model"]["text"].get("normalize", "none")
        encoder_config = directory / "text_encoder" / MODEL_CONFIG_NAME  # a model folder's: the vocabulary size
        vocab = _read_json(encoder_config).get("vocab_size") if encoder_config.is_file() else None
        tokenizer = load_saved_tokenizer(tokenizer_dir, normalize, vocab)
        return cls(tokenizer, from_dict(ImagePreprocess, preprocess), max_length)

    # ------------------------------------------------------------------ processing
    def tokenize(self, texts: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` (right-padded to the longest, cut at max_length), `text_present`.

        A caption reads as the readers read it in training: one spelled like a missing value ("nan", "None",
        "NA", ...) is a missing one (`missing_caption`), any other is stripped and capped (`clean_text`), since
        BPE and SentencePiece tokenizers make tokens of leading and trailing spaces. Padding is on the right
        whatever the tokenizer's `padding_side`, as training's collator pads: a left-padding tokenizer (decoder
        LMs) would shift the positions, and a caption's outputs would depend on the batch it is in."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        texts = [None if missing_caption(t) else t for t in texts]  # blank or "nan": missing, as a CSV cell
        present = [t is not None for t in texts]
        check_captions(texts)
        tok = self.tokenizer(
            [clean_text(t)[0] if t is not None else "" for t in texts],
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
            "text_present": torch.tensor(present, dtype=torch.bool),
        }

    def load_images(self, images: Sequence[ImageSource | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode + resize + crop as the training cache does: (uint8 [B, 3, H, W], image_present bool [B])."""
        h, w = self.image_preprocess.size
        zeros = np.zeros((3, h, w), dtype=np.uint8)

        def one(src: ImageSource | None) -> np.ndarray:
            return zeros if _absent(src) else preprocess_image(src, self.image_preprocess)

        if self.num_workers > 1 and len(images) > 1:
            # a PIL image given several times is decoded once: loading one lazily opened image from two threads
            # at once fails in PIL's decoder
            keys = [id(src) if isinstance(src, Image.Image) else -1 - i for i, src in enumerate(images)]
            distinct = dict(zip(keys, images))
            with ThreadPoolExecutor(min(self.num_workers, len(distinct))) as pool:
                decoded = dict(zip(distinct, pool.map(one, distinct.values())))
            arrays = [decoded[k] for k in keys]
        else:
            arrays = [one(src) for src in images]
        present = torch.tensor([not _absent(src) for src in images], dtype=torch.bool)
        return torch.from_numpy(np.stack(arrays)), present

    def normalize(self, uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the encoder's normalized float input, on the tensor's device."""
        dev = uint8.device
        if dev not in self._transforms:
            self._transforms[dev] = ImageTransform(self.image_preprocess, train=False).to(dev)
        return self._transforms[dev](uint8)

    def __call__(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[ImageSource | None] | None = None,
        device: str | torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch: text keys when `texts` is given, image keys when `images` is.

        Returns `input_ids`, `attention_mask`, `text_present` and/or `pixel_values` (normalized float),
        `image_present`; tensors on `device` (default CPU). Paths, bytes and PIL images are accepted.
        With one side only, the other's presence flags are False: the model predicts from the side given.
        """
        if texts is None and images is None:
            raise ValueError("FusionProcessor needs texts, images or both")
        if isinstance(texts, str) or isinstance(images, str | bytes | Path | Image.Image):
            raise TypeError("pass a list of captions / images, not a single one")
        if not len(texts if texts is not None else images):  # type: ignore[arg-type]
            raise ValueError("FusionProcessor got an empty list: pass at least one caption or image")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"got {len(texts)} texts but {len(images)} images; pairs need equal counts")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        out: dict[str, torch.Tensor] = {}
        if texts is not None:
            out.update({k: v.to(dev, non_blocking=True) for k, v in self.tokenize(list(texts)).items()})
        if images is not None:
            uint8, present = self.load_images(list(images))
            out["pixel_values"] = self.normalize(uint8.to(dev, non_blocking=True))
            out["image_present"] = present.to(dev)
        side, n = ("text", len(images)) if texts is None else ("image", len(texts)) if images is None else (None, 0)
        if side is not None:  # one side given: the rows have none of the other, so `model(**inputs)` runs as is
            out[f"{side}_present"] = torch.zeros(n, dtype=torch.bool, device=dev)
        return out


def check_captions(texts: Sequence[Any]) -> None:
    """Refuse a caption that is not a string (None: a missing one), naming its position."""
    for i, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise TypeError(f"texts[{i}] is a {type(t).__name__}; captions must be str or None (a missing one)")


def _absent(src: Any) -> bool:
    """No image: None, an empty path string or a pandas empty cell (NaN, NA)."""
    return missing_value(src) or (isinstance(src, str) and not src.strip())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _require(data: dict[str, Any], keys: Sequence[str], path: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{path} lacks {missing}; save it with FusionModel/FusionProcessor.save_pretrained")
