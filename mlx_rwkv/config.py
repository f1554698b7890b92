"""Model configuration of an RWKV-7 (x070) checkpoint, inferred from tensor shapes."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np


class CheckpointError(ValueError):
    """A file is not a usable RWKV-7 checkpoint (foreign, truncated, wrong tensors...)."""


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of an x070 model. C = n_head * head_size; LoRA ranks as in DESIGN.md."""

    n_layer: int
    n_embd: int  # C
    head_size: int  # N, 64 in every released model
    vocab_size: int  # V
    d_decay: int  # Dw: rank of the w1/w2 decay LoRA
    d_aaa: int  # Da: rank of the a1/a2 in-context learning-rate LoRA
    d_mv: int  # Dv: rank of the v1/v2 value-residual LoRA
    d_gate: int  # Dg: rank of the g1/g2 gate LoRA
    d_ffn: int  # channel-mix hidden size, 4C in released models

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "head_size", "vocab_size", "d_decay", "d_aaa", "d_gate", "d_ffn"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_mv < (1 if self.n_layer > 1 else 0):
            raise CheckpointError(f"d_mv must be >= 1 for a model of {self.n_layer} layers, got {self.d_mv}")
        if self.n_embd % self.head_size:
            raise CheckpointError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def fingerprint(self) -> str:
        """A short hash of the sizes, stored with saved states to refuse foreign ones."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the official .pth layout with its shape (Linear weights [out, in])."""
        C, V, H, N, F = self.n_embd, self.vocab_size, self.n_head, self.head_size, self.d_ffn
        shapes: dict[str, tuple[int, ...]] = {
            "emb.weight": (V, C),
            "blocks.0.ln0.weight": (C,),
            "blocks.0.ln0.bias": (C,),
            "ln_out.weight": (C,),
            "ln_out.bias": (C,),
            "head.weight": (V, C),
        }
        for i in range(self.n_layer):
            p = f"blocks.{i}."
            for ln in ("ln1", "ln2"):
                shapes[p + ln + ".weight"] = (C,)
                shapes[p + ln + ".bias"] = (C,)
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
                shapes[p + "att." + name] = (1, 1, C)
            lora = {"w": self.d_decay, "a": self.d_aaa, "g": self.d_gate}
            if i > 0:  # layer 0 takes v_first = v, so it has no value-residual LoRA
                shapes[p + "att.v0"] = (1, 1, C)
                lora["v"] = self.d_mv
            for name, rank in lora.items():
                shapes[p + f"att.{name}1"] = (C, rank)
                shapes[p + f"att.{name}2"] = (rank, C)
            shapes[p + "att.r_k"] = (H, N)
            for name in ("receptance", "key", "value", "output"):
                shapes[p + f"att.{name}.weight"] = (C, C)
            shapes[p + "att.ln_x.weight"] = (C,)
            shapes[p + "att.ln_x.bias"] = (C,)
            shapes[p + "ffn.x_k"] = (1, 1, C)
            shapes[p + "ffn.key.weight"] = (F, C)
            shapes[p + "ffn.value.weight"] = (C, F)
        return shapes

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> "ModelConfig":
        """Infer the config from tensor shapes (official key names); raises CheckpointError."""
        detect_version(shapes)
        try:
            V, C = shapes["emb.weight"]
            H, N = shapes["blocks.0.att.r_k"]
            n_layer = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
            rank = lambda name: shapes[name][1]  # noqa: E731
            v_rank = shapes["blocks.1.att.v1"][1] if n_layer > 1 and "blocks.1.att.v1" in shapes else 0
            cfg = cls(
                n_layer=n_layer, n_embd=C, head_size=N, vocab_size=V,
                d_decay=rank("blocks.0.att.w1"), d_aaa=rank("blocks.0.att.a1"), d_mv=v_rank,
                d_gate=rank("blocks.0.att.g1"), d_ffn=shapes["blocks.0.ffn.key.weight"][0],
            )
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"cannot infer the RWKV-7 sizes from the tensors: missing or mis-shaped {e}") from None
        if H * N != C:
            raise CheckpointError(f"att.r_k is {H}x{N} but emb.weight has C={C}")
        cfg.check_shapes(shapes)
        return cfg

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise one CheckpointError naming every missing or mis-shaped tensor."""
        expected = self.expected_shapes()
        optional = {f"blocks.0.att.{n}" for n in ("v0", "v1", "v2")}  # present in official files, unused
        problems = [f"missing {k} {list(s)}" for k, s in expected.items() if k not in shapes]
        problems += [
            f"{k} has shape {list(shapes[k])}, expected {list(s)}"
            for k, s in expected.items()
            if k in shapes and tuple(shapes[k]) != s
        ]
        unknown = sorted(set(shapes) - set(expected) - optional)
        problems += [f"unexpected tensor {k}" for k in unknown]
        if problems:
            raise CheckpointError(f"{len(problems)} tensor problem(s) in this RWKV-7 checkpoint:\n  " + "\n  ".join(problems))


def detect_version(shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse checkpoints of other RWKV versions with a message naming the one they look like."""
    keys = set(shapes)
    if "blocks.0.att.r_k" in keys and "blocks.0.att.k_k" in keys:
        return
    if "emb.weight" not in keys and not any(k.startswith("blocks.") for k in keys):
        raise CheckpointError("this file holds no RWKV tensors (no emb.weight, no blocks.*)")
    if "blocks.0.att.time_maa_x" in keys or "blocks.0.att.time_faaaa" in keys and "blocks.0.att.time_maa_w1" in keys:
        version = "RWKV-6 (x060)"
    elif "blocks.0.att.time_faaaa" in keys or "blocks.0.att.ln_x.weight" in keys and "blocks.0.att.gate.weight" in keys:
        version = "RWKV-5 (x052)"
    elif "blocks.0.att.time_first" in keys:
        version = "RWKV-4"
    else:
        version = "an unknown RWKV variant"
    raise CheckpointError(f"this checkpoint looks like {version}; mlx-rwkv runs RWKV-7 (x070) only")


def shapes_of(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in weights.items()}


# Real model sizes (DESIGN.md). d_ffn = 4C, head_size 64, vocab 65536.
SHAPES: dict[str, dict[str, int]] = {
    "0.1B": dict(n_layer=12, n_embd=768, d_decay=64, d_aaa=64, d_mv=32, d_gate=128),
    "0.4B": dict(n_layer=24, n_embd=1024, d_decay=64, d_aaa=64, d_mv=32, d_gate=128),
    "1.5B": dict(n_layer=24, n_embd=2048, d_decay=96, d_aaa=96, d_mv=64, d_gate=256),
    "2.9B": dict(n_layer=32, n_embd=2560, d_decay=96, d_aaa=96, d_mv=64, d_gate=320),
    "7.2B": dict(n_layer=32, n_embd=4096, d_decay=128, d_aaa=128, d_mv=96, d_gate=480),
}


def config_for_shape(name: str, **overrides: int) -> ModelConfig:
    """The config of a named real size, optionally with layers/embd/vocab overridden."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    sizes = dict(SHAPES[name], head_size=64, vocab_size=65536)
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**sizes, d_ffn=4 * sizes["n_embd"])
