"""Synthetic RWKV-7 (x070) checkpoints: random weights with trained-like statistics.

Each tensor is drawn from its own generator, seeded from (seed, tensor name), so a model is
made tensor by tensor, straight into the target dtype, and any tensor can be regenerated alone.
The statistics follow the official trainer's x070 init (RWKV-LM `RWKV-v7/train_temp/src/model.py`)
with the zero-initialised matrices made nonzero, so that every weight takes part in parity tests,
and a forward pass stays in a realistic numeric range: decays spread over their whole reachable
range, hidden activations O(1), logits neither flat nor saturated.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from tqdm import tqdm

from mlx_rwkv.config import ModelConfig, config_for_shape

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "bf16": "bfloat16"}
_CHUNK = 1 << 22  # values drawn per call for big matrices: bounds the float32 scratch to 16 MB

# Standard deviation of each matrix as gain / sqrt(fan_in). The trainer zero-inits att.output
# and ffn.value and makes att.key 10x smaller; trained weights are nonzero, so we use gains that
# keep each block's residual contribution O(0.5).
_LINEAR_GAIN = {
    "att.receptance.weight": 1.0,
    "att.key.weight": 1.0,
    "att.value.weight": 1.0,
    "att.output.weight": 0.5,
    "ffn.key.weight": 1.0,
    "ffn.value.weight": 0.5,
}
# LoRA pairs x @ m1 @ m2 with m1 [C, D], m2 [D, C]: m1 gives O(1) pre-activations,
# m2 sets the size of the LoRA's effect (w: offset to w0, a/v: offset to a0/v0, g: the gate).
_LORA_GAIN = {"w1": 1.0, "w2": 1.0, "a1": 1.0, "a2": 0.5, "v1": 1.0, "v2": 0.5, "g1": 1.0, "g2": 1.5}
_HEAD_GAIN = 2.0  # logits std ~2: softmax entropy about log(V) - 2 nats
_EMB_STD = 0.05  # ln0 normalises the embedding; 0.05 keeps fp16/bf16 copies far from underflow


def resolve_dtype(dtype: str | np.dtype | type) -> np.dtype:
    """float32 / float16 / bfloat16 as a numpy dtype, from a name ('f16', 'bf16', ...) or a dtype."""
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower(), dtype.lower())
        if name not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose float32, float16 or bfloat16")
        return DTYPES[name]
    dt = np.dtype(dtype)
    if dt not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dt}; choose float32, float16 or bfloat16")
    return dt


def tensor_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one tensor: PCG64 seeded from (seed, crc32 of the tensor name)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(key.encode())])))


def synthesize(config: ModelConfig, seed: int = 0, dtype: str | np.dtype | type = np.float32,
               progress: bool = False) -> dict[str, np.ndarray]:
    """Random weights for `config` in the official layout, including layer 0's unused v0/v1/v2.
    progress: a bar on stderr (by bytes: a 1.5B model takes tens of seconds)."""
    dt = resolve_dtype(dtype)
    shapes = dict(config.expected_shapes())
    if config.n_layer > 1:  # official files carry layer 0's value-residual tensors too
        for name in ("v0", "v1", "v2"):
            shapes[f"blocks.0.att.{name}"] = shapes[f"blocks.1.att.{name}"]
    total = sum(int(np.prod(shape)) for shape in shapes.values()) * dt.itemsize
    weights = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="synthesizing", disable=not progress) as bar:
        for key, shape in shapes.items():
            weights[key] = synth_tensor(config, key, shape, seed, dt)
            bar.update(weights[key].nbytes)
    return weights


def synth_tensor(config: ModelConfig, key: str, shape: tuple[int, ...], seed: int, dtype: np.dtype) -> np.ndarray:
    """One tensor of `synthesize`, drawn from its own generator."""
    rng = tensor_rng(seed, key)
    parts = key.split(".")
    layer = int(parts[1]) if parts[0] == "blocks" else 0
    suffix = ".".join(parts[2:]) if parts[0] == "blocks" else key
    if len(shape) == 2 and suffix != "att.r_k":
        return _uniform_matrix(rng, shape, _matrix_std(config, suffix, shape), dtype)
    values = _VECTORS[suffix](rng, config, layer) if suffix in _VECTORS else _vector_by_family(suffix, rng, config, layer)
    return values.reshape(shape).astype(dtype)


def _matrix_std(config: ModelConfig, suffix: str, shape: tuple[int, ...]) -> float:
    if suffix == "emb.weight":
        return _EMB_STD
    if suffix == "head.weight":
        return _HEAD_GAIN / np.sqrt(config.n_embd)
    if suffix in _LINEAR_GAIN:  # torch Linear: [out, in]
        return _LINEAR_GAIN[suffix] / np.sqrt(shape[1])
    lora = suffix.removeprefix("att.")
    if lora in _LORA_GAIN:  # used as x @ m: [in, out]
        return _LORA_GAIN[lora] / np.sqrt(shape[0])
    raise KeyError(f"no synthetic init for matrix {suffix}")


def _uniform_matrix(rng: np.random.Generator, shape: tuple[int, ...], std: float, dtype: np.dtype) -> np.ndarray:
    """Uniform(-a, a) with the given std, drawn in float32 chunks straight into `dtype`."""
    out = np.empty(int(np.prod(shape)), dtype=dtype)
    half_width = np.float32(std * np.sqrt(3.0))
    scratch = np.empty(min(_CHUNK, out.size), dtype=np.float32)
    for start in range(0, out.size, _CHUNK):
        buf = scratch[: min(_CHUNK, out.size - start)]
        rng.random(out=buf, dtype=np.float32)  # [0, 1)
        buf -= np.float32(0.5)
        buf *= 2 * half_width
        out[start : start + buf.size] = buf
    return out.reshape(shape)


# ---- per-channel vectors (float64, tiny) ----------------------------------------------------

def _ramps(config: ModelConfig, layer: int) -> dict[str, np.ndarray | float]:
    """The trainer's per-channel and per-layer ramps."""
    C, N, L = config.n_embd, config.head_size, config.n_layer
    n = np.arange(C)
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    return {
        "ddd": n / C,  # 0 .. 1 over channels
        "linear": n / (C - 1) - 0.5,  # -0.5 .. 0.5
        "zigzag": zigzag * np.abs(zigzag),  # -1 .. 1 within each head
        "ratio_0_to_1": layer / max(L - 1, 1),
        "ratio_1_to_almost0": 1.0 - layer / L,
    }


def _noise(rng: np.random.Generator, size: int, width: float) -> np.ndarray:
    return rng.uniform(-width, width, size)


def _token_shift(power: float) -> Callable[[np.random.Generator, ModelConfig, int], np.ndarray]:
    """x_* mixes: 1 - ddd^(power * ratio), from 1 (all previous token) down to ~0, plus noise."""
    def make(rng: np.random.Generator, config: ModelConfig, layer: int) -> np.ndarray:
        r = _ramps(config, layer)
        base = 1.0 - r["ddd"] ** (power * r["ratio_1_to_almost0"])
        return np.clip(base + _noise(rng, config.n_embd, 0.1), 0.01, 0.99)
    return make


def _w0(rng: np.random.Generator, config: ModelConfig, layer: int) -> np.ndarray:
    # -6..0 ramp + zigzag: sigmoid(w0) spans ~(3e-4, 0.95), so the decay
    # exp(-0.606531 * sigmoid(w0 + lora)) spans its whole range (e^-0.606531, 1).
    r = _ramps(config, layer)
    www = -6 + 6 * ((np.arange(config.n_embd) / (config.n_embd - 1)) ** (1 + r["ratio_0_to_1"] ** 0.3))
    return www + 0.5 + r["zigzag"] * 2.5 + _noise(rng, config.n_embd, 0.5)


def _a0(rng: np.random.Generator, config: ModelConfig, layer: int) -> np.ndarray:
    r = _ramps(config, layer)  # sigmoid(a0) ~ 0.3 .. 0.6
    return -0.19 + r["zigzag"] * 0.3 + r["linear"] * 0.4 + _noise(rng, config.n_embd, 0.2)


def _v0(rng: np.random.Generator, config: ModelConfig, layer: int) -> np.ndarray:
    r = _ramps(config, layer)
    return 0.73 - r["linear"] * 0.4 + _noise(rng, config.n_embd, 0.2)


def _k_k(rng: np.random.Generator, config: ModelConfig, layer: int) -> np.ndarray:
    r = _ramps(config, layer)
    return 0.85 - r["linear"] * 0.1 + _noise(rng, config.n_embd, 0.05)


def _ffn_x_k(rng: np.random.Generator, config: ModelConfig, layer: int) -> np.ndarray:
    r = _ramps(config, layer)
    base = 1.0 - r["ddd"] ** (r["ratio_1_to_almost0"] ** 4)
    return np.clip(base + _noise(rng, config.n_embd, 0.1), 0.01, 0.99)


def _ln_x_weight(rng: np.random.Generator, config: ModelConfig, layer: int) -> np.ndarray:
    scale = ((1 + layer) / config.n_layer) ** 0.7  # the trainer's per-layer ramp
    return scale * (1 + _noise(rng, config.n_embd, 0.1))


_VECTORS: dict[str, Callable[[np.random.Generator, ModelConfig, int], np.ndarray]] = {
    "att.x_r": _token_shift(0.2),
    "att.x_w": _token_shift(0.9),
    "att.x_k": _token_shift(0.7),
    "att.x_v": _token_shift(0.7),
    "att.x_a": _token_shift(0.9),
    "att.x_g": _token_shift(0.2),
    "att.w0": _w0,
    "att.a0": _a0,
    "att.v0": _v0,
    "att.k_k": _k_k,
    "att.k_a": lambda rng, config, layer: 1.0 + _noise(rng, config.n_embd, 0.05),
    "att.r_k": lambda rng, config, layer: rng.uniform(-0.05, 0.1, config.n_embd),
    "att.ln_x.weight": _ln_x_weight,
    "ffn.x_k": _ffn_x_k,
}


def _vector_by_family(suffix: str, rng: np.random.Generator, config: ModelConfig, layer: int) -> np.ndarray:
    """LayerNorm / GroupNorm parameters: weights ~1, biases ~0, both with small noise."""
    if suffix.endswith(".weight"):
        return 1.0 + _noise(rng, config.n_embd, 0.1)
    if suffix.endswith(".bias"):
        return _noise(rng, config.n_embd, 0.05)
    raise KeyError(f"no synthetic init for tensor {suffix}")


def write_synthetic(
    path: str | Path,
    shape: str = "0.1B",
    seed: int = 0,
    dtype: str = "float16",
    n_layer: int | None = None,
    n_embd: int | None = None,
    vocab_size: int | None = None,
    replace: bool = False,
    progress: bool = False,
) -> ModelConfig:
    """Write a synthetic checkpoint of a named size (optionally shrunk) to .pth or .safetensors.
    An existing file is replaced only with `replace=True`."""
    from mlx_rwkv.checkpoint import save_checkpoint  # the writer picks the format from the suffix

    config = config_for_shape(shape, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size)
    save_checkpoint(synthesize(config, seed=seed, dtype=dtype, progress=progress), path, replace=replace)
    return config
