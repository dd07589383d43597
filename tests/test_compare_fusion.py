"""benchmarks/compare_fusion.py's judgement and command line, without training: its verdicts count a difference
only beyond the seed spread and the test set's sampling noise, it flags unequal budgets, refuses abbreviated
options, and an interrupted comparison ends with one line and exit status 130."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_fusion  # noqa: E402

from tests.encoder_folders import save_tiny_bert  # noqa: E402


def row(name: str, acc: float, std: float = 0.0, n: int | None = 18, seeds: int = 2, **more: Any) -> dict[str, Any]:
    return {"name": name, "seeds": seeds, "accuracy": acc, "accuracy_std": std, "weighted_f1": acc,
            "weighted_f1_std": std, "n_scored": n, "epochs": 10, "steps": 20, **more}  # fmt: skip


def test_a_tiny_gap_at_zero_seed_spread_on_18_rows_is_no_win() -> None:
    # the user's case: 12.96 vs 12.90, 2 seeds at std 0.00, 18 scored rows (one row = 5.6 points)
    text = compare_fusion.verdict({"gated": row("gated", 0.1296), "text_only": row("text_only", 0.1290)})
    assert not text.startswith("Fusion beats"), text
    assert "not a clear win" in text and "test-set noise" in text and "18 scored rows" in text


def test_a_large_real_gap_is_still_a_win() -> None:
    for n in (18, 500):
        text = compare_fusion.verdict({"gated": row("gated", 0.90, 0.01, n), "text_only": row("text_only", 0.50, 0.01, n)})
        assert text.startswith("Fusion beats"), text


def test_the_same_gap_is_a_win_on_500_scored_rows_and_not_on_100() -> None:
    # 3 points on 500 rows at p~0.7: the standard error of the difference is ~2.9 points, 3 > 2.9 (a win);
    # on 100 rows it is ~6.5 points (no win), whatever the seed spread
    rows = {"gated": row("gated", 0.715, 0.0, 500), "text_only": row("text_only", 0.685, 0.0, 500)}
    assert compare_fusion.verdict(rows).startswith("Fusion beats")
    rows = {k: {**v, "n_scored": 100} for k, v in rows.items()}
    assert "not a clear win" in compare_fusion.verdict(rows)


def test_unknown_scored_rows_claim_nothing() -> None:
    text = compare_fusion.verdict({"gated": row("gated", 0.9, n=None), "text_only": row("text_only", 0.5, n=None)})
    assert not text.startswith("Fusion beats"), text


def test_cross_attention_vs_pooled_counts_the_sampling_noise() -> None:
    small = {"cross_attention": row("cross_attention", 0.1296), "gated": row("gated", 0.1290)}
    assert "does not beat" not in compare_fusion.cross_vs_pooled(small)
    assert " beats " not in compare_fusion.cross_vs_pooled(small)
    assert "within the seed spread or test-set noise" in compare_fusion.cross_vs_pooled(small)
    large = {"cross_attention": row("cross_attention", 0.9, 0.01), "gated": row("gated", 0.5, 0.01)}
    assert "`cross_attention` beats" in compare_fusion.cross_vs_pooled(large)


def test_budget_lines_flag_unequal_epochs_and_steps() -> None:
    same = [row("gated", 0.5), row("text_only", 0.5)]
    assert compare_fusion.budget_lines(same, 10) == [
        "- trained: every run 10 epochs, 20 optimizer steps (each run's summary.json)"
    ]
    differ = [row("gated", 0.5, epochs="2..7", steps="4..14"), row("text_only", 0.5)]
    (line,) = compare_fusion.budget_lines(differ, 10)
    assert "UNEQUAL BUDGETS" in line and "`gated` 2..7 epochs / 4..14 steps" in line


def test_aggregate_records_epochs_steps_and_scored_rows() -> None:
    runs = [{**row("gated", 0.5), "epochs": e, "steps": 2 * e, "acc_complete": 0.5, "acc_no_text": 0.4,
             "acc_no_image": 0.3, "macro_f1": 0.5, "train_seconds": 1.0, "pairs_per_s": 9.0,
             "trainable_params": 7, "stopped_early": e < 10} for e in (10, 7)]  # fmt: skip
    agg = compare_fusion.aggregate("gated", runs)
    assert (agg["epochs"], agg["steps"], agg["stopped_early"], agg["n_scored"]) == ("7..10", "14..20", 1, 18)
    assert compare_fusion.aggregate("gated", runs[:1])["epochs"] == 10


def test_abbreviated_options_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        compare_fusion.main(["--seed", "1"])  # not silently --seeds 1
    assert e.value.code == 2
    assert "unrecognized arguments: --seed" in capsys.readouterr().err


def test_an_interrupted_comparison_says_to_rerun_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    def stopped(*args: Any, **kwargs: Any) -> int:
        raise KeyboardInterrupt("SIGINT: ... Continue with: fusionkit train --resume runs/gated-s0")

    monkeypatch.setattr(compare_fusion, "run_comparison", stopped)
    code = compare_fusion.main(["--dataset", "synthetic:60", "--seeds", "1", "--epochs", "1", "--threads", "1",
                                "--work-dir", str(tmp_path), "--strategies", "gated", "--no-multitask"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 130
    assert "run the same command again" in err and "fusionkit train --resume" not in err


def recorded_trainers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """(run name, optim.max_steps) of every Trainer the comparison builds, in order."""
    built: list[tuple[str, Any]] = []

    class Recording(compare_fusion.Trainer):
        def __init__(self, cfg: Any, *args: Any, **kwargs: Any) -> None:
            built.append((cfg.run.name, cfg.optim.max_steps))
            super().__init__(cfg, *args, **kwargs)

    monkeypatch.setattr(compare_fusion, "Trainer", Recording)
    return built


def small_comparison(work: Path, *more: str) -> list[str]:
    return ["--seeds", "1", "--epochs", "1", "--threads", "1", "--strategies", "gated", "--no-multitask",
            "--work-dir", str(work), *more]  # fmt: skip


def test_an_untimed_warm_up_runs_before_the_first_timed_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """The first run of an invocation carried the process's start-up (3.6 s vs 0.7 s for the next seed): a
    one-step run trains first, untimed and removed after, and the report says how times are measured."""
    built = recorded_trainers(monkeypatch)
    argv = small_comparison(tmp_path, "--dataset", "synthetic:60")
    assert compare_fusion.main(argv) == 0
    assert built == [("warm-up", 1), ("gated-s0", None)]
    assert not list(tmp_path.rglob("warm-up*"))  # its run dir is gone
    report = (tmp_path / "full" / "compare_fusion-sentiment.md").read_text()
    assert "after one untimed warm-up run" in report and "Train time (s): wall-clock seconds" in report
    built.clear()
    assert compare_fusion.main(argv) == 0 and built == []  # every run read back: nothing to warm up


def test_results_of_other_encoder_weights_in_the_same_folder_are_not_read_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A config names its encoder by folder: weights saved there again are a new comparison, as the feature
    cache (keyed on the weights) already knew; the same weights are read back from results.jsonl."""
    save_tiny_bert(tmp_path / "bert", seed=0)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {{dataset: 'synthetic:60'}}\nmodel: {{freeze: encoders, text: {{name: '{tmp_path / 'bert'}', "
                      "max_length: 32}}\n")  # fmt: skip
    built = recorded_trainers(monkeypatch)
    argv = small_comparison(tmp_path / "work", "--config", str(config))
    assert compare_fusion.main(argv) == 0 and ("gated-s0", None) in built
    built.clear()
    assert compare_fusion.main(argv) == 0 and built == []
    assert "read back from results.jsonl" in capsys.readouterr().out
    save_tiny_bert(tmp_path / "bert", seed=1)  # the same folder, other weights
    assert compare_fusion.main(argv) == 0 and ("gated-s0", None) in built
    assert "read back from results.jsonl" not in capsys.readouterr().out


def test_a_plugins_one_sided_strategy_is_a_unimodal_baseline_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    """What a model reads follows its strategy's flags, not the built-in names: a plugin's caption-only strategy
    refuses pairs without a caption (as text_only does), is warned about for settings it cannot use, and is
    judged as a baseline by compare_fusion, not as the fused strategy that beats them. An itm task with a strategy
    that never joins caption and image (late, a baseline) is said to be unlearnable."""
    import torch

    import fusionkit
    from fusionkit.models import create_model
    from fusionkit.models.fusion import FusionStrategy, masked_mean
    from fusionkit.training.config import build_config, unused_settings

    @fusionkit.register_fusion("fk_caption_only")
    class CaptionOnly(FusionStrategy):
        uses_image = False

        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            self.proj = torch.nn.Linear(cfg.dim, cfg.dim)

        def forward(self, text, text_mask, image, image_mask=None):  # type: ignore[no-untyped-def]
            return self.proj(masked_mean(text, text_mask)).unsqueeze(1)

    model = create_model("tiny", fusion={"strategy": "fk_caption_only"})
    assert model.sides_read == ("caption",)
    with pytest.raises(ValueError, match="no caption, the only input of this fk_caption_only model"):
        model.predict(texts=[None], images=[Image.new("RGB", (32, 32))])
    cfg = build_config(None, {"model.fusion.strategy": "fk_caption_only", "model.fusion.modality_dropout": 0.3})
    assert any("modality_dropout=0.3 has no effect on the fk_caption_only" in m for m in unused_settings(cfg))
    rows = {"fk_caption_only": row("fk_caption_only", 0.9, 0.01, 400), "gated": row("gated", 0.6, 0.01, 400),
            "image_only": row("image_only", 0.5, 0.01, 400)}  # fmt: skip
    text = compare_fusion.verdict(rows)
    assert text.startswith("Fusion does NOT beat") and "`fk_caption_only`" in text and "fused strategy `gated`" in text
    itm = [{"name": "sentiment"}, {"name": "match", "type": "itm"}]
    for strategy, unlearnable in (("late", True), ("text_only", True), ("concat", False), ("cross_attention", False)):
        said = unused_settings(build_config(None, {"model.fusion.strategy": strategy, "model.tasks": itm}))
        assert any("task 'match' (itm) cannot be learned" in m for m in said) == unlearnable, strategy


def test_vectors_of_a_side_a_baseline_never_trained_are_warned_about_itm_or_not(caplog: pytest.LogCaptureFixture) -> None:
    """text_only trains no image projection: its encode_image vectors are random weights' (said once); a model
    whose label-free task reads images (contrastive) trains it, and is not warned about."""
    import torch

    from fusionkit.models import create_model

    pixels = torch.zeros(2, 3, 32, 32)
    baseline = create_model("tiny", fusion={"strategy": "text_only"})
    with caplog.at_level("WARNING", logger="fusionkit"):
        baseline.encode_image(pixels)
        baseline.encode_image(pixels)
    assert caplog.text.count("encode_image: this text_only model reads no image") == 1
    matched = create_model("tiny", fusion={"strategy": "text_only"},  # itm reads pairs through the fusion
                           tasks=[{"name": "sentiment", "class_names": ["a", "b"]}, {"name": "m", "type": "itm"}])  # fmt: skip
    with caplog.at_level("WARNING", logger="fusionkit"):
        matched.encode_image(pixels)
    assert caplog.text.count("encode_image: this text_only model reads no image") == 2
    caplog.clear()
    aligned = create_model("tiny", fusion={"strategy": "text_only"},
                           tasks=[{"name": "sentiment", "class_names": ["a", "b"]},
                                  {"name": "align", "type": "contrastive"}])  # fmt: skip
    with caplog.at_level("WARNING", logger="fusionkit"):
        aligned.encode_image(pixels)
        create_model("tiny", fusion={"strategy": "concat"}).encode_image(pixels)
    assert "reads no image" not in caplog.text
