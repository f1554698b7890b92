"""GGUF (llama.cpp rwkv7) export and import: layout, round trips, foreign types, clear errors."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest

from mlx_rwkv.config import CheckpointError, ModelConfig
from mlx_rwkv.gguf_io import escape_token, load_gguf, save_gguf, unescape_token
from mlx_rwkv.quant import Q4KTensor, dequantize_q4k, quantize_model, quantize_q4k
from mlx_rwkv.synth import synthesize

Q4_K, Q8_0, F16, F32 = (gguf.GGMLQuantizationType[n] for n in ("Q4_K", "Q8_0", "F16", "F32"))
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


def _same(a: np.ndarray | Q4KTensor, b: np.ndarray | Q4KTensor) -> bool:
    if isinstance(a, Q4KTensor) or isinstance(b, Q4KTensor):
        return isinstance(a, Q4KTensor) and isinstance(b, Q4KTensor) and a.shape == b.shape \
            and np.array_equal(a.blocks, b.blocks)
    return a.shape == b.shape and np.array_equal(a.astype(np.float32), b.astype(np.float32))


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return synthesize(CONFIG, seed=3, dtype="bfloat16")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights) -> Path:
    return save_gguf(weights, tmp_path_factory.mktemp("gguf") / "model-q4k.gguf")


def test_export_layout_matches_llama_cpp(exported: Path) -> None:
    reader = gguf.GGUFReader(exported)
    assert reader.get_field("general.architecture").contents() == "rwkv7"
    meta = {k: reader.get_field("rwkv7." + k).contents() for k in (
        "block_count", "embedding_length", "feed_forward_length", "wkv.head_size", "token_shift_count",
        "attention.decay_lora_rank", "attention.iclr_lora_rank",
        "attention.value_residual_mix_lora_rank", "attention.gate_lora_rank")}
    assert meta == {"block_count": 2, "embedding_length": 256, "feed_forward_length": 1024,
                    "wkv.head_size": 64, "token_shift_count": 2, "attention.decay_lora_rank": 32,
                    "attention.iclr_lora_rank": 48, "attention.value_residual_mix_lora_rank": 16,
                    "attention.gate_lora_rank": 64}
    got = {t.name: t.shape.tolist() for t in reader.tensors}
    assert got == _llama_cpp_shapes(CONFIG)
    types = {t.name: t.tensor_type for t in reader.tensors}
    linear = [n for n in got if n.endswith(("_key.weight", "_value.weight", "_receptance.weight",
                                            "time_mix_output.weight")) or n == "output.weight"]
    assert len(linear) == 2 * 6 + 1 and all(types[n] == Q4_K for n in linear)
    assert all(types[n] == F32 for n in got if n not in linear)  # bfloat16 input -> exact F32


def test_round_trip(exported: Path, weights: dict[str, np.ndarray]) -> None:
    model = load_gguf(exported)
    assert model.config == CONFIG and model.format == "gguf" and model.tokens is None
    expected = quantize_model(weights, progress=False)
    for key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
        del expected[key]  # unused by layer 0; the GGUF holds llama.cpp's dummies, dropped on import
    assert model.weights.keys() == expected.keys()
    bad = [k for k in expected if not _same(model.weights[k], expected[k])]
    assert not bad


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_dense(tmp_path: Path, dtype: str) -> None:
    """Without quantization every tensor comes back with its values and dtype (F16/F32)."""
    w = synthesize(CONFIG, seed=4, dtype=dtype)
    model = load_gguf(save_gguf(w, tmp_path / "dense.gguf", quantize=False))
    for key, value in model.weights.items():
        assert _same(value, w[key]), key
    assert model.weights["head.weight"].dtype == np.dtype(dtype)
    assert model.weights["blocks.1.att.key.weight"].dtype == np.dtype(dtype)


def test_head_kept_dense(tmp_path: Path, weights) -> None:
    model = load_gguf(save_gguf(weights, tmp_path / "m.gguf", include_head=False))
    assert not isinstance(model.weights["head.weight"], Q4KTensor)
    assert isinstance(model.weights["blocks.1.ffn.value.weight"], Q4KTensor)


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


def _is_linear(name: str) -> bool:
    return name.endswith(("time_mix_key.weight", "time_mix_value.weight", "time_mix_receptance.weight",
                          "time_mix_output.weight", "channel_mix_key.weight", "channel_mix_value.weight"))


@pytest.mark.parametrize("requantize", [False, True])
def test_q8_0_and_q4k_embedding(tmp_path: Path, weights, requantize: bool) -> None:
    """Q8_0 linear weights decode to float16 (or requantize to Q4_K); a Q4_K embedding decodes."""
    dense_file = save_gguf(weights, tmp_path / "dense.gguf", quantize=False)

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
    model = load_gguf(save_gguf(w, tmp_path / "world.gguf", tokens=tokens, quantize=False))
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
        save_gguf(weights, target, tokens=[b"x"] * 2000, quantize=False)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf"]
