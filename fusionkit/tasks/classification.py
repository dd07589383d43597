"""Single-label classification: class names reconciled by name, cross-entropy, accuracy and F1."""

from __future__ import annotations

import difflib
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, TaskConfig
from ..data.errors import DataError
from ..data.sources.rows import SKIP_ROWS
from .base import (
    Task,
    float32_values,
    is_missing,
    label_error,
    labelled_rows,
    register_task,
    replace,
    warn_missing_spellings,
)

log = logging.getLogger("fusionkit.tasks")


UNKNOWN_LABEL_HINT = ("fix the label, add the class to model.tasks[].class_names (a saved model: train again), or "
                      f"drop such labels and keep their rows: {SKIP_ROWS}")
# a whole number as pandas writes a float column to CSV ("2.0", "-0.0"): no sign "+", no leading zeros
_PANDAS_INTEGRAL_FLOAT = re.compile(r"-?(0|[1-9]\d*)\.0")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # "1e0" is 1 as "1.0" is


def canonical_name(name: str) -> str:
    """One spelling per class: stripped, Unicode NFC ("ü" typed or composed, as macOS and copy-paste give, is
    one class), booleans lower-case ("True" in a CSV, `true` in JSON or Parquet, are one class) and whole
    numbers as pandas writes floats without ".0" ("2.0" is how pandas writes an int column with gaps to CSV; its
    Parquet copy holds the float 2.0, named "2"). Any other spelling is kept as written ("+1", "01"): the class
    is named as the data names it, and two spellings of one number in a column are refused (`_spelling_key`)."""
    s = unicodedata.normalize("NFC", name.strip())
    if _PANDAS_INTEGRAL_FLOAT.fullmatch(s):
        return str(int(s[:-2]))
    return s.lower() if s.lower() in ("true", "false") else s


def _number_key(name: str) -> str | None:
    """The number a label spells, one key for all its spellings ("+1", "01", "1.0" -> "1"; "-0" -> "0"), or None."""
    if not _NUMBER.fullmatch(name):
        return None
    value = Decimal(name)
    return format(value.normalize(), "f") if value else "0"


def _same_number(name: str, names: Sequence[str]) -> list[str]:
    key = _number_key(name)
    return [n for n in names if key is not None and _number_key(n) == key]


def listed_class(name: str, names: Sequence[str]) -> str | None:
    """The listed class a label names: its own spelling, else the one class that is the same number written
    another way ("+1" in new data for a saved model's "1"); None for none, or several ("01" and "1" both listed)."""
    if name in names:
        return name
    same = _same_number(name, names)
    return same[0] if len(same) == 1 else None


def unknown_label(name: str, task: str, names: Sequence[str], where: str, item: str) -> DataError:
    """The error of a label no listed class is: unknown, or the number of several listed classes spelled apart."""
    same = _same_number(name, names)
    if len(same) > 1:
        return label_error(f"label {name!r} of task {task!r} is the number of several listed classes {same}, which "
                           "are spelled apart", where, item, f"write it as one of them exactly; classes are {list(names)}")  # fmt: skip
    return label_error(f"unknown label {name!r} for task {task!r}; classes are {list(names)}", where, item,
                       UNKNOWN_LABEL_HINT)  # fmt: skip


def label_string(value: Any, where: str, item: str) -> str:
    """A raw class label as a name: strings stripped, integral numbers without '.0'; inf/NaN refused."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise label_error(f"label {value!r} is not a class", where, item, "fix or empty the cell")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, str):
        s = canonical_name(value)
        if s.lower() in ("inf", "-inf", "+inf", "infinity", "-infinity"):
            raise label_error(f"label {value!r} is not a class", where, item, "fix or empty the cell")
        return s
    several = isinstance(value, list | tuple | set | np.ndarray)
    raise label_error(f"label {value!r} ({type(value).__name__}) is not a class name", where, item,
                      "write one class name (text or a number) per cell" + (
                          '; a row with several labels is a multilabel task: "type": "multilabel"' if several else ""))


def _name_or_none(value: Any, where: str) -> str | None:
    """A label's class name, None for one that is no class (inf): `encode` names its row, as for other types."""
    try:
        return label_string(value, where, "?")
    except DataError:
        return None


def _sort_key(name: str) -> tuple[int, float, str]:
    try:
        return (0, float(name), name)  # "2" before "10"
    except ValueError:
        return (1, 0.0, name)


def reconcile_class_names(
    task: str, observed: set[str], configured: Sequence[str] | None, declared: Sequence[str], where: str,
    counts: Mapping[str, int] | None = None,
) -> list[str]:
    """Class names in order, matched BY NAME (never by position or count) between config and data.

    Order: the config's `class_names` if given, else the names the source declares (HF `ClassLabel`,
    MVSA), else the sorted distinct values. Every observed value must be one of them (`listed_class`: a number
    may be written another way). `counts`: rows per observed name, said when two names are one class.
    """
    configured = [canonical_name(n) for n in configured] if configured else configured
    declared = [canonical_name(n) for n in declared]
    names = list(configured or declared or sorted(observed, key=_sort_key))
    origin = (
        "model.tasks[].class_names" if configured else ("the data's declared classes" if declared else "")
    )
    if configured and declared and not set(declared) <= set(configured):
        extra = sorted(set(declared) - set(configured))
        raise ConfigError(
            f"task {task!r}: the data ({where}) declares classes {list(declared)} but the config has "
            f"class_names {list(configured)}; {extra} are not in the config. Add them to class_names or "
            "relabel the data"
        )
    unknown = sorted((n for n in observed if listed_class(n, names) is None), key=_sort_key)
    if unknown:
        raise ConfigError(
            f"task {task!r}: labels {unknown[:10]} in {where} are not among the classes {names} "
            f"({origin}). Class names are matched by name (a number in any spelling: '+1' is class '1'): fix the "
            "data or list every class in "
            "model.tasks[].class_names"
        )
    if not configured:  # a class list taken from the data: spelling variants are almost always a mistake
        folded: dict[str, list[str]] = {}
        for n in names:
            folded.setdefault(_spelling_key(n), []).append(n)
        clashes = [v for v in folded.values() if len(v) > 1]
        if clashes:
            said = "; ".join(" and ".join(f"{n!r} ({_row_count(counts, n)})" for n in c) for c in clashes)
            numbers = any(_number_key(c[0]) is not None for c in clashes)
            listing = ("list the classes, each number once, in model.tasks[].class_names (e.g. "
                       f"{sorted({_number_key(n) or n for n in names}, key=_sort_key)}): every spelling of a listed "
                       "number reads as that class" if numbers else
                       "if they are really different classes list them in model.tasks[].class_names")  # fmt: skip
            how = "case or spelling (one number written two ways)" if numbers else "case or spelling"
            raise ConfigError(f"task {task!r}: labels in {where} differ only in {how}: {said}. Each would be a "
                              f"class of its own: write each label one way in the data, or {listing}")  # fmt: skip
    return names


def _row_count(counts: Mapping[str, int] | None, name: str) -> str:
    """'1 row', '12 rows': which spelling is the stray one."""
    n = (counts or {}).get(name)
    return "rows not counted" if n is None else f"{n} row{'' if n == 1 else 's'}"


def warn_rare_lookalikes(task: str, labels: Sequence[str], where: str) -> None:
    """A class of one or two rows whose name is close to a large class ('Postive' beside 'Positive') is most likely
    a typo: it becomes a class of its own, in every output, without a word. Said, not refused (it may be real)."""
    counts = Counter(labels)
    common = [n for n, c in counts.items() if c >= 5]
    for name, count in counts.items():
        if count <= 2 and len(labels) >= 20:
            near = difflib.get_close_matches(name, [n for n in common if n != name], n=1, cutoff=0.75)
            if near:
                log.warning("task %s: label %r has %d row(s) in %s and looks like %r (%d rows): a typo? It is a class "
                            "of its own unless fixed (or list the classes in model.tasks[].class_names)", task, name,
                            count, where, near[0], counts[near[0]])  # fmt: skip


def _spelling_key(name: str) -> str:
    """What two labels that look alike share: compatibility-folded (full-width letters), case-folded, with
    invisible format characters (zero-width space, joiners, BOM) removed; a number its value ("+1", "01", "1")."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    folded = "".join(c for c in folded if unicodedata.category(c) != "Cf")
    return _number_key(folded) or folded


def check_not_numeric(task: str, type_: str, observed: set[str], where: str) -> None:
    """Many distinct fractional numbers read as classes are a score column whose task forgot its type."""
    numbers = []
    for name in observed:
        try:
            numbers.append(float(name))
        except ValueError:
            return
    if len(numbers) > 10 and any(not x.is_integer() for x in numbers):
        example = sorted(observed, key=_sort_key)[:3]
        raise ConfigError(
            f"task {task!r}: its column in {where} holds {len(numbers)} distinct numbers (e.g. {example}) that a "
            f"{type_} task would read as {len(numbers)} classes. A score to predict is type regression: "
            f'{{"name": "{task}", "type": "regression"}}; if they really are class names, list them in '
            "model.tasks[].class_names"
        )


def class_report(y: Any, pred: Any, names: Sequence[str], present: Sequence[int]) -> dict[str, Any]:
    """sklearn's per-class report (class indices, or multilabel indicator rows), its "macro avg" over the classes
    `present` (labelled or predicted here), as the tasks' macro_f1 is; a class absent from both has no score (None),
    not a score of 0."""
    from sklearn.metrics import classification_report

    report = classification_report(y, pred, labels=range(len(names)), target_names=list(names), output_dict=True,
                                   zero_division=0)  # fmt: skip
    if len(present):
        report["macro avg"] = classification_report(y, pred, labels=list(present), output_dict=True,
                                                    zero_division=0)["macro avg"]  # fmt: skip
    for i in set(range(len(names))) - set(present):
        report[names[i]] = {"precision": None, "recall": None, "f1-score": None, "support": 0}
    return report


@register_task("classification")
class ClassificationTask(Task):
    """One class per example: softmax head, cross-entropy (optional label smoothing and class weights)."""

    default_metric = "macro_f1"
    metric_names = ("accuracy", "macro_f1", "weighted_f1")
    selects_first = True
    stratifies = True
    loss_options = ("class_weights", "label_smoothing", "logit_adjustment", "class_prior")
    search_space = {
        "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
        "class_weights": {"type": "categorical", "choices": [None, "balanced"]},
        # the rare-class lever of benchmarks/results/mvsa_single_recipe.md (+1.9 macro-F1 there): off or tau 1
        "logit_adjustment": {"type": "categorical", "choices": [0.0, 1.0]},
    }

    @classmethod
    def hf_feature(cls, class_names: Sequence[str]) -> Any:
        import datasets as hf

        return hf.ClassLabel(names=list(class_names)) if class_names else None

    def __init__(self, cfg: TaskConfig) -> None:
        if cfg.class_names and all(isinstance(c, str) for c in cfg.class_names):
            # in the spelling the data's labels are read in (`canonical_name`): "neutral " or "True" as the file
            # has them match its cells, and the saved model's names are those of a model that read them from data
            cfg = replace(cfg, class_names=[canonical_name(c) for c in cfg.class_names])
        super().__init__(cfg)

    @classmethod
    def validate_config(cls, cfg: TaskConfig) -> None:
        super().validate_config(cfg)
        names, n = cfg.class_names, cfg.num_classes
        if names is not None:
            if len(set(names)) != len(names) or not all(isinstance(c, str) and c.strip() for c in names):
                raise ConfigError(
                    f"task {cfg.name!r}: class_names must be distinct non-empty strings, got {names}"
                )
            read = {}
            for c in names:  # two names one label reads as: "True" and "true", "2" and "2.0", "a" and "a "
                if read.setdefault(canonical_name(c), c) != c:
                    raise ConfigError(
                        f"task {cfg.name!r}: class_names {read[canonical_name(c)]!r} and {c!r} are one class: labels "
                        "are read stripped, in Unicode NFC, booleans lower-case and '2.0' as '2'; list it once"
                    )
            cfg.class_names = list(read)  # the config (and the model saved from it) in that spelling too
            if n is not None and n != len(names):
                raise ConfigError(f"task {cfg.name!r}: {len(names)} class_names for num_classes={n}")
        if n is not None and n < cls.min_classes():
            raise ConfigError(
                f"task {cfg.name!r}: num_classes={n} is too small (at least {cls.min_classes()})"
            )
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ConfigError(
                f"task {cfg.name!r}: label_smoothing must be in [0, 1), got {cfg.label_smoothing}"
            )
        if not (math.isfinite(cfg.logit_adjustment) and cfg.logit_adjustment >= 0):
            raise ConfigError(
                f"task {cfg.name!r}: logit_adjustment must be a finite number >= 0, got {cfg.logit_adjustment}"
            )
        prior = cfg.class_prior
        if prior is not None and not cfg.logit_adjustment:
            raise ConfigError(f"task {cfg.name!r}: class_prior is read only by logit_adjustment, which is 0; set "
                              "logit_adjustment (1.0 is the usual tau) or remove class_prior")  # fmt: skip
        if prior is not None:
            k = n or (len(names) if names else None)
            if k not in (None, len(prior)) or any(not math.isfinite(p) or p <= 0 for p in prior):
                count = f"{k} positive numbers" if k else "positive numbers"
                raise ConfigError(f"task {cfg.name!r}: class_prior must be {count}, one per class, got {prior}")
        cw = cfg.class_weights
        if isinstance(cw, str) and cw != "balanced":
            raise ConfigError(f"task {cfg.name!r}: class_weights must be 'balanced' or a list, got {cw!r}")
        if isinstance(cw, list):
            if (n or (len(names) if names else None)) not in (None, len(cw)):
                raise ConfigError(f"task {cfg.name!r}: {len(cw)} class_weights for {n or len(names)} classes")
            if any(not math.isfinite(w) or w < 0 for w in cw) or not any(cw):  # all 0: nothing to learn from
                raise ConfigError(f"task {cfg.name!r}: class_weights must be finite and >= 0, one at least > 0, "
                                  f"got {cw}")  # fmt: skip

    @staticmethod
    def min_classes() -> int:
        return 2

    def _out_dim(self) -> int:
        if self.cfg.num_classes is None and self.cfg.class_names:  # listed classes are their own count
            return len(self.cfg.class_names)
        if self.cfg.num_classes is None:
            raise ConfigError(
                f"task {self.name!r} does not know its classes yet: set model.tasks[].class_names (or "
                "num_classes), or train on data so they are read from the label column"
            )
        return self.cfg.num_classes

    @property
    def names(self) -> list[str]:
        return self.cfg.class_names or [str(i) for i in range(self._out_dim())]

    # ------------------------------------------------------------------ schema
    def observed(self, values: Sequence[Any], where: str) -> set[str]:
        warn_missing_spellings(self.name, values, where, self.cfg.class_names or ())
        return self.names_in([v for v in values if not self._missing(v)], where)

    def names_in(self, labels: Sequence[Any], where: str) -> set[str]:
        """The class names that present labels spell (one per cell here; several per cell for multilabel)."""
        return {n for v in labels if isinstance(v, str | int | float) and (n := _name_or_none(v, where))}

    def _missing(self, value: Any) -> bool:
        """`is_missing`, except for a label spelled like a missing value ("None", "null") that is a listed class."""
        return is_missing(value) and not (isinstance(value, str) and value.strip() in (self.cfg.class_names or ()))

    def resolve_schema(self, values: Sequence[Any], declared: Sequence[str], where: str) -> TaskConfig:
        observed = self.observed(values, where)
        if values and not observed and not (self.cfg.class_names or declared):
            raise ConfigError(f"task {self.name!r}: the column {self.column!r} has no labels in {where}; fill it "
                              "or remove the task")  # fmt: skip
        if not (self.cfg.class_names or declared):
            check_not_numeric(self.name, self.type, observed, where)
        counts = Counter() if self.cfg.class_names else Counter(  # rows per label, said of a misspelt class
            n for v in values if not self._missing(v) for n in self.names_in([v], where))
        names = reconcile_class_names(self.name, observed, self.cfg.class_names, declared, where, counts)
        if not (self.cfg.class_names or declared):
            warn_rare_lookalikes(self.name, list(counts.elements()), where)
        if (
            self.cfg.num_classes is not None
            and self.cfg.class_names is None
            and len(names) > self.cfg.num_classes
        ):
            raise ConfigError(
                f"task {self.name!r}: num_classes={self.cfg.num_classes} but the data has {len(names)} "
                f"classes {names}; set model.tasks[].class_names"
            )
        if (
            self.cfg.num_classes is not None
            and self.cfg.class_names is None
            and len(names) < self.cfg.num_classes
        ):  # a class the data lacks needs a name: an invented "3" would be a column, a prediction, a report row
            raise ConfigError(
                f"task {self.name!r}: num_classes={self.cfg.num_classes} but the data has {len(names)} classes "
                f"{names}; list all {self.cfg.num_classes} in model.tasks[].class_names (a class absent from "
                "this data needs its name), or leave num_classes out"
            )
        if len(names) < self.min_classes():
            raise ConfigError(
                f"task {self.name!r}: the column {self.column!r} has {len(names)} class(es) {names} in {where}; "
                f"a {self.type} task needs at least {self.min_classes()}"
            )
        return replace(self.cfg, class_names=names, num_classes=len(names))

    def encode(self, value: Any, where: str, item: str) -> Any:
        if self._missing(value):
            return None
        label = label_string(value, where, item)
        name = listed_class(label, self.names)
        if name is None:
            raise unknown_label(label, self.name, self.names, where, item)
        return self.names.index(name)

    def collate(self, values: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.tensor([v is not None for v in values], dtype=torch.bool)
        return torch.tensor([0 if v is None else int(v) for v in values], dtype=torch.long), mask

    def fit_train_statistics(self, values: Sequence[Any]) -> TaskConfig:
        cfg = self.cfg
        counts = Counter(v for v in values if v is not None)
        n, k = sum(counts.values()), self._out_dim()
        if cfg.class_weights == "balanced":
            # sklearn's "balanced": n / (k * count). A class absent from train has no train loss whatever its
            # weight; 1 keeps the val/test loss of its rows finite (a weight 0 made a batch of them 0/0 = NaN)
            weights = [round(n / (k * counts[c]), 6) if counts[c] else 1.0 for c in range(k)]
            log.info("task %s: balanced class weights %s", self.name, dict(zip(self.names, weights)))
            cfg = replace(cfg, class_weights=weights)
        if cfg.logit_adjustment and cfg.class_prior is None:
            # label frequencies; a class absent from train counts as one example, so its log-prior is finite
            prior = [round(max(counts[c], 1) / max(n, 1), 6) for c in range(k)]
            log.info("task %s: class prior for logit adjustment %s", self.name, dict(zip(self.names, prior)))
            cfg = replace(cfg, class_prior=prior)
        return cfg

    # ------------------------------------------------------------------ model
    def build_head(self, dim: int, num_views: int, dropout: float) -> nn.Module:
        from ..models.heads import TaskHead

        return TaskHead(dim, self._out_dim(), num_views, dropout)

    def loss(self, output: torch.Tensor, target: torch.Tensor | None, mask: torch.Tensor | None) -> Any:
        """Cross-entropy, in float32, against label-smoothed targets ((1 - eps) + eps/K on the true class, eps/K on
        each other class); with class weights each row's loss is weighted by its true class's weight and the mean
        taken over those weights' sum, as torch's weighted cross-entropy does. (torch's `cross_entropy(weight=,
        label_smoothing=)` also weights the smoothing term by every class's weight, which moves the targets off
        those.) A batch whose rows all have weight 0 has loss 0, not 0/0: nothing in it is to be learned."""
        rows = labelled_rows(output, target, mask)
        if rows is None:
            return None
        output, target = rows
        if target.device.type == "cpu" and target.numel() and not 0 <= int(target.min()) <= int(target.max()) < output.shape[-1]:
            # torch's own IndexError names no task (a GPU's device assert names nothing at all); CPU checks for free
            raise ValueError(f"task {self.name!r}: labels must be class indices 0..{output.shape[-1] - 1} "
                             f"({self.names}), got {int(target.min())}..{int(target.max())}")  # fmt: skip
        logits, target = output.float(), target.long()
        if self.cfg.logit_adjustment and self.cfg.class_prior is not None:
            log_prior = logits.new_tensor(self.cfg.class_prior).log()
            logits = logits + self.cfg.logit_adjustment * log_prior  # in the loss only: predictions stay raw
        log_p = logits.log_softmax(-1)
        eps = self.cfg.label_smoothing
        per_row = -(1 - eps) * log_p.gather(-1, target[:, None]).squeeze(-1) - eps * log_p.mean(-1)
        weight = self.cfg.class_weights
        if not isinstance(weight, list):
            return per_row.mean()
        w = logits.new_tensor(weight)[target]
        return (w * per_row).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)

    def loss_normaliser(self, target: torch.Tensor | None, mask: torch.Tensor | None, rows: int) -> float:
        """With class weights, cross-entropy's mean divides by the labelled rows' weights: their sum."""
        weight = self.cfg.class_weights
        if not isinstance(weight, list) or target is None:
            return super().loss_normaliser(target, mask, rows)
        labelled = (target if mask is None else target[mask]).long().cpu().clamp(0, len(weight) - 1)
        return float(torch.tensor(weight, dtype=torch.float64)[labelled].sum())

    # ------------------------------------------------------------------ evaluation and prediction
    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(-1)

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Log of the mean class probabilities (their softmax is that mean)."""
        return torch.stack([self.probabilities(o) for o in outputs]).mean(0).clamp_min(1e-12).log()

    def metrics(
        self, outputs: torch.Tensor, labels: Any, mask: Any
    ) -> tuple[dict[str, float], dict[str, Any]]:
        from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

        if labels is None or mask is None or not bool(mask.any()):
            return {}, {}
        pred = self.probabilities(outputs[mask]).argmax(-1).numpy()
        y = labels[mask].numpy()
        ids = list(range(len(self.names)))
        # over the classes in the labels or the predictions (sklearn's default): a declared class absent from
        # both has no F1, and counting it as 0 would cap a perfect score on such a split at (k-1)/k
        present = sorted({*y.tolist(), *pred.tolist()})
        report = class_report(y, pred, self.names, present)
        flat = {
            "accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=present, zero_division=0)),
            "weighted_f1": float(f1_score(y, pred, average="weighted", labels=ids, zero_division=0)),
        }
        details = {
            "class_names": self.names,
            "report": report,
            "confusion": confusion_matrix(y, pred, labels=ids).tolist(),
        }
        return flat, details

    def true_labels(self, labels: torch.Tensor, mask: torch.Tensor) -> list[Any]:
        return [self.names[int(y)] if m else None for y, m in zip(labels, mask)]

    def predict(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """The most probable class and every class's probability, unrounded (a tiny one is not 0.0: log-loss)."""
        probs = self.probabilities(outputs)
        names = self.names
        return [
            {self.name: names[int(p.argmax())], f"{self.name}_prob": dict(zip(names, values))}
            for p, values in zip(probs, float32_values(probs))
        ]
