"""`embed(model, texts, images)`: joint (or single-modality) vectors for any number of pairs, streamed.

Inputs are consumed lazily, one batch at a time, so memory stays bounded whatever the number of
pairs: lists, generators, a `MultimodalDataset` and a `datasets.Dataset` (its `text` / `image` / `id`
columns) all work. Images may be PIL images, paths or encoded bytes, and either side may hold
`None` (a missing caption or image); they go through `FusionProcessor`, the same decode + resize +
crop as the training cache, so vectors match what the model saw in training.

    vectors = embed(model, texts, images)                                   # [N, dim] joint
    vecs, ids = embed(model, dataset, return_ids=True)                      # ids beside the rows
    out = embed(model, texts, images, modalities=("joint", "text", "image"))  # dict, one encoder pass

Which vectors are comparable, within one model: "text" and "image" vectors share a space only for a model trained
with a contrastive task (ITM alone does not align them); otherwise compare joint with joint, text with text, image
with image.
"""

from __future__ import annotations

import itertools
import logging
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.dataset import missing_caption
from .models import FusionModel
from .processor import FusionProcessor

if TYPE_CHECKING:  # the Hugging Face face of a model (AutoModel.from_pretrained): transformers only for type checkers
    from .hf import FusionkitModel

log = logging.getLogger("fusionkit")
MODALITIES = ("joint", "text", "image")
_MISSING = object()


def check_batch_size(batch_size: Any) -> None:
    """A batch size is a positive int: 0 would yield nothing (an empty result), -1 a confusing crash."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:  # np.int64 too
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def as_fusion_model(model: Any, where: str) -> FusionModel:
    """The FusionModel itself, also behind its Hugging Face face (`AutoModel.from_pretrained(dir)`)."""
    inner = getattr(model, "fusion_model", None)
    model = inner if isinstance(inner, FusionModel) else model
    if not isinstance(model, FusionModel):
        raise TypeError(f"{where}() takes a fusionkit model (fusionkit.FusionModel.from_pretrained(DIR)), "
                        f"got {type(model).__name__}")  # fmt: skip
    return model


def _nothing_read(model: FusionModel) -> str:
    if len(model.sides_read) == 2:
        return "row has neither a caption nor an image"
    return f"row has no {model.sides_read[0]}, the only input of this {model.config.fusion.strategy} model"


def _is_hf_dataset(x: Any) -> bool:
    return type(x).__module__.startswith("datasets") and hasattr(x, "column_names")


def _is_dataframe(x: Any) -> bool:
    return type(x).__module__.startswith("pandas") and hasattr(x, "columns") and hasattr(x, "iloc")


def _column_names(x: Any) -> list[str]:
    return list(x.column_names) if _is_hf_dataset(x) else [str(c) for c in x.columns]


def _is_fusionkit_dataset(x: Any) -> bool:
    from .data import MultimodalDataset

    return isinstance(x, MultimodalDataset)


def _column(x: Any, name: str) -> Iterable[Any]:
    """A column of a table, streamed; a DataFrame's empty cells (NaN, NA) read as None (a missing side)."""
    if _is_dataframe(x):
        import pandas as pd

        return (None if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) else v for v in x[name])
    return (row[name] for row in x) if _is_hf_dataset(x) else x


def column_ids(x: Any) -> Iterator[str]:
    """A table's `id` column as `load_dataset` reads it (`row_id`: 100.0 -> "100", a missing id -> its row
    number), so `embed`, `embed_to_shards` and `fusionkit embed` name a DataFrame's rows alike."""
    from .data.sources.rows import row_id

    return (row_id(v, n) for n, v in enumerate(_column(x, "id")))


def index_ids(x: Any) -> list[str] | None:
    """A DataFrame's index labels as ids when its index is not the default 0..n-1 (a filtered or sampled frame), as
    `load_dataset` names such rows; None otherwise (rows are then their row numbers)."""
    from .data.sources.rows import row_id
    from .data.sources.table import _labelled_index

    return [row_id(label, n) for n, label in enumerate(x.index)] if _is_dataframe(x) and _labelled_index(x) else None


def refuse_columns(data: Any, where: str) -> None:
    """A dict of columns is not rows: iterating it would embed the column NAMES as captions."""
    if isinstance(data, Mapping):
        raise TypeError(f"{where}() takes rows (a list, a DataFrame, a dataset), not a dict of columns "
                        f"({list(data)[:5]}): pass pandas.DataFrame(columns), whose 'text', 'image' and 'id' "
                        "columns are read")  # fmt: skip


def check_unique_ids(names: Sequence[str], start: int, first_row: dict[str, int]) -> None:
    """Refuse an id given twice (rows `start`, `start + 1`, ... of the input), as `load_dataset` and `fusionkit embed`
    refuse it: the vectors of one id would overwrite each other wherever they are looked up by id."""
    for k, name in enumerate(names, start):
        seen = first_row.setdefault(name, k)
        if seen != k:
            raise ValueError(f"duplicate id {name!r} (rows {seen} and {k} of the input): ids must be unique; "
                             "give each row its own id (a missing id is its row number)")  # fmt: skip


def default_modality(rows: Iterable[Any]) -> str:
    """The vectors asked of rows (`Example`s) when no modality is named, by the rule `embed(model, texts)`
    follows: "text" when no row has an image, "image" when none has a caption, else "joint". So a
    caption-only file gives the same vectors as its captions passed alone (`fusionkit embed` uses it too)."""
    has_text = has_image = False
    for ex in rows:
        has_text, has_image = has_text or ex.text is not None, has_image or ex.image is not None
        if has_text and has_image:
            break
    return "joint" if has_text == has_image else "text" if has_text else "image"


def _unpack_dataset(
    texts: Any, images: Any, ids: Iterable[Any] | None, modalities: Any = None,
    columns: Mapping[str, str | None] | None = None,
) -> tuple[Iterable[Any] | None, Iterable[Any] | None, Iterable[Any] | None]:
    """A dataset passed as `texts` (or `images`) supplies its text / image / id columns, or those the model trained
    on (`columns`: its `data_columns`, as `fusionkit embed` reads a file); a side that no row of a
    `MultimodalDataset` has is left out when no `modalities` are named (`default_modality`)."""
    if _is_fusionkit_dataset(texts):
        ds = texts
        only = default_modality(ds) if modalities is None and images is None else "joint"
        if only != "joint":
            log.warning("embed(%s): no row has %s: %s vectors only", ds.name,
                        "an image" if only == "text" else "a caption", only)  # fmt: skip
        return (
            (ex.text for ex in ds) if only != "image" else None,
            (images if images is not None else (ex.image for ex in ds)) if only != "text" else None,
            (ids if ids is not None else ds.ids),
        )
    if _is_hf_dataset(texts) or _is_dataframe(texts):
        ds, cols = texts, _column_names(texts)
        kind = type(ds).__name__
        trained = {side: (columns or {}).get(f"{side}_column") for side in ("text", "image", "id")}
        renames = {c: side for side, c in trained.items() if c and c != side and c in cols}
        if renames:  # the model's own columns (review_text, photo_file) are its text / image / id, as `fusionkit
            # embed` reads them: a generic column of that name beside one is not read
            shadowed = [side for side in renames.values() if side in cols]
            if _is_dataframe(ds):
                ds = ds.drop(columns=shadowed).rename(columns=renames)
            else:
                ds = ds.remove_columns(shadowed).rename_columns(renames)
            cols = _column_names(ds)
        if "text" not in cols and ("image" not in cols or images is not None):
            raise ValueError(f"embed({kind}) reads its 'text', 'image' and 'id' columns; it has {cols}. Rename "
                             "yours (Dataset.rename_columns / DataFrame.rename), or pass the columns: "
                             "embed(model, texts=list(ds['caption']), images=list(ds['photo']))")  # fmt: skip
        # a DataFrame column with no value is no column (`default_modality`, as load_dataset(...) -> embed reads it);
        # both empty: kept, every row then fails as it does through load_dataset
        empty = [c for c in ("text", "image") if modalities is None and images is None and _is_dataframe(ds)
                 and c in cols and all(missing_caption(v) for v in ds[c])]  # fmt: skip
        if len(empty) == 1:
            cols.remove(empty[0])

        def absent(side: str) -> str:
            return f"its {side!r} column is empty in every row" if side in empty else f"no {side!r} column (it has {cols})"

        if images is None and "image" in cols:
            images = _column(ds, "image")
        elif images is None:
            log.warning("embed(%s): %s: text vectors only", kind, absent("image"))
        if ids is None and "id" in cols:
            ids = column_ids(ds)
        elif ids is None:  # a DataFrame with its own index: its labels, as training names the rows
            ids = index_ids(ds)
        if "text" not in cols:
            log.warning("embed(%s): %s: image vectors only", kind, absent("text"))
        return (_column(ds, "text") if "text" in cols else None), images, ids
    if _is_hf_dataset(images):
        return texts, _column(images, "image"), ids
    return texts, images, ids


def _batches(streams: Sequence[Iterable[Any] | None], size: int) -> Iterator[list[list[Any] | None]]:
    """Zip the (texts, images, ids) streams (None ones stay None) into lists of `size`, checking they have equal
    length (streams have no len(): said where one ends)."""
    names = [n for n, s in zip(("texts", "images", "ids"), streams, strict=True) if s is not None]
    live = [iter(s) for s in streams if s is not None]
    rows = itertools.zip_longest(*live, fillvalue=_MISSING)
    done = 0
    while chunk := list(itertools.islice(rows, size)):
        short = next((k for k, row in enumerate(chunk) if _MISSING in row), None)
        if short is not None:
            ended = [n for n, v in zip(names, chunk[short], strict=True) if v is _MISSING]
            raise ValueError(f"{' and '.join(ended)} ended after {done + short} items, "
                             f"{' and '.join(n for n in names if n not in ended)} go on: give one of each per pair")  # fmt: skip
        done += len(chunk)
        columns = iter(list(c) for c in zip(*chunk))
        yield [next(columns) if s is not None else None for s in streams]


def _resolve_modalities(
    modalities: str | Sequence[str] | None, has_text: bool, has_image: bool
) -> tuple[str, ...]:
    if modalities is None:
        return ("joint",) if has_text and has_image else ("text",) if has_text else ("image",)
    mods = (modalities,) if isinstance(modalities, str) else tuple(modalities)
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown or not mods:
        raise ValueError(f"modalities must be some of {MODALITIES}, got {modalities!r}")
    if ("joint" in mods or "text" in mods) and not has_text:
        raise ValueError(f"modalities {mods} need texts")
    if ("joint" in mods or "image" in mods) and not has_image:
        raise ValueError(f"modalities {mods} need images")
    return mods


def _vectors(
    model: FusionModel, inputs: dict[str, torch.Tensor], mods: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Unnormalized vectors per modality, NaN for a row without that side (the model's `encode_text` /
    `encode_image` rule); several modalities share one pass of each encoder."""
    if mods == ("joint",):
        from .models.fusion_model import model_inputs

        return {"joint": model.encode(**model_inputs(inputs))}
    if mods == ("text",):
        return {"text": model.encode_text(inputs["input_ids"], inputs["attention_mask"],
                                          text_present=inputs["text_present"])}  # fmt: skip
    if mods == ("image",):
        return {"image": model.encode_image(inputs["pixel_values"], image_present=inputs["image_present"])}
    mask = inputs["attention_mask"]
    text_features, image_features = model.encoder_features(inputs["input_ids"], mask, inputs["pixel_values"])
    out: dict[str, torch.Tensor] = {}
    if "joint" in mods:
        out["joint"] = model.encode(
            text_features=text_features,
            attention_mask=mask,
            image_features=image_features,
            text_present=inputs["text_present"],
            image_present=inputs["image_present"],
        )
    if "text" in mods:
        out["text"] = model.encode_text(text_features=text_features, attention_mask=mask,
                                        text_present=inputs["text_present"])  # fmt: skip
    if "image" in mods:
        out["image"] = model.encode_image(image_features=image_features, image_present=inputs["image_present"])
    return out


def embed(
    model: FusionModel | FusionkitModel,
    texts: Iterable[str | None] | Any | None = None,
    images: Iterable[Any] | None = None,
    batch_size: int = 64,
    normalize: bool = True,
    device: str | torch.device | None = None,
    *,
    modalities: str | Sequence[str] | None = None,
    ids: Iterable[Any] | None = None,
    return_ids: bool = False,
    precision: str = "auto",
    progress: bool | None = None,
    compile: bool = False,
    on_error: str = "raise",
) -> Any:
    """Vectors [N, dim] (float32): joint for pairs, text-only or image-only when one side is given.

    `texts` may be a `MultimodalDataset`, a `datasets.Dataset` or a pandas DataFrame: its `text`,
    `image` and `id` columns are used, or the columns the model trained on (`model.data_columns`) (a DataFrame's empty cells are missing sides; a caption spelled like a
    missing value, "nan" or "None", is a missing caption, as `load_dataset` and training read it). `modalities` ("joint", "text", "image" or several) returns a dict of arrays, computed from one
    pass of each encoder; a row without a caption (image) gets NaN as its text (image) vector.
    `return_ids=True` (or passing `ids`) returns `(vectors, ids)`, ids as strings (row numbers when
    none are known); note `embed_shards.read_embeddings` returns the other order, `(ids, vectors)`. `precision`: "auto" (bf16 autocast where the CPU/GPU runs it natively), "fp32"
    or "bf16". `progress`: a tqdm bar (None: only on a terminal). `compile`: `torch.compile` the
    model's encoders in place (pays off from a few thousand pairs). `device` moves the model first.
    `on_error`: an image that cannot be read raises a `DataError` naming its row ("raise"), or
    ("skip") gives its row NaN vectors, so rows and ids stay aligned, and is logged with the row's id.
    """
    from tqdm.auto import tqdm

    from .data.errors import DataError, SkipLog, check_policy
    from .precision import inference_precision

    skips = SkipLog(check_policy(on_error), "embed")
    model = as_fusion_model(model, "embed")
    check_batch_size(batch_size)
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    refuse_columns(texts, "embed")
    want_ids = return_ids or ids is not None
    texts, images, ids = _unpack_dataset(texts, images, ids, modalities, getattr(model, "data_columns", None))
    # one image where a column of them belongs (a column may be a Series or a 1-D array of paths: an image array has 2+)
    if isinstance(images, str | bytes | Path) or type(images).__module__.startswith("PIL.") or getattr(images, "ndim", 1) > 1:
        raise TypeError("images must be a list of paths, bytes or PIL images (one image: a list of one), not a "
                        f"single {type(images).__name__}")  # fmt: skip
    if texts is None and images is None:
        raise ValueError("embed() needs texts, images or both")
    mods = _resolve_modalities(modalities, texts is not None, images is not None)
    if device is not None:
        model.to(device)
    dev = model.device
    processor = FusionProcessor.from_model(model)
    autocast = inference_precision(precision, dev, "precision").autocast(dev.type)
    total = next((len(s) for s in (texts, images) if hasattr(s, "__len__")), None)  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    if compile:
        from .export import compile_model

        compile_model(model)
    out: dict[str, list[np.ndarray]] = {m: [] for m in mods}
    out_ids: list[str] = []
    first_row: dict[str, int] = {}  # given ids: each names one row (a {id: vector} map would lose the others)
    done = 0
    bar = tqdm(total=total, desc="embed", unit="pair", disable=None if progress is None else not progress)
    try:
        with torch.inference_mode(), autocast:
            for text_batch, image_batch, id_batch in _batches(
                (texts, images, ids), batch_size
            ):
                n = len(text_batch if text_batch is not None else image_batch)  # type: ignore[arg-type]
                names = [str(i) for i in id_batch] if id_batch is not None else [str(done + i) for i in range(n)]
                if id_batch is not None:
                    check_unique_ids(names, done, first_row)
                inputs = processor(texts=text_batch, device=dev) if text_batch is not None else {}
                unread: list[int] = []
                if image_batch is not None:
                    uint8, present, unread = _load_images(processor, image_batch, names, skips)
                    inputs.update(pixel_values=processor.normalize(uint8.to(dev, non_blocking=True)),
                                  image_present=present.to(dev))  # fmt: skip
                if "joint" in mods:  # a pair without the sides the model reads: an error, or NaN under skip
                    read = [inputs[f"{'text' if s == 'caption' else s}_present"] for s in model.sides_read]
                    for k in (~torch.stack(read).any(0)).nonzero().flatten().tolist():
                        skips(DataError(_nothing_read(model), item=names[k]))
                        unread.append(k)
                for name, vec in _vectors(model, inputs, mods).items():
                    vec = F.normalize(vec.float(), dim=-1) if normalize else vec.float()  # NaN stays NaN
                    vec[unread] = float("nan")  # an unreadable image under on_error="skip": no vector at all
                    out[name].append(vec.cpu().numpy())
                if want_ids:  # the given ids, else row numbers
                    out_ids += names
                done += n
                bar.update(n)
    finally:
        bar.close()
        model.train(was_training)
    skips.finish(None, done)
    dim = model.config.fusion.dim
    arrays = {m: np.concatenate(v) if v else np.zeros((0, dim), dtype=np.float32) for m, v in out.items()}
    result: Any = arrays if modalities is not None and not isinstance(modalities, str) else arrays[mods[0]]
    return (result, out_ids) if want_ids else result



def _load_images(
    processor: FusionProcessor, images: list[Any], names: list[str], skips: Any
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`processor.load_images`, plus the positions of unreadable images under on_error="skip" (loaded as
    missing). Only a batch that fails is decoded again image by image, to name the row (or skip it)."""
    from .data.errors import DataError
    from .data.image import ImageSource

    try:
        return (*processor.load_images(images), [])
    except DataError:
        pass
    unread = []
    for i, src in enumerate(images):
        try:
            processor.load_images([src])
        except DataError as e:
            if not isinstance(src, ImageSource):  # a wrong type, not a bad image: skipping would skip every row
                raise DataError(e.problem, source=e.source, item=names[i], hint=e.hint) from None
            skips(DataError(e.problem, source=e.source, item=names[i], hint=f"{e.hint or 'replace it'}, or skip such rows: on_error='skip' (fusionkit embed --on-error skip)"))
            unread.append(i)
    return (*processor.load_images([None if i in unread else src for i, src in enumerate(images)]), unread)


def retrieval_recall(
    text_vectors: np.ndarray, image_vectors: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Text->image and image->text recall@k over a set of pairs (row i's caption matches row i's image).

    The vectors are compared by cosine similarity; recall@k at chance is k / N (also returned), so a
    model whose text and image spaces are unrelated (no contrastive/ITM training) scores about that.
    """
    t = text_vectors / np.linalg.norm(text_vectors, axis=1, keepdims=True)
    i = image_vectors / np.linalg.norm(image_vectors, axis=1, keepdims=True)
    if t.shape != i.shape:
        raise ValueError(f"text vectors {t.shape} and image vectors {i.shape} must be paired row by row")
    if np.isnan(t).any() or np.isnan(i).any():  # a NaN compares False with everything: it would rank first
        raise ValueError("a row has no text or no image vector (NaN): pass complete pairs only")
    sim = t @ i.T
    diag = np.diag(sim)
    # Candidates scoring above the true one, and those tied with it (the same image twice, a placeholder photo):
    # a tie is broken at random, so the true one lands anywhere among them (a constant model scores chance)
    above = {"t2i": (sim > diag[:, None]).sum(1), "i2t": (sim > diag[None, :]).sum(0)}
    tied = {"t2i": (sim == diag[:, None]).sum(1) - 1, "i2t": (sim == diag[None, :]).sum(0) - 1}
    n = len(diag)
    out = {f"{d}_r@{k}": float(np.mean(np.clip((k - above[d]) / (tied[d] + 1), 0, 1))) for d in above for k in ks}
    out.update({f"chance_r@{k}": min(1.0, k / n) for k in ks})
    return out
