"""One on-disk store for everything computed once and read many times (the token/pixel cache, the
frozen-feature cache): named arrays in a folder with a `meta.json`, published by an atomic rename.

- Fixed-shape arrays (`pixels` [N, 3, H, W]) are `.npy` files written in place through a memmap.
- Ragged arrays (`tokens`: one int row per item, `text` features: one [L, W] block per item) are one
  `.npy` of the rows concatenated plus `<name>.offsets.npy` (int64 [N+1]); rows are appended as they are
  produced, so nothing is held in memory.
- `open_or_build(path, build)` returns the store at `path`, building it only if absent. The build writes
  into a private temp folder, syncs it to disk and renames it onto `path` (`meta.json` last), so a
  reader never sees half a store, even after a crash. An advisory lock on the parent folder makes a
  second process building there wait, then use the first one's store; where locks are unavailable
  (some network filesystems), both build and the loser of the rename discards its copy. Temp folders
  of builds that died (SIGKILL, power loss) are removed by the next build in the same folder: a live
  build always holds the lock (without locks: those older than `UNLOCKED_STALE_S`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builds still end with one winner
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("fusionkit")

META = "meta.json"
_TMP = ".tmp-store-"  # temp folder infix: only folders named so are ever swept
UNLOCKED_STALE_S = 2 * 86400  # where locks are unsupported, a temp folder this old is a dead build's
_HEADER = 128  # bytes reserved for a ragged array's .npy header, rewritten with the real shape at close


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 `.npy` header of exactly `_HEADER` bytes (so it can be written before the shape is known)."""
    desc = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    text = repr(desc).ljust(_HEADER - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


class RaggedWriter:
    """Appends rows of shape [len, *row_shape] to `<name>.npy`; `close()` writes the header and offsets."""

    def __init__(self, folder: Path, name: str, dtype: Any, row_shape: tuple[int, ...] = ()) -> None:
        self.folder, self.name = folder, name
        self.dtype, self.row_shape = np.dtype(dtype), tuple(row_shape)
        self.lengths: list[int] = []
        self._f = (folder / f"{name}.npy").open("wb")
        self._f.write(b"\0" * _HEADER)

    def append(self, row: Any) -> None:
        row = np.ascontiguousarray(row, dtype=self.dtype)
        if row.shape[1:] != self.row_shape:
            raise ValueError(f"{self.name}: row shape {row.shape} does not match [len, *{self.row_shape}]")
        self._f.write(row.tobytes())
        self.lengths.append(len(row))

    def close(self) -> None:
        self._f.seek(0)
        self._f.write(_npy_header(self.dtype, (sum(self.lengths), *self.row_shape)))
        self._f.close()
        offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)
        np.save(self.folder / f"{self.name}.offsets.npy", offsets)


def _size(nbytes: float) -> str:
    """Bytes as MiB, or KiB under one MiB (a small disk's "needs 0 MiB, 0 MiB are free" read as a contradiction)."""
    return f"{nbytes / 2**20:,.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.0f} KiB"


def no_room(e: BaseException, folder: Path, what: str) -> OSError | None:
    """`e` as "no room for WHAT in FOLDER (N MiB free)" when it is a full disk or a file-size limit, else None.
    Why: writers say it their own way (numpy "96000 requested and 24544 written", Arrow "Error writing bytes",
    `ulimit -f` "File too large"), none naming the folder."""
    code = getattr(e, "errno", None)
    text = str(e)
    if "no room for " in text:  # said already (by an inner writer)
        return None
    if code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and not any(
        m in text for m in ("No space left", "requested and", "File too large", "os error 28", "Disk quota")
    ):
        return None
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    reason = getattr(e, "strerror", None) or text.splitlines()[0]
    return OSError(code or errno.ENOSPC, f"no room for {what} in {folder} ({reason}; {free}): free space, "
                   "raise the file size limit (ulimit -f), or write elsewhere")  # fmt: skip


class StoreWriter:
    """What a build function gets: a temp folder to fill with arrays and files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ragged: list[RaggedWriter] = []

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.memmap:
        """A zero-filled fixed-shape array on disk, writable in place (also from forked workers).

        Its blocks are allocated now: a sparse memmap on a full disk kills the writer with SIGBUS (no message,
        no traceback) at the first page the disk cannot hold; allocated, it is an OSError naming the folder."""
        path = self.path / f"{name}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        if hasattr(os, "posix_fallocate") and out.nbytes:
            try:
                with open(path, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, out.offset + out.nbytes)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                        return out  # a file system without fallocate: as before
                    raise
                del out
                free = shutil.disk_usage(self.path).free
                raise OSError(e.errno, f"no room for the cache's {name} ({e.strerror}): it needs "
                              f"{_size(np.prod(shape) * np.dtype(dtype).itemsize)} in {self.path.parent}, "
                              f"{_size(free)} are free; free space or set data.cache_dir (--cache-dir, "
                              "$FUSIONKIT_CACHE) to another disk") from None  # fmt: skip
        return out

    def ragged(self, name: str, dtype: Any, row_shape: tuple[int, ...] = ()) -> RaggedWriter:
        """A ragged array filled row by row with `.append`; closed by `open_or_build`."""
        w = RaggedWriter(self.path, name, dtype, row_shape)
        self._ragged.append(w)
        return w

    def _close(self) -> None:
        for w in self._ragged:
            w.close()


FILES = "_files"  # meta key: {file name: [size, sha256]} of every file the build wrote
META_SHA = "_meta_sha256"  # meta key: the hash of the rest of meta.json (ids, labels...: read as they are)


def _damaged(folder: Path, what: str) -> OSError:
    return OSError(f"the cache folder {folder} is damaged ({what}); delete that folder and run again: it is rebuilt")


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, *stat: int) -> str:
    """Memoized per process by inode, size, mtime and ctime (which no copy tool can restore): an unchanged
    stat means unchanged bytes, so a store is hashed once per process however often it is opened."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of `meta` as JSON (`META_SHA` aside), keys sorted: a file re-indented by a tool keeps it."""
    body = {k: v for k, v in meta.items() if k != META_SHA}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load(path: Path, mmap: bool = True) -> np.ndarray:
    """One array of a published store; a file cut short or altered since (a full disk, a copy that stopped)
    is named with what to do, not left to numpy's "mmap length is greater than file size"."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _damaged(path.parent, f"{path.name}: {e}") from None


class Ragged:
    """Read side of a ragged array: `r[i]` is row i (a view into the memmap), `len(r)` the number of rows."""

    def __init__(self, folder: Path, name: str) -> None:
        self.values = _load(folder / f"{name}.npy")
        self.offsets = _load(folder / f"{name}.offsets.npy", mmap=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """Every row's length, without reading the rows."""
        return np.diff(self.offsets)


class Store:
    """A completed store folder: `meta`, `array(name)` (read-only memmap), `ragged(name)`."""

    def __init__(self, path: str | Path) -> None:
        """Opened only if every file, `meta.json` too, is as built: a cache altered in place (same size, other
        bytes) or labels edited in its meta.json would otherwise train a wrong model without an error. Every store
        at a current cache key records both checksums (the keys' versions say so): one without them is damaged."""
        self.path = Path(path)
        try:
            try:
                self.meta: dict[str, Any] = json.loads((self.path / META).read_text())
            except json.JSONDecodeError as e:  # cut or emptied: name the file, not only the parser's words
                raise ValueError(f"{META} is not valid JSON ({e})") from None
            if not isinstance(self.meta, dict) or FILES not in self.meta or META_SHA not in self.meta:
                raise ValueError(f"{META} lacks its checksums ({FILES}, {META_SHA}): edited since, or not written "
                                 "by fusionkit")  # fmt: skip
            if _meta_digest(self.meta) != self.meta[META_SHA]:
                raise ValueError(f"{META} is not as built: edited since")
            built = {name: tuple(v) for name, v in self.meta[FILES].items()}
            found = {name: ((self.path / name).stat().st_size, _digest(self.path / name)) for name in built}
        except (ValueError, OSError) as e:  # a cut meta.json, a missing file
            raise _damaged(self.path, str(e)) from None
        for name, (size, sha) in found.items():
            if (size, sha) != built[name]:
                raise _damaged(self.path, f"{name} is not as built: {size:,} bytes, sha256 {sha[:12]}, instead of "
                               f"{built[name][0]:,} bytes, {built[name][1][:12]}")  # fmt: skip

    def array(self, name: str) -> np.ndarray:
        return _load(self.path / f"{name}.npy")

    def ragged(self, name: str) -> Ragged:
        return Ragged(self.path, name)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"


def is_built(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `folder` itself (no lock file is left behind); blocks while
    another process builds there. Yields False where directory locks are unsupported."""
    if fcntl is None:
        yield False
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building in %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK, EBADF on some network filesystems
            log.debug("no lock on %s (%s): building unlocked", folder, e)
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temps(folder: Path, older_than_s: float = 0.0) -> list[Path]:
    """Remove the temp folders in `folder` left by builds that died (SIGKILL, power loss). Holding the
    folder's lock, every temp is such a leftover (a live build holds the lock); without locks, only
    those untouched for `older_than_s` seconds are."""
    removed, now = [], time.time()
    for tmp in folder.glob(f".*{_TMP}*"):
        with contextlib.suppress(FileNotFoundError):  # another unlocked process got there first
            if tmp.is_dir() and now - tmp.stat().st_mtime >= older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
    if removed:
        log.warning("removed %d temp folder(s) of interrupted builds in %s", len(removed), folder)
    return removed


def open_or_build(path: str | Path, build: Callable[[StoreWriter], dict[str, Any]]) -> Store:
    """The store at `path`; if absent, `build(writer)` fills a temp folder and returns the meta dict,
    then the folder is published atomically. Safe when several processes build the same path at once.
    A non-empty folder at `path` without `meta.json` is no build's (publishing is one rename): named as damaged.
    `build` must not itself build a store in the same parent folder (it would wait for its own lock).
    """
    final = Path(path)
    if is_built(final):
        return Store(final)
    if final.is_dir() and any(final.iterdir()):  # never half-published (the rename moves meta.json with the rest)
        raise _damaged(final, f"{META} is missing: a copy that stopped, or deleted")  # named before a whole build
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        probe = final.parent / f".write-probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:  # a read-only cache folder: say which one and how to point elsewhere
        raise OSError(e.errno, f"cache folder {final.parent} is not writable ({e.strerror or e}), and {final.name} "
                      "is not built there yet: point the cache at a folder you can write: --data.cache_dir DIR for train and "
                      "tune, --cache-dir DIR for eval, predict and embed, or $FUSIONKIT_CACHE") from None  # fmt: skip
    with _locked(final.parent) as locked:
        if is_built(final):  # another process built it while we waited for the lock
            log.info("using the store another process just built: %s", final)
            return Store(final)
        remove_stale_temps(final.parent, 0.0 if locked else UNLOCKED_STALE_S)
        tmp = final.parent / f".{final.name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            writer = StoreWriter(tmp)
            meta = build(writer)
            writer._close()
            meta[FILES] = {f.name: [f.stat().st_size, _digest(f)] for f in sorted(tmp.iterdir()) if f.is_file()}
            meta = json.loads(json.dumps(meta))  # as a reader will see it (tuples as lists, keys as strings)
            meta[META_SHA] = _meta_digest(meta)
            (tmp / META).write_text(json.dumps(meta))
            _sync(tmp)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _say_older_stores(final.parent)
    return Store(final)


_SAID_OLDER: set[Path] = set()


def _say_older_stores(root: Path) -> None:
    """After a build, once per cache folder: the stores an older fusionkit built there (no `META_SHA`: before
    cache version 7) are never read again; say how much space they hold and that they can go."""
    if root in _SAID_OLDER:
        return
    _SAID_OLDER.add(root)
    older, size = [], 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError):
            continue  # no store (or a damaged one, named when it is opened)
        if isinstance(meta, dict) and META_SHA not in meta:
            older.append(folder.name)
            size += sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    said = root / ".older-stores-said"  # the folders said already (by any process): each set is said once
    try:
        if not older or (said.is_file() and said.read_text() == "\n".join(older)):
            return
        said.write_text("\n".join(older))
    except OSError:  # a cache folder another user owns: said, and said again next time
        pass
    log.warning("%s holds %d cache folder(s) an older fusionkit built (%.1f MB), which this version never reads "
                "(it rebuilt what it needs under new names): delete them to free the space, e.g. %s",
                root, len(older), size / 1e6, ", ".join(older[:3]) + (", ..." if len(older) > 3 else ""))  # fmt: skip


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():  # Windows cannot open a folder; there is nothing to sync then
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some filesystems refuse fsync on a folder (EINVAL)
            raise
    finally:
        os.close(fd)


def _sync(folder: Path) -> None:
    """fsync every file, then the folder: a rename may reach the disk before the data it names."""
    for f in [*folder.iterdir(), folder]:
        _fsync(f)


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` onto `final`; if another builder got there first, keep theirs and drop ours."""
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not is_built(final):
            raise
        log.info("another process published %s first: using it", final)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    _fsync(final.parent)  # the rename itself


def replace_file(path: Path, write: Callable[[Path], Any], elsewhere: str = "another run.output_dir") -> None:
    """`write(tmp)`, then `tmp` renamed over `path`: a failed or killed write leaves the previous file whole and
    a failed one no temporary file, and another name of the old file (a hard-linked copy of a run, `cp -al`, or
    a backup) keeps its bytes. Says which file could not be written, and to free space or choose `elsewhere`."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix kept: savefig reads the format from it
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}): free space or choose "
                               f"{elsewhere}, then run the same command again") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all (`replace_file`)."""
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_atomic(path: Path, lines: Sequence[str]) -> None:
    """Append `lines` to `path` by writing it anew (`replace_file`): an append in place would write into the
    original run's file too when this run is a hard-linked copy of it."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_atomic(path, old + ("\n" if old and not old.endswith("\n") else "") + "".join(line + "\n" for line in lines))
