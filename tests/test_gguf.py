"""GGUF (llama.cpp rwkv7) export and import: layout, tensor types and metadata as llama.cpp's
converter writes them, round trips of every type (bytes refereed by the `gguf` package, logits
through `load`), conversion between formats, foreign types, clear errors."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mlx_rwkv.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from mlx_rwkv.checkpoint.files import OutputExistsError  # noqa: E402
from mlx_rwkv.config import CheckpointError, ModelConfig  # noqa: E402
from mlx_rwkv.convert import convert  # noqa: E402
from mlx_rwkv.gguf_io import GLOBALS, LAYER, escape_token, load_gguf, save_gguf, unescape_token  # noqa: E402
from mlx_rwkv.quant import (  # noqa: E402
    Q4KTensor, dequantize_q4k, is_quantizable, load_quantized, quantize_q4k, save_quantized,
)
from mlx_rwkv.synth import synthesize  # noqa: E402

Q4_K, Q8_0, F16, F32 = (gguf.GGMLQuantizationType[n] for n in ("Q4_K", "Q8_0", "F16", "F32"))
OUT_TYPES = ("q4_k", "q8_0", "f16", "f32")
FILE_TYPES = {"q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}
CONFIG = ModelConfig(n_layer=2, n_embd=256, head_size=64, vocab_size=1000,
                     d_decay=32, d_aaa=48, d_mv=16, d_gate=64, d_ffn=1024)


def _llama_cpp_shapes(c: ModelConfig) -> dict[str, list[int]]:
    """ggml ne of every tensor as llama.cpp's llama_model_rwkv7::load_arch_tensors creates it."""
    C, V, F = c.n_embd, c.vocab_size, c.d_ffn
    ne = {"token_embd.weight": [C, V], "token_embd_norm.weight": [C], "token_embd_norm.bias": [C],
          "output_norm.weight": [C], "output_norm.bias": [C], "output.weight": [C, V]}
    for i in range(c.n_layer):
        b = f"blk.{i}."
        v_rank = c.d_aaa if i == 0 else c.d_mv  # layer 0: dummy copies of a0/a1/a2
        for n in ("attn_norm", "attn_norm_2", "time_mix_ln"):
            ne[b + n + ".weight"] = ne[b + n + ".bias"] = [C]
        for n in ("w0", "a0", "v0", "k_k", "k_a", "r_k"):
            ne[b + f"time_mix_{n}.weight"] = [C]
        for n, rank in (("w", c.d_decay), ("a", c.d_aaa), ("v", v_rank), ("g", c.d_gate)):
            ne[b + f"time_mix_{n}1.weight"] = [C, rank]
            ne[b + f"time_mix_{n}2.weight"] = [rank, C]
        ne[b + "time_mix_lerp_fused.weight"] = [C, 1, 1, 6]
        for n in ("key", "value", "receptance", "output"):
            ne[b + f"time_mix_{n}.weight"] = [C, C]
        ne[b + "channel_mix_lerp_k.weight"] = [C]  # llama.cpp asks {C, 1, 1}: trailing 1s match
        ne[b + "channel_mix_key.weight"] = [C, F]
        ne[b + "channel_mix_value.weight"] = [F, C]
    return ne


_LINEAR = ("time_mix_key.weight", "time_mix_value.weight", "time_mix_receptance.weight",
           "time_mix_output.weight", "channel_mix_key.weight", "channel_mix_value.weight")


def _is_linear(name: str) -> bool:
    return name.endswith(_LINEAR)


def _converter_type(name: str, ne: list[int], out_type: str, include_head: bool = True):
    """The type llama.cpp gives each tensor: convert_hf_to_gguf.py (1-D tensors, time_mix_w1/w2 and
    the fused lerp F32; other matrices in the output type, Q8_0 falling back to F16 for rows that
    are not a multiple of 32), then for q4_k llama-quantize (linear weights and head Q4_K; the rwkv7
    LoRAs untouched; the embedding, which it would quantize too, kept F16 by us)."""
    if len(ne) == 1 or name.endswith(("time_mix_w1.weight", "time_mix_w2.weight", "time_mix_lerp_fused.weight")) \
            or out_type == "f32":
        return F32
    if name == "output.weight" and not include_head:
        return F16
    if out_type == "q4_k":
        return Q4_K if _is_linear(name) or name == "output.weight" else F16
    if out_type == "q8_0":
        return Q8_0 if ne[0] % 32 == 0 else F16
    return F16


def _gguf_name(key: str) -> str:
    if key in GLOBALS:
        return GLOBALS[key]
    _, layer, local = key.split(".", 2)
    return f"blk.{layer}.{LAYER.get(local, 'time_mix_lerp_fused.weight')}"  # x_r, x_w, ...: fused


def _decoded(key: str, value: np.ndarray, qtype) -> np.ndarray:
    """float32 values a reader gets back from `value` stored as qtype (in GGUF's row order)."""
    x = np.asarray(value, np.float32)
    lora = key.rsplit(".", 1)[-1] in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
    x = x.T if lora else x  # GGUF rows of a LoRA are the official columns
    if qtype == Q8_0:
        x = gguf.quants.dequantize(gguf.quants.quantize(x, Q8_0), Q8_0)
    elif qtype == Q4_K:
        x = dequantize_q4k(quantize_q4k(x), x.shape)
    elif qtype == F16:
        x = x.astype(np.float16).astype(np.float32)
    return x.T if lora else x


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return synthesize(CONFIG, seed=3, dtype="bfloat16")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights) -> Path:
    return save_gguf(weights, tmp_path_factory.mktemp("gguf") / "model-q4k.gguf")


@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_export_layout_matches_llama_cpp(tmp_path: Path, weights, out_type: str) -> None:
    path = save_gguf(weights, tmp_path / "m.gguf", out_type)
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "rwkv7" and field("general.type") == "model"
    assert field("general.name") == "m" and field("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert field("general.file_type") == FILE_TYPES[out_type]
    meta = {k: field("rwkv7." + k) for k in (
        "block_count", "embedding_length", "feed_forward_length", "wkv.head_size", "token_shift_count",
        "attention.decay_lora_rank", "attention.iclr_lora_rank", "context_length",
        "attention.value_residual_mix_lora_rank", "attention.gate_lora_rank", "attention.head_count")}
    assert meta == {"block_count": 2, "embedding_length": 256, "feed_forward_length": 1024,
                    "wkv.head_size": 64, "token_shift_count": 2, "attention.decay_lora_rank": 32,
                    "attention.iclr_lora_rank": 48, "attention.value_residual_mix_lora_rank": 16,
                    "attention.gate_lora_rank": 64, "context_length": 1048576, "attention.head_count": 0}
    got = {t.name: t.shape.tolist() for t in reader.tensors}
    assert got == _llama_cpp_shapes(CONFIG)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types == {name: _converter_type(name, ne, out_type) for name, ne in got.items()}
    # the file type names the type of the big matrices (llama.cpp's own guess for a mostly-Q4_K file)
    linear = {types[n] for n in got if _is_linear(n)}
    assert linear == {{"q4_k": Q4_K, "q8_0": Q8_0, "f16": F16, "f32": F32}[out_type]}


@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_round_trip(tmp_path: Path, weights, out_type: str) -> None:
    """Every tensor comes back as its source stored in its converter type: Q4_K blocks exactly
    those of quantize_q4k, Q8_0 exactly gguf's own encoding, F16 the rounded source, F32 exact."""
    model = load_gguf(save_gguf(weights, tmp_path / "m.gguf", out_type))
    assert model.config == CONFIG and model.format == "gguf" and model.tokens is None
    expected = dict(weights)
    for key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
        del expected[key]  # unused by layer 0; the GGUF holds llama.cpp's dummies, dropped on import
    assert model.weights.keys() == expected.keys()
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    for key, source in expected.items():
        got = model.weights[key]
        qtype = types[_gguf_name(key)]
        if qtype == Q4_K:
            assert isinstance(got, Q4KTensor)
            np.testing.assert_array_equal(got.blocks, quantize_q4k(np.asarray(source, np.float32)), key)
            continue
        # F16/F32 keep their dtype; Q8_0 decodes to float16 for the big matrices, float32 for the LoRAs
        big = is_quantizable(key) or key == "emb.weight"
        assert got.dtype == (np.float16 if qtype == F16 or qtype == Q8_0 and big else np.float32), key
        np.testing.assert_array_equal(got.astype(np.float32), _decoded(key, source, qtype).reshape(got.shape)
                                      .astype(got.dtype).astype(np.float32), key)


def test_gguf_referees_our_blocks(exported: Path) -> None:
    """gguf's own decoder reads our Q4_K and Q8_0 tensors as we do."""
    for path in (exported, save_gguf(synthesize(CONFIG, seed=5), exported.with_name("q8.gguf"), "q8_0")):
        model = load_gguf(path)
        checked = 0
        for t in gguf.GGUFReader(path).tensors:
            if t.tensor_type not in (Q4_K, Q8_0) or not _is_linear(t.name):
                continue
            theirs = gguf.quants.dequantize(t.data, t.tensor_type)
            layer, local = t.name.split(".", 2)[1:]
            ours = model.weights[f"blocks.{layer}.{dict(map(reversed, LAYER.items()))[local]}"]
            ours = ours.dequantize() if isinstance(ours, Q4KTensor) else ours.astype(np.float32)
            np.testing.assert_array_equal(ours, theirs.astype(ours.dtype if t.tensor_type == Q4_K else np.float16)
                                          .astype(np.float32))
            checked += 1
        assert checked == 6 * CONFIG.n_layer


def test_head_kept_dense(tmp_path: Path, weights) -> None:
    for out_type in ("q4_k", "q8_0"):
        path = save_gguf(weights, tmp_path / f"{out_type}.gguf", out_type, include_head=False)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
        assert types["output.weight"] == F16 and types["blk.1.channel_mix_value.weight"] != F16


def test_tokenizer_metadata(tmp_path: Path) -> None:
    """As _set_vocab_rwkv_world: "<s>" control token 0 = bos = eos, eot = "\\n\\n", the chat template."""
    tokens = [b""] + [b"a", b"\n\n", b"b"] * 2
    path = save_gguf(synthesize(CONFIG, seed=1), tmp_path / "m.gguf", "f16", tokens=tokens)
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "rwkv"
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (0, 0)
    assert field("tokenizer.ggml.eot_token_id") == 2  # the first "\n\n"
    assert "'User: ' + message['content']|trim" in field("tokenizer.chat_template")
    texts = field("tokenizer.ggml.tokens")
    assert texts[:4] == ["<s>", "a", "\\n\\n", "b"] and texts[7] == "[PAD7]" and len(texts) == CONFIG.vocab_size
    types = field("tokenizer.ggml.token_type")
    assert types[:2] == [gguf.TokenType.CONTROL, gguf.TokenType.NORMAL] and types[7] == gguf.TokenType.UNUSED
    no_eot = save_gguf(synthesize(CONFIG, seed=1), tmp_path / "n.gguf", "f16", tokens=[b"", b"a"])
    assert gguf.GGUFReader(no_eot).get_field("tokenizer.ggml.eot_token_id") is None


# ---- tensors of other types, as other tools write them -------------------------------------------

Converter = Callable[[str, np.ndarray], "list[tuple[str, np.ndarray, object]]"]


def _rewrite(src: Path, dst: Path, convert: Converter, arch: str = "rwkv7") -> Path:
    """Copy a GGUF's tensors (decoded, numpy order) through `convert`, which returns the
    (name, data, ggml type or None) entries to write: it may re-encode, rename or drop."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch)
    writer.add_wkv_head_size(64)
    writer.add_block_count(CONFIG.n_layer)
    for t in reader.tensors:
        for name, data, qtype in convert(t.name, gguf.quants.dequantize(t.data, t.tensor_type)):
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("requantize", [False, True])
def test_q8_0_and_q4k_embedding(tmp_path: Path, weights, requantize: bool) -> None:
    """Q8_0 linear weights decode to float16 (or requantize to Q4_K); a Q4_K embedding decodes."""
    dense_file = save_gguf(weights, tmp_path / "dense.gguf", "f32")

    def convert(name: str, x: np.ndarray) -> list[tuple[str, np.ndarray, object]]:
        if _is_linear(name):
            return [(name, gguf.quants.quantize(x, Q8_0), Q8_0)]
        if name == "token_embd.weight":  # llama.cpp's Q4_K_M files quantize the embedding too
            return [(name, quantize_q4k(x), Q4_K)]
        return [(name, x, None)]

    model = load_gguf(_rewrite(dense_file, tmp_path / "q8.gguf", convert), requantize=requantize)
    key = "blocks.1.att.key.weight"
    reference = gguf.quants.dequantize(gguf.quants.quantize(weights[key].astype(np.float32), Q8_0), Q8_0)
    got = model.weights[key]
    if requantize:
        assert isinstance(got, Q4KTensor)
        err = np.sqrt(np.mean((got.dequantize() - reference) ** 2)) / reference.std()
        assert err < 0.1  # a 4-bit code: ~1/15 of the range
    else:
        assert got.dtype == np.float16
        np.testing.assert_allclose(got, reference, rtol=2 ** -11, atol=0)
    emb = model.weights["emb.weight"]
    assert emb.dtype == np.float16 and emb.shape == (CONFIG.vocab_size, CONFIG.n_embd)
    emb32 = weights["emb.weight"].astype(np.float32)
    np.testing.assert_array_equal(emb, dequantize_q4k(quantize_q4k(emb32), emb32.shape).astype(np.float16))
    assert model.weights["blocks.0.att.w1"].dtype == np.float32  # F32 tensors keep their dtype


# ---- tokenizer ------------------------------------------------------------------------------------

def test_token_escaping() -> None:
    tricky = [b"'", b'"', b"'\"", b"\\", b"\\x41", b"\n\t\r", b"\x00\xff", "é".encode(), b"a b"]
    for token in tricky:
        assert unescape_token(escape_token(token)) == token


def test_world_vocab_round_trip(tmp_path: Path) -> None:
    from mlx_rwkv.tokenizer import load_vocab

    vocab = load_vocab()
    config = ModelConfig(n_layer=1, n_embd=256, head_size=64, vocab_size=65536,
                         d_decay=16, d_aaa=16, d_mv=0, d_gate=32, d_ffn=1024)
    w = {k: v[:, :256] if k in ("emb.weight", "head.weight") else v
         for k, v in synthesize(config, dtype="float16").items()}  # tiny arrays, real vocab size
    tokens = [vocab.get(i, b"") for i in range(65536)]
    model = load_gguf(save_gguf(w, tmp_path / "world.gguf", "f16", tokens=tokens))
    assert model.tokens == tokens and model.world_vocab
    reader = gguf.GGUFReader(tmp_path / "world.gguf")
    texts = reader.get_field("tokenizer.ggml.tokens").contents()
    assert texts[0] == "<s>" and texts[65535] == "[PAD65535]" and texts[11] == "\\n"


# ---- errors ---------------------------------------------------------------------------------------

def test_other_architecture(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'llama'.*rwkv7"):
        load_gguf(tmp_path / "llama.gguf")


def test_truncated_and_foreign_files(tmp_path: Path, exported: Path) -> None:
    data = exported.read_bytes()
    for name, content in [("truncated.gguf", data[: len(data) // 2]), ("header.gguf", data[:100]),
                          ("empty.gguf", b""), ("text.gguf", b"not a gguf file at all")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="GGUF"):
            load_gguf(tmp_path / name)


def test_unknown_and_missing_tensors(tmp_path: Path, exported: Path) -> None:
    def rename(name: str, x: np.ndarray) -> list[tuple[str, np.ndarray, object]]:
        return [("blk.0.time_mix_gate.weight" if name == "blk.1.time_mix_g1.weight" else name, x, None)]

    with pytest.raises(CheckpointError, match="unknown to the rwkv7 layout: blk.0.time_mix_gate.weight"):
        load_gguf(_rewrite(exported, tmp_path / "odd.gguf", rename))

    def drop(name: str, x: np.ndarray) -> list[tuple[str, np.ndarray, object]]:
        return [] if name == "blk.1.time_mix_k_k.weight" else [(name, x, None)]

    with pytest.raises(CheckpointError, match="missing blocks.1.att.k_k"):
        load_gguf(_rewrite(exported, tmp_path / "missing.gguf", drop))


def test_failed_export_leaves_nothing(tmp_path: Path, weights) -> None:
    target = tmp_path / "keep.gguf"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="tokens"):
        save_gguf(weights, target, "f16", tokens=[b"x"] * 2000)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf"]


# ---- convert: any input to GGUF or our .safetensors --------------------------------------------

BYTES = ModelConfig(n_layer=2, n_embd=256, head_size=64, vocab_size=256,
                    d_decay=32, d_aaa=48, d_mv=16, d_gate=64, d_ffn=1024)
TOKENS = list(b"Hello world")


def _logits(path: Path, quant: str | None = None) -> np.ndarray:
    """Our logits [T, V] for TOKENS through `mlx_rwkv.load` (float32)."""
    from mlx_rwkv import load

    model, _ = load(path, dtype="float32", quant=quant)
    return np.array(model.forward(TOKENS, all_logits=True)[0], dtype=np.float64)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A float32 .pth with a byte vocab (so GGUF exports carry a tokenizer)."""
    return save_checkpoint(synthesize(BYTES, seed=3, dtype="float32"), tmp_path_factory.mktemp("convert") / "m.pth")


@pytest.fixture(scope="module")
def source_logits(source: Path) -> dict[str, np.ndarray]:
    return {"dense": _logits(source), "q4k": _logits(source, quant="q4k")}


# (out_type, suffix, reference, bound): max |logits - reference| / max |reference|. The F16 and
# Q8_0 bounds are ~5x and ~3x the measured 1e-3 and 1.8e-2; a Q4_K GGUF differs from quantizing
# at load only by its F16 embedding and LoRAs (measured 1e-3), a Q4_K .safetensors not at all.
ROUND_TRIPS = [("f32", ".gguf", "dense", 0), ("f32", ".safetensors", "dense", 0),
               ("f16", ".gguf", "dense", 5e-3), ("f16", ".safetensors", "dense", 5e-3),
               ("q8_0", ".gguf", "dense", 5e-2), ("q4_k", ".gguf", "q4k", 5e-3),
               ("q4_k", ".safetensors", "q4k", 0)]


@pytest.mark.parametrize("out_type, suffix, reference, bound", ROUND_TRIPS)
def test_convert_logits(source: Path, source_logits, out_type: str, suffix: str, reference: str,
                        bound: float) -> None:
    out = convert(source, source.with_name(f"m-{out_type}{suffix}"), out_type)
    assert out.read_bytes()[:4] == b"GGUF" if suffix == ".gguf" else out.read_bytes()[8:9] == b"{"
    ref = source_logits[reference]
    assert np.abs(_logits(out) - ref).max() <= bound * np.abs(ref).max()


def test_convert_q4k_input(source: Path, tmp_path: Path) -> None:
    """Our Q4_K files are accepted: their blocks pass through to a q4_k output unchanged (also
    back from GGUF) and are decoded for a float output."""
    weights = load_quantized(convert(source, tmp_path / "q.safetensors", "q4_k")).weights
    key = "blocks.1.ffn.value.weight"
    # arbitrary blocks, which the quantizer would not give back from their values: a pass-through
    # is observable (our quantizer's own output is a fixed point of requantization)
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, weights[key].blocks.shape, dtype=np.uint8).reshape(-1, 144)
    odd[:, 0:4] = np.array([0.001, 0.0005], np.float16).view(np.uint8)  # small d, dmin
    weights[key] = Q4KTensor(odd.reshape(weights[key].blocks.shape), weights[key].shape)
    assert not np.array_equal(quantize_q4k(weights[key].dequantize()), weights[key].blocks)
    q4k = save_quantized(weights, tmp_path / "odd.safetensors")
    back = load_quantized(convert(convert(q4k, tmp_path / "q.gguf", "q4_k"), tmp_path / "back.safetensors", "q4_k"))
    for k, v in weights.items():
        if isinstance(v, Q4KTensor):
            np.testing.assert_array_equal(back.weights[k].blocks, v.blocks, k)
    got = load_checkpoint(convert(q4k, tmp_path / "f16.safetensors", "f16")).weights[key]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, weights[key].dequantize().astype(np.float16))


def test_convert_gguf_input(source: Path, tmp_path: Path) -> None:
    """Re-typing a GGUF keeps its tokenizer; the values are the input's, re-encoded."""
    f16 = convert(source, tmp_path / "m-f16.gguf", "f16")
    q8 = load_gguf(convert(f16, tmp_path / "m-q8.gguf", "q8_0"))
    assert q8.tokens == load_gguf(f16).tokens == [b""] + [bytes([i]) for i in range(1, 256)]
    key = "blocks.0.att.receptance.weight"
    x = load_gguf(f16).weights[key].astype(np.float32)
    np.testing.assert_array_equal(q8.weights[key], gguf.quants.dequantize(gguf.quants.quantize(x, Q8_0), Q8_0)
                                  .astype(np.float16))


@pytest.mark.parametrize("out_name, out_type, match", [
    ("m.bin", "q4_k", r"output format from the name 'm.bin'.*\.gguf.*\.safetensors"),
    ("m.pth", "f16", "output format"),
    ("model", "f16", "output format"),
    ("m.safetensors", "q8_0", r"q8_0 is a GGUF type: write it to a \.gguf"),
    ("m.gguf", "q4_0", "unknown output type 'q4_0'"),
    ("sub", "f16", "is a directory"),
])
def test_convert_refuses(source: Path, tmp_path: Path, out_name: str, out_type: str, match: str) -> None:
    (tmp_path / "sub").mkdir()
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ValueError, match=match):
        convert(source, tmp_path / out_name, out_type)
    assert sorted(tmp_path.iterdir()) == before


def test_convert_never_writes_over_its_input(source: Path, tmp_path: Path) -> None:
    gguf_in = convert(source, tmp_path / "in.gguf", "f16")
    data = gguf_in.read_bytes()
    (tmp_path / "link.gguf").symlink_to(gguf_in)
    for out in (gguf_in, tmp_path / "." / "in.gguf", tmp_path / "link.gguf"):
        with pytest.raises(ValueError, match="write over the input"):
            convert(gguf_in, out, "q4_k")
    assert gguf_in.read_bytes() == data


@pytest.mark.parametrize("name, out_type", [("m.gguf", "q4_k"), ("m.safetensors", "q4_k"), ("m.safetensors", "f32")])
def test_convert_replaces_only_when_asked(source: Path, tmp_path: Path, name: str, out_type: str) -> None:
    out = tmp_path / name
    out.write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="exists"):
        convert(source, out, out_type)
    assert out.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == [name]
    convert(source, out, out_type, replace=True)
    assert _logits(out).shape == (len(TOKENS), BYTES.vocab_size)


def test_convert_file_mode_follows_umask(source: Path, tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        for name, out_type in (("m.gguf", "q8_0"), ("m.safetensors", "q4_k"), ("d.safetensors", "f16")):
            assert convert(source, tmp_path / name, out_type).stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_missing_gguf_package(source: Path, tmp_path: Path, monkeypatch) -> None:
    """Without `gguf`, GGUF input or output fails up front with one line; .safetensors still works."""
    gguf_file = convert(source, tmp_path / "m.gguf", "f16")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    monkeypatch.delitem(sys.modules, "mlx_rwkv.gguf_io")
    message = r"^GGUF needs the gguf package: pip install 'mlx-rwkv\[gguf\]'$"
    for src, out in ((source, tmp_path / "x.gguf"), (gguf_file, tmp_path / "x.safetensors")):
        with pytest.raises(ImportError, match=message) as info:
            convert(src, out, "f16")
        assert info.value.__cause__ is None and info.value.__suppress_context__
    from mlx_rwkv.loading import read_weights

    with pytest.raises(ImportError, match=message):
        read_weights(gguf_file)
    assert convert(source, tmp_path / "ok.safetensors", "q4_k").is_file()
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.safetensors").exists()
