"""Files that several processes share: atomic replacement and advisory locks (filelock)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Replace `path` with `data` so that a reader, or a crash, sees the old file or the new one, never half
    of either (a temporary file of this process beside it, fsync'ed, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, payload: Any, **dumps: Any) -> Path:
    """`write_atomic` of `payload` as JSON (`dumps`: json.dumps' options, e.g. indent)."""
    return write_atomic(path, json.dumps(payload, **dumps))


def lock_beside(path: Path) -> FileLock:
    """The advisory lock `<path>.lock` that every writer of `path` holds (on one machine: Flower's workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(path.name + ".lock"))
