"""Shared helpers of the checkpoint readers and writers: dtypes, file mapping, atomic writes."""
from __future__ import annotations

import mmap
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

import ml_dtypes
import numpy as np

from mlx_rwkv.config import CheckpointError

F32, F16, BF16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (F32, F16, BF16)


def map_file(path: Path) -> mmap.mmap | bytes:
    """The whole file, memory-mapped read-only (arrays made with np.frombuffer keep it alive)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def tensor_at(buf: mmap.mmap | bytes, dtype: np.dtype, shape: tuple[int, ...], offset: int, what: str) -> np.ndarray:
    """A read-only array view of `buf` at `offset`; CheckpointError if the file ends too early."""
    count = int(np.prod(shape, dtype=np.int64))
    end = offset + count * dtype.itemsize
    if end > len(buf):
        raise CheckpointError(
            f"truncated file: {what} needs bytes {offset}..{end} but the file ends at {len(buf)}")
    if count == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(buf, dtype, count, offset).reshape(shape)


def check_weights(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Contiguous copies-if-needed of the tensors to write; refuse keys or dtypes we cannot store."""
    out = {}
    for key, arr in weights.items():
        if not isinstance(key, str) or not isinstance(arr, np.ndarray):
            raise TypeError(f"weights must map str to np.ndarray, got {key!r}: {type(arr).__name__}")
        if arr.dtype not in FLOAT_DTYPES:
            raise ValueError(f"cannot save {key} of dtype {arr.dtype}: use float32, float16 or bfloat16")
        out[key] = np.ascontiguousarray(arr)
    return out


def raw_bytes(arr: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (no copy)."""
    return memoryview(arr.reshape(-1).view(np.uint8))


class OutputExistsError(FileExistsError):
    """The output file exists and the caller did not allow replacing it."""


@contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """A temporary path next to `path` to write; on success it becomes `path` in one step.

    With `replace=False` an existing `path` is never touched: the temporary file is hard-linked
    into place, which fails if the name exists, even when it appears while we write. Files get
    the umask's permissions (0644 under the usual 022), like any file a tool creates.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp`'s content the name `path` only if that name is free."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path} exists: not replaced") from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise OutputExistsError(f"{path} exists: not replaced") from None
        os.replace(tmp, path)


@contextmanager
def atomic_output(path: str | os.PathLike, replace: bool = True) -> Iterator[BinaryIO]:
    """A binary file object whose content becomes `path` only if the block succeeds."""
    with atomic_path(path, replace) as tmp, open(tmp, "wb") as f:
        yield f
