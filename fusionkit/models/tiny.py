"""The embedded default encoders: tiny, randomly initialised, built with no download.

They let `fusionkit train` with no arguments, and the test suite, run on a fresh machine with no hub
access. The tokenizer is a real WordPiece tokenizer (`BertTokenizerFast`) over a small built-in
vocabulary: common English and sentiment words plus single characters, so any text tokenizes
(unknown words fall back to characters) and padding/truncation behave as with a real BERT.
"""

from __future__ import annotations

import string
from typing import Any

_WORDS = """
a about after again all also am an and any are as at be because been before being best better big
but by can could day did do does down even every feel feeling few first for from get go going good
got great had has have he her here him his how i if in into is it its just know last life like
little look love made make man many me more most much my never new night no not now of off oh old
on one only or other our out over people really right said same see she should so some still such
take than thank thanks that the their them then there these they thing think this those time to
today too two up us very want was way we well were what when where which while who why will with
without work would year yes yet you your
happy happiest joy joyful glad lovely wonderful amazing awesome beautiful brilliant excellent fantastic
fun nice perfect proud sweet win winning won yay best bright sunny sunshine smile smiling cheerful
sad sadly unhappy angry awful bad worst terrible horrible hate hated lost lose losing cry crying
broken dark gloomy storm stormy rain rainy grey gray cold miserable tired sick pain fail failed ugly
boring annoyed upset scared afraid sorry disaster wow what weather view morning evening weekend trip
beach park city street house home food dinner lunch coffee dog cat photo picture friends family team
game match music show movie news sky sea tree flower car train bus work school
""".split()


def tiny_vocab() -> dict[str, int]:
    """Special tokens, characters, their `##` continuations, then whole words (deterministic order)."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += chars + ["##" + c for c in chars]
    tokens += [w for w in dict.fromkeys(_WORDS) if w not in tokens]
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_tokenizer(model_max_length: int = 128) -> Any:
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=tiny_vocab(), do_lower_case=True, model_max_length=model_max_length)


def tiny_bert_config(**overrides: Any) -> Any:
    from transformers import BertConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=len(tiny_vocab()),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


# timm kwargs for a ViT small enough to train on 2 CPU cores in seconds; 32px, 8px patches -> 16 tokens.
TINY_VIT_KWARGS: dict[str, Any] = dict(
    img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0
)
TINY_VIT_BASE = "vit_tiny_patch16_224"
