"""Training: `TrainConfig` + `Trainer` (resumable, crash-safe, DDP-ready), metrics and the feature cache."""

from .config import DataConfig, OptimConfig, RunConfig, TrainConfig, build_config
from .feature_cache import FeatureDataset, build_features
from .inference import run_inference
from .trainer import NonFiniteLossError, Trainer, TrainingInterrupted, train

__all__ = [
    "DataConfig",
    "FeatureDataset",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "build_config",
    "build_features",
    "run_inference",
    "train",
]
