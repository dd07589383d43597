"""A caption gets the same token ids on every path (reader + cache in training, the processor in predict/embed),
and a tokenizer that cannot batch captions is refused before any work. Tokenizers are built offline."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionkit import FusionProcessor, MultimodalDataset
from fusionkit.config import ConfigError, ImagePreprocess
from fusionkit.data import MAX_TEXT_CHARS, Collator, Example, build_cache, load_dataset

PREPROCESS = ImagePreprocess(size=(16, 16))
WORDS = "a sunny day at the beach leading and trailing spaces b".split()


def _bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (RoBERTa/GPT-2 style: a leading space is part of a token)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 3, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", mask_token="<mask>")  # fmt: skip


def _csv(folder: Path, captions: list[str]) -> Path:
    """A table of `captions`, each with a small image."""
    rows = []
    for i, caption in enumerate(captions):
        Image.fromarray(np.full((16, 16, 3), 40 * i % 255, np.uint8)).save(folder / f"{i}.png")
        rows.append({"id": f"r{i}", "text": caption, "image": f"{i}.png", "mood": "pos"})
    with (folder / "data.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "data.csv"


def _cached_ids(ds: MultimodalDataset, tokenizer, folder: Path) -> list[list[int]]:
    data = build_cache(ds, tokenizer, PREPROCESS, folder, max_length=32, num_proc=1, progress=False)
    return [data[i]["input_ids"].tolist() for i in range(len(data))]


def _processor_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    out = FusionProcessor(tokenizer, PREPROCESS, max_length=32).tokenize(captions)
    return [ids[mask.bool()].tolist() for ids, mask in zip(out["input_ids"], out["attention_mask"], strict=True)]


def test_a_padded_caption_has_the_same_token_ids_in_training_and_in_the_processor(tmp_path: Path) -> None:
    tokenizer = _bpe_tokenizer()
    captions = ["   leading and trailing   ", "\ta sunny day\n", "the beach"]
    assert tokenizer(captions[0])["input_ids"] != tokenizer(captions[0].strip())["input_ids"]  # spaces are tokens
    read = load_dataset(_csv(tmp_path, captions))
    expected = _cached_ids(read, tokenizer, tmp_path / "cache")
    assert _processor_ids(tokenizer, captions) == expected  # predict, embed, AutoProcessor, the export
    # a dataset built in Python (not read) trains on the same ids too
    built = MultimodalDataset([Example(f"r{i}", c, None, {}) for i, c in enumerate(captions)], {}, name="built")
    assert _cached_ids(built, tokenizer, tmp_path / "cache") == expected


def test_a_huge_caption_keeps_the_same_tokens_with_left_truncation(tmp_path: Path, caplog) -> None:
    tokenizer = _bpe_tokenizer()
    tokenizer.truncation_side = "left"  # keeps a caption's end
    huge = "a " * (MAX_TEXT_CHARS // 2) + "b " * 5000  # past the cap: its end reads "b b b", its first 20,000 "a a"
    with caplog.at_level(logging.WARNING, logger="fusionkit.data"):
        read = load_dataset(_csv(tmp_path, [huge, "the beach"]))
    assert "1 captions longer than 20,000 characters were cut" in caplog.text
    assert _processor_ids(tokenizer, [huge]) == _cached_ids(read, tokenizer, tmp_path / "cache")[:1]


def _no_pad_encoder(folder: Path) -> Path:
    """A text encoder folder whose tokenizer has no pad token (GPT-2 style), as a user saves one."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer().backend_tokenizer, unk_token="<unk>")
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64)).save_pretrained(folder)  # fmt: skip
    return folder


def test_a_tokenizer_without_a_pad_token_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    import fusionkit

    encoder = _no_pad_encoder(tmp_path / "enc")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf'no pad token.*add "pad_token": .* to {encoder}/tokenizer_config\.json'):
        fusionkit.train(overrides={
            "data.dataset": "synthetic:24", "data.cache_dir": "cache", "run.output_dir": "runs",
            "run.progress": False, "run.plots": False, "optim.epochs": 1, "model.text.name": str(encoder),
            "model.text.max_length": 32})  # fmt: skip
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no cache built
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run dir left


def test_the_collator_refuses_a_missing_pad_token_id() -> None:
    with pytest.raises(ValueError, match="pad_token_id=None"):
        Collator(None)  # type: ignore[arg-type]


def test_the_cache_build_says_captions_of_unknown_tokens_and_captions_cut_at_max_length(tmp_path: Path, caplog) -> None:
    from fusionkit.models.tiny import tiny_tokenizer  # an English WordPiece vocabulary

    exact = " ".join(["sunny"] * 30)  # 30 words + [CLS] + [SEP]: exactly max_length=32 tokens, nothing cut
    captions = ["東京の夜景", "😀🎉", "a sunny day", " ".join(["sunny"] * 40), exact]
    ds = MultimodalDataset([Example(f"r{i}", c, None, {}) for i, c in enumerate(captions)], {}, name="mixed")
    with caplog.at_level(logging.INFO, logger="fusionkit.data"):
        _cached_ids(ds, tiny_tokenizer(), tmp_path / "cache")
    assert "are the unknown token [UNK], and 2 of 5 captions are nothing else" in caplog.text
    assert "1 of 5 captions (20%) are longer than model.text.max_length=32 tokens" in caplog.text
    # one emoji-only caption among many: a line, not a warning
    many = [Example(f"r{i}", f"a sunny day {i}", None, {}) for i in range(200)] + [Example("e", "😀", None, {})]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fusionkit.data"):
        _cached_ids(MultimodalDataset(many, {}, name="tweets"), tiny_tokenizer(), tmp_path / "cache2")
    said = [r for r in caplog.records if "unknown token" in r.getMessage()]
    assert [r.levelname for r in said] == ["INFO"] and "1 of 201 captions are nothing else" in said[0].getMessage()


def test_saved_tokenizer_files_truncate_at_the_models_max_length(tmp_path: Path) -> None:
    """A model's tokenizer.json (checkpoint, save_pretrained, export) cuts where the model does, for serving with the
    `tokenizers` library alone: counting the cut captions at cache build left max_length + 1 in it."""
    import json

    from fusionkit.cli import main

    argv = ["train", "--data.dataset", "synthetic:40", "--model.text.max_length", "8", "--optim.max_steps", "1",
            "--run.output_dir", str(tmp_path / "runs"), "--run.name", "r", "--data.cache_dir", str(tmp_path / "c"),
            "--run.progress", "false", "--run.plots", "false"]  # fmt: skip
    assert main(argv) == 0  # synthetic captions are longer than 8 tokens: the cache build counts the cut ones
    run = tmp_path / "runs" / "r"
    from fusionkit import FusionModel

    FusionModel.from_pretrained(run).save_pretrained(tmp_path / "saved")
    files = [*run.glob("checkpoints/*/text_encoder/tokenizer.json"), tmp_path / "saved" / "tokenizer.json"]
    assert len(files) >= 2
    for path in files:
        assert json.loads(path.read_text())["truncation"]["max_length"] == 8, path
