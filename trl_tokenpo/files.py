"""Atomic files: what a reader finds is the old file, no file, or the whole new one, whatever kills the writer.

Used by the trainers' checkpoint counters and by the estimator's adapter directories and score store. A file is
written to a temporary name next to its target (``.<name>.<host>.<pid>.<random>.tmp``, see :func:`temp_path`),
fsynced, then renamed over the target; a temporary file whose writer is gone is recognised by :func:`is_stale_temp`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any


__all__ = ["HOST", "atomic_write_bytes", "atomic_write_json", "is_stale_temp", "read_json", "temp_path"]

HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]+)\.tmp$")




def temp_path(target: str | os.PathLike) -> Path:
    """A temporary name next to `target` that says which host and process writes it."""
    target = Path(target)
    return target.with_name(f".{target.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `target` so that readers see the old file, nothing, or the whole new file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON (sorted keys, no NaN) to `target` atomically, like :func:`atomic_write_bytes`."""
    text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
    atomic_write_bytes(target, (text + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None if it is absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists but not ours, or cannot tell
    return True


def is_stale_temp(path: Path, max_age: float = 3600.0) -> bool:
    """Whether `path` is a temporary file or directory of `temp_path` (or an adapter staging directory
    `.<name>.<pid>.tmp`) whose writer is gone: a dead process on this host, or older than `max_age` seconds when its
    host is another one."""
    match = _TEMP_RE.match(path.name)
    if match is None:
        legacy = re.match(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.tmp$", path.name)
        if legacy is None:
            return False
        host, pid = HOST, int(legacy["pid"])
    else:
        host, pid = match["host"], int(match["pid"])
    if host == HOST:
        return pid != os.getpid() and not _pid_alive(pid)
    try:
        return time.time() - path.stat().st_mtime > max_age
    except FileNotFoundError:
        return False
