"""The .safetensors format: an 8-byte header length, a JSON header, then the raw tensors.

Parsed here rather than through `safetensors.safe_open(framework="numpy")`, which has no
bfloat16; every tensor is a read-only view of the memory-mapped file.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlx_rwkv.checkpoint.files import BF16, F16, F32, map_file, raw_bytes, tensor_at
from mlx_rwkv.config import CheckpointError

DTYPES = {"F32": F32, "F16": F16, "BF16": BF16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, memory-mapped."""
    buf = map_file(path)
    (n,) = struct.unpack_from("<Q", buf, 0)
    if 8 + n > len(buf):
        raise CheckpointError(f"truncated .safetensors file {path}: the header says {n} bytes, "
                              f"the file has {len(buf) - 8} after the length")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"damaged .safetensors header in {path}: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"damaged .safetensors header in {path}: not a JSON object")
    header.pop("__metadata__", None)
    return {key: _tensor(buf, 8 + n, key, meta) for key, meta in header.items()}


def _tensor(buf: bytes, base: int, key: str, meta: object) -> np.ndarray:
    try:
        dtype_name, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        dims_ok = (isinstance(dtype_name, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                   and isinstance(begin, int) and isinstance(end, int))
    except (TypeError, KeyError, ValueError):
        dims_ok = False
    if not dims_ok:
        raise CheckpointError(f"damaged .safetensors header: bad entry for {key}: {meta!r:.120}")
    if dtype_name not in DTYPES:
        raise CheckpointError(f"tensor {key} has dtype {dtype_name}: mlx-rwkv reads F32, F16 and BF16")
    dtype = DTYPES[dtype_name]
    if begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"damaged .safetensors header: {key} {list(shape)} {dtype_name} "
                              f"does not match its byte range {begin}..{end}")
    return tensor_at(buf, dtype, shape, base + begin, key)


def write_safetensors(weights: dict[str, np.ndarray], f: BinaryIO) -> None:
    """Write contiguous float tensors as .safetensors (widest dtypes first, so all stay aligned)."""
    order = sorted(weights, key=lambda k: -weights[k].itemsize)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        arr = weights[key]
        header[key] = {"dtype": DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned, as safetensors pads
    f.write(struct.pack("<Q", len(text)) + text)
    for key in order:
        f.write(raw_bytes(weights[key]))
