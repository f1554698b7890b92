"""Read and write llama.cpp `rwkv7` GGUF files.

Tensor names and layouts follow llama.cpp's converter (`convert_hf_to_gguf.py`, Rwkv7Model) and
loader (`llama_model_rwkv7::load_arch_tensors`). Numpy shapes below are the reverse of ggml's ne:
  emb.weight -> token_embd.weight; blocks.0.ln0 -> token_embd_norm; ln_out -> output_norm;
  head.weight -> output.weight; per layer i ("blk.{i}."):
  ln1/ln2 -> attn_norm / attn_norm_2 (weight, bias); att.ln_x -> time_mix_ln (weight, bias);
  att.x_r,x_w,x_k,x_v,x_a,x_g [1,1,C] -> one time_mix_lerp_fused [6,1,1,C] in that order;
  att.w0/a0/v0/k_k/k_a [1,1,C] -> time_mix_{name} [C]; att.r_k [H,N] -> time_mix_r_k [C];
  att.{w,a,v,g}1 [C,D] and {w,a,v,g}2 [D,C] -> time_mix_{name} transposed ([D,C] and [C,D]);
  att.receptance/key/value/output -> time_mix_*; ffn.x_k -> channel_mix_lerp_k [C];
  ffn.key/value -> channel_mix_key/value (Linear [out, in] as is).
Layer 0 has no value-residual LoRA: llama.cpp wants dummies there, which its converter fills
with copies of a0/a1/a2; we write the same and drop them on import.

On export (save_gguf) the output type is one of q4_k, q8_0, f16, f32, and each tensor's type and
the metadata follow llama.cpp's converter (see the export section).

On import, Q4_K tensors stay Q4_K blocks (Q4KTensor, no requantization); F32/F16 tensors keep
their dtype; other types (BF16, Q8_0, Q6_K, ..., and Q4_K outside the linear weights, e.g. the
embedding) are decoded with `gguf.quants.dequantize`: linear weights, head and embedding to
float16 (their codes carry <= 8 bits, so fp16 rounding adds <= 2^-11 relative), the rest to
float32. With requantize=True, non-Q4_K linear weights and head are re-encoded as Q4_K
instead. The tokenizer (`tokenizer.ggml.tokens` of model "rwkv") comes back as id -> bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

try:
    import gguf
except ImportError:  # an optional dependency: one line, not the import machinery's traceback
    raise ImportError("GGUF needs the gguf package: pip install 'mlx-rwkv[gguf]'") from None

from mlx_rwkv.config import CheckpointError, ModelConfig, shapes_of
from mlx_rwkv.quant import Q4KTensor, is_quantizable, quantize_model, quantize_q4k

ARCH = "rwkv7"
LERP = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # order of time_mix_lerp_fused
VECTORS = ("w0", "a0", "v0", "k_k", "k_a")
LORAS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
GLOBALS = {
    "emb.weight": "token_embd.weight",
    "blocks.0.ln0.weight": "token_embd_norm.weight",
    "blocks.0.ln0.bias": "token_embd_norm.bias",
    "ln_out.weight": "output_norm.weight",
    "ln_out.bias": "output_norm.bias",
    "head.weight": "output.weight",
}
LAYER = {  # official suffix -> GGUF name after "blk.{i}."
    "ln1.weight": "attn_norm.weight", "ln1.bias": "attn_norm.bias",
    "ln2.weight": "attn_norm_2.weight", "ln2.bias": "attn_norm_2.bias",
    "att.ln_x.weight": "time_mix_ln.weight", "att.ln_x.bias": "time_mix_ln.bias",
    "att.r_k": "time_mix_r_k.weight",
    "att.receptance.weight": "time_mix_receptance.weight", "att.key.weight": "time_mix_key.weight",
    "att.value.weight": "time_mix_value.weight", "att.output.weight": "time_mix_output.weight",
    "ffn.x_k": "channel_mix_lerp_k.weight",
    "ffn.key.weight": "channel_mix_key.weight", "ffn.value.weight": "channel_mix_value.weight",
    **{f"att.{n}": f"time_mix_{n}.weight" for n in VECTORS + LORAS},
}
LERP_FUSED = "time_mix_lerp_fused.weight"
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
Q4_K, Q8_0, F16, F32 = (gguf.GGMLQuantizationType[t] for t in ("Q4_K", "Q8_0", "F16", "F32"))
_FLOAT_TYPES = (F32, F16)


@dataclass
class GGUFModel:
    """An imported GGUF: the Checkpoint fields plus the tokenizer's tokens (id -> bytes)."""

    config: ModelConfig
    weights: dict[str, np.ndarray | Q4KTensor]
    path: Path
    tokens: list[bytes] | None  # id -> bytes (b"" for "<s>"/padding); None without an "rwkv" tokenizer
    format: str = "gguf"

    @property
    def world_vocab(self) -> bool:
        """Whether the tokens are exactly the RWKV World vocabulary (mlx_rwkv.tokenizer's)."""
        from mlx_rwkv.tokenizer import load_vocab

        if self.tokens is None:
            return False
        vocab = load_vocab()
        return len(self.tokens) > max(vocab) and all(t == vocab.get(i, b"") for i, t in enumerate(self.tokens))


# ---------------------------------------------------------------- import

def load_gguf(path: str | Path, requantize: bool = False) -> GGUFModel:
    """Read an `rwkv7` GGUF into the official layout; CheckpointError for anything else."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError/IndexError/... on damaged files
        raise CheckpointError(f"cannot read {path} as GGUF (truncated or damaged?): {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{path} is a GGUF of architecture {arch!r}; mlx-rwkv runs RWKV-7 "
                              f"({ARCH!r}) only")
    head_size = int(_field(reader, f"{ARCH}.wkv.head_size") or 64)
    raw = {t.name: t for t in reader.tensors}
    weights: dict[str, np.ndarray | Q4KTensor] = {}
    unknown = []
    for name, t in raw.items():
        if name in _GGUF_TO_GLOBAL:
            key = _GGUF_TO_GLOBAL[name]
        else:
            m = _LAYER_RE.fullmatch(name)
            if m is None or (m.group(2) not in _GGUF_TO_LAYER and m.group(2) != LERP_FUSED):
                unknown.append(name)
                continue
            layer, local = int(m.group(1)), m.group(2)
            if layer == 0 and local in ("time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight"):
                continue  # llama.cpp's dummies (copies of a0/a1/a2); layer 0 uses v_first = v
            if local == LERP_FUSED:
                fused = _dense(t).reshape(len(LERP), -1)
                for j, mix in enumerate(LERP):
                    weights[f"blocks.{layer}.att.{mix}"] = fused[j].reshape(1, 1, -1)
                continue
            key = f"blocks.{layer}.{_GGUF_TO_LAYER[local]}"
        try:
            weights[key] = _to_official(key, t, head_size, requantize)
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {name} ({t.tensor_type.name}): {e}") from None
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} tensor(s) unknown to the rwkv7 layout: "
                              + ", ".join(unknown[:6]))
    config = ModelConfig.from_shapes(shapes_of(weights))
    block_count = _field(reader, f"{ARCH}.block_count")
    if block_count is not None and int(block_count) != config.n_layer:
        raise CheckpointError(f"{path}: metadata says {block_count} layers, the tensors hold {config.n_layer}")
    return GGUFModel(config, weights, path, _tokens(reader))


_GGUF_TO_GLOBAL = {v: k for k, v in GLOBALS.items()}
_GGUF_TO_LAYER = {v: k for k, v in LAYER.items()}


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _dense(t) -> np.ndarray:
    """A float tensor's values in numpy order: F32/F16 as stored, anything else decoded."""
    if t.tensor_type in _FLOAT_TYPES:
        return t.data
    return gguf.quants.dequantize(t.data, t.tensor_type)


def _to_official(key: str, t, head_size: int, requantize: bool) -> np.ndarray | Q4KTensor:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne -> numpy order
    stored = t.tensor_type in _FLOAT_TYPES
    if is_quantizable(key) and t.tensor_type == Q4_K:
        return Q4KTensor(np.asarray(t.data), shape)  # kept as blocks: no requantization
    value = _dense(t).reshape(shape)
    if is_quantizable(key) and requantize and not stored:
        return Q4KTensor(quantize_q4k(value), shape)
    if not stored:  # decoded values carry <= 8 significant bits: fp16 holds the big matrices
        value = value.astype(np.float16 if is_quantizable(key) or key == "emb.weight" else np.float32)
    suffix = key.split(".", 2)[-1] if key.startswith("blocks.") else key
    name = suffix.removeprefix("att.")
    if name in LORAS:
        return np.ascontiguousarray(value.T)  # GGUF keeps them [out, in] like nn.Linear
    if name in VECTORS or suffix == "ffn.x_k":
        return value.reshape(1, 1, -1)
    if name == "r_k":
        return value.reshape(-1, head_size)
    return value


def _tokens(reader) -> list[bytes] | None:
    """id -> bytes of an "rwkv" tokenizer; control and unused ids ("<s>", "[PAD...]") map to b""."""
    if _field(reader, "tokenizer.ggml.model") != "rwkv":
        return None
    texts = reader.get_field("tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or []
    normal = [t == gguf.TokenType.NORMAL for t in types] or [True] * len(texts.data)
    return [unescape_token(bytes(texts.parts[i])) if ok else b"" for i, ok in zip(texts.data, normal)]


_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)
_SIMPLE = {b"t": b"\t", b"n": b"\n", b"r": b"\r"}


def unescape_token(text: bytes) -> bytes:
    """llama.cpp's `llama_unescape_rwkv_token`: the converter stores repr(bytes)[2:-1]."""
    def one(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        return bytes([int(code[1:], 16)]) if len(code) == 3 else _SIMPLE.get(code, code)
    return _ESCAPE.sub(one, text)


def escape_token(token: bytes) -> bytes:
    """The converter's form of a token: repr(bytes) without the b'' quotes."""
    return repr(token)[2:-1].encode("utf-8")


# ---------------------------------------------------------------- export
# Tensor types follow llama.cpp: its converter (`convert_hf_to_gguf.py`, Rwkv7Model) writes
# 1-D tensors (norms, biases, mixing vectors, r_k), time_mix_w1/w2 and the fused lerp as F32 and
# every other matrix (embedding, head, linear weights, the a/v/g LoRAs) in the output type
# (F16, or Q8_0 where the row length is a multiple of 32, else F16); `llama-quantize` then turns
# the linear weights (and head) into Q4_K and leaves the rwkv7 LoRAs alone. A q4_k export here
# is that pipeline's file, except that the embedding stays F16 (llama-quantize would make it
# Q4_K too; it is a row lookup, not a matmul, so it costs no speed to keep it exact).

OUT_TYPES: dict[str, "gguf.LlamaFileType"] = {
    "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M,  # what llama.cpp's loader infers for mostly-Q4_K files
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "f32": gguf.LlamaFileType.ALL_F32,
}
_ALWAYS_F32 = ("time_mix_w1.weight", "time_mix_w2.weight", LERP_FUSED)
# llama.cpp's models/templates/llama-cpp-rwkv-world.jinja, which its converter stores for RWKV World.
CHAT_TEMPLATE = """\
{%- if not add_generation_prompt is defined -%}
    {%- set add_generation_prompt = true -%}
{%- endif -%}
{%- set ns = namespace(system_prompt='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.system_prompt = message['content'] -%}
    {%- endif -%}
{%- endfor -%}
{{bos_token}}
{%- if ns.system_prompt != '' -%}
{{- 'System: ' + ns.system_prompt + '\\n\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- 'User: ' + message['content']|trim + '\\n\\n' -}}
    {%- endif -%}
    {%- if message['role'] == 'assistant' and message['content'] is  not none -%}
        {%- set content = message['content'] -%}
        {%- if '</think>' in content -%}
            {%- set content = content.split('</think>')[-1] -%}
        {%- endif -%}
        {{- 'Assistant: ' + content|trim + '\\n\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'Assistant:' -}}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- ' <think>\\n</think>' }}
    {%- endif %}
    {%- if enable_thinking is defined and enable_thinking is true %}
        {{- ' <think>' }}
    {%- endif %}
{%- endif -%}"""


def save_gguf(weights: Mapping[str, np.ndarray | Q4KTensor], path: str | Path, out_type: str = "q4_k", *,
              tokens: Sequence[bytes] | None = None, include_head: bool = True, name: str | None = None,
              progress: bool = False, replace: bool = False) -> Path:
    """Write an `rwkv7` GGUF that llama.cpp loads, atomically (temp file + rename); an existing
    file is replaced only with replace=True (else OutputExistsError, a FileExistsError).

    out_type: "q4_k" | "q8_0" | "f16" | "f32", recorded as general.file_type; tensor types as
    described above. Q4KTensor values are written as their blocks for q4_k (no requantization)
    and decoded for the other types. include_head=False keeps a float head in F16 (q4_k, q8_0);
    an already-Q4_K head stays Q4_K in a q4_k file.
    tokens: id -> bytes, stored as tokenizer "rwkv"; id 0 and empty or missing ids (up to the
    vocab size) become llama.cpp's "<s>" / "[PAD<id>]" placeholders. name: general.name
    (default: the file's stem). Raises ValueError for an unknown out_type or too many tokens.
    """
    from mlx_rwkv.checkpoint.files import atomic_path

    if out_type not in OUT_TYPES:
        raise ValueError(f"unknown GGUF type {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    path = Path(path)
    config = ModelConfig.from_shapes(shapes_of(weights))
    if tokens is not None and len(tokens) > config.vocab_size:
        raise ValueError(f"{len(tokens)} tokens for a vocab of {config.vocab_size}")
    if out_type == "q4_k":
        weights = quantize_model(weights, include_head=include_head, progress=progress)
    with atomic_path(path, replace) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        for gguf_name, array, qtype in _gguf_tensors(weights, config, out_type, include_head):
            writer.add_tensor(gguf_name, array, raw_dtype=qtype)
        _write_metadata(writer, config, out_type, tokens, name or path.stem)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return path


def _write_metadata(writer, config: ModelConfig, out_type: str, tokens: Sequence[bytes] | None, name: str) -> None:
    """The keys llama.cpp's converter writes for an RWKV-7 World model (Rwkv7Model.set_gguf_parameters,
    _set_vocab_rwkv_world, prepare_metadata); call after the tensors are added (size label)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    total, shared, experts, expert_count = writer.get_total_parameter_count()
    writer.add_size_label(gguf.size_label(total, shared, experts, expert_count))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(OUT_TYPES[out_type])
    writer.add_context_length(1048576)  # RWKV has no context limit
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_layer_norm_eps(1e-5)
    writer.add_wkv_head_size(config.head_size)
    writer.add_decay_lora_rank(config.d_decay)
    writer.add_iclr_lora_rank(config.d_aaa)
    writer.add_value_residual_mix_lora_rank(config.d_mv)
    writer.add_gate_lora_rank(config.d_gate)
    writer.add_feed_forward_length(config.d_ffn)
    writer.add_token_shift_count(2)  # att and ffn x_prev (llama.cpp's default, stated)
    writer.add_head_count(0)  # required by llama.cpp, unused
    if tokens is None:
        return
    texts, types = [b"<s>"], [gguf.TokenType.CONTROL]  # "<s>" at id 0, "[PAD<id>]" for unused ids
    for i in range(1, config.vocab_size):
        token = tokens[i] if i < len(tokens) else b""
        texts.append(escape_token(token) if token else f"[PAD{i}]".encode())
        types.append(gguf.TokenType.NORMAL if token else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(texts)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    if b"\n\n" in tokens:  # the converter's "eot" hack (id 261 in World) so chat turns end
        writer.add_eot_token_id(list(tokens).index(b"\n\n"))
    writer.add_chat_template(CHAT_TEMPLATE)


def _encode(value: np.ndarray | Q4KTensor, out_type: str, quantize: bool) -> tuple[np.ndarray, object]:
    """A matrix in the output type: (array, ggml type); quantize=False keeps it F16 (or F32)."""
    if isinstance(value, Q4KTensor) and out_type == "q4_k":
        return np.ascontiguousarray(value.blocks), Q4_K
    dense = value.dequantize() if isinstance(value, Q4KTensor) else np.asarray(value)
    if out_type == "f32":
        return np.ascontiguousarray(dense, np.float32), F32
    if out_type == "q8_0" and quantize and dense.shape[-1] % gguf.GGML_QUANT_SIZES[Q8_0][0] == 0:
        return gguf.quants.quantize(np.asarray(dense, np.float32), Q8_0), Q8_0
    return np.ascontiguousarray(dense, np.float16), F16


def _gguf_tensors(weights: Mapping, config: ModelConfig, out_type: str, include_head: bool):
    """(GGUF name, array, ggml type) for every tensor, in llama.cpp's order."""
    def f32(name: str, value) -> tuple[str, np.ndarray, object]:
        return name, np.ascontiguousarray(np.asarray(value, np.float32)), F32

    def matrix(name: str, value, quantize: bool = True) -> tuple[str, np.ndarray, object]:
        return (name, *_encode(value, out_type, quantize))

    yield matrix(GLOBALS["emb.weight"], weights["emb.weight"])
    for key in ("blocks.0.ln0.weight", "blocks.0.ln0.bias"):
        yield f32(GLOBALS[key], weights[key])
    for i in range(config.n_layer):
        p, g = f"blocks.{i}.", f"blk.{i}."
        yield f32(g + LERP_FUSED, np.stack([np.asarray(weights[p + f"att.{m}"]).reshape(1, 1, -1) for m in LERP]))
        for suffix, local in LAYER.items():
            short = suffix.removeprefix("att.")
            if i == 0 and short in ("v0", "v1", "v2"):
                suffix = "att.a" + short[1]  # llama.cpp's dummies for layer 0
            if p + suffix not in weights:
                continue
            value = weights[p + suffix]
            if short in LORAS:  # GGUF keeps them [out, in] like nn.Linear
                value = np.asarray(value).T
            if local in _ALWAYS_F32:
                yield f32(g + local, value)
            elif short in LORAS or is_quantizable(p + suffix):
                yield matrix(g + local, value)
            else:  # norms, biases, mixing vectors and r_k: 1-D
                yield f32(g + local, np.asarray(value).reshape(-1))
    for key in ("ln_out.weight", "ln_out.bias"):
        yield f32(GLOBALS[key], weights[key])
    yield matrix(GLOBALS["head.weight"], weights["head.weight"], quantize=include_head)
