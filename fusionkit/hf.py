"""Hugging Face native loading: `AutoConfig` / `AutoModel` / `AutoProcessor`, the hub and the HF `Trainer`.

Importing this module registers fusionkit's classes with `transformers` (model_type "fusionkit"):

    import fusionkit.hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained("my-model")                # a saved model folder, or a hub id "org/name"
    processor = AutoProcessor.from_pretrained("my-model")
    model = FusionkitModel.from_pretrained("runs/mvsa")          # a run dir (its best checkpoint): this class only,
                                                                 # as the Auto classes read the run's own config.json
    out = model(**processor(texts=["what a day"], images=["photo.jpg"]))   # out.logits: {task: logits}
    model.push_to_hub("org/name")

`FusionkitModel` is a thin `PreTrainedModel` around a `FusionModel` (its `.fusion_model`), so the
fusionkit API stays exactly as it is for users who never touch `transformers`, and the folder format
is one: whatever `FusionModel.save_pretrained` writes, `AutoModel` loads, and the other way round.
Weights are always safetensors; a hub download fetches only safetensors, JSON and tokenizer files.
It is kept out of `import fusionkit` because `transformers.PreTrainedModel` costs seconds to import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from . import __version__
from .config import ConfigError, ImagePreprocess, ModelConfig, from_dict, to_dict
from .data.collate import ImageTransform
from .hub import resolve_pretrained_dir
from .models.fusion_model import CONFIG_NAME, FusionModel, _find_checkpoint_dir, hf_label_maps, model_inputs
from .processor import FusionProcessor

MODEL_TYPE = "fusionkit"


class FusionkitConfig(PretrainedConfig):
    """The `config.json` of a saved `FusionModel` as a `PretrainedConfig` (fusionkit's config under `model`)."""

    model_type = MODEL_TYPE

    model: dict[str, Any] | None = None  # fusionkit.ModelConfig as a dict
    image_preprocess: dict[str, Any] | None = None  # fusionkit.ImagePreprocess as a dict
    fusionkit_version: str | None = None

    @classmethod
    def from_fusion_model(cls, model: FusionModel) -> FusionkitConfig:
        return cls(
            model=to_dict(model.config),
            image_preprocess=to_dict(model.image_preprocess),
            fusionkit_version=__version__,
            architectures=[FusionkitModel.__name__],
            **hf_label_maps(model.config),
        )

    def model_config(self) -> ModelConfig:
        if self.model is None:
            raise ConfigError(
                "this FusionkitConfig holds no fusionkit model config (its 'model' key is empty)"
            )
        return from_dict(ModelConfig, self.model).validate()


@dataclass
class FusionkitOutput(ModelOutput):
    """`loss` (when labels are given), per-task `logits`, and the per-task losses behind `loss`."""

    loss: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] | None = None
    task_losses: dict[str, torch.Tensor] | None = None


class FusionkitModel(PreTrainedModel):
    """`PreTrainedModel` face of a `FusionModel`: Auto classes, hub, HF `Trainer` (`labels` -> `loss`)."""

    config_class = FusionkitConfig
    base_model_prefix = "fusion_model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    # `forward` returns a mean loss and takes no `num_items_in_batch`: the HF Trainer must divide by
    # gradient_accumulation_steps itself (it would skip that for a `**kwargs` forward, so N times the gradient)
    accepts_loss_kwargs = False

    def __init__(self, config: FusionkitConfig, fusion_model: FusionModel | None = None) -> None:
        super().__init__(config)
        if fusion_model is None:
            fusion_model = FusionModel(config.model_config())
            if config.image_preprocess is not None:
                fusion_model.image_encoder.preprocess = from_dict(ImagePreprocess, config.image_preprocess)
        self.fusion_model = fusion_model
        # uint8 images (fusionkit's cache + Collator) are normalized here, so those batches train as they are.
        self.image_transform = ImageTransform(fusion_model.image_preprocess, train=False)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """No-op: the FusionModel initializes (or loads) its own weights; HF must not re-initialize them."""

    @classmethod
    def from_fusion_model(cls, model: FusionModel) -> FusionkitModel:
        return cls(FusionkitConfig.from_fusion_model(model), model)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        image_present: torch.Tensor | None = None,
        labels: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> FusionkitOutput | tuple:
        """`FusionModel.forward` plus the loss when `labels` are given, or when a task needs none (align).

        `labels`: fusionkit's `{task: tensor}` (+ `label_mask={task: bool}` from `kwargs`), or a plain
        tensor for a single-task model (HF style; -100 marks a missing label). uint8 `pixel_values`
        are normalized first. Other `kwargs` (ids, num_items_in_batch, ...) are collator extras.
        `label_mask` is not a named parameter because the HF Trainer takes every forward parameter
        whose name contains "label" for a label column, and would then skip the loss without it.
        """
        label_mask = kwargs.get("label_mask")
        if pixel_values is not None and not pixel_values.is_floating_point():
            pixel_values = self.image_transform.to(pixel_values.device)(pixel_values)
        batch = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            text_features=text_features,
            image_features=image_features,
            text_present=text_present,
            image_present=image_present,
        )
        logits = self.fusion_model(**model_inputs({k: v for k, v in batch.items() if v is not None}))
        loss = task_losses = None
        if labels is not None or self._scores_without_labels():
            labels, label_mask = self._task_labels({} if labels is None else labels, label_mask)
            losses = self.fusion_model.loss(logits, labels, label_mask)
            loss = losses.pop("loss")
            task_losses = losses
        if return_dict is False:
            return tuple(v for v in (loss, logits) if v is not None)
        return FusionkitOutput(loss=loss, logits=logits, task_losses=task_losses)

    def _scores_without_labels(self) -> bool:
        """Whether a task scores a batch with no labels at all (contrastive, itm): then there is always a loss."""
        return any(not t.needs_labels and t.label_source == n for n, t in self.fusion_model.tasks.items())

    def _task_labels(
        self, labels: Mapping[str, torch.Tensor] | torch.Tensor, label_mask: Mapping[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        if isinstance(labels, Mapping):
            return dict(labels), None if label_mask is None else dict(label_mask)
        labelled = [n for n, t in self.fusion_model.tasks.items() if getattr(t, "needs_labels", True)]
        if len(labelled) != 1:
            raise ValueError(
                f"a labels tensor needs a model with one labelled task; this one has {labelled}: "
                "pass labels={task: tensor} instead"
            )
        task = labelled[0]
        mask = labels != -100 if not labels.is_floating_point() else torch.ones_like(labels, dtype=torch.bool)
        return {task: labels.clamp_min(0) if not labels.is_floating_point() else labels}, {task: mask}

    # ------------------------------------------------------------------ save / load
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Also take a saved folder's own keys (`FusionModel` names, no `fusion_model.` prefix): the HF
        Trainer reloads its checkpoints (`resume_from_checkpoint`, `load_best_model_at_end`) through this."""
        prefix = self.base_model_prefix + "."
        if state_dict and not any(k.startswith(prefix) for k in state_dict):
            state_dict = {prefix + k: v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict, assign)

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write the `FusionModel` folder (safetensors only) with an HF `config.json` (model_type fusionkit).

        `push_to_hub=True` uploads it too (`repo_id` defaults to the folder name), as transformers does.
        Other transformers arguments (`safe_serialization`, `max_shard_size`, `state_dict`) are accepted
        and ignored: the format is always one safetensors file.
        """
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, **{k: v for k, v in kwargs.items() if k in _PUSH_KWARGS})
        directory = Path(save_directory)
        self.fusion_model.save_pretrained(directory)
        write_hf_config(directory, self.fusion_model)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | Path, *model_args: Any, **kwargs: Any
    ) -> FusionkitModel:
        """Load a saved folder, a run dir (its best/ model) or a hub id; `device_map`/`map_location` pick
        the device ("auto": cuda if there is one, else cpu), `dtype` as in `FusionModel.from_pretrained`
        (float32 unless given; "auto": the saved dtype). Other keywords go to the hub download
        (`revision`, `token`, `cache_dir`, ...)."""
        if model_args:
            raise TypeError(
                f"FusionkitModel.from_pretrained takes no positional model args, got {model_args}"
            )
        # AutoModel passes the config it loaded; the folder's config.json is read again with the weights.
        kwargs.pop("config", None)
        map_location, device_map = kwargs.pop("map_location", None), kwargs.pop("device_map", None)
        device = _device(device_map if map_location is None else map_location)
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)  # transformers 5 / 4
        dtype = torch_dtype if dtype is None else dtype  # a name ("bfloat16") too: FusionModel reads it
        directory = _find_checkpoint_dir(resolve_pretrained_dir(pretrained_model_name_or_path, **kwargs))
        model = cls.from_fusion_model(
            FusionModel.from_pretrained(directory, map_location=device, dtype=dtype)
        )
        model.config.name_or_path = str(pretrained_model_name_or_path)
        return model.eval()


def _device(device_map: Any) -> torch.device:
    """The one device a `device_map` names: a fusionkit model is small enough to load whole (no sharding)."""
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, Mapping):  # transformers' {"": device} puts the whole model there
        if set(device_map) != {""}:
            raise ValueError(
                f"device_map={device_map!r} splits the model across devices, which fusionkit does not do: "
                'pass one device (device_map="cuda:0", "cpu", "auto" or {"": 0})'
            )
        device_map = device_map[""]
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f'device_map={device_map!r} is not a device: pass "auto", "cpu", "cuda", "cuda:1" or a GPU index'
        ) from e


_PUSH_KWARGS = ("commit_message", "private", "token", "revision", "create_pr")


def write_hf_config(directory: str | Path, model: FusionModel) -> Path:
    """Merge the HF keys (`model_type`, `architectures`, versions) into a saved model's config.json."""
    path = Path(directory) / CONFIG_NAME
    meta = json.loads(path.read_text()) if path.is_file() else {}
    hf = FusionkitConfig.from_fusion_model(model).to_diff_dict()
    path.write_text(json.dumps({**hf, **meta, "model_type": MODEL_TYPE}, indent=2, default=str))
    return path


def push_to_hub(model: FusionModel, repo_id: str, **kwargs: Any) -> Any:
    """Upload a plain `FusionModel` (saved as `save_pretrained` would) to the hub as `repo_id`."""
    return FusionkitModel.from_fusion_model(model).push_to_hub(repo_id, **kwargs)


AutoConfig.register(MODEL_TYPE, FusionkitConfig, exist_ok=True)
AutoModel.register(FusionkitConfig, FusionkitModel, exist_ok=True)
AutoProcessor.register(FusionkitConfig, FusionProcessor, exist_ok=True)
