"""The built-in synthetic set as a source: "synthetic" or "synthetic:N" (see `fusionkit.data.synthetic`)."""

from __future__ import annotations

from typing import Any

from fusionkit.data.dataset import MultimodalDataset
from fusionkit.data.sources.registry import register_source
from fusionkit.data.sources.rows import ReadOptions

GENERATOR_OPTIONS = ("seed", "image_size", "label_noise")


def _is_spec(obj: Any) -> bool:
    return isinstance(obj, str) and (obj == "synthetic" or obj.startswith("synthetic:"))


@register_source("synthetic", _is_spec)
def read_synthetic(spec: str, **options: Any) -> MultimodalDataset:
    """`make_synthetic(N)` (default N=2000). Besides the generator's `seed`, `image_size` and
    `label_noise`, it takes the common reader options; only `label_columns` matters (its one column is
    "sentiment"): the data has no missing or bad rows and no column names to choose."""
    from fusionkit.data.synthetic import make_synthetic

    gen = {k: options.pop(k) for k in GENERATOR_OPTIONS if k in options}
    opts = ReadOptions.from_kwargs(options)
    n = spec.partition(":")[2]
    try:
        ds = make_synthetic(int(n), **gen) if n else make_synthetic(**gen)
    except ValueError as e:
        raise ValueError(f"dataset {spec!r}: {e} (use 'synthetic' or 'synthetic:N' with N > 0)") from None
    keep = opts.label_columns_of(list(ds.label_names), spec)
    if keep == list(ds.label_names):
        return ds
    for ex in ds:
        ex.labels = {c: ex.labels[c] for c in keep}
    return MultimodalDataset(ds.examples, {c: ds.label_names[c] for c in keep}, name=ds.name)
