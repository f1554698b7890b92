"""rwkv.cpp model files (FP32/FP16), rebuilt into the official .pth layout.

Layout (little-endian): `int32 magic, version, n_vocab, n_embd, n_layer, data_type`, then per
tensor `int32 n_dims, key_len, dtype` (0 f32, 1 f16, others quantized), `int32 dims[n_dims]` in
ggml (reversed) order, the UTF-8 key, and the row-major data. For x070 its converter differs
from the official layout in two ways that we undo: `att.x_r..x_g` are concatenated into
`att.x_rwkvag` (6, 1, C), and the LoRA matrices w1 w2 a1 a2 v1 v2 g1 g2 are transposed.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from mlx_rwkv.checkpoint.files import F16, F32, map_file, tensor_at
from mlx_rwkv.config import CheckpointError

MAGIC = 0x67676D66  # "ggmf"
VERSIONS = (100, 101)
TENSOR_DTYPES = {0: F32, 1: F16}
LORA = {"w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"}
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions


def read_rwkvcpp(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an rwkv.cpp file under official names and shapes."""
    buf = map_file(path)
    if len(buf) < 24:
        raise CheckpointError(f"truncated rwkv.cpp file {path}: {len(buf)} bytes, the header alone needs 24")
    _magic, version, n_vocab, n_embd, _n_layer, _data_type = struct.unpack_from("<6i", buf, 0)
    if version not in VERSIONS:
        raise CheckpointError(f"rwkv.cpp file version {version} is not supported (expected 100 or 101)")
    raw: dict[str, np.ndarray] = {}
    pos = 24
    while pos < len(buf):
        key, arr, pos = _read_tensor(buf, pos)
        raw[key] = arr
    weights = to_official(raw)
    if "emb.weight" in weights and weights["emb.weight"].shape != (n_vocab, n_embd):
        raise CheckpointError(f"damaged rwkv.cpp file: the header says vocab {n_vocab} x {n_embd}, "
                              f"emb.weight is {list(weights['emb.weight'].shape)}")
    return weights


def _read_tensor(buf: bytes, pos: int) -> tuple[str, np.ndarray, int]:
    """One tensor record at `pos`: its key, its data (a view) and the position after it."""
    if pos + 12 > len(buf):
        raise CheckpointError(f"truncated rwkv.cpp file: a tensor header at byte {pos} is cut off")
    n_dims, key_len, dtype_id = struct.unpack_from("<3i", buf, pos)
    if not (1 <= n_dims <= MAX_DIMS and 0 < key_len <= 1024):
        raise CheckpointError(f"damaged rwkv.cpp file: bad tensor header at byte {pos} "
                              f"(n_dims={n_dims}, key_len={key_len})")
    key_at = pos + 12 + 4 * n_dims
    if key_at + key_len > len(buf):
        raise CheckpointError(f"truncated rwkv.cpp file: a tensor header at byte {pos} is cut off")
    dims = struct.unpack_from(f"<{n_dims}i", buf, pos + 12)[::-1]  # ggml order -> torch order
    try:
        key = bytes(buf[key_at:key_at + key_len]).decode()
    except UnicodeDecodeError:
        raise CheckpointError(f"damaged rwkv.cpp file: the tensor name at byte {key_at} is not UTF-8") from None
    if dtype_id not in TENSOR_DTYPES:
        raise CheckpointError(f"tensor {key} has rwkv.cpp type {dtype_id} (quantized): only FP32 and FP16 "
                              "files can be read; convert the original .pth instead")
    if min(dims) < 0:
        raise CheckpointError(f"damaged rwkv.cpp file: tensor {key} has dims {list(dims)}")
    arr = tensor_at(buf, TENSOR_DTYPES[dtype_id], dims, key_at + key_len, key)
    return key, arr, key_at + key_len + arr.nbytes


def to_official(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split att.x_rwkvag into x_r..x_g and transpose the LoRA matrices back."""
    out: dict[str, np.ndarray] = {}
    for key, arr in raw.items():
        prefix, _, name = key.rpartition(".")
        if name == "x_rwkvag" and arr.shape[0] == 6:
            for i, letter in enumerate("rwkvag"):
                out[f"{prefix}.x_{letter}"] = arr[i:i + 1]
        elif name in LORA and prefix.endswith(".att") and arr.ndim == 2:
            out[key] = np.ascontiguousarray(arr.T)
        else:
            out[key] = arr
    return out
