import json
import logging
import pickle

import pytest
import torch

from fusionkit.config import ConfigError
from fusionkit.models import FusionModel, create_model
from fusionkit.models.tiny import tiny_bert_config, tiny_tokenizer

from .test_models import TASKS, tiny_batch


@pytest.mark.parametrize("strategy", ["cross_attention", "late"])
def test_round_trip_is_exact(tmp_path, strategy):
    model = create_model(
        "tiny", fusion={"strategy": strategy}, tasks=TASKS[:1] + TASKS[3:4], loss_weighting="uncertainty"
    ).eval()
    with torch.no_grad():
        model.criterion.log_vars.add_(0.3)
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "text_encoder",
    }
    loaded = FusionModel.from_pretrained(tmp_path / "m")
    assert not loaded.training  # ready to use, as transformers' from_pretrained: dropout off
    assert loaded.config == model.config
    assert loaded.image_preprocess == model.image_preprocess
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    batch = tiny_batch(model)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(**batch)
        torch.manual_seed(1)
        b = loaded(**batch)
    for task in a:
        assert torch.equal(a[task], b[task])
    # the tokenizer travels with the model
    assert loaded.tokenizer("a lovely day")["input_ids"] == model.tokenizer("a lovely day")["input_ids"]


def test_a_bf16_saved_model_reloads_as_float32_unless_dtype_says_otherwise(tmp_path, caplog):
    """As transformers: `dtype="auto"` keeps the saved dtype and a torch dtype casts; the default stays float32
    (bf16 is ~500x slower on CPUs without AMX) and says so, instead of silently changing the weights' type."""
    model = create_model("tiny", tasks=TASKS[:1]).eval().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="fusionkit"):
        default = FusionModel.from_pretrained(tmp_path / "m")
    assert {p.dtype for p in default.parameters()} == {torch.float32} and "dtype='auto'" in caplog.text
    kept = FusionModel.from_pretrained(tmp_path / "m", dtype="auto")
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), kept.state_dict().values()))
    assert {p.dtype for p in FusionModel.from_pretrained(tmp_path / "m", dtype=torch.float16).parameters()} == {
        torch.float16}
    assert {p.dtype for p in FusionModel.from_pretrained(tmp_path / "m", dtype="bfloat16").parameters()} == {
        torch.bfloat16}  # a name, as transformers takes it
    with pytest.raises(TypeError, match="dtype must be"):
        FusionModel.from_pretrained(tmp_path / "m", dtype="bf61")  # the CLI's "bf16" is taken (test_deploy)


@pytest.mark.parametrize("freeze", ["none", "top_k"])
def test_the_saved_config_is_checked_before_loading_whatever_the_freeze(tmp_path, freeze):
    """from_pretrained builds the saved config on the meta device to compare shapes first; the encoders' own
    build checks (a test forward) must not run there, or that comparison is skipped with a warning."""
    import warnings

    create_model("tiny", tasks=TASKS[:1], freeze=freeze, trainable_layers=1).save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusionModel.from_pretrained(tmp_path / "m")


def _save_tiny_hf_encoders(root):
    """What a user gets from the hub, made offline: tiny random BERT and ViT saved with save_pretrained."""
    from transformers import BertModel, ViTConfig, ViTImageProcessor, ViTModel

    BertModel(tiny_bert_config()).save_pretrained(root / "bert")
    tiny_tokenizer().save_pretrained(root / "bert")
    vit_cfg = ViTConfig(
        image_size=48,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(vit_cfg).save_pretrained(root / "vit")
    ViTImageProcessor(
        size={"height": 48, "width": 48}, image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7]
    ).save_pretrained(root / "vit")


def test_loads_hf_encoders_from_a_local_directory(tmp_path):
    _save_tiny_hf_encoders(tmp_path)
    from transformers import BertModel

    reference = BertModel.from_pretrained(tmp_path / "bert")
    model = create_model(
        "tiny",
        text={"name": str(tmp_path / "bert"), "pretrained": True},
        image={"backend": "hf", "name": str(tmp_path / "vit"), "pretrained": True},
    )
    # pretrained weights really were loaded, and preprocessing comes from the processor config
    torch.testing.assert_close(
        model.text_encoder.model.embeddings.word_embeddings.weight,
        reference.embeddings.word_embeddings.weight,
    )
    pre = model.image_preprocess
    assert pre.size == (48, 48) and pre.mean == (0.1, 0.2, 0.3) and pre.std == (0.9, 0.8, 0.7)
    assert model.image_encoder.width == 32
    batch = tiny_batch(model)
    out = model(**batch)
    assert out["sentiment"].shape == (3, 3)
    # and the whole model survives a round trip without the original folders
    model.eval().save_pretrained(tmp_path / "fused")
    for sub in ("bert", "vit"):
        for f in (tmp_path / sub).iterdir():
            f.unlink()
    loaded = FusionModel.from_pretrained(tmp_path / "fused").eval()
    assert loaded.image_preprocess == pre
    with torch.no_grad():
        torch.testing.assert_close(model.encode(**batch), loaded.encode(**batch), rtol=0, atol=0)


def test_timm_encoder_from_a_local_checkpoint_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    from fusionkit.models.tiny import TINY_VIT_BASE, TINY_VIT_KWARGS

    source = timm.create_model(TINY_VIT_BASE, pretrained=False, num_classes=0, **TINY_VIT_KWARGS)
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    model = create_model(
        "tiny",
        image={
            "name": TINY_VIT_BASE,
            "pretrained": True,
            "checkpoint_path": str(tmp_path / "vit.safetensors"),
            "model_kwargs": TINY_VIT_KWARGS,
        },
    )
    torch.testing.assert_close(
        model.image_encoder.model.patch_embed.proj.weight, source.patch_embed.proj.weight
    )
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        create_model(
            "tiny",
            image={
                "name": TINY_VIT_BASE,
                "checkpoint_path": str(tmp_path / "nope.pth"),
                "model_kwargs": TINY_VIT_KWARGS,
            },
        )


def test_checkpoint_from_another_config_is_refused(tmp_path):
    create_model("tiny", fusion={"dim": 32}).save_pretrained(tmp_path / "a")
    model = create_model("tiny")
    with pytest.raises(ValueError, match="does not match this model's config.*shape mismatches"):
        model.load_weights(tmp_path / "a" / "model.safetensors")
    create_model("tiny", fusion={"strategy": "gated"}).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="missing keys"):
        model.load_weights(tmp_path / "b" / "model.safetensors")


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    model = create_model("tiny")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        FusionModel.from_pretrained(tmp_path / "m")
    # a pickle that would run code is never unpickled: safetensors refuses it as a format error
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        FusionModel.from_pretrained(tmp_path / "m")
    assert not marker.exists()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model": {"fusion": {"depht": 1}}}))
    with pytest.raises(ConfigError, match="depht"):
        FusionModel.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="holds no fusionkit model"):
        FusionModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FusionModel.from_pretrained(tmp_path / "missing")


def test_a_checkpoint_without_the_missing_modality_placeholders_still_loads(tmp_path):
    """fusionkit 0.1 checkpoints predate the placeholders: they load, with a warning, and predict the same."""
    import warnings

    from safetensors.torch import load_file, save_file

    import fusionkit

    model = fusionkit.create_model("tiny")
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["text_placeholder"], state["image_placeholder"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fusionkit.FusionModel.from_pretrained(tmp_path)
    assert any("predates missing-modality" in str(w.message) for w in caught)
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    state["fusion.extra"] = torch.zeros(1)  # anything else missing or extra is still refused
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not in the model: fusion.extra"):
        fusionkit.FusionModel.from_pretrained(tmp_path)


def test_checkpoints_of_frozen_encoders_share_one_weights_file(tmp_path):
    """A run with frozen encoders writes their weights once; each checkpoint holds the trainable rest."""
    import shutil

    import fusionkit

    model = fusionkit.create_model("tiny", freeze="encoders")
    shared = tmp_path / "run" / "frozen_encoders.safetensors"
    a = model.save_pretrained(tmp_path / "run" / "a", frozen_weights=shared)
    with torch.no_grad():
        model.heads["sentiment"].views[0][-1].bias.add_(1.0)  # training moves only the trainable part
    b = model.save_pretrained(tmp_path / "run" / "b", frozen_weights=shared)
    frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen > 0 and shared.is_file()
    assert (b / "model.safetensors").stat().st_size < shared.stat().st_size  # the big part is stored once
    loaded = fusionkit.FusionModel.from_pretrained(b)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not torch.equal(fusionkit.FusionModel.from_pretrained(a).heads["sentiment"].views[0][-1].bias,
                           loaded.heads["sentiment"].views[0][-1].bias)  # fmt: skip
    shutil.copytree(b, tmp_path / "alone")  # one checkpoint without its run: a clear error, not random weights
    with pytest.raises(FileNotFoundError, match="frozen encoder weights.*whole run directory"):
        fusionkit.FusionModel.from_pretrained(tmp_path / "alone")


def test_read_config_reads_the_saved_schema_without_the_weights(tmp_path):
    model = create_model("tiny", tasks=TASKS)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"junk")  # never read: an ensemble check runs before any model
    config = FusionModel.read_config(tmp_path / "m")
    assert [t.name for t in config.tasks] == [t.name for t in model.config.tasks]
    assert config.fusion.strategy == model.config.fusion.strategy
    with pytest.raises(ValueError):
        FusionModel.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        FusionModel.read_config(tmp_path / "nothing")


def test_an_incomplete_encoder_folder_is_named_before_anything_loads(tmp_path, caplog, monkeypatch):
    """transformers builds a 5-token tokenizer from a folder without one, and reads a missing folder as a hub id."""
    import shutil

    _save_tiny_hf_encoders(tmp_path)
    no_tok = tmp_path / "bert_no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "bert" / f, no_tok / f)
    with pytest.raises(ConfigError, match="bert_no_tokenizer has no tokenizer"):
        create_model("tiny", text={"name": str(no_tok), "pretrained": True})
    (tmp_path / "bert" / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="bert has no config.json"):
        create_model("tiny", text={"name": str(tmp_path / "bert"), "pretrained": True})
    with pytest.raises(ConfigError, match="encoder folder .*gone does not exist"):
        create_model("tiny", image={"backend": "hf", "name": str(tmp_path / "gone")})
    monkeypatch.chdir(tmp_path)  # relative: "vit/gone" is in a local folder, so not a hub id (which would wait on the network)
    with pytest.raises(ConfigError, match="encoder folder vit/gone does not exist"):
        create_model("tiny", image={"backend": "hf", "name": "vit/gone"})
    with pytest.raises(ConfigError, match="holds a bert text model"):  # a text model's folder as the image encoder
        create_model("tiny", image={"backend": "hf", "name": str(no_tok)})
    (tmp_path / "vit" / "preprocessor_config.json").unlink()  # loads, but says what it assumes
    with caplog.at_level("WARNING", logger="fusionkit"):
        model = create_model("tiny", image={"backend": "hf", "name": str(tmp_path / "vit"), "pretrained": True})
    assert "has no image processor config" in caplog.text and model.image_preprocess.mean == (0.5, 0.5, 0.5)


def test_saved_models_and_checkpoints_follow_the_umask(tmp_path) -> None:
    """safetensors writes 0600 and mkdtemp makes 0700: a run in a shared folder must stay readable by others."""
    import os
    import stat

    from fusionkit.cli import main
    from fusionkit.models import create_model

    old = os.umask(0o022)
    try:
        create_model("tiny").save_pretrained(tmp_path / "m")
        assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644
        assert main(["train", "--data.dataset", "synthetic:48", "--optim.max_steps", "2", "--run.output_dir",
                     str(tmp_path / "runs"), "--run.name", "r", "--data.cache_dir", str(tmp_path / "cache"),
                     "--run.progress", "false", "--run.plots", "false"]) == 0  # fmt: skip
        step = next((tmp_path / "runs" / "r" / "checkpoints").glob("step-*"))
        assert stat.S_IMODE(step.stat().st_mode) == 0o755
        assert stat.S_IMODE((step / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_a_damaged_encoder_folder_is_named_not_a_transformers_traceback(tmp_path, caplog):
    """A corrupt weights file, a config that does not fit its weights, a tokenizer larger than the vocabulary,
    and weights missing from the file (transformers leaves them random) are each said, naming the folder."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    _save_tiny_hf_encoders(tmp_path)
    text = {"pretrained": True}
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tmp_path / "bert", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match=r"model.text.name .*corrupt: transformers could not load this folder"):
        create_model("tiny", text={**text, "name": str(corrupt)})
    small = tmp_path / "small_vocab"
    shutil.copytree(tmp_path / "bert", small)
    config = json.loads((small / "config.json").read_text())
    weights = load_file(small / "model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key] = weights[key][:20].clone()
    save_file(weights, small / "model.safetensors")
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 20}))
    with pytest.raises(ConfigError, match=r"its tokenizer has \d+ tokens but the model's vocabulary 20"):
        create_model("tiny", text={**text, "name": str(small)})
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "bert", partial)
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, partial / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="fusionkit"):
        create_model("tiny", text={**text, "name": str(partial)})
    assert "weights are not in the folder and start random" in caplog.text


def test_a_saved_model_missing_a_part_or_with_a_broken_config_names_the_file(tmp_path):
    import shutil

    create_model("tiny").save_pretrained(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "no_text")
    shutil.rmtree(tmp_path / "no_text" / "text_encoder")
    with pytest.raises(FileNotFoundError, match="no_text has no text_encoder/ folder"):
        FusionModel.from_pretrained(tmp_path / "no_text")
    (tmp_path / "m" / "config.json").write_text("{'model': oops")
    with pytest.raises(ConfigError, match=r"m/config.json is not valid JSON"):
        FusionModel.from_pretrained(tmp_path / "m")


def test_a_checkpoint_beside_another_runs_frozen_encoders_is_refused(tmp_path):
    """The shared frozen-encoder file is named by a relative path: a checkpoint copied into another run
    dir (or another run's file copied beside it) would load that run's encoders; an id in both refuses it."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import fusionkit

    runs = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = fusionkit.create_model("tiny", freeze="encoders")
        runs[seed] = model.save_pretrained(tmp_path / f"run{seed}" / "ckpt", frozen_weights=tmp_path / f"run{seed}" / "frozen.safetensors")  # fmt: skip
    shutil.copytree(runs[1], tmp_path / "run2" / "copied")  # run 1's checkpoint in run 2's dir
    with pytest.raises(ValueError, match=r"frozen encoder weights of another run: .*run2/frozen.safetensors"):
        fusionkit.FusionModel.from_pretrained(tmp_path / "run2" / "copied")
    shutil.copy(tmp_path / "run2" / "frozen.safetensors", tmp_path / "run1" / "frozen.safetensors")
    with pytest.raises(ValueError, match="copy the checkpoint together with its own run's file"):
        fusionkit.FusionModel.from_pretrained(runs[1])
    # saved before ids were written (neither file has one): still loads
    for path in (runs[2] / "model.safetensors", tmp_path / "run2" / "frozen.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            meta = {k: v for k, v in (f.metadata() or {}).items() if k != "fusionkit_frozen_id"}
        save_file(load_file(str(path)), str(path), metadata=meta)
    fusionkit.FusionModel.from_pretrained(runs[2])
