"""Recurrent state on the GPU, in the oracle's per-layer layout, all fp32."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import wgpu

from mlx_rwkv.config import ModelConfig

STATE_USAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST


class StateLayout:
    """Floats of layer i: att x_prev [C] at i*stride, wkv S [H, N, N] (S[h, value, key]) after it,
    then ffn x_prev [C]."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.c = config.n_embd
        self.wkv_size = config.n_head * config.head_size ** 2
        self.stride = 2 * self.c + self.wkv_size
        self.nbytes = 4 * config.n_layer * self.stride

    def att_x(self, layer: int) -> int:
        return layer * self.stride

    def wkv(self, layer: int) -> int:
        return layer * self.stride + self.c

    def ffn_x(self, layer: int) -> int:
        return layer * self.stride + self.c + self.wkv_size

    def pack(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The oracle's flat list [att_x, wkv, ffn_x] * n_layer as one float32 array."""
        cfg = self.config
        if len(arrays) != 3 * cfg.n_layer:
            raise ValueError(f"a state holds 3 arrays per layer ({3 * cfg.n_layer}), got {len(arrays)}")
        shapes = [(self.c,), (cfg.n_head, cfg.head_size, cfg.head_size), (self.c,)] * cfg.n_layer
        for i, (a, shape) in enumerate(zip(arrays, shapes)):
            if np.shape(a) != shape:
                raise ValueError(f"state array {i} has shape {np.shape(a)}, expected {shape}")
        return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])

    def unpack(self, flat: np.ndarray) -> list[np.ndarray]:
        cfg = self.config
        out = []
        for i in range(cfg.n_layer):
            out += [flat[self.att_x(i): self.wkv(i)].copy(),
                    flat[self.wkv(i): self.ffn_x(i)].reshape(cfg.n_head, cfg.head_size, cfg.head_size).copy(),
                    flat[self.ffn_x(i): self.ffn_x(i) + self.c].copy()]
        return out


class WebGPUState:
    """A model's recurrent state in GPU memory. `forward` advances it in place; `copy` branches.

    While a state is the one the model last ran, its contents live in the model's working
    buffer (so a decode loop never copies it); running another state saves it back first.
    """

    def __init__(self, model, buffer: wgpu.GPUBuffer) -> None:
        self.model = model
        self.buffer = buffer

    def to_numpy(self) -> list[np.ndarray]:
        """[att x_prev [C], wkv [H, N, N], ffn x_prev [C]] per layer, float32 (the oracle's layout)."""
        return self.model.read_state(self)

    def copy(self) -> "WebGPUState":
        return self.model.copy_state(self)
