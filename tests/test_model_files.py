"""A model's files belong together: weights are tied to the config they were saved with, damaged bytes are
found, a run's checkpoint predicts the run's classes, and a run dir on two disks still loads."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import fusionkit
from fusionkit import FusionModel, FusionProcessor
from fusionkit.training import train
from tests.test_train import tiny_config


def _tiny(classes: list[str], seed: int = 0) -> FusionModel:
    torch.manual_seed(seed)
    return fusionkit.create_model("tiny", tasks=[{"name": "mood", "class_names": classes}]).eval()


def _flip_a_byte(path: Path) -> None:
    """One byte in the middle of the tensor data (after the JSON header), as a bad disk or copy does."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[(start + len(data)) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _strip_new_metadata(path: Path) -> None:
    """The file as a fusionkit before these checks wrote it: no task list, no digest in its header."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in ("fusionkit_tasks", "fusionkit_sha256")}
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_weights_and_config_of_two_models_are_not_mixed(tmp_path: Path) -> None:
    ours, theirs = _tiny(["gloom", "joy", "meh"]), _tiny(["happy", "neutral", "sad"], seed=1)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for copied in ("model.safetensors", "config.json"):  # either file of the other model copied in
        mixed = shutil.copytree(tmp_path / "ours", tmp_path / f"mixed-{copied}")
        shutil.copy(tmp_path / "theirs" / copied, mixed / copied)
        with pytest.raises(ValueError, match="are not from the same model") as e:
            FusionModel.from_pretrained(mixed)
        assert str(mixed / "model.safetensors") in str(e.value) and str(mixed / "config.json") in str(e.value)
        assert "['gloom', 'joy', 'meh']" in str(e.value) and "['happy', 'neutral', 'sad']" in str(e.value)
    damaged = shutil.copytree(tmp_path / "ours", tmp_path / "damaged")
    _flip_a_byte(damaged / "model.safetensors")
    with pytest.raises(ValueError, match=r"damaged/model.safetensors is damaged: its tensors are not the ones"):
        FusionModel.from_pretrained(damaged)
    # the pair saved together loads, to the same outputs
    loaded = FusionModel.from_pretrained(tmp_path / "ours")
    assert loaded.predict(texts=["a sunny day"]) == ours.predict(texts=["a sunny day"])
    # weights written before the checks (no task list, no digest) load as they did
    old = tmp_path / "mixed-config.json"
    _strip_new_metadata(old / "model.safetensors")
    assert FusionModel.from_pretrained(old).class_names["mood"] == ["happy", "neutral", "sad"]


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run on frozen encoders: its checkpoints share one frozen_encoders.safetensors."""
    root = tmp_path_factory.mktemp("frozen")
    train(tiny_config(root, "frz", **{"model.freeze": "encoders", "data.dataset": "synthetic:40", "optim.epochs": 1}))
    return root / "runs" / "frz"


def test_a_frozen_encoder_run_with_its_checkpoints_on_another_disk_loads(frozen_run: Path, tmp_path: Path) -> None:
    """checkpoints/ linked to another disk: the shared file is found beside the run (`..` taken on the path
    as the user gave it, not after following the link), and a damaged shared file is refused."""
    run = shutil.copytree(frozen_run, tmp_path / "run")
    assert (run / "frozen_encoders.safetensors").is_file()
    reference = FusionModel.from_pretrained(run).state_dict()
    shutil.move(run / "checkpoints", tmp_path / "bigdisk")
    (run / "checkpoints").symlink_to(tmp_path / "bigdisk", target_is_directory=True)
    loaded = FusionModel.from_pretrained(run).state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)
    _flip_a_byte(run / "frozen_encoders.safetensors")
    with pytest.raises(ValueError, match=r"run/frozen_encoders.safetensors is damaged"):
        FusionModel.from_pretrained(run)


def test_a_run_refuses_a_checkpoint_of_another_runs_classes(frozen_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(frozen_run, tmp_path / "run")
    best = run / (run / "best").read_text().strip()
    # another run's classes, or the same classes in another order (its outputs would be read under this run's names)
    for other in (["happy", "neutral", "sad"], ["negative", "neutral", "positive"]):
        _tiny(other).save_pretrained(tmp_path / "other")
        for name in ("config.json", "model.safetensors"):  # the other run's checkpoint copied over this run's best
            shutil.copy(tmp_path / "other" / name, best / name)
        with pytest.raises(ValueError, match="does not predict the classes") as e:
            FusionModel.from_pretrained(run)
        assert "['positive', 'neutral', 'negative'] in the run's data" in str(e.value)
        assert "data_fingerprint.json" in str(e.value)
        assert FusionModel.from_pretrained(best).class_names == {"mood": other}  # asked for by name


def test_the_processor_pads_on_the_right_whatever_the_tokenizers_side(caplog: pytest.LogCaptureFixture) -> None:
    """Training's collator pads on the right; a left-padding tokenizer must not make a caption's prediction
    depend on the longer captions beside it."""
    model = _tiny(["neg", "pos"])
    model.tokenizer.padding_side = "left"
    mask = FusionProcessor.from_model(model)(texts=["ok", "what a lovely sunny day at the beach"])["attention_mask"]
    assert mask[0].tolist()[:2] == [1, 1] and mask[0, -1] == 0
    with caplog.at_level(logging.ERROR):  # the one-sided pairs are not the point here
        alone = model.predict(texts=["ok"])[0]
        beside = model.predict(texts=["ok", "what a lovely sunny day at the beach"])[0]
    assert alone == beside


def test_predict_refuses_a_dict_or_a_dataset_before_any_warning(caplog: pytest.LogCaptureFixture) -> None:
    datasets = pytest.importorskip("datasets")
    model = _tiny(["neg", "pos"])
    ds = datasets.Dataset.from_dict({"caption": ["a sunny day", "rain"], "mood": ["pos", "neg"]})
    for given in (ds, datasets.DatasetDict({"train": ds, "test": ds}), {"caption": ["a sunny day"]}):
        with caplog.at_level(logging.WARNING, logger="fusionkit"):
            with pytest.raises(TypeError, match=r"predict\(\) takes lists, not a .*texts=list\(ds\['caption'\]\)"):
                model.predict(texts=given)
        assert "have no image" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        with pytest.raises(TypeError, match=r"texts\[0\] is a dict"):
            model.predict(texts=list(ds))  # its rows: each a dict
    assert "have no image" not in caplog.text
