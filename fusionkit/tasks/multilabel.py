"""Multi-label classification: any subset of the classes per example; sigmoid heads, micro/macro F1."""

from __future__ import annotations

import ast
import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError, TaskConfig
from .base import float32_values, is_missing, label_error, labelled_rows, register_task
from .classification import (
    ClassificationTask,
    class_report,
    label_string,
    listed_class,
    unknown_label,
)

log = logging.getLogger("fusionkit.tasks")
SEPARATOR = "|"  # between the tags of a text cell, as read and as prediction CSVs write them


def label_list(value: Any, where: str, item: str) -> list[str]:
    """A cell of names: a list (JSON, HF, or Python's repr as `DataFrame.to_csv` writes a list column:
    "['cat', 'dog']"), or a '|'-joined string ("cat|dog")."""
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:  # a JSON list in a text cell (CSV): "[]" is the empty set, not a class named "[]"
            value = json.loads(value)
        except ValueError:
            try:  # literals only: evaluates no code
                parsed = ast.literal_eval(value.strip())
                value = parsed if isinstance(parsed, list) else value
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
    values = value if isinstance(value, list | tuple) else str(value).split(SEPARATOR)
    return [label_string(v, where, item) for v in values if not is_missing(v)]


@register_task("multilabel")
class MultilabelTask(ClassificationTask):
    default_metric = "micro_f1"
    metric_names = ("micro_f1", "macro_f1")
    selects_first = False
    stratifies = False  # a set of tags per row: no one class to stratify on
    loss_options = ()  # plain per-class BCE: no class weights, smoothing or logit adjustment
    search_space = {}
    # a tag is predicted when its probability exceeds `threshold`: one number, or one per tag (class_names order)
    params_read = ("threshold",)

    @classmethod
    def validate_config(cls, cfg: TaskConfig) -> None:
        super().validate_config(cfg)
        joined = [c for c in cfg.class_names or () if SEPARATOR in c]
        if joined:
            raise ConfigError(f"task {cfg.name!r}: tags {joined} hold '|', which separates tags in a cell (and in "
                              "prediction files): rename them without '|'")  # fmt: skip
        t = cfg.params.get("threshold", 0.5)
        values = t if isinstance(t, list) else [t]
        if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1 for v in values):
            raise ConfigError(f"task {cfg.name!r}: params.threshold must be a number between 0 and 1 (exclusive), "
                              f"or a list of them, one per tag; got {t!r}")  # fmt: skip
        if isinstance(t, list) and cfg.class_names and len(t) != len(cfg.class_names):
            raise ConfigError(f"task {cfg.name!r}: params.threshold lists {len(t)} values for {len(cfg.class_names)} "
                              f"tags {cfg.class_names}: give one per tag, in that order, or one number")  # fmt: skip

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """The tags predicted (a bool per tag) from their probabilities, at the task's threshold(s)."""
        t = self.cfg.params.get("threshold", 0.5)
        if isinstance(t, list) and len(t) != probs.shape[-1]:
            raise ConfigError(f"task {self.name!r}: params.threshold lists {len(t)} values for {probs.shape[-1]} tags "
                              f"{self.names}: give one per tag, in that order, or one number")  # fmt: skip
        return probs > probs.new_tensor(t)

    @classmethod
    def hf_feature(cls, class_names: Sequence[str]) -> Any:
        import datasets as hf

        return hf.Sequence(hf.ClassLabel(names=list(class_names))) if class_names else None

    @staticmethod
    def min_classes() -> int:
        return 1

    def names_in(self, labels: Sequence[Any], where: str) -> set[str]:
        """The tags the cells name; one holding '|' is no tag (`encode` refuses its row, naming it)."""
        names = {n for v in labels for n in label_list(v, where, "?") if SEPARATOR not in n}
        joined = sorted(n for n in names if ";" in n or "," in n)
        if joined:  # "a;b" read as one tag named "a;b" is almost always another separator
            log.warning("task %s: tags %s in %s hold ';' or ','; a multilabel cell separates its tags with '|' "
                        "(or is a JSON list), so each is read as one tag", self.name, joined[:5], where)  # fmt: skip
        return names

    def encode(self, value: Any, where: str, item: str) -> Any:
        if value is None or (isinstance(value, str | float) and is_missing(value)):
            return None
        out = set()
        for name in label_list(value, where, item):
            if SEPARATOR in name:
                raise label_error(f"tag {name!r} of task {self.name!r} holds '|', which separates the tags of a "
                                  "prediction file's cell: it would be read back as several tags", where, item,
                                  "rename the tag without '|' (a JSON list cell is one tag per element)")  # fmt: skip
            listed = listed_class(name, self.names)  # "+1" for a listed "1", as a classification task reads it
            if listed is None:
                raise unknown_label(name, self.name, self.names, where, item)
            out.add(self.names.index(listed))
        return sorted(out)

    def collate(self, values: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.tensor([v is not None for v in values], dtype=torch.bool)
        hot = torch.zeros(len(values), len(self.names))
        for row, v in enumerate(values):
            hot[row, list(v or [])] = 1.0
        return hot, mask

    def fit_train_statistics(self, values: Sequence[Any]) -> TaskConfig:
        """Nothing to fit; a tag in every labelled train row or in none is said: the model learns a constant for it,
        and that constant, right on every row, inflates micro-F1."""
        labelled = [set(v) for v in values if v is not None]
        counts = Counter(c for tags in labelled for c in tags)
        always = [n for c, n in enumerate(self.names) if labelled and counts[c] == len(labelled)]
        never = [n for c, n in enumerate(self.names) if labelled and not counts[c]]
        for tags, where in ((always, "every"), (never, "no")):
            if tags:
                log.warning("task %s: tag(s) %s are in %s labelled train row (%d rows): the model can only learn a "
                            "constant for them, which scores as right on every such row and inflates micro_f1; check "
                            "the labels, or remove the tags", self.name, tags, where, len(labelled))  # fmt: skip
        return self.cfg

    def loss(self, output: torch.Tensor, target: Any, mask: Any) -> Any:
        rows = labelled_rows(output, target, mask)
        return None if rows is None else F.binary_cross_entropy_with_logits(rows[0], rows[1].float())

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().sigmoid()

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits of the mean per-class probabilities (their sigmoid is that mean)."""
        return torch.stack([self.probabilities(o) for o in outputs]).mean(0).clamp(1e-7, 1 - 1e-7).logit()

    def metrics(
        self, outputs: torch.Tensor, labels: Any, mask: Any
    ) -> tuple[dict[str, float], dict[str, Any]]:
        from sklearn.metrics import f1_score

        if labels is None or mask is None or not bool(mask.any()):
            return {}, {}
        pred = self.decide(self.probabilities(outputs[mask])).long().numpy()
        y = labels[mask].numpy().astype(int)
        # macro over the tags labelled or predicted here, as classification's macro_f1: a tag absent from both
        # has no F1, and counting it as 0 would cap a perfect score on a split that lacks a rare tag
        present = (y.any(0) | pred.any(0)).nonzero()[0]
        macro = f1_score(y[:, present], pred[:, present], average="macro", zero_division=0) if present.size else 0.0
        # per tag: precision, recall, F1 and support (rows holding it), to see which tags the averages hide
        report = class_report(y, pred, self.names, present.tolist())
        return {
            "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
            "macro_f1": float(macro),
        }, {"class_names": list(self.names), "report": report, "threshold": self.cfg.params.get("threshold", 0.5)}

    def true_labels(self, labels: torch.Tensor, mask: torch.Tensor) -> list[Any]:
        return [[c for c, on in zip(self.names, row) if on] if m else None for row, m in zip(labels.tolist(), mask)]

    def predict(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """The tags above their threshold and every tag's probability, unrounded."""
        probs = self.probabilities(outputs)
        chosen = self.decide(probs).numpy()
        return [
            {
                self.name: [c for c, keep in zip(self.names, row) if keep],
                f"{self.name}_prob": dict(zip(self.names, values)),
            }  # fmt: skip
            for values, row in zip(float32_values(probs), chosen)
        ]
