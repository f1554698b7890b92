"""Recurrent state of an RWKV-7 model: constant size, the WKV part always fp32."""
from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from .checkpoint.files import atomic_path
from .config import ModelConfig

if TYPE_CHECKING:
    from .model import RWKV7


class StateError(ValueError):
    """A state that does not belong to this model (other sizes, batch or a foreign file)."""


@dataclass
class State:
    """Per layer: att_x (B, C) last ln1 output, wkv (B, H, N, N) fp32 S[v, k], ffn_x (B, C)."""

    att_x: list[mx.array]
    wkv: list[mx.array]
    ffn_x: list[mx.array]

    @classmethod
    def zeros(cls, config: ModelConfig, batch_size: int, dtype: mx.Dtype) -> "State":
        if batch_size < 1:
            raise StateError(f"batch_size must be >= 1, got {batch_size}")
        B, C, H, N, L = batch_size, config.n_embd, config.n_head, config.head_size, config.n_layer
        return cls([mx.zeros((B, C), dtype) for _ in range(L)],
                   [mx.zeros((B, H, N, N), mx.float32) for _ in range(L)],
                   [mx.zeros((B, C), dtype) for _ in range(L)])

    @property
    def batch_size(self) -> int:
        return self.wkv[0].shape[0]

    def arrays(self) -> list[mx.array]:
        return [*self.att_x, *self.wkv, *self.ffn_x]

    def copy(self) -> "State":
        """An independent copy (item assignment on MLX arrays is in place, so arrays are copied)."""
        return State(*([mx.array(a) for a in part] for part in (self.att_x, self.wkv, self.ffn_x)))

    def check(self, config: ModelConfig, batch_size: int | None = None) -> None:
        """Raise StateError unless this state fits `config` (and `batch_size`)."""
        B = self.batch_size
        L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
        if not len(self.att_x) == len(self.wkv) == len(self.ffn_x) == L:
            raise StateError(f"state does not fit this model: it has {len(self.att_x)}/{len(self.wkv)}/{len(self.ffn_x)} layers "
                             f"(att_x/wkv/ffn_x); this model has {L}")
        for name, part, shape in (("att_x", self.att_x, (B, C)), ("wkv", self.wkv, (B, H, N, N)),
                                  ("ffn_x", self.ffn_x, (B, C))):
            for i, a in enumerate(part):
                if tuple(a.shape) != shape:
                    raise StateError(f"state does not fit this model: {name}[{i}] has shape {tuple(a.shape)}; this model needs {shape}")
        if any(s.dtype != mx.float32 for s in self.wkv):
            raise StateError("the WKV state must be float32")
        if batch_size is not None and batch_size != B:
            raise StateError(f"state has batch size {B} but the input has {batch_size} sequences")

    def save(self, path: str | os.PathLike, model: "RWKV7", overwrite: bool = False) -> None:
        """Write the state and the model's fingerprint to a .safetensors file, atomically.

        An existing file is replaced only with `overwrite=True` (else OutputExistsError).
        """
        self.check(model.config)
        tensors = {}
        for i in range(len(self.wkv)):
            tensors[f"{i}.att_x"] = self.att_x[i]
            tensors[f"{i}.wkv"] = self.wkv[i]
            tensors[f"{i}.ffn_x"] = self.ffn_x[i]
        meta = {"format": "mlx-rwkv-state", "fingerprint": model.config.fingerprint(),
                "config": json.dumps(model.config.__dict__)}
        with atomic_path(path, replace=overwrite) as tmp, open(tmp, "wb") as f:
            mx.save_safetensors(f, tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model: "RWKV7") -> "State":
        """Read a state saved by `save`; refuses states of another model."""
        if not Path(path).is_file():
            raise StateError(f"no such state file: {path}")
        try:
            tensors, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        except Exception as e:  # noqa: BLE001 - MLX raises several types for bad files
            raise StateError(f"{path}: not a readable state file ({e})") from None
        if meta.get("format") != "mlx-rwkv-state":
            raise StateError(f"{path}: not an mlx-rwkv state file")
        if meta.get("fingerprint") != model.config.fingerprint():
            raise StateError(f"{path}: this state was saved from another model ({meta.get('config')}), "
                             f"not {model.config}")
        L = model.config.n_layer
        try:
            state = cls([tensors[f"{i}.att_x"].astype(model.dtype) for i in range(L)],
                        [tensors[f"{i}.wkv"] for i in range(L)],
                        [tensors[f"{i}.ffn_x"].astype(model.dtype) for i in range(L)])
        except KeyError as e:
            raise StateError(f"{path}: state file is missing tensor {e}") from None
        state.check(model.config)
        return state

    @classmethod
    def load_tuned(cls, path: str | os.PathLike, model: "RWKV7") -> "State":
        """The initial state of an RWKV-PEFT state-tuning file (`blocks.{i}.att.time_state`);
        layout and sources in `mlx_rwkv.state_files`."""
        from .state_files import load_tuned_state

        return load_tuned_state(path, model)
