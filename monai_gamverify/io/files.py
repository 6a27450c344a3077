"""Atomic file writes: a result file is either complete or absent, with explicit permissions and fsync."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_path", "write_json", "write_csv", "FILE_MODE"]

#: permission bits of every file the package writes (explicit: reading the process umask would race between threads)
FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success its data is flushed to disk (``fsync``), it gets ``mode``
    and is renamed onto ``path``: a reader or a resumed run sees the complete file or none, also after a crash.

    Args:
        path: the final file.
        mode: permission bits of the final file.

    Example:
        >>> with atomic_path("table.csv") as tmp:
        ...     df.to_csv(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix so writers that infer the format from the name (nibabel, pandas) still work
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # the writer closed its own handle: flush the data through a new one
            os.fsync(fh.fileno())
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars and arrays converted)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default) + "\n")
    return out


def write_csv(df: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    out = Path(path)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, **kwargs)
    return out
