"""Synthetic checkpoints: deterministic, complete, nonzero, and numerically realistic in a forward pass."""
from __future__ import annotations

import numpy as np
import pytest

import mlx_rwkv.synth as synth
from mlx_rwkv.checkpoint import load_checkpoint
from mlx_rwkv.config import ModelConfig, config_for_shape
from mlx_rwkv.synth import resolve_dtype, synth_tensor, synthesize, write_synthetic
from oracle import forward, softmax

LAYER0_VALUE_RESIDUAL = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}


def test_same_seed_same_bytes_other_seed_differs(small_config):
    a, b, c = synthesize(small_config, seed=5), synthesize(small_config, seed=5), synthesize(small_config, seed=6)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
        assert not np.array_equal(a[key], c[key]), key


def test_shapes_nonzero_finite(small_config):
    weights = synthesize(small_config)
    expected = small_config.expected_shapes()
    extra = LAYER0_VALUE_RESIDUAL if small_config.n_layer > 1 else set()
    assert set(weights) == set(expected) | extra
    for key, array in weights.items():
        assert array.shape == expected.get(key, expected.get(key.replace("blocks.0.", "blocks.1."))), key
        assert array.dtype == np.float32, key
        assert np.isfinite(array).all(), key
        assert np.count_nonzero(array) > 0.99 * array.size, f"{key} is (mostly) zero"
    assert ModelConfig.from_shapes({k: v.shape for k, v in weights.items()}) == small_config


@pytest.mark.parametrize("dtype", ["float16", "bf16", np.float16])
def test_half_dtypes_round_the_float32_weights(dtype):
    config = config_for_shape("0.1B", n_layer=2, n_embd=128, vocab_size=300)
    full, half = synthesize(config, seed=2), synthesize(config, seed=2, dtype=dtype)
    for key in full:
        assert half[key].dtype == resolve_dtype(dtype), key
        np.testing.assert_allclose(half[key].astype(np.float32), full[key], rtol=1e-2, atol=1e-6, err_msg=key)


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match="unsupported dtype"):
        synthesize(config_for_shape("0.1B", n_layer=1, n_embd=64, vocab_size=10), dtype="int8")


def test_tensors_can_be_made_one_by_one_and_in_any_chunk_size(monkeypatch):
    config = config_for_shape("0.1B", n_layer=2, n_embd=128, vocab_size=777)
    weights = synthesize(config, seed=9, dtype="float16")
    for key in ("head.weight", "blocks.1.att.w0", "blocks.0.att.v2"):
        alone = synth_tensor(config, key, weights[key].shape, 9, resolve_dtype("float16"))
        assert alone.tobytes() == weights[key].tobytes(), key
    monkeypatch.setattr(synth, "_CHUNK", 1001)  # odd, so chunks split the generator's 64-bit words
    assert synthesize(config, seed=9, dtype="float16")["head.weight"].tobytes() == weights["head.weight"].tobytes()


def test_forward_pass_stays_in_a_realistic_range():
    config = config_for_shape("0.1B", n_layer=4, n_embd=256, vocab_size=4096)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, config.vocab_size, 48)]
    trace: dict[str, list[np.ndarray]] = {}
    logits, state = forward(synthesize(config, seed=0), config, tokens, trace=trace)

    # decay = exp(-0.606531 * sigmoid(.)) can only lie in (0.545, 1): ask for most of that range
    decay = np.stack(trace["decay"])
    x = np.stack(trace["x"]).reshape(len(tokens), config.n_layer, config.n_embd)
    entropy = -(softmax(logits) * np.log(softmax(logits))).sum(axis=1)
    print(f"decay [{decay.min():.3f}, {decay.max():.5f}], hidden std per layer {x.std(axis=(0, 2)).round(2)}, "
          f"|hidden| max {np.abs(x).max():.1f}, logits std {logits.std(axis=1).mean():.2f}, "
          f"entropy {entropy.min():.2f}..{entropy.max():.2f} of log V {np.log(config.vocab_size):.2f}")

    assert decay.min() < 0.6 and decay.max() > 0.99
    assert np.percentile(decay, 25) < 0.9 < np.percentile(decay, 75)  # spread, not bunched at one end
    assert 0.3 < x.std(axis=(0, 2)).min() and x.std(axis=(0, 2)).max() < 10 and np.abs(x).max() < 100
    for name in ("r", "k", "v", "g", "att_out", "ffn_out"):
        assert 0.05 < np.stack(trace[name]).std() < 10, name
    assert 0.5 < logits.std(axis=1).mean() < 5
    assert entropy.min() > 0.5 and entropy.max() < 0.95 * np.log(config.vocab_size)
    assert all(np.isfinite(s).all() for s in state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_write_synthetic_round_trip(tmp_path, suffix):
    path = tmp_path / ("model" + suffix)
    config = write_synthetic(path, shape="1.5B", seed=4, dtype="bfloat16", n_layer=2, n_embd=128, vocab_size=500)
    assert config == config_for_shape("1.5B", n_layer=2, n_embd=128, vocab_size=500)
    loaded = load_checkpoint(path)
    assert loaded.config == config
    expected = synthesize(config, seed=4, dtype="bfloat16")
    assert loaded.weights.keys() == expected.keys()
    for key, array in expected.items():
        assert loaded.weights[key].dtype == array.dtype and loaded.weights[key].tobytes() == array.tobytes(), key
