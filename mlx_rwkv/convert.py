"""Convert a checkpoint to GGUF (llama.cpp) or to our .safetensors formats: `convert(IN, OUT, TYPE)`.

The input is anything `mlx_rwkv.loading.read_weights` reads: official .pth / .safetensors,
rwkv.cpp .bin, llama.cpp rwkv7 GGUF (re-typing) and our Q4_K .safetensors. The output's suffix
chooses its format, never its content:
  .gguf         out_type q4_k | q8_0 | f16 | f32, tensor types and metadata as llama.cpp's
                converter writes them (mlx_rwkv.gguf_io.save_gguf);
  .safetensors  q4_k: our Q4_K file (mlx_rwkv.quant.save_quantized, other tensors keep their
                dtype); f16 / f32: a dense checkpoint in that dtype (Q4_K input is decoded).
Q4_K blocks of the input are passed through unchanged when the output is q4_k (no second
rounding) and decoded otherwise. The tokenizer travels with a GGUF input; otherwise a 65,536
vocab gets the RWKV World tokens and a 256 vocab the byte tokens (id = byte value), so that
llama.cpp can tokenize; other vocab sizes are written without a tokenizer.
Writes are atomic (a failed conversion leaves no file and the old one intact).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlx_rwkv.checkpoint import save_checkpoint
from mlx_rwkv.config import ModelConfig, shapes_of
from mlx_rwkv.quant import Q4KTensor, quantize_model, save_quantized

OUT_TYPES = ("q4_k", "q8_0", "f16", "f32")
FORMATS = {".gguf": OUT_TYPES, ".safetensors": ("q4_k", "f16", "f32")}


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, out_type: str,
            include_head: bool = True, progress: bool = False, replace: bool = False) -> Path:
    """Read `in_path`, write it to `out_path` as `out_type`; returns out_path.

    include_head: quantize the head too (q4_k, q8_0); False keeps a float head in F16
    (GGUF) or its dtype (.safetensors). An already-Q4_K head stays Q4_K in a q4_k output.
    replace: whether an existing out_path may be replaced (never the input, even then); without
    it an existing file raises OutputExistsError (a FileExistsError), also one that appears while
    we convert.
    Checked before anything is read, each with a one-line message: ValueError when out_path
    names the input file, for a directory as either path, an unknown out_type, a suffix other
    than .gguf / .safetensors, q8_0 to .safetensors; ImportError when a GGUF is involved and
    the `gguf` package is missing. Reading raises FileNotFoundError or CheckpointError
    (mlx_rwkv.config); quantizing, ValueError for rows that are not a multiple of 256.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    suffix = out_path.suffix.lower()
    if out_path.exists() and in_path.exists() and os.path.samefile(in_path, out_path):
        raise ValueError(f"refusing to write over the input {in_path}: choose another output path")
    if in_path.is_dir() or out_path.is_dir():
        raise ValueError(f"{in_path if in_path.is_dir() else out_path} is a directory: give a file name")
    if out_type not in OUT_TYPES:
        raise ValueError(f"unknown output type {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the output format from the name {out_path.name!r}: "
                         "end it in .gguf (llama.cpp) or .safetensors (mlx-rwkv)")
    if out_type not in FORMATS[suffix]:
        raise ValueError(f"{out_type} is a GGUF type: write it to a .gguf file "
                         f"(.safetensors holds {', '.join(FORMATS[suffix])})")
    gguf_in = _is_gguf(in_path)
    if gguf_in or suffix == ".gguf":
        import mlx_rwkv.gguf_io  # noqa: F401 - fails here, in one line, when `gguf` is missing

    weights, tokens = _read(in_path, gguf_in)
    if suffix == ".gguf":
        from mlx_rwkv.gguf_io import save_gguf

        config = ModelConfig.from_shapes(shapes_of(weights))
        return save_gguf(weights, out_path, out_type, tokens=tokens or _default_tokens(config),
                         include_head=include_head, name=in_path.stem, progress=progress, replace=replace)
    if out_type == "q4_k":
        return save_quantized(quantize_model(weights, include_head=include_head, progress=progress), out_path, replace)
    dtype = np.float16 if out_type == "f16" else np.float32
    dense = {k: (v.dequantize() if isinstance(v, Q4KTensor) else np.asarray(v)).astype(dtype)
             for k, v in weights.items()}
    return save_checkpoint(dense, out_path, format="safetensors", replace=replace)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # missing or unreadable: read_weights gives the message
        return False


def _read(path: Path, gguf_in: bool) -> tuple[dict[str, np.ndarray | Q4KTensor], list[bytes] | None]:
    """(weights in the official layout, GGUF tokens or None)."""
    if gguf_in:
        from mlx_rwkv.gguf_io import load_gguf

        model = load_gguf(path)
        return model.weights, model.tokens
    from mlx_rwkv.loading import read_weights

    weights, _, _ = read_weights(path)
    return weights, None


def _default_tokens(config: ModelConfig) -> list[bytes] | None:
    """The tokenizer mlx_rwkv.loading.tokenizer_for gives this vocab size, as id -> bytes."""
    if config.vocab_size == 65536:
        from mlx_rwkv.tokenizer import load_vocab

        vocab = load_vocab()
        return [vocab.get(i, b"") for i in range(config.vocab_size)]
    if config.vocab_size == 256:
        return [bytes([i]) for i in range(256)]
    return None
