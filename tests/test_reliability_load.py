"""`fusionkit.embed` streams: peak RSS must not grow with the number of pairs (beyond the returned array).

Each size runs in a fresh interpreter fed by a generator of small PIL images and captions, so
nothing is materialised up front; the peak RSS (ru_maxrss) of the two runs is compared. The returned
[N, dim] float32 array necessarily grows with N, so it is allowed for, plus a fixed margin.
"""

from __future__ import annotations

import pytest

from tests.reliability_utils import peak_rss_mib, record

MARGIN_MIB = 48

CODE = """
import numpy as np
from PIL import Image
from fusionkit.embedding import embed
from fusionkit.models import create_model
N = {n}
model = create_model("tiny")
embed(model, ["warm up"], [Image.new("RGB", (48, 40))])  # lazy imports and allocations happen here
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: measure the embedding itself
def images():
    for i in range(N):
        yield Image.new("RGB", (48 + i % 17, 40 + i % 13), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
texts = (f"what a lovely day number {{i}} at the beach" for i in range(N))
vectors = embed(model, texts, images(), batch_size=256)
assert vectors.shape == (N, model.config.fusion.dim) and np.isfinite(vectors).all()
print("DIM", vectors.shape[1])
"""


def _check(small: int, large: int) -> None:
    peaks = {n: peak_rss_mib(CODE.format(n=n)) for n in (small, large)}
    dim = 64  # the tiny preset's fusion.dim
    result_mib = (large - small) * dim * 4 / 2**20 * 2  # the output list + its concatenation
    # Holding the extra inputs, even as uint8 at the tiny encoder's 32x32, would cost inputs_mib; a
    # streaming embed may grow by allocator slack, a small fraction of that, but never by the inputs.
    inputs_mib = (large - small) * 3 * 32 * 32 / 2**20
    allowed = result_mib + MARGIN_MIB + 0.1 * inputs_mib
    growth = peaks[large] - peaks[small]
    record(f"load/embed_{small}_vs_{large}", pairs=[small, large],
           peak_rss_mib={str(k): round(v, 1) for k, v in peaks.items()},
           growth_mib=round(growth, 1), allowed_mib=round(allowed, 1),
           inputs_if_held_mib=round(inputs_mib, 1))  # fmt: skip
    assert growth < allowed, peaks


def test_embed_memory_does_not_grow_with_pairs() -> None:
    _check(2_000, 20_000)


@pytest.mark.slow
def test_embed_100k_pairs_bounded_memory() -> None:
    _check(10_000, 100_000)
