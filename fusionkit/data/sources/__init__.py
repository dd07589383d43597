"""Data sources: one registered reader per format, all taking the same options (`ReadOptions`).

`load_dataset(spec_or_object, **options)` finds the reader whose `accepts` takes the input. A new
format is one new module here with one `@register_source(name, accepts)` function.
"""

from fusionkit.data.sources.hf import from_hf
from fusionkit.data.sources.mvsa import SENTIMENT, read_mvsa
from fusionkit.data.sources.registry import SOURCES, load_dataset, register_source
from fusionkit.data.sources.rows import MISSING_POLICIES, ReadOptions
from fusionkit.data.sources.synthetic import read_synthetic
from fusionkit.data.sources.table import read_table

__all__ = [
    "MISSING_POLICIES",
    "SENTIMENT",
    "SOURCES",
    "ReadOptions",
    "from_hf",
    "load_dataset",
    "read_mvsa",
    "read_synthetic",
    "read_table",
    "register_source",
]
