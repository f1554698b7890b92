"""Read and write RWKV-7 checkpoints: official .pth, .safetensors and rwkv.cpp .bin.

Every reader returns the canonical container: a dict of numpy arrays with the official key
names and shapes (see ModelConfig.expected_shapes), memory-mapped from the file where it can.
The format is recognised from the file's first bytes, never from its name.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from mlx_rwkv.checkpoint.files import atomic_output, check_weights
from mlx_rwkv.checkpoint.pth import read_pth, write_pth
from mlx_rwkv.checkpoint.rwkvcpp import MAGIC as RWKVCPP_MAGIC
from mlx_rwkv.checkpoint.rwkvcpp import read_rwkvcpp
from mlx_rwkv.checkpoint.safetensors_io import read_safetensors, write_safetensors
from mlx_rwkv.config import CheckpointError, ModelConfig, shapes_of

__all__ = ["Checkpoint", "CheckpointError", "detect_format", "load_checkpoint", "read_tensors", "save_checkpoint"]

READERS: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    "pth": read_pth, "safetensors": read_safetensors, "rwkvcpp": read_rwkvcpp,
}
WRITERS = {".pth": ("pth", write_pth), ".safetensors": ("safetensors", write_safetensors)}
EXPECTED = "expected a torch .pth (zip), a .safetensors file or an rwkv.cpp .bin"


@dataclass
class Checkpoint:
    """A validated RWKV-7 checkpoint: its sizes and its weights in the official layout."""

    config: ModelConfig
    weights: dict[str, np.ndarray]
    path: Path
    format: str  # "pth" | "safetensors" | "rwkvcpp"


def detect_format(path: str | Path) -> str:
    """The file's format from its first bytes: "pth", "safetensors" or "rwkvcpp" (else CheckpointError)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "pth"
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == RWKVCPP_MAGIC:
        return "rwkvcpp"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if not head:
        why = "the file is empty"
    elif head[:4] == b"GGUF":
        why = "it is a GGUF file"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        why = "it is a bare pickle (pre-1.6 torch.save format?); re-save it with a recent torch"
    else:
        why = f"it starts with bytes {head[:8].hex(' ')}"
    raise CheckpointError(f"not an RWKV checkpoint: {path}: {why} ({EXPECTED})")


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint file in the official layout, without checking them."""
    path = Path(path)
    return READERS[detect_format(path)](path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint and infer its ModelConfig; CheckpointError names everything wrong."""
    path = Path(path)
    fmt = detect_format(path)
    weights = READERS[fmt](path)
    return Checkpoint(ModelConfig.from_shapes(shapes_of(weights)), weights, path, fmt)


def save_checkpoint(weights: Mapping[str, np.ndarray], path: str | Path, format: str | None = None,
                    replace: bool = False) -> Path:
    """Write float32/float16/bfloat16 tensors as .pth or .safetensors (by extension unless
    `format` is given), atomically: the file appears complete or not at all. An existing file
    is replaced only with `replace=True` (else OutputExistsError)."""
    path = Path(path)
    by_name = {name: (name, writer) for name, writer in WRITERS.values()}
    choice = by_name.get(format) if format else WRITERS.get(path.suffix.lower())
    if choice is None:
        raise ValueError(f"cannot choose a format for {path} (format={format!r}): "
                         "use a .pth or .safetensors name, or format='pth' / 'safetensors'")
    arrays = check_weights(weights)
    with atomic_output(path, replace) as f:
        choice[1](arrays, f)
    return path
