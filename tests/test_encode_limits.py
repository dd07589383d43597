"""Token ids past the text encoder's limits are named, not left to the encoder's own errors."""

from __future__ import annotations

import pytest
import torch

from fusionkit.models import create_model


def test_too_many_tokens_and_ids_outside_the_vocabulary_name_the_limit() -> None:
    model = create_model("tiny").eval()
    limit, vocab = model.text_encoder.model.config.max_position_embeddings, model.text_encoder.model.config.vocab_size
    with pytest.raises(ValueError, match=rf"600 tokens, more than the {limit} positions .*max_length=64"):
        model.encode_text(torch.randint(5, 30, (1, 600)))
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"token id {bad}, outside this model's vocabulary of {vocab}"):
            model.encode_text(torch.tensor([[5, bad, 6]]))
    assert model.encode_text(torch.tensor([[5, vocab - 1, 6]])).shape == (1, model.config.fusion.dim)
