"""The WebGPU reference engine behind the interface `generate` drives (`--engine webgpu`).

`stream_generate` needs `config`, `forward(ids, state, chunk_size=)` -> (V,) logits and
`step(tokens (B,), state)` -> (B, V) logits. WebGPU returns logits on the host, so each step
is one submit and one read back; sampling runs in MLX on those logits, with the same sampler,
penalties and seeds as the MLX engine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from .loading import read_weights, tokenizer_for


@dataclass
class HeldState:
    """A WebGPU state (a device buffer) in the shape generation expects: `arrays()` is empty
    because nothing in it is an MLX array waiting for evaluation."""

    buffer: object

    def arrays(self) -> list[mx.array]:
        return []


class WebGPUEngine:
    """A `webgpu_ref.WebGPUModel` that `mlx_rwkv.stream_generate` can run."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config

    def forward(self, tokens, state: HeldState | None = None, chunk_size: int = 1024) -> tuple[mx.array, HeldState]:
        logits, held = self.model.forward(list(tokens), None if state is None else state.buffer)
        return mx.array(logits), HeldState(held)

    def step(self, tokens: mx.array, state: HeldState) -> tuple[mx.array, HeldState]:
        logits, held = self.model.forward([int(tokens.item())], state.buffer)
        return mx.array(logits)[None], HeldState(held)


def load_webgpu(path: str | os.PathLike | None, dtype: str, quant: str | None, chunk_size: int):
    """(engine, tokenizer) for a checkpoint on the WebGPU reference engine (f16 or f32 matrices)."""
    from webgpu_ref import WebGPUModel

    weights, config, _ = read_weights(path)
    model = WebGPUModel.from_weights(weights, config, dtype=dtype, quant=quant, prefill_chunk=chunk_size)
    return WebGPUEngine(model), tokenizer_for(config)
