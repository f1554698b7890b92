"""`mlx-rwkv info PATH`: what a checkpoint holds, read from the file alone.

The tensors stay memory-mapped on the host (numpy views): nothing is copied to the device and
no model is built, so `info` on a 7B file takes about as long as reading its header.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from .config import SHAPES, config_for_shape
from .loading import read_weights
from .quant import Q4KTensor


def storage(value: np.ndarray | Q4KTensor) -> str:
    """How one tensor is stored: 'q4_k' or its numpy dtype name."""
    return "q4_k" if isinstance(value, Q4KTensor) else str(value.dtype)


def describe(path: str | os.PathLike) -> dict:
    """Format, sizes, parameter count and storage of the checkpoint at `path`."""
    weights, config, description = read_weights(path)
    used = [weights[key] for key in config.expected_shapes()]  # not layer 0's unused v0/v1/v2 (GGUF drops them)
    params = sum(int(np.prod(v.shape)) for v in used)
    by_storage: Counter[str] = Counter()
    for value in used:
        by_storage[storage(value)] += int(np.prod(value.shape))
    return {
        "path": str(path),
        "format": description.rsplit("(", 1)[-1].rstrip(")"),
        "file_mb": Path(path).stat().st_size / 2**20,
        "shape": next((name for name in SHAPES if config_for_shape(name, vocab_size=config.vocab_size) == config),
                      None),
        "layers": config.n_layer, "width": config.n_embd, "heads": config.n_head,
        "head_size": config.head_size, "vocab": config.vocab_size, "ffn": config.d_ffn,
        "lora_ranks": {"decay": config.d_decay, "a": config.d_aaa, "value": config.d_mv, "gate": config.d_gate},
        "parameters": params,
        "storage": {kind: count / params for kind, count in by_storage.most_common()},
        "head": storage(weights["head.weight"]),
        "fingerprint": config.fingerprint(),
    }


def format_info(info: dict) -> str:
    """The `describe` dict as aligned lines for the terminal."""
    ranks = ", ".join(f"{k} {v}" for k, v in info["lora_ranks"].items())
    mix = ", ".join(f"{kind} {share:.1%}" for kind, share in info["storage"].items())
    rows = [
        ("file", f"{info['path']} ({info['file_mb']:,.1f} MiB)"),
        ("format", info["format"]),
        ("model", f"RWKV-7 x070{' ' + info['shape'] + ' shape' if info['shape'] else ''}"),
        ("layers", info["layers"]),
        ("width", f"{info['width']} ({info['heads']} head{'s' if info['heads'] > 1 else ''} of {info['head_size']})"),
        ("vocab", info["vocab"]),
        ("ffn", info["ffn"]),
        ("LoRA ranks", ranks),
        ("parameters", f"{info['parameters']:,}"),
        ("storage", f"{mix} of the parameters; head {info['head']}"),
        ("fingerprint", info["fingerprint"]),
    ]
    return "\n".join(f"{name:<12} {value}" for name, value in rows)
