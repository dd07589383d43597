"""Data layer: sources -> `MultimodalDataset` (raw labels) -> `fusionkit.tasks.bind_labels` (encoded) ->
`build_cache` -> `CachedDataset` -> `Collator` -> `move_batch`.

Typical use::

    raw = load_dataset("photos.csv", text_column="caption", image_column="photo")  # any source
    ds, tasks = bind_labels(raw, model_config.tasks)
    parts = split_dataset(ds, path="runs/split.json")
    train = build_cache(parts["train"], tokenizer, preprocess, "cache/")
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=Collator(tokenizer.pad_token_id,
                        train.label_names), pin_memory=torch.cuda.is_available())
    for batch in loader:
        batch = move_batch(batch, device, ImageTransform(preprocess, train=True).to(device))
"""

from fusionkit.data.cache import CachedDataset, build_cache
from fusionkit.data.collate import Collator, ImageTransform, move_batch
from fusionkit.data.dataset import MAX_TEXT_CHARS, Example, MultimodalDataset, read_split_file, split_dataset
from fusionkit.data.errors import DataError
from fusionkit.data.image import MAX_IMAGE_PIXELS, load_image, preprocess_image
from fusionkit.data.sources import (
    SENTIMENT,
    ReadOptions,
    from_hf,
    load_dataset,
    read_mvsa,
    read_table,
    register_source,
)
from fusionkit.data.synthetic import make_synthetic

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_TEXT_CHARS",
    "SENTIMENT",
    "CachedDataset",
    "Collator",
    "DataError",
    "Example",
    "ImageTransform",
    "MultimodalDataset",
    "ReadOptions",
    "build_cache",
    "from_hf",
    "load_dataset",
    "load_image",
    "make_synthetic",
    "move_batch",
    "preprocess_image",
    "read_mvsa",
    "register_source",
    "read_table",
    "read_split_file",
    "split_dataset",
]
