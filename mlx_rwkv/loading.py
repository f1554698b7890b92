"""Turn a checkpoint (canonical numpy weights) into an MLX `RWKV7` model and its tokenizer."""
from __future__ import annotations

import os
import sys
from typing import Mapping

import mlx.core as mx
import ml_dtypes
import numpy as np
from tqdm import tqdm

from .config import ModelConfig, config_for_shape
from .model import LORAS, MIX_ORDER, RWKV7, Dense, Layer, Linear
from .quant import Q4KTensor, is_quantized_file, load_quantized, quantize_model

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DEFAULT_SHAPE = "0.1B"  # the built-in synthetic model when no checkpoint is given


def to_mx(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """A numpy (or memmap) array as an MLX array of `dtype` (bfloat16 sources included)."""
    if a.dtype == ml_dtypes.bfloat16:
        return mx.array(np.ascontiguousarray(a).view(np.uint16)).view(mx.bfloat16).astype(dtype)
    return mx.array(np.ascontiguousarray(a)).astype(dtype)


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def layer_norm_np(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _lora_stack(w: Mapping[str, np.ndarray], p: str, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """The four LoRA pairs as (4, C, D) and (4, D, C), zero-padded to the largest rank D.

    Padding is exact: padded down-projection columns give tanh(0) = 0 or sigmoid(0) = 0.5,
    which meet zero rows of the up-projection. Layer 0 has no value LoRA: it stays zero.
    """
    C = config.n_embd
    D = max(config.d_decay, config.d_aaa, config.d_mv, config.d_gate)
    down = np.zeros((4, C, D), np.float32)
    up = np.zeros((4, D, C), np.float32)
    for row, name in enumerate(LORAS):
        if p + f"att.{name}1" in w and (name != "v" or not p.startswith("blocks.0.")):
            w1, w2 = f32(w[p + f"att.{name}1"]), f32(w[p + f"att.{name}2"])
            down[row, :, : w1.shape[1]] = w1
            up[row, : w2.shape[0], :] = w2
    return down, up


class Stacked:
    """Several projections applied to the rows of a (G, M, K) input: (G, M, N) out."""

    def __init__(self, parts: list[Linear]):
        self.parts = parts

    def __call__(self, x: mx.array) -> mx.array:
        return mx.stack([part(x[i]) for i, part in enumerate(self.parts)])


def linear(w: np.ndarray | Q4KTensor, dtype: mx.Dtype) -> Linear:
    """The projection for one weight [out, in]: a Q4_K kernel layer or a dense matmul."""
    if isinstance(w, Q4KTensor):
        from .q4k_linear import Q4KLinear

        return Q4KLinear(w)
    return Dense(to_mx(w, dtype))


def build_layer(w: Mapping[str, np.ndarray], i: int, config: ModelConfig, dtype: mx.Dtype) -> Layer:
    p = f"blocks.{i}."
    vec = lambda name: to_mx(w[p + name].reshape(-1), dtype)  # noqa: E731
    vec32 = lambda name: to_mx(w[p + name].reshape(-1), mx.float32)  # noqa: E731
    down, up = _lora_stack(w, p, config)
    rkv = [w[p + f"att.{n}.weight"] for n in ("receptance", "key", "value")]
    if any(isinstance(m, Q4KTensor) for m in rkv):
        att_rkv: Linear = Stacked([linear(m, dtype) for m in rkv])
    else:  # one batched matmul for the three projections
        att_rkv = Dense(to_mx(np.stack(rkv), dtype))
    return Layer(
        ln1=(vec("ln1.weight"), vec("ln1.bias")),
        ln2=(vec("ln2.weight"), vec("ln2.bias")),
        att_mix=to_mx(np.stack([f32(w[p + "att." + n]).reshape(-1) for n in MIX_ORDER]), dtype),
        att_rkv=att_rkv,
        lora_down=to_mx(down, dtype),
        lora_up=to_mx(up, dtype),
        wkv_params={"w0": vec32("att.w0"), "a0": vec32("att.a0"),
                    "v0": vec32("att.v0") if i > 0 else mx.zeros((config.n_embd,), mx.float32),
                    "k_k": vec32("att.k_k"), "k_a": vec32("att.k_a"), "r_k": vec32("att.r_k"),
                    "ln_w": vec32("att.ln_x.weight"), "ln_b": vec32("att.ln_x.bias")},
        att_out=linear(w[p + "att.output.weight"], dtype),
        ffn_mix=vec("ffn.x_k")[None],
        ffn_key=linear(w[p + "ffn.key.weight"], dtype),
        ffn_value=linear(w[p + "ffn.value.weight"], dtype),
    )


def build_model(weights: Mapping[str, np.ndarray], config: ModelConfig, dtype: str = "float16",
                progress: bool = False) -> RWKV7:
    """An `RWKV7` from canonical weights (official names and shapes)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    mxd = DTYPES[dtype]
    emb = layer_norm_np(f32(weights["emb.weight"]), f32(weights["blocks.0.ln0.weight"]),
                        f32(weights["blocks.0.ln0.bias"]))  # ln0 folded into the table once
    layers = []
    for i in tqdm(range(config.n_layer), desc="loading layers", unit="layer", disable=not progress,
                  file=sys.stderr):
        layers.append(build_layer(weights, i, config, mxd))
        mx.eval(layers[-1].__dict__)
    return RWKV7(config, to_mx(emb, mxd), layers,
                 (to_mx(weights["ln_out.weight"], mxd), to_mx(weights["ln_out.bias"], mxd)),
                 linear(weights["head.weight"], mxd), mxd)


def read_weights(path: str | os.PathLike | None) -> tuple[dict, ModelConfig, str]:
    """(weights, config, description) from any supported file; None = the synthetic default."""
    if path is None:
        from .synth import synthesize

        config = config_for_shape(DEFAULT_SHAPE)
        return synthesize(config, seed=0, dtype=np.float16), config, f"synthetic {DEFAULT_SHAPE}"
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_io import load_gguf

        ckpt = load_gguf(path)
    elif is_quantized_file(path):
        ckpt = load_quantized(path)
    else:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
    return ckpt.weights, ckpt.config, f"{path} ({ckpt.format})"


def tokenizer_for(config: ModelConfig):
    """The World tokenizer for 65,536-token models, bytes for 256-token ones, else None."""
    from .tokenizer import ByteTokenizer, WorldTokenizer

    if config.vocab_size == 256:
        return ByteTokenizer()
    if config.vocab_size == 65536:
        return WorldTokenizer()
    return None


def load(path: str | os.PathLike | None = None, dtype: str = "float16", quant: str | None = None,
         progress: bool = False):
    """Load a model and its tokenizer: `model, tokenizer = mlx_rwkv.load(path)`.

    path: an official .pth, .safetensors, rwkv.cpp .bin, llama.cpp rwkv7 .gguf or a Q4_K file
    written by `mlx-rwkv quantize`; None loads the built-in synthetic 0.1B model (random
    weights: for trying the engine, not for text). quant: None or "q4k" (quantize at load).
    """
    if quant not in (None, "q4k"):
        raise ValueError(f"quant must be None or 'q4k', got {quant!r}")
    weights, config, _ = read_weights(path)
    if quant == "q4k":
        weights = quantize_model(weights, include_head=True)
    return build_model(weights, config, dtype, progress), tokenizer_for(config)
