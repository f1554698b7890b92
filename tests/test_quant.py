"""Q4_K format, quantizer quality, quantized model files and the MLX Q4KLinear (all CPU)."""
from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from oracle import forward

from mlx_rwkv.checkpoint import save_checkpoint
from mlx_rwkv.checkpoint.files import OutputExistsError
from mlx_rwkv.config import CheckpointError, ModelConfig
from mlx_rwkv.convert import convert
from mlx_rwkv.q4k_linear import Q4KLinear
from mlx_rwkv.quant import (
    BLOCK_BYTES, Q4KTensor, dequantize_model, dequantize_q4k, is_quantized_file, load_quantized,
    quantize_model, quantize_q4k, save_quantized,
)
from mlx_rwkv.synth import synthesize

RNG = np.random.default_rng(1234)


def _config(n_layer: int, n_embd: int, vocab_size: int) -> ModelConfig:
    """Small models whose C is a multiple of 256, as Q4_K needs (real sizes all are)."""
    return ModelConfig(n_layer=n_layer, n_embd=n_embd, head_size=64, vocab_size=vocab_size,
                       d_decay=32, d_aaa=32, d_mv=16, d_gate=64, d_ffn=4 * n_embd)


SMALL = _config(2, 256, 1000)
MEDIUM = _config(4, 512, 2048)


def _matrices() -> dict[str, np.ndarray]:
    shape = (96, 1024)
    outliers = RNG.standard_normal(shape) * np.where(RNG.random(shape) < 0.003, 25.0, 1.0)
    return {
        "normal": RNG.standard_normal(shape),
        "uniform": RNG.uniform(-1, 1, shape),
        "student-t3": RNG.standard_t(3, shape),
        "laplace": RNG.laplace(size=shape),
        "outliers": outliers,
        "positive": np.abs(RNG.standard_normal(shape)) + 0.5,  # min > 0: offset pinned at 0
    }


MATRICES = {name: (0.02 * m).astype(np.float32) for name, m in _matrices().items()}


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def _minmax_q4k(w: np.ndarray) -> np.ndarray:
    """The plain reference: per sub-block scale (max-min)/15 and offset min (no search), with
    the same 6-bit quantization of scales/offsets and fp16 d/dmin as Q4_K; dequantized."""
    x = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    scale, mn = (x.max(-1) - lo) / 15, -lo
    ms, mm = scale.max(1, keepdims=True), mn.max(1, keepdims=True)
    ls = np.minimum(np.rint(np.divide(63 * scale, ms, out=np.zeros_like(scale), where=ms > 0)), 63)
    lm = np.minimum(np.rint(np.divide(63 * mn, mm, out=np.zeros_like(mn), where=mm > 0)), 63)
    dsc = (ms / 63).astype(np.float16).astype(np.float32) * ls
    dm = (mm / 63).astype(np.float16).astype(np.float32) * lm
    q = np.clip(np.rint((x + dm[..., None]) / np.where(dsc == 0, 1, dsc)[..., None]), 0, 15)
    return (dsc[..., None] * q - dm[..., None]).reshape(w.shape)


def _mlx_affine(w: np.ndarray) -> np.ndarray:
    """MLX's own 4-bit group-32 min/max quantization (fp32 scales here), dequantized."""
    wq, s, b = mx.quantize(mx.array(w), group_size=32, bits=4)
    return np.array(mx.dequantize(wq, s, b, group_size=32, bits=4))


# ---- format -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MATRICES))
def test_dequantize_matches_gguf_bit_for_bit(name: str) -> None:
    w = MATRICES[name]
    blocks = quantize_q4k(w)
    assert blocks.shape == (96, 1024 // 256 * BLOCK_BYTES) and blocks.dtype == np.uint8
    ours = dequantize_q4k(blocks, w.shape)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    assert ref.shape == w.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_dequantize_arbitrary_blocks_matches_gguf() -> None:
    """Every bit of the scales/nibbles is decoded as gguf does, not just what our quantizer emits."""
    blocks = RNG.integers(0, 256, (16, 4 * BLOCK_BYTES), dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    blocks[:, 0:4] = RNG.uniform(0, 0.01, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    blocks = blocks.reshape(16, -1)
    ours = dequantize_q4k(blocks, (16, 1024))
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_constant_and_zero_rows() -> None:
    w = np.zeros((4, 256), np.float32)
    w[1] = 0.5
    w[2] = -0.25
    w[3, :128] = 1.0
    out = dequantize_q4k(quantize_q4k(w), w.shape)
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_allclose(out[1:], w[1:], atol=1e-3)


@pytest.mark.parametrize("name", list(MATRICES))
def test_error_not_worse_than_minmax(name: str) -> None:
    """The searched scales beat plain min/max in the same format, and MLX's own 4-bit g32
    (except on all-positive data: Q4_K's offset -dmin*m can only be <= 0, MLX's is free)."""
    w = MATRICES[name]
    ours = _rmse(dequantize_q4k(quantize_q4k(w), w.shape), w)
    assert ours <= _rmse(_minmax_q4k(w), w)
    if name != "positive":
        assert ours <= _rmse(_mlx_affine(w), w)


def test_input_dtypes() -> None:
    w = MATRICES["normal"][:8]
    ref = quantize_q4k(w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(quantize_q4k(w.astype(np.float16)), ref)


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((4, 300), np.float32), ValueError, "multiple of 256"),
    (np.zeros((4, 128), np.float32), ValueError, "multiple of 256"),
    (np.zeros(512, np.float32), ValueError, "2-D"),
    (np.zeros((4, 256), np.int32), TypeError, "float"),
    (np.full((4, 256), np.nan, np.float32), ValueError, "NaN"),
])
def test_bad_input(bad: np.ndarray, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        quantize_q4k(bad)


def test_bad_blocks() -> None:
    blocks = quantize_q4k(MATRICES["normal"][:4])
    with pytest.raises(ValueError, match="uint8"):
        Q4KTensor(blocks[:, :-1], (4, 1024))
    with pytest.raises(ValueError, match="multiple of 256"):
        Q4KTensor(blocks, (4, 1000))


# ---- models and files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_weights() -> dict[str, np.ndarray]:
    return synthesize(SMALL, seed=0, dtype="float16")


@pytest.mark.parametrize("include_head", [True, False])
def test_quantize_model_keys(small_weights: dict[str, np.ndarray], include_head: bool) -> None:
    q = quantize_model(small_weights, include_head=include_head, progress=False)
    assert q.keys() == small_weights.keys()
    quantized = {k for k, v in q.items() if isinstance(v, Q4KTensor)}
    expected = {k for k in small_weights if k.endswith((
        "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
        "ffn.key.weight", "ffn.value.weight"))}
    assert quantized == expected | ({"head.weight"} if include_head else set())
    for k in q.keys() - quantized:
        assert q[k] is small_weights[k]
    assert q["blocks.0.ffn.value.weight"].shape == (256, 1024)


def test_quantize_model_names_the_tensor() -> None:
    weights = synthesize(_config(1, 128, 64), dtype="float32")
    with pytest.raises(ValueError, match=r"multiple of 256; 6 tensor\(s\) are not: head\.weight \[64, 128\]"):
        quantize_model(weights, progress=False)


def test_save_load_round_trip(tmp_path, small_weights: dict[str, np.ndarray]) -> None:
    q = quantize_model(small_weights, progress=False)
    path = save_quantized(q, tmp_path / "model-q4k.safetensors")
    assert is_quantized_file(path) and not list(tmp_path.glob("*.tmp"))
    loaded = load_quantized(path)
    assert loaded.config == SMALL and loaded.format == "q4k"
    for key, value in q.items():
        got = loaded.weights[key]
        if isinstance(value, Q4KTensor):
            assert isinstance(got, Q4KTensor) and got.shape == value.shape
            np.testing.assert_array_equal(got.blocks, value.blocks)
        else:
            assert got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)


def test_convert_to_q4k_file(tmp_path, small_weights: dict[str, np.ndarray]) -> None:
    """`mlx-rwkv quantize in.pth out.safetensors --keep-head` (mlx_rwkv.convert.convert)."""
    src = save_checkpoint(small_weights, tmp_path / "model.pth")
    before = src.read_bytes()
    out = convert(src, tmp_path / "model-q4k.safetensors", "q4_k", include_head=False)
    assert src.read_bytes() == before
    loaded = load_quantized(out)
    expected = quantize_model(small_weights, include_head=False, progress=False)
    np.testing.assert_array_equal(loaded.weights["blocks.1.att.key.weight"].blocks,
                                  expected["blocks.1.att.key.weight"].blocks)
    assert not isinstance(loaded.weights["head.weight"], Q4KTensor)
    with pytest.raises(ValueError, match="write over the input"):
        convert(src, src, "q4_k", replace=True)
    with pytest.raises(OutputExistsError, match="exists"):
        convert(src, out, "q4_k")
    assert convert(src, out, "q4_k", replace=True) == out
    assert isinstance(load_quantized(out).weights["head.weight"], Q4KTensor)


def test_load_refuses_other_files(tmp_path, small_weights: dict[str, np.ndarray]) -> None:
    plain = save_checkpoint(small_weights, tmp_path / "plain.safetensors")
    assert not is_quantized_file(plain)
    with pytest.raises(CheckpointError, match="not a Q4_K model"):
        load_quantized(plain)
    damaged = tmp_path / "damaged.safetensors"
    data = save_quantized(quantize_model(small_weights, progress=False), tmp_path / "q.safetensors").read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_quantized(damaged)


@pytest.mark.parametrize("config", [SMALL, MEDIUM], ids=["L2-C256", "L4-C512"])
def test_logits_close_to_f16(config: ModelConfig) -> None:
    """A Q4_K model's logits stay close to its f16 model's (float64 oracle, dequantized weights).

    Bound: 4-bit codes on these uniform synthetic weights carry a relative weight error of
    about 1/15 = 0.067 per matrix; the head adds that directly and every layer's branches add
    theirs in quadrature, measured at 0.10-0.14 mean relative RMS (12 tokens, seeds 0/1).
    The assertion allows twice the expected 0.1.
    """
    weights = synthesize(config, seed=0, dtype="float16")
    quantized = dequantize_model(quantize_model(weights, progress=False))
    tokens = [1, 7, 42, 3, 99, 5, 200, 11]
    ref, _ = forward(weights, config, tokens)
    got, _ = forward(quantized, config, tokens)
    rel = np.sqrt(np.mean((got - ref) ** 2, axis=1)) / ref.std(axis=1)
    assert rel.mean() < 0.2, rel


# ---- Q4KLinear --------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, k", [(64, 256), (300, 512), (96, 2048)])
def test_q4k_linear_matches_dequantized_matmul(rows: int, k: int) -> None:
    w = (RNG.standard_normal((rows, k)) * 0.05).astype(np.float32)
    weight = Q4KTensor(quantize_q4k(w), (rows, k))
    layer = Q4KLinear(weight)
    deq = weight.dequantize()
    # The repack (CPU) / dequant kernel (GPU) is exact: the same float32 weights bit for bit.
    np.testing.assert_array_equal(np.array(layer.dequantize()).view(np.uint32), deq.view(np.uint32))
    for lead in [(), (1,), (3,), (2, 4)]:  # <= 8 rows: the GPU mat-vec kernel too (fp32 throughout)
        x = RNG.standard_normal((*lead, k)).astype(np.float32)
        y = layer(mx.array(x))
        assert y.shape == (*lead, rows) and y.dtype == mx.float32
        ref = x.astype(np.float64) @ deq.T.astype(np.float64)
        np.testing.assert_allclose(np.array(y), ref, rtol=0, atol=1e-5 * np.abs(ref).max() + 1e-6)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_q4k_linear_low_precision_inputs(dtype: mx.Dtype) -> None:
    w = (RNG.standard_normal((128, 512)) * 0.05).astype(np.float32)
    weight = Q4KTensor(quantize_q4k(w), w.shape)
    x = mx.array(RNG.standard_normal((4, 512)).astype(np.float32)).astype(dtype)
    ref = np.array(x.astype(mx.float32)).astype(np.float64) @ weight.dequantize().T.astype(np.float64)
    for scale_dtype, tol in [(mx.float32, 1e-2), (mx.float16, 2e-2)]:
        y = Q4KLinear(weight, scale_dtype=scale_dtype)(x)
        assert y.dtype == dtype
        np.testing.assert_allclose(np.array(y.astype(mx.float32)), ref, rtol=0, atol=tol * np.abs(ref).max())


def test_q4k_linear_rejects_wrong_width() -> None:
    weight = Q4KTensor(quantize_q4k(MATRICES["normal"][:8]), (8, 1024))
    with pytest.raises(ValueError, match="1024"):
        Q4KLinear(weight)(mx.zeros((2, 512)))
