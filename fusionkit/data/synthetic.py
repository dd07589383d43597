"""A built-in sentiment dataset whose label needs both the caption and the picture.

Rule (an irony XOR): a caption has a polarity (+1 cheerful, 0 matter-of-fact, -1 gloomy) and the
scene a "sincerity" (+1 sunny: the caption is meant literally, -1 stormy: it is ironic, so its
polarity flips, 0 grey/foggy: muted). The label is the sign of their product: "what a lovely day"
under a storm is negative, the same caption in sunshine positive; a matter-of-fact caption or a grey
scene gives neutral. Labels are balanced; each modality alone predicts ~53% at best (chance 33%), both ~100%
minus the label noise (default 5%). Scenes differ in the colour and brightness of large regions,
so a tiny ViT sees the cue at 32x32; captions use words of the tiny tokenizer's vocabulary.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw

from fusionkit.data.dataset import Example, MultimodalDataset
from fusionkit.data.sources.mvsa import SENTIMENT

# label -> its (caption polarity, scene sincerity) cells; balanced by sampling the label first.
_CELLS: dict[str, list[tuple[int, int]]] = {
    "positive": [(1, 1), (-1, -1)],
    "negative": [(1, -1), (-1, 1)],
    "neutral": [(1, 0), (-1, 0), (0, 1), (0, 0), (0, -1)],
}
_OPENERS = {
    1: ["what a", "such a", "so happy with this", "love this", "best", "really nice"],
    0: ["a", "one more", "here is a", "this is the", "just a", "my"],
    -1: ["what an awful", "such a terrible", "worst", "so tired of this", "hate this", "really bad"],
}
_ADJ = {
    1: ["lovely", "wonderful", "amazing", "beautiful", "perfect", "fun", "great", "happy"],
    0: ["new", "old", "big", "little", "first", "last", "same", "other"],
    -1: ["awful", "terrible", "horrible", "boring", "miserable", "bad", "ugly", "sad"],
}
_NOUNS = ["day", "weekend", "trip", "view", "morning", "evening", "beach", "park", "city", "street"]
_TAILS = [
    "",
    "today",
    "with friends",
    "with the family",
    "at the beach",
    "in the city",
    "this morning",
    "again",
]
_SKY = {1: (90, 170, 250), 0: (150, 150, 150), -1: (30, 32, 55)}
_GROUND = {1: (80, 190, 70), 0: (120, 125, 115), -1: (25, 35, 30)}


def _caption(polarity: int, rng: np.random.Generator) -> str:
    words = [
        rng.choice(_OPENERS[polarity]),
        rng.choice(_ADJ[polarity]),
        rng.choice(_NOUNS),
        rng.choice(_TAILS),
    ]
    return " ".join(w for w in words if w)


def _jitter(color: tuple[int, int, int], rng: np.random.Generator, amount: int = 25) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _scene(sincerity: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Sky over ground with a horizon, sun (sunny), fog bands (grey) or rain and lightning (stormy)."""
    im = Image.new("RGB", (size, size), _jitter(_SKY[sincerity], rng))
    draw = ImageDraw.Draw(im)
    horizon = int(size * rng.uniform(0.5, 0.75))
    draw.rectangle([0, horizon, size, size], fill=_jitter(_GROUND[sincerity], rng))
    for _ in range(rng.integers(1, 4)):  # nuisance objects (houses, trees) of any colour
        x, w, h = (
            int(rng.integers(0, size)),
            int(rng.integers(size // 10, size // 4)),
            int(rng.integers(size // 10, size // 3)),
        )
        draw.rectangle([x, horizon - h, x + w, horizon], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    s = size / 64
    if sincerity == 1:
        cx, cy, r = rng.uniform(10, 54) * s, rng.uniform(8, 20) * s, rng.uniform(5, 9) * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter((255, 220, 60), rng, 15))
    elif sincerity == 0:
        for _ in range(3):
            y = rng.uniform(0, horizon)
            draw.rectangle([0, y, size, y + 3 * s], fill=_jitter((190, 190, 190), rng, 10))
    else:
        for _ in range(int(12 * s)):
            x, y = rng.uniform(0, size), rng.uniform(0, horizon)
            draw.line([x, y, x - 2 * s, y + 6 * s], fill=(110, 120, 150), width=1)
        x = rng.uniform(10, 54) * s
        draw.line(
            [x, 0, x + 4 * s, 10 * s, x - 2 * s, 14 * s, x + 3 * s, 26 * s],
            fill=(235, 235, 255),
            width=max(1, int(s)),
        )
    return im


_SCENE_WORDS = {1: "sunny", 0: "grey", -1: "stormy"}


def make_synthetic(
    n: int = 2000, seed: int = 0, image_size: int = 64, label_noise: float = 0.05, describe_scene: bool = False
) -> MultimodalDataset:
    """`n` generated (caption, scene) pairs; item i depends only on (seed, i), so smaller n is a prefix.

    `describe_scene=True` ends each caption with its scene ("... sunny sky"), so captions and images
    share content a contrastive model can align (for retrieval); by default they share none.

    Labels are raw class names in column "sentiment", declared in `SENTIMENT` order, so binding them
    to a classification task gives indices 0 = positive, 1 = neutral, 2 = negative.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    examples = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        label = SENTIMENT[int(rng.integers(3))]
        polarity, sincerity = _CELLS[label][int(rng.integers(len(_CELLS[label])))]
        y = SENTIMENT.index(label)
        if rng.random() < label_noise:
            y = (y + int(rng.integers(1, 3))) % 3
        examples.append(
            Example(
                id=f"syn-{i:06d}",
                text=_caption(polarity, rng) + (f" {_SCENE_WORDS[sincerity]} sky" if describe_scene else ""),
                image=_scene(sincerity, image_size, rng),
                labels={"sentiment": SENTIMENT[y]},
                meta={"caption_polarity": polarity, "scene_sincerity": sincerity, "clean_label": label},
            )
        )
    key = f"synthetic|v2|{n}|{seed}|{image_size}|{label_noise}" + ("|scene" if describe_scene else "")
    return MultimodalDataset(
        examples,
        {"sentiment": list(SENTIMENT)},
        name=f"synthetic-{n}",
        fingerprint=hashlib.sha1(key.encode()).hexdigest(),
    )
