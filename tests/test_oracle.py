"""The float64 oracle against the official `rwkv` package and the real tiny model.

Relative difference of two logit arrays: per token row, max|oracle - official| / max|official|;
the tests report and bound the largest over all rows.
"""
from __future__ import annotations

import numpy as np
import pytest

from mlx_rwkv.synth import synthesize
from oracle import forward, softmax, zero_state

TINY_PROMPT = [34, 105, 110]  # the bytes `"in`, as in the tiny model's README
N_TOKENS = 33
REL_TOL = 1e-4

ENGLISH = (
    b"Once upon a time there was a little girl who lived in a village near the forest. "
    b"Whenever she went out, the little girl wore a red riding cloak, so everyone in the "
    b"village called her Little Red Riding Hood. One morning, she asked her mother if she "
    b"could go to visit her grandmother, as it had been a while since they had seen each other."
)


def row_relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-row max|a - b| / max|b|."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return float((np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)).max())


def _tokens(vocab_size: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab_size, N_TOKENS)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_official_sequence_and_one_token_modes(small_config, dtype, synthetic_checkpoint, official_rwkv):
    ckpt = synthetic_checkpoint(small_config, seed=3, dtype=dtype)
    model = official_rwkv(model=str(ckpt.path.with_suffix("")), strategy="cpu fp32")
    tokens = _tokens(small_config.vocab_size)
    ours, our_state = forward(ckpt.weights, small_config, tokens)

    seq, _ = model.forward(tokens, None, full_output=True)
    seq_rel = row_relative(ours, seq.double().numpy())

    state, one = None, []
    for token in tokens:
        logits, state = model.forward(token, state)
        one.append(logits.double().numpy())
    one_rel = row_relative(ours, np.stack(one))
    state_diff = max(float(np.abs(a - b.double().numpy()).max()) for a, b in zip(our_state, state))

    print(f"{small_config} {dtype}: seq rel {seq_rel:.2e}, one-token rel {one_rel:.2e}, state max abs {state_diff:.2e}")
    assert seq_rel < REL_TOL
    assert one_rel < REL_TOL
    assert state_diff < 1e-3


def test_state_carries_across_calls_and_is_not_mutated(small_config):
    config = small_config
    weights = synthesize(config, seed=1)
    tokens = _tokens(config.vocab_size, seed=1)
    whole, whole_state = forward(weights, config, tokens)
    first, state = forward(weights, config, tokens[:10])
    kept = [s.copy() for s in state]
    rest, rest_state = forward(weights, config, tokens[10:], state)
    assert all(np.array_equal(a, b) for a, b in zip(state, kept))
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=0, atol=1e-12)
    assert all(np.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(rest_state, whole_state))
    assert [s.shape for s in zero_state(config)] == [s.shape for s in whole_state]


def test_tiny_model_reference_logits(tiny_weights, tiny_reference_logits):
    config, weights = tiny_weights
    logits, _ = forward(weights, config, TINY_PROMPT)
    diff = float(np.abs(logits[-1] - tiny_reference_logits).max())
    print(f"tiny model vs reference logits: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_tiny_model_bits_per_byte(tiny_weights):
    # This small model is lightly trained: ~5 bits per byte on plain English (the official
    # package gives the same), well below the 8 bits of a uniform guess; < 3 is out of its reach.
    config, weights = tiny_weights
    data = list(ENGLISH)
    logits, _ = forward(weights, config, data)
    probs = softmax(logits[:-1])
    bpb = float(-np.log2(probs[np.arange(len(data) - 1), data[1:]]).mean())
    print(f"tiny model: {bpb:.3f} bits per byte over {len(data)} bytes")
    assert bpb < 5.5
