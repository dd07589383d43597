"""The dataset readers, one per format, live in `fusionkit.data.sources`; this module keeps the old
import path working."""

from fusionkit.data.sources import SENTIMENT, ReadOptions, from_hf, load_dataset, read_mvsa, read_table

__all__ = ["SENTIMENT", "ReadOptions", "from_hf", "load_dataset", "read_mvsa", "read_table"]
