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
from .kernels import gpu_backend
from .matvec import ProjectionGroup, Segment
from .model import LORAS, MIX_ORDER, RWKV7, Layer
from .quant import is_quantized_file, load_quantized, quantize_model

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


def _loras(w: Mapping[str, np.ndarray], p: str, config: ModelConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The four LoRA pairs (down (C, D), up (D, C)) in LORAS order.

    Layer 0 has no value residual (its value LoRA, if the file has one, is never used): it
    gets a zero pair, so every layer has the same projection layout.
    """
    ranks = {"w": config.d_decay, "a": config.d_aaa, "v": config.d_mv, "g": config.d_gate}
    pairs = []
    for name in LORAS:
        if name == "v" and p == "blocks.0.":
            pairs.append((np.zeros((config.n_embd, ranks[name]), np.float32),
                          np.zeros((ranks[name], config.n_embd), np.float32)))
        else:
            pairs.append((w[p + f"att.{name}1"], w[p + f"att.{name}2"]))
    return pairs


def _dense_t(a: np.ndarray) -> np.ndarray:
    """A LoRA matrix (in, out) as a projection weight (out, in)."""
    return np.ascontiguousarray(np.asarray(a).T)


def build_layer(w: Mapping[str, np.ndarray], i: int, config: ModelConfig, dtype: mx.Dtype) -> Layer:
    p = f"blocks.{i}."
    C = config.n_embd
    vec = lambda name: to_mx(w[p + name].reshape(-1), dtype)  # noqa: E731
    vec32 = lambda name: to_mx(w[p + name].reshape(-1), mx.float32)  # noqa: E731
    group = lambda segments: ProjectionGroup(segments, dtype)  # noqa: E731
    loras = _loras(w, p, config)
    acts = {"w": "tanh", "g": "sigmoid"}
    att_in = [Segment(w[p + f"att.{n}.weight"], x_base=slot * C)
              for slot, n in enumerate(("receptance", "key", "value"))]
    att_in += [Segment(_dense_t(down), acts.get(name, "none"), (3 + slot) * C)
               for slot, (name, (down, _)) in enumerate(zip(LORAS, loras))]
    # the up-projections read the LoRA hiddens where att_in wrote them, after r, k, v
    hidden_bases = 3 * C + np.cumsum([0] + [down.shape[1] for down, _ in loras[:-1]])
    lora_up = [Segment(_dense_t(up), x_base=int(base)) for (_, up), base in zip(loras, hidden_bases)]
    return Layer(
        ln1=(vec("ln1.weight"), vec("ln1.bias")),
        ln2=(vec("ln2.weight"), vec("ln2.bias")),
        att_mix=to_mx(np.stack([f32(w[p + "att." + n]).reshape(-1) for n in MIX_ORDER]), dtype),
        att_in=group(att_in),
        lora_up=group(lora_up),
        wkv_params={"w0": vec32("att.w0"), "a0": vec32("att.a0"),
                    "v0": vec32("att.v0") if i > 0 else mx.zeros((C,), mx.float32),
                    "k_k": vec32("att.k_k"), "k_a": vec32("att.k_a"), "r_k": vec32("att.r_k"),
                    "ln_w": vec32("att.ln_x.weight"), "ln_b": vec32("att.ln_x.bias")},
        att_out=group([Segment(w[p + "att.output.weight"])]),
        ffn_mix=vec("ffn.x_k")[None],
        ffn_key=group([Segment(w[p + "ffn.key.weight"], "relu2")]),
        ffn_value=group([Segment(w[p + "ffn.value.weight"])]),
    )


def default_dtype() -> str:
    """What dtype "auto" means: float16 on a GPU; float32 on the CPU, where the float32 forward
    pass runs on numpy's BLAS (RWKV7._run_host) and MLX's float16 matmuls are slow."""
    return "float16" if gpu_backend() else "float32"


def build_model(weights: Mapping[str, np.ndarray], config: ModelConfig, dtype: str = "auto",
                progress: bool = False) -> RWKV7:
    """An `RWKV7` from canonical weights (official names and shapes); dtype "auto": `default_dtype()`."""
    dtype = default_dtype() if dtype == "auto" else dtype
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
    emb = to_mx(emb, mxd)
    ln_out = (to_mx(weights["ln_out.weight"], mxd), to_mx(weights["ln_out.bias"], mxd))
    mx.eval(emb, ln_out)  # a lazy weight would be recomputed by every compiled decode step
    return RWKV7(config, emb, layers, ln_out, ProjectionGroup([Segment(weights["head.weight"])], mxd), mxd)


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


def load(path: str | os.PathLike | None = None, dtype: str = "auto", quant: str | None = None,
         progress: bool = False):
    """Load a model and its tokenizer: `model, tokenizer = mlx_rwkv.load(path)`.

    path: an official .pth, .safetensors, rwkv.cpp .bin, llama.cpp rwkv7 .gguf or a Q4_K file
    written by `mlx-rwkv quantize`; None loads the built-in synthetic 0.1B model (random
    weights: for trying the engine, not for text). dtype: "float16", "bfloat16", "float32" or "auto"
    (float16 on a GPU, float32 on the CPU). quant: None or "q4k" (quantize at load).
    """
    if quant not in (None, "q4k"):
        raise ValueError(f"quant must be None or 'q4k', got {quant!r}")
    weights, config, _ = read_weights(path)
    if quant == "q4k":
        weights = quantize_model(weights, include_head=True, progress=progress)
    return build_model(weights, config, dtype, progress), tokenizer_for(config)
