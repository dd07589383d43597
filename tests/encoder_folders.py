"""Encoder folders as a user saves them (tiny, random, offline), for tests that re-save their weights."""

from __future__ import annotations

from pathlib import Path


def save_tiny_bert(path: Path, seed: int) -> None:
    """A tiny random BERT saved with its tokenizer, as a user's encoder folder (`seed`: which random weights)."""
    import torch
    from transformers import BertConfig, BertModel

    from fusionkit.models.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(tiny_tokenizer()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(path)  # fmt: skip
    tiny_tokenizer(32).save_pretrained(path)
