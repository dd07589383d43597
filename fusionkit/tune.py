"""`fusionkit tune CONFIG --trials N [--space space.yaml]`: Optuna search over config keys.

Each trial is an ordinary training run (its own run dir under `<tune dir>/trials/`) with the sampled
values applied as config overrides; with frozen encoders every trial reuses the same feature cache,
so a trial costs only the fusion + heads training. Trials report their per-epoch validation metric
(the run's `run.metric`) through `Trainer.epoch_callbacks`, and Optuna's `MedianPruner` stops those
that trail the median of earlier trials at the same epoch (from the second epoch on, once a quarter of
the requested trials, at least 2 and at most 5, have finished).

A search space is a YAML mapping from config keys to distributions; a task's option is addressed
as `model.tasks.<task name>.<option>`:

    optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    model.fusion.depth: {type: int, low: 1, high: 3}
    model.fusion.dropout: {type: float, low: 0.0, high: 0.4, step: 0.1}
    model.fusion.dim: {type: categorical, choices: [64, 128, 256]}
    model.tasks.sentiment.class_weights: {type: categorical, choices: [null, balanced]}

The tune dir receives `trials.csv`, `trials.md` (sorted by value; a tie by val/loss, as training's checkpoint choice), `history.png` (optimization
history) and `best.yaml` (the best trial's full config, to train with `fusionkit train best.yaml`), rewritten
after each trial, so a crash leaves a current table.
The study itself is kept there (`study.jsonl`, Optuna's journal storage): running `tune` again on the
same dir adds trials to it (after an interruption, or to search longer) and rewrites those files from
every trial; a dir that holds a study of another config, space, data or encoder weights is refused, so
nothing is lost; a trial left running by a tune process that died (kill -9) is marked failed when the study
is opened again (`.tune.lock`, held by each live tune of it, tells). A trial whose values, each valid alone,
make an invalid config together (`fusion.dim` not divisible by `num_heads`), or that the trainer refuses,
fails with its error in trials.csv and the search goes on; 5 such trials in a row stop it, since then most
of the space is invalid.
Needs `pip install 'fusionkit[tune]'` (optuna).
"""

from __future__ import annotations

import collections
import copy
import csv
import json
import logging
import math
import os
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config_file, to_dict
from .models.fusion_model import is_model_folder
from .store import replace_file
from .training.config import IN_MEMORY, TASK_PREFIX
from .training.rundir import RunDirError, run_dir_holding

log = logging.getLogger("fusionkit.tune")

DISTRIBUTIONS = ("float", "int", "categorical")
# options that change the loss itself: a val/loss metric then compares different objectives
LOSS_CHANGING = ("label_smoothing", "class_weights", "logit_adjustment", "class_prior", "weight", "loss_weighting")


def changes_the_loss(key: str) -> bool:
    """A space key whose value changes the loss or its scale: a LOSS_CHANGING option, or a task type's own
    parameter (`model.tasks.<task>.params.<key>`: supcon's temperature, regression's standardize)."""
    return key.rsplit(".", 1)[-1] in LOSS_CHANGING or (key.startswith(TASK_PREFIX) and ".params." in key)


RESULT_FILES = ("trials.md", "best.yaml", "history.png")  # written from the study (trials.csv: refused if there)
INVALID_IN_A_ROW = 5  # trials in a row whose values combine into no valid config: the space is mostly invalid, stop


class InvalidTrialConfig(ConfigError):
    """A trial's drawn values, each valid alone, combine into an invalid config: that trial fails, the search goes on."""


def default_space(tasks: Sequence[Any] = (), freeze: str = "encoders", num_heads: int = 4) -> dict[str, dict[str, Any]]:
    """What matters most with frozen encoders (see benchmarks/results/mvsa_single_recipe.md), plus the
    options each task type declares (`Task.search_space`: label smoothing, class weights, ...); with
    `freeze: top_k` also the rates of the trained encoder blocks, which no other setting reaches. The fusion
    widths are multiples of `num_heads` (the config's), near 64, 128 and 256, so each one is valid."""
    from .config import TaskConfig, from_dict
    from .tasks import get_task_class

    tasks = [from_dict(TaskConfig, t, "tasks") if isinstance(t, Mapping) else t for t in tasks]  # as configs write them
    own = {f"{TASK_PREFIX}{t.name}.{key}": dict(spec) for t in tasks
           for key, spec in get_task_class(t.type).search_space.items()}  # fmt: skip
    dims = sorted({max(1, round(d / num_heads)) * num_heads for d in (64, 128, 256)})
    return {
        "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
        "optim.weight_decay": {"type": "float", "low": 1e-3, "high": 0.2, "log": True},
        "model.fusion.dropout": {"type": "float", "low": 0.0, "high": 0.4},
        "model.fusion.modality_dropout": {"type": "float", "low": 0.0, "high": 0.4},
        "model.fusion.dim": {"type": "categorical", "choices": dims},
        "model.fusion.depth": {"type": "int", "low": 1, "high": 3},
        **(TOP_K_SPACE if freeze == "top_k" else {}),
        **own,
    }


TOP_K_SPACE = {  # the trained top blocks' lr: lr * encoder_lr_scale * layer_decay ** (blocks above)
    "optim.encoder_lr_scale": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
    "optim.layer_decay": {"type": "float", "low": 0.6, "high": 1.0},
}


# the options each distribution takes (Optuna's suggest_float / suggest_int / suggest_categorical)
OPTIONS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"), "categorical": ("choices",)}
_SAME_SPLIT = "every trial must be scored on the same val rows"
_SAME_LABELS = "every trial must be scored on the same labels"
# keys that change what a trial's value measures: trials would be ranked on different yardsticks
MEASURE_KEYS = {
    "run.metric": "every trial must be ranked by the same metric (and direction)",
    **dict.fromkeys(("data.dataset", "data.split_seed", "data.split_ratios", "data.split_file",
                     "data.allow_new_rows", "data.missing_text", "data.missing_image", "data.on_error",
                     "data.text_column", "data.image_column", "data.id_column", "data.image_root"), _SAME_SPLIT),
    "model.tasks": f"{_SAME_LABELS} of the same tasks",
}  # fmt: skip
# a task's options that say which labels it is scored on (`model.tasks.<task>.<option>`)
TASK_LABEL_OPTIONS = ("name", "type", "column", "class_names", "num_classes")
SMALL_GRID = 16  # a discrete range of at most this many values is checked value by value, not at its ends


def why_fixed(key: str) -> str | None:
    """Why the config key `key` cannot be searched (it changes what a trial is scored on), or None."""
    if key in MEASURE_KEYS:
        return MEASURE_KEYS[key]
    if key.startswith(TASK_PREFIX) and ".params." not in key and key.rpartition(".")[2] in TASK_LABEL_OPTIONS:
        return f"{_SAME_LABELS} (a task's {', '.join(TASK_LABEL_OPTIONS)} say which labels those are)"
    return None


def keys_set(key: str, value: Any) -> list[str]:
    """The config keys a space value sets: a section's mapping (`optim: {lr: 0.01}`) sets each of its keys."""
    if isinstance(value, Mapping):
        return [k for sub, v in value.items() for k in keys_set(f"{key}.{sub}", v)]
    return [key]


def resolve_value(key: str, value: Any) -> Any:
    """`value` with a relative path (an encoder folder, a cache dir) made absolute against the working directory,
    as the command line's `--key value` is: best.yaml and the trial configs then work from any directory."""
    from .training.config import PATH_KEYS, resolve_paths

    if isinstance(value, Mapping):
        return {sub: resolve_value(f"{key}.{sub}", v) for sub, v in value.items()}
    return resolve_paths({key: value}, Path.cwd())[key] if key in (*PATH_KEYS, "run.output_dir") else value


def load_space(source: str | Path | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A search space from a YAML file or a mapping, checked and normalised: every entry a known distribution
    with only its own options, bounds as numbers (PyYAML reads `5e-4` as a string), no key that changes
    what is measured."""
    at = f" in {source}" if isinstance(source, str | Path) else ""
    space = load_config_file(source) if isinstance(source, str | Path) else dict(source)
    if not space:
        raise ConfigError(f"the search space{at} declares no parameters")
    for key in space:  # `optim` and `optim.lr`: a trial would use one value, and trials.csv record both
        inner = next((k for k in space if k.startswith(f"{key}.")), None)
        if inner is not None:
            raise ConfigError(f"search space {key!r}{at}: it sets {inner!r}, which the space also searches on its "
                              "own (a trial would use only one of the two values); keep one of them")  # fmt: skip
    return {key: _check_entry(key, spec, at) for key, spec in space.items()}


def _check_entry(key: str, spec: Any, at: str) -> dict[str, Any]:
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"search space {key!r}{at}: {problem}")

    def fixed(why: str) -> ConfigError:
        return bad(f"cannot be searched: {why}; set it in the config, the same for every trial")

    if why_fixed(key):
        raise fixed(why_fixed(key))
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind not in DISTRIBUTIONS:
        raise bad(f"needs type: one of {DISTRIBUTIONS}, got {spec!r}")
    unknown = sorted(set(spec) - {"type", *OPTIONS[kind]})
    if unknown:
        raise bad(f"unknown option(s) {unknown}; a {kind} takes {list(OPTIONS[kind])}")
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise bad("choices must be a non-empty list")
        for choice in spec["choices"]:
            for k in keys_set(key, choice):
                if why_fixed(k):
                    raise fixed(f"its choice {choice!r} sets {k}, and {why_fixed(k)}")
        return {"type": kind, "choices": [resolve_value(key, choice) for choice in spec["choices"]]}
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise bad(f"({kind}) needs {missing}")
    out = {"type": kind, **{k: _number(spec[k], kind, k, bad) for k in ("low", "high", "step") if k in spec}}
    if not out["low"] < out["high"]:
        raise bad(f"low must be < high, got {out['low']} and {out['high']}")
    if "log" in spec:
        if not isinstance(spec["log"], bool):
            raise bad(f"log must be true or false, got {spec['log']!r}")
        out["log"] = spec["log"]
    if out.get("log") and out["low"] <= 0:
        raise bad(f"log: true needs low > 0 (a log scale has no 0), got low {out['low']}")
    if "step" in out:
        if out["step"] <= 0:
            raise bad(f"step must be > 0, got {out['step']}")
        if out.get("log") and (kind == "float" or out["step"] != 1):
            raise bad("log and step cannot be combined (Optuna draws either on a log scale or on a grid)")
    return out


def _number(value: Any, kind: str, name: str, bad: Callable[[str], ConfigError]) -> int | float:
    """A bound or step as a number: numeric strings read as numbers, an int distribution's as whole numbers."""
    number = None
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise bad(f"{name} must be a number, got {value!r}")
    if kind == "float":
        return number
    if not number.is_integer():
        raise bad(f"{name} of an int must be a whole number, got {value!r}")
    return int(number)


def values_to_check(spec: Mapping[str, Any]) -> list[Any]:
    """The values a trial can draw that `check_space` tries: each choice, each value of a small grid (an int range
    or a float one with a step, at most SMALL_GRID values), else the extremes: low and the highest step on the
    grid (Optuna draws from low + k * step, and lowers a high that is off the grid)."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    low, high, step = spec["low"], spec["high"], spec.get("step")
    if step is None and spec["type"] == "float":
        return [low, high]
    step = step or 1
    count = math.floor((high - low) / step + 1e-9) + 1
    grid = [low + k * step for k in (range(count) if count <= SMALL_GRID else (0, count - 1))]
    return [round(v, 12) for v in grid] if spec["type"] == "float" else grid


def _encoder_sources(model: Any) -> tuple[Any, ...]:
    """What a model config reads its encoders from: a value that changes it is checked by building them."""
    text, image = model.text, model.image
    return text.name, text.config_overrides, image.backend, image.name, image.checkpoint_path, image.model_kwargs


def check_space(config: Any, space: Mapping[str, Mapping[str, Any]]) -> None:
    """Each value a trial can draw (see `values_to_check`) makes a valid config, and one that names other encoders
    builds them (the folder exists and loads): a bad key or value stops the search before the first trial
    instead of failing one trial at a time. A value that changes the model config otherwise meets the built
    model's own checks (`check_model`: max_length within the encoder's positions, image_grid within its patches)."""
    from .models.checks import check_model

    base = None  # the config's own encoders, built once if a value needs them
    for key, spec in space.items():
        for value in values_to_check(spec):
            try:
                tried = apply_params(config, {key: value})
                if _encoder_sources(tried.model) != _encoder_sources(config.model):
                    _encoders_model(tried)  # builds them: `check_model` runs on the new encoders
                elif tried.model != config.model:
                    base = base or _encoders_model(config)
                    view = copy.copy(base)  # the same encoders, read with the trial's model config
                    view.config = tried.model
                    check_model(view)
            except (ConfigError, OSError) as e:  # OSError: transformers' word on a hub id it cannot fetch
                relative = isinstance(value, str) and key.endswith(".name") and not Path(value).is_absolute()
                where = f" (a folder in a search space is relative to the working directory, {Path.cwd()})" * relative
                raise ConfigError(f"search space {key!r}: the value {value!r} gives an invalid config: {e}{where}") from None


def suggest(trial: Any, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One value per key, drawn by the trial's sampler (from a space `load_space` checked)."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        log = spec.get("log", False)
        if spec["type"] == "float":
            out[key] = trial.suggest_float(key, spec["low"], spec["high"], log=log, step=spec.get("step"))
        elif spec["type"] == "int":
            out[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=log)
        else:
            out[key] = trial.suggest_categorical(key, list(spec["choices"]))
    return out


def apply_params(config: Any, params: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Any:
    """The `TrainConfig` with the sampled `params`, then `overrides`, set (see `set_options`)."""
    from .training.config import set_options

    return set_options(config, {**params, **(overrides or {})})


def tune(
    config: Any,
    trials: int,
    space: str | Path | Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
    data: Any = None,
    seed: int = 0,
    callbacks: Sequence[Callable[[Any, Any], None]] = (),
) -> dict[str, Any]:
    """Run `trials` Optuna trials of `config` (a `TrainConfig`, dict or file); returns the best trial's summary.

    `data`: an in-memory dataset every trial trains on, anything `Trainer(data=...)` takes (a pandas DataFrame,
    a `datasets.Dataset`, a `MultimodalDataset`); best.yaml then says `data.dataset: in-memory:<type>`, so
    it trains only with the data passed again. `callbacks`: Optuna's `(study, frozen_trial)` callables,
    called after each trial (logging, `MaxTrialsCallback`, ...)."""
    import optuna

    from .tasks import create_task
    from .training.config import TrainConfig, build_config
    from .training.metrics import check_metric, default_metric
    from .training.trainer import Trainer, data_source_name

    cfg: TrainConfig = config if isinstance(config, TrainConfig) else build_config(config)
    if data is not None:  # best.yaml records what the trials trained on, as a run's config does
        cfg = copy.deepcopy(cfg)
        cfg.data.dataset = data_source_name(data)
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    default = space is None
    space = load_space(default_space(cfg.model.tasks, cfg.model.freeze, cfg.model.fusion.num_heads) if default else space)
    try:
        check_space(cfg, space)
    except ConfigError as e:
        if not default:
            raise
        raise ConfigError(f"the default search space (no --space given) does not suit this config: {e}; pass "
                          "--space SPACE.yaml with values that do") from None  # fmt: skip
    tasks = {t.name: create_task(t) for t in cfg.model.tasks}
    metric = cfg.run.metric or default_metric(tasks)
    check_metric(metric, tasks)  # before the study exists: a typo must not leave one behind that blocks the fix
    out = Path(output_dir or Path(cfg.run.output_dir) / f"tune-{cfg.run.name or 'run'}")
    file = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:
        raise ConfigError(f"the tune dir {out}: {file} is a file, not a folder; pass --output-dir a folder (one that "
                          "does not exist yet is created)")  # fmt: skip
    holder = run_dir_holding(out)
    if holder is not None:  # its trials would be refused one by one, after the study's files were written there
        raise RunDirError(f"the tune dir {out} is inside the run dir {holder}, which holds that run's files only: "
                          "choose a folder outside it (--output-dir)")  # fmt: skip
    model_dir = next((p for p in (out.resolve(), *out.resolve().parents) if is_model_folder(p)), None)
    if model_dir is not None:  # an encoder, a saved model or an export: its folder holds that model's files only
        raise ConfigError(f"the tune dir {out} is inside the model folder {model_dir} (a saved model, an encoder or "
                          "an ONNX export), whose files are that model's own: choose a folder outside it (--output-dir)")  # fmt: skip
    fingerprint = _data_fingerprint(cfg, data)  # reads the data: unreadable data leaves no tune dir behind
    encoders = encoder_identity(cfg)  # loads the encoders: a missing folder leaves no tune dir behind either
    out.mkdir(parents=True, exist_ok=True)

    invalid: list[InvalidTrialConfig] = []  # the latest trials in a row whose drawn values made no valid config

    def objective(trial: optuna.Trial) -> float:
        try:
            value = run_trial(trial)
        except InvalidTrialConfig as e:  # this trial fails (caught by study.optimize), the search goes on
            _record_error(trial, e)
            invalid.append(e)
            if len(invalid) >= INVALID_IN_A_ROW:
                raise ConfigError(
                    f"the last {len(invalid)} trials drew values that make no valid config (the first: {invalid[0]}); "
                    "narrow the search space to values that combine into valid configs"
                ) from None
            raise
        except optuna.TrialPruned:
            invalid.clear()
            raise
        except Exception as e:
            _record_error(trial, e)
            raise
        except KeyboardInterrupt:  # optuna marks it failed: trials.csv says why, not a blank error
            trial.set_user_attr("error", "interrupted (Ctrl-C / SIGTERM) before it finished")
            raise
        invalid.clear()
        return value

    def run_trial(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        run = {"run.output_dir": str(out / "trials"), "run.name": f"trial-{trial.number:03d}",
               "run.name_exists": "increment", "run.progress": False, "run.plots": False}  # fmt: skip
        try:
            trial_cfg = apply_params(cfg, params, run)
        except ConfigError as e:  # values valid one by one (check_space), not together: fusion.dim vs num_heads
            raise InvalidTrialConfig(f"the values drawn make an invalid config together: {e}") from None
        try:
            trainer = Trainer(trial_cfg, data=data)
        except ConfigError as e:  # what check_space cannot see cheaply (labels, data): this trial fails, not the search
            raise InvalidTrialConfig(f"the trainer refused this trial's config: {e}") from None
        trial.set_user_attr("run_dir", str(trainer.run_dir))

        def report(entry: dict[str, Any]) -> None:
            value = entry.get(metric)
            if value is None:
                return
            trial.report(float(value), entry["epoch"])
            if entry["epoch"] < trainer.epochs and trial.should_prune():  # a finished trial is complete
                raise optuna.TrialPruned(f"{metric}={value:.4f} at epoch {entry['epoch']}: below the median")

        trainer.epoch_callbacks.append(report)
        summary = trainer.fit()
        if summary["best"] is None:
            raise ConfigError(f"trial {trial.number}: {metric} was never computed (no labelled val rows?)")
        trial.set_user_attr("val_loss", (summary.get("val") or {}).get("val/loss"))  # breaks ties, as training does
        return float(summary["best"])

    loss_keys = sorted(filter(changes_the_loss, space))
    if metric.endswith("/loss") and loss_keys:
        log.warning("%s is compared across trials whose loss itself differs (%s in the search space): prefer "
                    "an accuracy or F1 metric as run.metric", metric, loss_keys)  # fmt: skip
    study = open_study(out, cfg, space, metric, fingerprint, encoders)
    # reseeded past the trials already there, so a continued study does not redraw their values
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    # a trial is judged only from its second epoch on, and only once a few trials have finished
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, trials // 4)), n_warmup_steps=2)
    lock = _hold_study(out, study)

    def write_each(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:  # a crash leaves a current table
        write_results(study, out, metric, space, cfg)

    quiet, once = _QuietFailures(), _SaidOnce()
    logging.getLogger("optuna.study._optimize").addFilter(quiet)
    fusionkit_loggers = once.install()
    before = len(study.trials)
    try:
        study.optimize(objective, n_trials=trials, catch=(FloatingPointError, InvalidTrialConfig),
                       callbacks=[write_each, *callbacks])  # fmt: skip
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM (the trainer checkpoints first): keep what finished
        from .training.trainer import TrainingInterrupted

        done = write_results(study, out, metric, space, cfg)
        kept = (f"{done} complete, summarised in {out} (trials.md, best.yaml)" if done else
                f"none complete, so there is no trials.md or best.yaml yet (trials.csv in {out})")  # fmt: skip
        raise TrainingInterrupted(
            f"tuning stopped after {len(study.trials)} trials, {kept}. Continue the study by running the same "
            "fusionkit tune command again.",
            getattr(e, "signum", signal.SIGINT),
        ) from None
    except Exception:  # a trial's error that stops the search (a config error): trials.csv still lists it
        write_results(study, out, metric, space, cfg)
        raise
    finally:
        logging.getLogger("optuna.study._optimize").removeFilter(quiet)
        for logger in fusionkit_loggers:
            logger.removeFilter(once)
        os.close(lock)
    if not write_results(study, out, metric, space, cfg):
        raise ConfigError(_none_completed(study.trials[before:], out))
    best, tie = best_trial(study), tie_note(study, metric)
    if tie:
        log.warning("tune: %s", tie)
    return {"best_value": best.value, "best_params": best.params, "best_trial": best.number,
            "metric": metric, "trials": len(study.trials), "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
            "output_dir": str(out)}  # fmt: skip


class _QuietFailures(logging.Filter):
    """Optuna logs each failed trial with its traceback (and a second line, "failed with value None"); tune
    keeps one line per trial: the error is in trials.csv and the traceback in the run dir's error.txt. An
    interrupted trial is not logged as failed (with the trainer's "resume this run" advice): tune's own
    message (rerun tune) is the one that applies."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            return False
        record.exc_info = record.exc_text = None
        return "failed with value None" not in record.getMessage()


class _SaidOnce(logging.Filter):
    """Every trial reads the same data and builds the same tasks, so their warnings (a constant tag, a class
    missing from val, ...) would repeat once per trial: a warning already said in this search is not said again.
    A trial's own warnings (naming its run dir or values) differ, and errors always show."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[tuple[str, str]] = set()

    def install(self) -> list[logging.Logger]:
        """On every fusionkit logger (a filter is not inherited by child loggers); returns them for removal."""
        names = ["fusionkit", *(n for n in logging.Logger.manager.loggerDict if n.startswith("fusionkit."))]
        loggers = [logging.getLogger(n) for n in names]
        for logger in loggers:
            logger.addFilter(self)
        return loggers

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        # a trial's own paths (its run dir's skipped_rows.jsonl) in an otherwise equal message: the same warning
        args = record.args if isinstance(record.args, tuple) else ()
        key = (record.name, str(record.msg), *(str(a) for a in args if not _names_a_path(a)))
        if key in self.said:
            return False
        self.said.add(key)
        return True


def _names_a_path(value: Any) -> bool:
    return isinstance(value, Path) or (isinstance(value, str) and os.sep in value)


def _record_error(trial: Any, error: Exception) -> None:
    """A failed trial's error as its `error` attribute (trials.csv's error column), with the traceback in its
    run dir (error.txt) when the trainer made one (one that failed before its first checkpoint removed its files:
    the folder, in the tune dir, then holds error.txt only)."""
    trial.set_user_attr("error", f"{type(error).__name__}: {error}")
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "error.txt").write_text("".join(traceback.format_exception(error)))


def _none_completed(trials: Sequence[Any], out: Path) -> str:
    """Why a search that ran `trials` has no result: the first failure's error, where the others are."""
    failed = [t for t in trials if t.state.name == "FAIL"]
    first = failed[0] if failed else None
    why = f"; the first (trial {first.number}): {first.user_attrs.get('error', 'no value')}" if first else ""
    return (f"no tuning trial completed: {len(failed)} of {len(trials)} failed{why}. Each trial's error is in the "
            f"error column of {out / 'trials.csv'}; fix the config or search space and run again")  # fmt: skip


def _data_fingerprint(cfg: Any, data: Any) -> str:
    """The content of the rows every trial trains on (texts, labels, image bytes): an edited file at the same
    path must not add its trials to a study of the old data. `data` (a DataFrame, `datasets.Dataset`, ...) is
    read as `Trainer(data=...)` reads it."""
    from .data import load_dataset
    from .training.trainer import reader_kwargs

    source = cfg.data.dataset if data is None else data
    rows = load_dataset(source, **reader_kwargs(cfg.data, cfg.model.tasks, source=source))
    return str(rows.fingerprint)[:16]


def encoder_identity(cfg: Any) -> str:
    """`cfg`'s encoders as the frozen-encoder feature cache keys them (`encoder_key`: their config and a hash of
    their weights; random ones drawn from `run.seed`, as a run draws them): a study or a result of other weights
    saved in the same folder is not this config's, though the config reads the same."""
    from .training.feature_cache import encoder_key

    return encoder_key(_encoders_model(cfg))


def _encoders_model(cfg: Any) -> Any:
    """`cfg`'s model with a stand-in head: the heads play no part (and a task's classes may come from the data)."""
    import torch

    from .config import TaskConfig
    from .models import create_model

    model = copy.deepcopy(cfg.model)
    model.tasks = [TaskConfig("identity", num_classes=2)]
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(cfg.run.seed)
        return create_model(model)


def open_study(
    out: Path, cfg: Any, space: Mapping[str, Any], metric: str, data: str | None = None, encoders: str | None = None
) -> Any:
    """The tune dir's study (`study.jsonl`), created or continued; one of another config, space, data (`data`: its
    content fingerprint) or encoder weights (`encoders`: `encoder_identity`) is refused. The identity records the
    fusionkit version: encoder keys of another version are computed otherwise, so they are said to be that, not
    other weights."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from . import __version__
    from .tasks import create_task
    from .training.metrics import higher_is_better
    from .training.rundir import OPERATIONAL_KEYS, config_changes

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    identity = json.loads(json.dumps({"config": to_dict(cfg), "space": space, "metric": metric, "data": data,
                                      "encoders": encoders, "fusionkit_version": __version__}))  # fmt: skip
    journal = out / "study.jsonl"
    exists = journal.is_file() and journal.stat().st_size > 0
    if not exists and (out / "trials.csv").is_file():  # refused before the storage creates study.jsonl there
        raise ConfigError(f"{out} holds a trials.csv that is not this study's (no study.jsonl beside it: a file of "
                          "yours, or one an older fusionkit wrote), so it cannot be continued; pass "
                          "--output-dir NEW_DIR so it is not overwritten")  # fmt: skip

    def storage() -> JournalStorage:  # created only once the folder is known to be ours: it may write study.jsonl
        return JournalStorage(JournalFileBackend(str(journal)))

    if exists:  # loading only reads it
        try:
            study = optuna.load_study(study_name="fusionkit-tune", storage=storage())
        except Exception as e:  # Optuna's KeyError 'op_code' or "Record does not exist": not a journal of ours
            raise ConfigError(f"{journal} is not a fusionkit tune study ({type(e).__name__}: {e}), so it cannot be "
                              "continued; it is left as it is: pass --output-dir NEW_DIR") from None  # fmt: skip
    else:
        from .training.report import keep_previous

        for name in RESULT_FILES:  # a new study's results must not overwrite files that are not its own
            keep_previous(out / name)
        tasks = {t.name: create_task(t) for t in cfg.model.tasks}  # each metric's direction is its task's
        study = optuna.create_study(storage=storage(), study_name="fusionkit-tune",
                                    direction="maximize" if higher_is_better(metric, tasks) else "minimize")  # fmt: skip
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
        return study
    for key in ("data", "encoders"):  # a study of an older fusionkit, which did not record them
        if key not in saved:
            identity.pop(key)
    version = saved.get("fusionkit_version")  # none: 0.2 or older
    saved, identity = ({k: v for k, v in d.items() if k != "fusionkit_version"} for d in (saved, identity))
    changes = {k: v for k, v in config_changes(saved, identity).items()
               if k.removeprefix("config.") not in OPERATIONAL_KEYS}  # fmt: skip
    other_keys = "encoders" in changes and version != __version__  # keyed by another version's `encoder_key`
    if "data" in changes:
        changes["data"] = ("the rows its trials trained on", "other rows (the data file was edited)")
    who = f"fusionkit {version}" if version else "fusionkit 0.2 or older"
    if other_keys:
        changes["encoders"] = (f"keys of {who}", f"keys of fusionkit {__version__}, computed otherwise")
    elif "encoders" in changes:
        changes["encoders"] = ("the encoder weights its trials trained with",
                               "other weights (an encoder was saved again or replaced)")  # fmt: skip
    dead = not _held_by_another(out)  # its RUNNING trials were left by a killed tune: failed (as _hold_study says)
    failed = all(t.state == optuna.trial.TrialState.FAIL or (dead and t.state == optuna.trial.TrialState.RUNNING)
                 for t in study.trials)  # fmt: skip
    if changes and failed:  # nothing learned: the corrected command starts the study again, the old one kept aside
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = journal.with_name(f"study.failed-{stamp}.jsonl")
        journal.rename(kept)
        if (out / "trials.csv").is_file():  # its failed trials' errors, kept with it (not an older fusionkit's)
            (out / "trials.csv").rename(out / f"trials.failed-{stamp}.csv")
        log.warning("%s held only failed trials of another config; kept as %s, starting a new study", out, kept.name)
        return open_study(out, cfg, space, metric, data, encoders)
    if other_keys and list(changes) == ["encoders"]:  # nothing else differs: the version is the cause
        raise ConfigError(
            f"{out} holds a tuning study ({len(study.trials)} trials) written by {who}, which keyed encoder weights "
            f"otherwise than fusionkit {__version__}: whether its trials trained with these weights cannot be told, "
            "so it is not continued. Pass --output-dir NEW_DIR for a new study; this one's trials.csv and best.yaml "
            "stay readable where they are"
        )
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:5])
        raise ConfigError(
            f"{out} holds a tuning study ({len(study.trials)} trials) of another config, search space, data or encoder weights ({listed}); "
            "pass --output-dir NEW_DIR for a new study, or the same config and space to add trials to it"
        )
    log.info("continuing the study in %s: %d trials so far", out, len(study.trials))
    return study


WHERE = "another --output-dir"  # where a tuning table goes when its disk is full
STUDY_LOCK = ".tune.lock"  # held (shared) by each live tune process of the study in that folder


def _held_by_another(out: Path) -> bool:
    """Whether a live tune process holds `out`'s study lock (the kernel drops a killed one's)."""
    import fcntl

    if not (out / STUDY_LOCK).is_file():
        return False
    fd = os.open(out / STUDY_LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here


def _hold_study(out: Path, study: Any) -> int:
    """Hold `out`'s study lock while this process tunes (the kernel drops it when the process dies, kill -9
    included); when no other live tune holds it, no trial can still be running: the trials a dead process left
    RUNNING are marked failed, saying so. Returns the lock's fd, to close when done."""
    import fcntl

    import optuna

    fd = os.open(out / STUDY_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:  # another tune runs on this study: its RUNNING trials are running
        alone = False
    fcntl.flock(fd, fcntl.LOCK_SH)
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if alone else []
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, "error", "its tune process ended while it ran (killed?); "
                                           "marked failed when the study was opened again")  # fmt: skip
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if stale:
        log.warning("%s: %d trial(s) left running by a tune process that ended (killed?) marked failed: %s", out,
                    len(stale), [t.number for t in stale])  # fmt: skip
    return fd


def _rank(maximize: bool) -> Callable[[Mapping[str, Any]], tuple[float, float, int]]:
    """A trials.csv row's sort key, best first: by value, a tie (a metric saturated on a small val split) to the
    lower val/loss, as training's checkpoint choice does; then the earlier trial."""
    def key(r: Mapping[str, Any]) -> tuple[float, float, int]:
        loss = r.get("val_loss")
        return (-r["value"] if maximize else r["value"], math.inf if loss is None else loss, r["trial"])

    return key


def best_trial(study: Any) -> Any:
    """The best complete trial: Optuna's `best_trial`, except that a tie on the value goes to the lower val/loss."""
    key = _rank(study.direction.name == "MAXIMIZE")
    return min((t for t in study.trials if t.state.name == "COMPLETE"),
               key=lambda t: key({"trial": t.number, "value": t.value, "val_loss": t.user_attrs.get("val_loss")}))


def tie_note(study: Any, metric: str) -> str:
    """What a tie of complete trials on the best value means (a metric saturated on a small val split); "": none."""
    best = best_trial(study)
    tied = [t.number for t in study.trials if t.state.name == "COMPLETE" and t.value == best.value]
    if len(tied) < 2:
        return ""
    return (f"{len(tied)} trials ({', '.join(map(str, tied))}) tie on {metric} = {best.value:.4f}: the best is trial "
            f"{best.number}, of the lowest val/loss, as training picks its checkpoint; a larger val split would tell "
            "them apart")


def write_results(study: Any, out: Path, metric: str, space: Mapping[str, Any], cfg: Any) -> int:
    """trials.csv (every trial), trials.md (trials with a value, best first), history.png and best.yaml (the
    best complete trial's full config); returns how many trials completed (0: only trials.csv is written)."""
    import optuna
    import yaml

    keys = list(space)
    rows = []
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     "val_loss": t.user_attrs.get("val_loss"), "epochs": max(t.intermediate_values, default=None), "seconds": seconds,
                     **{k: t.params.get(k) for k in keys}, "run_dir": t.user_attrs.get("run_dir"),
                     "error": t.user_attrs.get("error")})  # fmt: skip
    if not rows:
        return 0
    def table(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    replace_file(out / "trials.csv", table, WHERE)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return 0
    done = sorted((r for r in rows if r["value"] is not None), key=_rank(study.direction.name == "MAXIMIZE"))
    lines = [f"| trial | state | {metric} | val/loss | epochs | seconds | " + " | ".join(keys) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(keys)]  # fmt: skip
    for r in done:  # a pruned trial shows its last reported value
        cells = " | ".join(_cell(r[k]) for k in keys)
        loss = "" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        lines.append(f"| {r['trial']} | {r['state'].lower()} | {r['value']:.4f} | {loss} | {r['epochs']} | "
                     f"{r['seconds'] or 0:.0f} | {cells} |")  # fmt: skip
    states = collections.Counter(r["state"].lower() for r in rows)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    tie = tie_note(study, metric)
    md = (f"# Tuning: {len(rows)} trials ({counts}); those with a value, best first (a tie: the lower val/loss)\n\n"
          + (f"{tie}\n\n" if tie else "") + "\n".join(lines) + "\n")  # fmt: skip
    replace_file(out / "trials.md", lambda path: path.write_text(md), WHERE)
    replace_file(out / "history.png",
                 lambda path: plot_history(rows, path, metric, study.direction.name == "MAXIMIZE"), WHERE)  # fmt: skip
    best = best_trial(study)
    best_cfg = apply_params(cfg, best.params, {"run.name": None})
    in_memory = str(cfg.data.dataset).startswith(IN_MEMORY)  # `fusionkit train best.yaml` refuses it, saying so
    text = (
        f"# fusionkit tune: best of {len(study.trials)} trials, {metric} = {best.value:.4f} (trial {best.number})\n"
        + ("# tuned on data passed in Python: fusionkit.train('best.yaml', data=<the same data>)\n" if in_memory else "")
        + yaml.safe_dump(to_dict(best_cfg), sort_keys=False)
    )
    replace_file(out / "best.yaml", lambda path: path.write_text(text), WHERE)
    return len(complete)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return json.dumps(v) if v is None or not isinstance(v, str) else v


def plot_history(rows: list[dict[str, Any]], path: Path, metric: str, maximize: bool) -> None:
    """Each trial's best value (pruned ones at their last report) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    done = [(r["trial"], r["value"]) for r in rows if r["state"] == "COMPLETE"]
    if done:
        xs, ys = zip(*done)
        ax.scatter(xs, ys, label="completed trial", zorder=3)
        best, running = [], -math.inf if maximize else math.inf
        for y in ys:
            running = max(running, y) if maximize else min(running, y)
            best.append(running)
        ax.step(xs, best, where="post", color="C1", label="best so far")
    pruned = [(r["trial"], r["value"]) for r in rows if r["state"] == "PRUNED" and r["value"] is not None]
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", color="0.5", label="pruned (last report)", zorder=2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are numbered: no 0.5
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("fusionkit tune: optimization history")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
