"""Embed a dataset of any size into Parquet shards, across processes, resumable after a kill.

    torchrun --nproc_per_node 8 -m fusionkit embed RUN/best --data pairs.csv --output vecs/ --shard-size 50000

The input is cut into shards of `shard_size` consecutive rows; shard k goes to rank k % world_size,
which embeds it (`fusionkit.embed`, batch by batch) and writes `shard-0000k.parquet` (columns `id`,
`embedding`) through a temp file and a rename, so a shard file on disk is always complete. A killed
run started again with the same settings skips the shards already on disk, on any number of
processes: a shard's rows and batches do not depend on who embeds it, so the result equals a
one-process run. `manifest.json` records the settings from the start and, once every shard is
written, `complete: true`, the shard list and the row count. Memory holds one shard of inputs and
vectors per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import count, islice
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ConfigError
from .data.image import image_digest
from .data.sources.rows import row_id
from .embedding import (
    _column,
    _is_dataframe,
    _is_hf_dataset,
    as_fusion_model,
    check_batch_size,
    check_unique_ids,
    default_modality,
    embed,
    index_ids,
    refuse_columns,
)
from .models import FusionModel
from .precision import inference_precision
from .store import no_room
from .training import distributed as D

if TYPE_CHECKING:  # the Hugging Face face of a model: transformers only for type checkers
    from .hf import FusionkitModel

log = logging.getLogger("fusionkit.embed")

MANIFEST = "manifest.json"
MODALITIES = ("joint", "text", "image")
Row = tuple[str, Any, Any]  # id, text, image


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def model_fingerprint(model: FusionModel) -> str:
    """A hash of the weights: resuming into a directory another model started is refused."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _row(item: Any, index: int) -> Row:
    """(id, text, image) from an `Example` or a dict row (HF datasets); a dict row's id as `load_dataset`
    reads it (`row_id`: 100.0 -> "100", none -> its row number)."""
    if isinstance(item, Mapping):
        return row_id(item.get("id"), index), item.get("text"), item.get("image")
    if not all(hasattr(item, k) for k in ("id", "text", "image")):
        raise TypeError(f"row {index}: embed_to_shards takes rows as dicts {{'id', 'text', 'image'}} or Examples, "
                        f"not a {type(item).__name__}")  # fmt: skip
    return str(item.id), item.text, item.image


def data_fingerprint(data: Any) -> str | None:
    """A content hash of the rows, so a folder of other rows' shards is never reused for these: a
    `MultimodalDataset`'s own; for rows held in memory (a list of dict rows or `Example`s) a hash of what
    is embedded, as `MultimodalDataset.fingerprint` hashes it (ids, captions, image CONTENT); an HF `Dataset`
    read from files its own (that of its files and transforms; one built in memory gets a random one, so its
    rows are hashed), plus the bytes of the image files its cells name (its own covers their paths only).
    None for a stream (it can be read only once): its ids are checked as they are read."""
    own = getattr(data, "fingerprint", None)
    if isinstance(own, str):
        return own
    if _is_hf_dataset(data) and data.cache_files:
        files = _image_files_digest(data)
        return f"datasets:{data._fingerprint}" + (f"+files:{files}" if files else "")
    if not (isinstance(data, Sequence) or _is_hf_dataset(data)) or isinstance(data, str | bytes):
        return None
    h = hashlib.sha256()
    for i, item in enumerate(data):
        id_, text, image = _row(item, i)
        h.update(json.dumps([id_, text], default=str).encode())
        h.update(image_digest(image))
    return h.hexdigest()


def _image_files_digest(data: Any, batch_size: int = 4096) -> str | None:
    """A hash of the image files an HF `Dataset`'s `image` cells name (paths, or `Image()` cells holding a path
    and no bytes), as `image_digest` hashes a file: by its BYTES. None where no cell names a file (bytes in the
    table are in its fingerprint already). Reads the column as Arrow, so no image is decoded."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = data.features.get("image")
    is_image = isinstance(feature, datasets.Image)
    if not is_image and getattr(feature, "dtype", None) not in ("string", "large_string"):
        return None
    h, named = hashlib.sha256(), False
    for batch in data.select_columns(["image"]).with_format("arrow").iter(batch_size=batch_size):
        column = batch.column("image")
        if is_image:  # decoding reads the bytes when there are any, else the file at the path
            column = pc.if_else(pc.is_null(pc.struct_field(column, "bytes")), pc.struct_field(column, "path"),
                                pa.scalar(None, pa.string()))  # fmt: skip
        for path in column.to_pylist():
            named = named or path is not None
            h.update(image_digest(path))
    return h.hexdigest() if named else None


def _as_rows(data: Any) -> Any:
    """A DataFrame as a list of dict rows (its empty cells None: a missing side); other data as it is."""
    refuse_columns(data, "embed_to_shards")
    if not _is_dataframe(data):
        return data
    names = [c for c in ("id", "text", "image") if c in data.columns]
    columns = [list(_column(data, c)) for c in names]
    labels = index_ids(data) if "id" not in names else None  # a DataFrame's own index names its rows (as embed's)
    if labels is not None:
        names, columns = ["id", *names], [labels, *columns]
    return [dict(zip(names, values)) for values in zip(*columns)]


def _indexable(data: Any) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _own_shards(
    data: Any, size: int, rank: int, world: int, done: set[int], out: Path, read: list[int]
) -> Iterator[tuple[int, list[Row]]]:
    """(k, rows) for the shards this rank embeds. Indexable data (a `MultimodalDataset`, an HF
    `Dataset`) is read at the shard's rows only; a stream (no fingerprint) is read through, each shard on
    disk checked against its rows' ids (every rank checks all, so all raise alike); `read` gets its row count."""
    if _indexable(data):
        n = len(data)
        for k in range(rank, -(-n // size), world):
            if k not in done:
                yield k, [_row(data[i], i) for i in range(k * size, min(n, (k + 1) * size))]
        return
    it, k, n = iter(data), 0, 0
    while chunk := list(islice(it, size)):
        rows = [_row(x, n + i) for i, x in enumerate(chunk)]
        if k in done:
            _check_same_ids(out, k, [r[0] for r in rows])
        elif k % world == rank:
            yield k, rows
        k, n = k + 1, n + len(chunk)
    read.append(n)


def _check_same_ids(out: Path, k: int, ids: list[str]) -> None:
    """A stream has no fingerprint: a shard written earlier is reused only for rows of the same ids."""
    import pyarrow.parquet as pq

    held = pq.read_table(out / shard_name(k), columns=["id"]).column("id").to_pylist()
    if held != ids:
        first = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
        raise ConfigError(f"{out / shard_name(k)} holds other rows than the input's: its {len(held)} ids differ "
                          f"from the input's {len(ids)} at position {first} ({held[first:first + 2]} vs "
                          f"{ids[first:first + 2]}): write to a new directory to embed these rows")  # fmt: skip


def _write_shard(path: Path, ids: list[str], vectors: np.ndarray) -> None:
    """Parquet `id` (string) + `embedding` (fixed-size float32 list), written to a temp file and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        full = no_room(e, path.parent, path.name)
        if full is None:
            raise
        raise full from e
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _start(out: Path, settings: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank 0 creates the manifest (or checks it); every rank gets it back, or the same error."""
    error = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        path = out / MANIFEST
        if path.is_file():
            manifest = json.loads(path.read_text())
            changed = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
            if changed:
                error = _mismatch(out, changed)
        elif held := sorted(p.name for p in out.iterdir() if not p.name.startswith(".shard-")):
            # shards without a manifest are nobody's to adopt (another model's vectors), nor are a user's files
            error = (f"{out} holds files but no {MANIFEST} ({', '.join(held[:5])}): write the shards to a new or "
                     "empty directory")  # fmt: skip
        else:
            manifest = {"format": "fusionkit-embeddings", "version": 1, **settings, "complete": False}
            _write_json(path, manifest)
        for stale in out.glob(".shard-*.tmp-*"):  # left by a killed run; never renamed into place
            stale.unlink(missing_ok=True)
    error = D.broadcast_object(error)
    if error:
        raise ConfigError(error)
    D.barrier()
    return json.loads((out / MANIFEST).read_text())


def _mismatch(out: Path, changed: dict[str, tuple[Any, Any]]) -> str:
    """Why `out`'s embedding is not this one, in words: the data and model entries are hashes, which say
    nothing to a user, so they are named as other rows / another model, and only settings show their values."""
    data, model = changed.pop("data", None), changed.pop("model", None)
    what = []
    if data is not None:
        stream = "earlier" if data[0] is None else "now" if data[1] is None else None
        what.append(f"of rows given as a stream {stream} (no fingerprint to compare)" if stream
                    else "of other rows, or rows whose captions or images changed since (the data's fingerprint differs)")  # fmt: skip
    if model is not None:
        what.append("by another model (its weights' fingerprint differs)")
    if changed:
        what.append("made with other settings: " + ", ".join(f"{k}={was!r} (now {now!r})"
                                                             for k, (was, now) in changed.items()))  # fmt: skip
    keep = "" if data or model else "rerun with its settings to resume or reuse it, "
    return (f"{out} holds an embedding {', '.join(what)}: {keep}write to another directory, or delete {out} to "
            "embed anew there")  # fmt: skip


def _finish(out: Path, manifest: dict[str, Any], expected_rows: int | None, dim: int) -> dict[str, Any]:
    """Rank 0 checks the shards form rows 0..N-1 with no gap and marks the manifest complete."""
    import pyarrow.parquet as pq

    size = manifest["shard_size"]
    files = sorted(out.glob("shard-*.parquet"))
    shards = [{"file": f.name, "rows": pq.read_metadata(f).num_rows} for f in files]
    for k, s in enumerate(shards):
        last = k == len(shards) - 1
        if s["file"] != shard_name(k) or (s["rows"] != size and not last):
            raise RuntimeError(f"{out}: shard {shard_name(k)} is missing or short ({s}); rerun to fill it in")
    rows = sum(s["rows"] for s in shards)
    if expected_rows is not None and rows != expected_rows:
        raise ConfigError(f"{out}: shards hold {rows} rows but the input has {expected_rows}: other rows than this "
                          "folder's embedding; write to a new directory to embed them")  # fmt: skip
    manifest.update(complete=True, rows=rows, shards=shards, dim=dim)  # dim: an empty embedding is [0, dim] too
    _write_json(out / MANIFEST, manifest)
    return manifest


def _log_reused(out: Path, manifest: dict[str, Any], checked: str) -> None:
    """A warning: returning vectors computed earlier must not pass unseen in a notebook."""
    log.warning("%s already holds a complete embedding of %d rows (%s): nothing to do; reusing it. Write to a new "
                "directory to embed again", out, manifest["rows"], checked)  # fmt: skip


def embed_to_shards(
    model: FusionModel | FusionkitModel,
    data: Iterable[Any],
    output_dir: str | Path,
    *,
    shard_size: int = 10_000,
    batch_size: int = 64,
    modality: str | None = None,
    normalize: bool = True,
    precision: str = "auto",
    source: str | None = None,
    progress: bool | None = None,
    on_shard: Callable[[int, int], None] | None = None,
    on_error: str = "raise",
) -> dict[str, Any]:
    """Embed `data` (`Example`s or dict rows with id/text/image, a DataFrame of those columns, a dataset)
    into `output_dir`; returns the manifest. A complete `output_dir` of the same model, settings and rows
    is returned as it is (logged as a warning); other rows, like another model, are refused.

    Launched under `torchrun` / `accelerate launch`, every process runs this with the same arguments
    and embeds its share of the shards. `source` (e.g. the dataset path) is recorded and checked on
    resume, like the other settings and the model's weights. `on_shard(k, rows)` is called after
    shard k is on disk. `precision` as in `fusionkit.precision.choose_precision`; `on_error` as in `embed`
    (a skipped row keeps its place, with NaN as its vector).
    """
    from .data.errors import check_policy

    # every argument is checked before the manifest is written: it records them, and a rerun must match it
    if shard_size < 1:
        raise ConfigError(f"shard_size must be positive, got {shard_size}")
    if modality is not None and modality not in MODALITIES:
        raise ConfigError(f"modality must be one of {MODALITIES}, got {modality!r}")
    check_batch_size(batch_size)
    check_policy(on_error)
    model = as_fusion_model(model, "embed_to_shards")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file, not a folder: name a new folder for the shards")
    data = _as_rows(data)
    if _indexable(data) and not _is_hf_dataset(data):  # before the manifest is written: the corrected call runs
        check_unique_ids([_row(item, i)[0] for i, item in enumerate(data)], 0, {})
    if modality is None:  # `embed`'s rule: caption-only rows give text vectors; a stream (read once) joint ones
        modality = (default_modality(SimpleNamespace(text=t, image=i) for _, t, i in map(_row, data, count()))
                    if _indexable(data) else "joint")  # fmt: skip
    own_group = not D.is_distributed()
    rank, world = D.init_distributed(model.device)
    own_group = own_group and world > 1
    try:
        chosen = inference_precision(precision, model.device, "precision")
        settings = {"shard_size": shard_size, "batch_size": batch_size, "modality": modality,
                    "normalize": normalize, "precision": chosen.name, "source": source,
                    "model": model_fingerprint(model),
                    # the rows' content: other or edited rows never resume into (or reuse) old shards; rank 0
                    # alone compares it with the manifest, so only it reads the images to hash them
                    "data": data_fingerprint(data) if rank == 0 else None}  # fmt: skip
        manifest = _start(out, settings, rank)
        gone = [s["file"] for s in manifest.get("shards", []) if not (out / s["file"]).is_file()]
        reused = manifest["complete"] and not gone
        if reused and manifest["data"]:
            if rank == 0:
                _log_reused(out, manifest, "the same model, settings and rows")
            return manifest
        # (a stream has no fingerprint: its ids are checked against the shards as it is read through below)
        if gone and rank == 0:
            log.warning("%s: %d shard(s) listed as done are gone (%s): embedding them again", out, len(gone),
                        ", ".join(gone[:3]))  # fmt: skip
        done_before = any(out.glob("shard-*.parquet"))
        if done_before and not reused and manifest.get("data") is None and rank == 0:
            log.warning("%s: resuming over shards written earlier; rows given as a stream have no fingerprint, "
                        "only their ids are checked: if captions or images changed, write to a new directory", out)  # fmt: skip
        if rank == 0:
            log.info("embedding into %s on %d process(es), %s", out, world, chosen.reason)
        done = {int(f.stem.partition("-")[2]) for f in out.glob("shard-*.parquet")}
        start, rows = time.perf_counter(), 0
        # a bar on rank 0, on a terminal (None) or as asked, as `embed` draws one
        bar = tqdm(desc="embed", unit="rows", disable=True if rank else None if progress is None else not progress)
        read: list[int] = []  # a stream's row count, once read through
        first_row: dict[str, int] = {}
        for k, shard in _own_shards(data, shard_size, rank, world, done, out, read):
            ids, texts, images = zip(*shard)
            check_unique_ids(ids, k * shard_size, first_row)  # across this process's shards; embed checks within
            with chosen.autocast(model.device.type):
                vectors = embed(model, texts if modality != "image" else None,
                                images if modality != "text" else None, batch_size=batch_size,
                                normalize=normalize, precision=chosen.name, progress=False, ids=ids,
                                on_error=on_error)[0]  # fmt: skip
            _write_shard(out / shard_name(k), list(ids), vectors)
            rows += len(ids)
            bar.update(len(ids))
            if on_shard is not None:
                on_shard(k, len(ids))
        bar.close()
        log.info("rank %d: %d rows in %.1fs (%d shards were already done)",
                 rank, rows, time.perf_counter() - start, len(done))  # fmt: skip
        D.barrier()
        if rank == 0:
            expected = len(data) if _indexable(data) else read[0]  # type: ignore[arg-type]
            manifest = _finish(out, manifest, expected, model.config.fusion.dim)
            if reused:
                _log_reused(out, manifest, "the same model and settings, and a stream of the same ids: edited "
                            "captions or images cannot be told apart")  # fmt: skip
        D.barrier()
        return json.loads((out / MANIFEST).read_text())
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def read_embeddings(output_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """(ids, vectors [N, dim]) of a complete sharded embedding, in input order. Note the order: ids first,
    the reverse of `embed(..., return_ids=True)`'s `(vectors, ids)` (both kept for existing callers)."""
    import pyarrow.parquet as pq

    out = Path(output_dir)
    path = out / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out} has no {MANIFEST}: not a fusionkit sharded embedding")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise RuntimeError(f"the embedding in {out} is not complete: run the same command (same data and settings) "
                           "again to finish it, or write to a new directory")
    ids: list[str] = []
    parts: list[np.ndarray] = []
    gone = [s["file"] for s in manifest["shards"] if not (out / s["file"]).is_file()]
    if gone:
        raise FileNotFoundError(f"{out}: {len(gone)} shard(s) of this embedding are gone ({', '.join(gone[:3])}): "
                                "run embed_to_shards (or `fusionkit embed`) into this folder again with the same "
                                "model, data and settings to recompute them; the other shards are kept")  # fmt: skip
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        ids += table.column("id").to_pylist()
        emb = table.column("embedding").combine_chunks()
        parts.append(emb.values.to_numpy().reshape(len(emb), emb.type.list_size))
    dim = parts[0].shape[1] if parts else manifest.get("dim", 0)
    return ids, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
