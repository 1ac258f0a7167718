"""The estimator's sharded, checksummed, concurrency-safe score store (its files are written by `trl_tokenpo.files`).

Layout of one score store, `root/key/`:

    layout.json               key, num_rows, shard_size (a different layout under the same key is refused)
    request.json              what the key was computed from, for humans (never read back)
    shard-00000.npz           the rows of shard 0: per column a flat float32 array and row offsets (no pickle)
    shard-00000.json          its sidecar: rows, columns, size and SHA-256 of the .npz, written after it
    shard-00000.lock          held (`flock`) by the process scoring shard 0; empty, left in place

A shard exists exactly when its sidecar does and the data file matches the sidecar's size and checksum. Every file is
written atomically (temporary file in the same directory, fsync, rename), so a kill at any point leaves a complete
shard, nothing, or a temporary file (ignored, removed once its writer is dead). A shard found damaged is deleted and
reads as missing. Several processes may fill one store at once: a shard is written only under its lock, and only when
it is missing, so no shard is ever rewritten under a reader. Nothing is written while the store is only read: a
complete store in a read-only directory is a cache hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import HOST, atomic_write_bytes, atomic_write_json, is_stale_temp, read_json


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking, one process per store
    fcntl = None


logger = logging.getLogger(__name__)

__all__ = ["CacheError", "IncompleteCacheError", "ShardedScoreCache"]

FORMAT_VERSION = 2
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# ----------------------------------------------------------------------------------------------------------------------
# The score store
# ----------------------------------------------------------------------------------------------------------------------


class CacheError(Exception):
    """The score store cannot be used as asked (layout mismatch, inconsistent columns)."""


class IncompleteCacheError(CacheError):
    """`load_all` found shards missing or damaged (damaged ones were deleted). `missing` lists them all."""

    def __init__(self, message: str, missing: Sequence[int]):
        super().__init__(message)
        self.missing = list(missing)


class _CorruptShard(Exception):
    pass


class ShardedScoreCache:
    """Variable-length float32 lists per row and column, for rows `[0, num_rows)` in shards of `shard_size` rows.

    Args:
        root: directory holding one subdirectory per key.
        key: the store's key (letters, digits, `.`, `_`, `-`), typically a fingerprint.
        num_rows: number of rows.
        shard_size: rows per shard (the last shard may be shorter).
        columns: the column names every shard holds.
        request: what the key was computed from, written to `request.json` with the first shard.

    Raises:
        CacheError: the key's directory holds a store of another `num_rows` / `shard_size`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        key: str,
        num_rows: int,
        shard_size: int,
        columns: Sequence[str],
        request: Mapping[str, Any] | None = None,
    ):
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid store key {key!r}: 1-128 letters, digits, '.', '_' or '-'")
        if num_rows < 0 or shard_size < 1:
            raise ValueError(f"need num_rows >= 0 and shard_size >= 1, got {num_rows} and {shard_size}")
        self.directory = Path(root) / key
        self.key, self.num_rows, self.shard_size = key, num_rows, shard_size
        self.columns = list(columns)
        self.request = dict(request) if request is not None else None
        self._prepared = False
        existing = read_json(self.directory / "layout.json")
        if existing is not None and existing != self._layout():
            raise CacheError(
                f"score store {self.directory} was created with num_rows={existing.get('num_rows')}, "
                f"shard_size={existing.get('shard_size')}, this one has num_rows={num_rows}, shard_size={shard_size}: "
                "use the same cache_shard_size, or delete the directory to start over"
            )

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def shard_rows(self, i: int) -> range:
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range: this store has {self.num_shards} shards")
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_rows))

    def shard_path(self, i: int) -> Path:
        return self.directory / f"shard-{i:05d}.npz"

    def sidecar_path(self, i: int) -> Path:
        return self.directory / f"shard-{i:05d}.json"

    def _layout(self) -> dict:
        return {"format_version": FORMAT_VERSION, "key": self.key, "num_rows": self.num_rows, "shard_size": self.shard_size}

    def _prepare_for_writing(self) -> None:
        """Create the directory and its descriptive files, and remove temporary files of dead writers; run before the
        first write only, so that reading never writes."""
        if self._prepared:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if not (self.directory / "layout.json").exists():
            atomic_write_json(self.directory / "layout.json", self._layout())
        if self.request is not None and not (self.directory / "request.json").exists():
            atomic_write_json(self.directory / "request.json", self.request)
        for path in self.directory.glob(".*.tmp"):
            if is_stale_temp(path):
                _remove(path)
        self._prepared = True

    # -- reading -------------------------------------------------------------------------------------------------------

    def missing_shards(self, verify: bool = False) -> list[int]:
        """Shards not stored (damaged ones are deleted and listed). `verify`: hash every stored shard; otherwise only
        sidecars and file sizes are checked."""
        missing = []
        for i in range(self.num_shards):
            try:
                sidecar = self._sidecar(i)
                if sidecar is None:
                    missing.append(i)
                elif verify:
                    self._verified_bytes(i, sidecar)
                elif self.shard_path(i).stat().st_size != sidecar["size"]:
                    raise _CorruptShard(f"shard {i}: size differs from its sidecar")
            except (_CorruptShard, FileNotFoundError) as exc:
                self._discard(i, exc)
                missing.append(i)
        return missing

    def has_shard(self, i: int) -> bool:
        """Whether shard `i` is stored (sidecar readable and matching, data file of the recorded size), unverified."""
        try:
            sidecar = self._sidecar(i)
            return sidecar is not None and self.shard_path(i).stat().st_size == sidecar["size"]
        except (_CorruptShard, FileNotFoundError):
            return False

    def _sidecar(self, i: int) -> dict | None:
        path = self.sidecar_path(i)
        if not path.exists():
            return None
        sidecar = read_json(path)
        if sidecar is None:
            if not path.exists():  # removed meanwhile
                return None
            raise _CorruptShard(f"shard {i}: sidecar unreadable")
        rows = self.shard_rows(i)
        expected = {"key": self.key, "shard": i, "start": rows.start, "stop": rows.stop, "columns": self.columns}
        for name, value in expected.items():
            if sidecar.get(name) != value:
                raise _CorruptShard(f"shard {i}: sidecar has {name}={sidecar.get(name)!r}, expected {value!r}")
        if not isinstance(sidecar.get("sha256"), str) or not isinstance(sidecar.get("size"), int):
            raise _CorruptShard(f"shard {i}: sidecar lacks sha256/size")
        return sidecar

    def _verified_bytes(self, i: int, sidecar: dict) -> bytes:
        data = self.shard_path(i).read_bytes()
        if len(data) != sidecar["size"] or hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
            raise _CorruptShard(f"shard {i}: size or sha256 differs from its sidecar")
        return data

    def _discard(self, i: int, reason: BaseException) -> None:
        logger.warning("Score store %s: discarding shard %d (%s); it will be recomputed.", self.directory, i, reason)
        _remove(self.sidecar_path(i))  # first: without it the shard reads as missing
        _remove(self.shard_path(i))

    def read_shard(self, i: int) -> dict[str, list[list[float]]] | None:
        """The columns of shard `i` after verifying its checksum, or None when it is missing or damaged (deleted)."""
        try:
            sidecar = self._sidecar(i)
            if sidecar is None:
                return None
            return self._decode(i, self._verified_bytes(i, sidecar))
        except (_CorruptShard, FileNotFoundError) as exc:
            self._discard(i, exc)
            return None

    def _decode(self, i: int, data: bytes) -> dict[str, list[list[float]]]:
        rows = self.shard_rows(i)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                out = {}
                for c, name in enumerate(self.columns):
                    values, offsets = npz[f"values_{c}"], npz[f"offsets_{c}"]
                    if len(offsets) != len(rows) + 1 or offsets[0] != 0 or offsets[-1] != len(values):
                        raise _CorruptShard(f"shard {i}: inconsistent offsets of column {name!r}")
                    flat = values.tolist()
                    out[name] = [flat[offsets[r] : offsets[r + 1]] for r in range(len(rows))]
                return out
        except _CorruptShard:
            raise
        except Exception as exc:  # passed its checksum but cannot be parsed: a broken writer
            raise _CorruptShard(f"shard {i}: cannot be decoded ({type(exc).__name__}: {exc})") from exc

    def load_all(self) -> dict[str, list[list[float]]]:
        """Every column in row order, each shard verified. Raises `IncompleteCacheError` listing the shards that are
        missing or were found damaged (and deleted)."""
        out: dict[str, list] = {name: [] for name in self.columns}
        missing = []
        for i in range(self.num_shards):
            shard = self.read_shard(i)
            if shard is None:
                missing.append(i)
            elif not missing:
                for name in self.columns:
                    out[name].extend(shard[name])
        if missing:
            raise IncompleteCacheError(f"score store {self.directory}: shards {missing} are missing", missing)
        return out

    # -- writing -------------------------------------------------------------------------------------------------------

    def write_shard(self, i: int, columns: Mapping[str, Sequence[Sequence[float]]]) -> None:
        """Store shard `i`: for every column of the store, one float sequence per row of `shard_rows(i)`. Call it under
        `lock(i)` when other processes may fill the same store."""
        rows = self.shard_rows(i)
        if sorted(columns) != sorted(self.columns):
            raise ValueError(f"shard {i}: got columns {sorted(columns)}, the store holds {sorted(self.columns)}")
        arrays = {}
        for c, name in enumerate(self.columns):
            values = columns[name]
            if len(values) != len(rows):
                raise ValueError(f"shard {i} has {len(rows)} rows, column {name!r} has {len(values)}")
            parts = [np.asarray(row, dtype=np.float32).reshape(-1) for row in values]
            arrays[f"offsets_{c}"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
            arrays[f"values_{c}"] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        self._prepare_for_writing()
        _remove(self.sidecar_path(i))  # while the data file is replaced the shard reads as missing, never damaged
        atomic_write_bytes(self.shard_path(i), data)
        sidecar = {
            "key": self.key, "shard": i, "start": rows.start, "stop": rows.stop, "columns": self.columns,
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "writer": f"{HOST}:{os.getpid()}",
        }  # fmt: skip
        atomic_write_json(self.sidecar_path(i), sidecar)

    @contextlib.contextmanager
    def lock(self, i: int, wait: bool) -> Iterator[bool]:
        """Hold the lock of shard `i` (an `flock` on `shard-<i>.lock`, released by the kernel if the holder dies).
        Yields whether it is held; with `wait=False` it is not when another process holds it."""
        self._prepare_for_writing()
        if fcntl is None:  # pragma: no cover
            yield True
            return
        fd = os.open(self.directory / f"shard-{i:05d}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
