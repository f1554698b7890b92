"""The MLX engine's forward pass and state (CPU), through `build_model`, against the float64 oracle.

Comparison metric for logits (as in test_oracle.py): per token row max|ours - oracle| / max|oracle|,
the largest over all rows ("row-relative"). States compare per tensor, max|a - b| / max|b|.

Tolerances were measured on this CPU build (mlx 0.32.4, 2 cores) before being set; each bound
says what it was measured at. Synthetic weights come from `synthesize` (trained-like statistics),
token sequences from a fixed numpy generator, so every number here is reproducible.
"""
from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx
import numpy as np
import pytest

from conftest import SMALL_CONFIGS, _config
from mlx_rwkv.loading import build_model
from mlx_rwkv.model import RWKV7
from mlx_rwkv.state import State, StateError
from mlx_rwkv.synth import synthesize
from oracle import forward as oracle_forward
from oracle import softmax

CONFIG_NAMES = list(SMALL_CONFIGS)  # c128-h2, c320-h5 (5 heads), l1-c64 (1 layer), v37-c192-h3 (V=37 < C)
SEED = 3
T = 24

TINY_PROMPT = [34, 105, 110]  # the bytes `"in`, as in the tiny model's README
ENGLISH = (  # 337 bytes, the same text test_oracle.py scores with the oracle alone
    b"Once upon a time there was a little girl who lived in a village near the forest. "
    b"Whenever she went out, the little girl wore a red riding cloak, so everyone in the "
    b"village called her Little Red Riding Hood. One morning, she asked her mother if she "
    b"could go to visit her grandmother, as it had been a while since they had seen each other."
)


# ---- helpers ----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def weights_for(name: str, seed: int = SEED) -> dict[str, np.ndarray]:
    return synthesize(SMALL_CONFIGS[name], seed=seed)


@lru_cache(maxsize=None)
def model_for(name: str, dtype: str = "float32", seed: int = SEED) -> RWKV7:
    return build_model(weights_for(name, seed), SMALL_CONFIGS[name], dtype)


@lru_cache(maxsize=None)
def oracle_for(name: str, seed: int = SEED, n: int = T) -> tuple[np.ndarray, list[np.ndarray]]:
    return oracle_forward(weights_for(name, seed), SMALL_CONFIGS[name], tokens_for(name, n, seed))


def tokens_for(name: str, n: int = T, seed: int = SEED) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, SMALL_CONFIGS[name].vocab_size, n)]


def np32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def row_relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row max|a - b| / max|b| (rows = tokens)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)


def state_parts(state: State, row: int = 0) -> list[tuple[str, np.ndarray]]:
    """One batch row of an MLX state in the oracle's flat order [att_x, wkv, ffn_x] per layer."""
    out = []
    for i in range(len(state.wkv)):
        out += [(f"{i}.att_x", np32(state.att_x[i])[row]), (f"{i}.wkv", np32(state.wkv[i])[row]),
                (f"{i}.ffn_x", np32(state.ffn_x[i])[row])]
    return out


def state_relative(state: State, oracle_state: list[np.ndarray], row: int = 0) -> dict[str, float]:
    return {name: float(np.abs(a - b).max() / np.abs(b).max())
            for (name, a), b in zip(state_parts(state, row), oracle_state, strict=True)}


def state_max_diff(a: State, b: State, row_a: int = 0, row_b: int = 0) -> float:
    """Largest per-tensor relative difference of two MLX states (one batch row each)."""
    return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))
               for (_, x), (_, y) in zip(state_parts(a, row_a), state_parts(b, row_b), strict=True))


def assert_states_equal(a: State, b: State) -> None:
    for x, y in zip(a.arrays(), b.arrays(), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(np32(x), np32(y))


# ---- parity with the oracle -------------------------------------------------------------------

# float32: measured row-relative 6e-7..2.5e-6 on the four configs, states 5e-7..8e-7.
F32_TOL = 1e-4


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_float32_logits_and_state_match_oracle(name):
    config = SMALL_CONFIGS[name]
    ref_logits, ref_state = oracle_for(name)
    logits, state = model_for(name).forward(tokens_for(name), all_logits=True)
    assert logits.shape == (T, config.vocab_size) and logits.dtype == mx.float32
    rel = row_relative(np32(logits), ref_logits)
    srel = state_relative(state, ref_state)
    print(f"{name} float32: logits row-rel max {rel.max():.2e}, state max {max(srel.values()):.2e}")
    assert rel.max() < F32_TOL
    assert max(srel.values()) < F32_TOL, srel


# Half precision: every weight and activation is rounded to 11 (float16) or 8 (bfloat16)
# significant bits, the residual stream included; only the WKV recurrence runs in float32.
# Measured over 4 configs x 12 seeds x 24 tokens (oracle on the full-precision weights; rounding
# the oracle's weights to the same dtype changes nothing: activation rounding dominates):
#   float16:  median row 0.8e-3..1.2e-3 per run, worst row 8.6e-3;  state worst 2.1e-3
#   bfloat16: median row 6.6e-3..9.2e-3 per run, worst row 8.0e-2;  state worst 1.8e-2
# (at SEED = 3 below: float16 median <= 1.05e-3, worst 2.4e-3; bfloat16 <= 8.2e-3, 1.6e-2).
# bfloat16 errors are ~8x float16's, the ratio of their rounding units (2^-8 / 2^-11). The worst
# row is a tail (one token among ~1,000), so each dtype gets a loose bound on the worst row and a
# tight one on the median row, which catches any systematic error (a wrong dtype cast, a
# half-precision recurrence) that the tail bound would let through.
HALF_TOL = {  # dtype: (median row, worst row, state)
    "float16": (4e-3, 3e-2, 1e-2),
    "bfloat16": (3e-2, 1.5e-1, 6e-2),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_half_precision_matches_oracle(name, dtype):
    config = SMALL_CONFIGS[name]
    ref_logits, ref_state = oracle_for(name)
    logits, state = model_for(name, dtype).forward(tokens_for(name), all_logits=True)
    assert logits.shape == (T, config.vocab_size) and logits.dtype == getattr(mx, dtype)
    rel = row_relative(np32(logits), ref_logits)
    srel = state_relative(state, ref_state)
    print(f"{name} {dtype}: row-rel median {np.median(rel):.2e} max {rel.max():.2e}, "
          f"state max {max(srel.values()):.2e}")
    median_tol, max_tol, state_tol = HALF_TOL[dtype]
    assert np.isfinite(np32(logits)).all()
    assert np.median(rel) < median_tol
    assert rel.max() < max_tol
    assert max(srel.values()) < state_tol, srel


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_wkv_state_is_float32_in_every_dtype(dtype, tmp_path):
    name = "c128-h2"
    model = model_for(name, dtype)
    mxd = getattr(mx, dtype)
    fresh = model.new_state(2)
    _, after_prefill = model.forward(tokens_for(name, 9))
    _, after_step = model.step(mx.array([1, 2]), fresh)
    after_prefill.save(tmp_path / "s.safetensors", model)
    loaded = State.load(tmp_path / "s.safetensors", model)
    for state in (fresh, after_prefill, after_step, loaded):
        assert all(s.dtype == mx.float32 for s in state.wkv)
        assert all(x.dtype == mxd for x in state.att_x + state.ffn_x)


# ---- prefill, steps, chunks, batches ----------------------------------------------------------
# All of these are bit-identical on the CPU backend (measured difference 0.0 on every config);
# 1e-5 relative leaves room for backends that reorder reductions by shape.
EXACT_TOL = 1e-5


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_prefill_equals_single_steps(name):
    model, tokens = model_for(name), tokens_for(name, 30)
    logits, state = model.forward(tokens, all_logits=True)
    logits = np32(logits)

    step_state, fwd_state, step_rows, fwd_rows = model.new_state(1), None, [], []
    for t in tokens:
        row, step_state = model.step(mx.array([t]), step_state)  # the compiled decode step
        step_rows.append(np32(row[0]))
        row, fwd_state = model.forward([t], fwd_state)  # forward with T = 1
        fwd_rows.append(np32(row))
    for rows, last in ((step_rows, step_state), (fwd_rows, fwd_state)):
        assert row_relative(np.stack(rows), logits).max() < EXACT_TOL
        assert state_max_diff(last, state) < EXACT_TOL


@pytest.mark.parametrize("chunk_size", [3, 7])
@pytest.mark.parametrize("name", ["c128-h2", "v37-c192-h3"])
def test_chunked_equals_unchunked(name, chunk_size):
    # 22 tokens = 7 x 3 + 1 = 3 x 7 + 1: the last chunk is a single token (the step path).
    model, tokens = model_for(name), tokens_for(name, 22)
    whole, whole_state = model.forward(tokens, all_logits=True)
    chunked, chunked_state = model.forward(tokens, all_logits=True, chunk_size=chunk_size)
    last, last_state = model.forward(tokens, chunk_size=chunk_size)
    assert chunked.shape == whole.shape
    assert row_relative(np32(chunked), np32(whole)).max() < EXACT_TOL
    assert row_relative(np32(last), np32(whole)[-1]).max() < EXACT_TOL
    assert state_max_diff(chunked_state, whole_state) < EXACT_TOL
    assert state_max_diff(last_state, whole_state) < EXACT_TOL


@pytest.mark.parametrize("name", ["c320-h5", "l1-c64"])
def test_batch_equals_separate_runs(name):
    model, V = model_for(name), SMALL_CONFIGS[name].vocab_size
    rng = np.random.default_rng(7)
    first, second = rng.integers(0, V, (3, 12)), rng.integers(0, V, (3, 5))
    # Two calls, so that a batched nonzero state is carried as well.
    _, state = model.forward(mx.array(first))
    logits, state = model.forward(mx.array(second), state, all_logits=True)
    last, _ = model.forward(mx.array(first))
    assert logits.shape == (3, 5, V) and last.shape == (3, V) and state.batch_size == 3
    for b in range(3):
        _, one_state = model.forward(first[b].tolist())
        one, one_state = model.forward(second[b].tolist(), one_state, all_logits=True)
        one_last, _ = model.forward(first[b].tolist())
        assert row_relative(np32(logits[b]), np32(one)).max() < EXACT_TOL
        assert row_relative(np32(last[b]), np32(one_last)).max() < EXACT_TOL
        assert state_max_diff(state, one_state, row_a=b) < EXACT_TOL


def test_last_logits_are_the_last_row_of_all_logits():
    name = "v37-c192-h3"
    model, tokens, V = model_for(name), tokens_for(name, 11), SMALL_CONFIGS[name].vocab_size
    every, every_state = model.forward(tokens, all_logits=True)
    last, last_state = model.forward(tokens)
    assert every.shape == (11, V) and last.shape == (V,)
    assert np.array_equal(np32(last), np32(every)[-1])
    assert_states_equal(last_state, every_state)
    batch = mx.array(np.random.default_rng(1).integers(0, V, (2, 6)))
    every, _ = model.forward(batch, all_logits=True)
    last, _ = model.forward(batch)
    assert every.shape == (2, 6, V) and last.shape == (2, V)
    assert np.array_equal(np32(last), np32(every)[:, -1])
    one, _ = model.forward([5], all_logits=True)  # a single token keeps its T axis
    assert one.shape == (1, V)


def test_state_carries_across_calls_and_is_not_mutated():
    name = "c128-h2"
    model, tokens = model_for(name), tokens_for(name, 20)
    whole, whole_state = model.forward(tokens, all_logits=True)
    head, state = model.forward(tokens[:8], all_logits=True)
    kept = [np32(a) for a in state.arrays()]
    tail, tail_state = model.forward(tokens[8:], state, all_logits=True)
    model.step(mx.array([tokens[8]]), state)
    assert all(np.array_equal(np32(a), b) for a, b in zip(state.arrays(), kept))
    assert row_relative(np.concatenate([np32(head), np32(tail)]), np32(whole)).max() < EXACT_TOL
    assert state_max_diff(tail_state, whole_state) < EXACT_TOL


# ---- state objects and files ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_continue_equals_uninterrupted(dtype, tmp_path):
    name = "c320-h5"
    model, V = model_for(name, dtype), SMALL_CONFIGS[name].vocab_size
    tokens = mx.array(np.random.default_rng(2).integers(0, V, (2, 16)))  # batch 2
    whole, whole_state = model.forward(tokens, all_logits=True)
    _, state = model.forward(tokens[:, :9])
    path = tmp_path / "state.safetensors"
    state.save(path, model)
    loaded = State.load(path, model)
    assert_states_equal(loaded, state)  # the file is lossless
    rest, rest_state = model.forward(tokens[:, 9:], loaded, all_logits=True)
    assert np.array_equal(np32(rest), np32(whole)[:, 9:])
    assert_states_equal(rest_state, whole_state)
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # no temp file left



def test_save_load_round_trip_without_safetensors_suffix(tmp_path):
    model = model_for("l1-c64")
    _, state = model.forward([1, 2, 3])
    state.save(tmp_path / "chat.state", model)  # save accepts any name...
    assert_states_equal(State.load(tmp_path / "chat.state", model), state)  # ...load refuses it


def test_copy_is_independent():
    name = "c128-h2"
    model, tokens = model_for(name), tokens_for(name, 10)
    _, state = model.forward(tokens[:6])
    copy = state.copy()
    assert copy is not state
    kept = [np32(a) for a in copy.arrays()]
    a, _ = model.forward(tokens[6:], state)  # running from the original leaves the copy as it was
    assert all(np.array_equal(np32(x), y) for x, y in zip(copy.arrays(), kept))
    copy.wkv[0] = mx.zeros_like(copy.wkv[0])  # replacing a tensor of the copy...
    assert np.abs(np32(state.wkv[0])).max() > 0  # ...leaves the original's alone
    b, _ = model.forward(tokens[6:], state.copy())
    assert np.array_equal(np32(a), np32(b))
def test_copy_is_independent_under_in_place_edits():
    model = model_for("c128-h2")
    _, state = model.forward(tokens_for("c128-h2", 6))
    copy = state.copy()
    copy.wkv[0][0] = 0.0  # e.g. resetting one sequence of a batch in place
    copy.att_x[1][...] = 0.0
    assert np.abs(np32(state.wkv[0])).max() > 0
    assert np.abs(np32(state.att_x[1])).max() > 0


def test_state_from_another_config_is_refused(tmp_path):
    small, other = model_for("c128-h2"), model_for("c320-h5")
    one_layer = model_for("l1-c64")
    _, state = small.forward([1, 2, 3])
    path = tmp_path / "s.safetensors"
    state.save(path, small)
    for model in (other, one_layer):
        with pytest.raises(StateError, match="another model"):
            State.load(path, model)
    # same sizes but a different vocabulary: still another config
    v_other = build_model(synthesize(_config(2, 128, 500, 32, 32, 16, 64), seed=0),
                          _config(2, 128, 500, 32, 32, 16, 64), "float32")
    with pytest.raises(StateError, match="another model"):
        State.load(path, v_other)
    with pytest.raises(StateError):  # and in memory
        other.forward([1], state)


def test_state_of_wrong_batch_or_shape_is_refused():
    model = model_for("c128-h2")
    with pytest.raises(StateError, match="batch size 2 but the input has 1"):
        model.forward([1, 2], model.new_state(2))
    with pytest.raises(StateError, match="batch size 1 but the input has 3"):
        model.forward(mx.zeros((3, 4), mx.int32), model.new_state(1))
    with pytest.raises(StateError, match="batch_size must be >= 1"):
        model.new_state(0)
    state = model.new_state(1)
    state.wkv = state.wkv[:1]  # a layer missing
    with pytest.raises(StateError, match="does not fit"):
        model.forward([1], state)
    state = model.new_state(1)
    state.att_x[0] = mx.zeros((1, 64))
    with pytest.raises(StateError, match="does not fit"):
        model.forward([1], state)
    state = model.new_state(1)
    state.wkv[0] = state.wkv[0].astype(mx.float16)
    with pytest.raises(StateError, match="float32"):
        model.forward([1], state)
@pytest.mark.parametrize("bad", ["ffn_x0-width", "ffn_x0-batch", "att_x1-width", "wkv1-shape"])
def test_state_with_a_bad_later_tensor_is_refused(bad):
    model = model_for("c128-h2")
    state = model.new_state(1)
    if bad == "ffn_x0-width":
        state.ffn_x[0] = mx.zeros((1, 1))  # broadcasts over C in a T = 1 forward: no error at all
    elif bad == "ffn_x0-batch":
        state.ffn_x[0] = mx.zeros((3, 128))  # a (V,) result from a batch-3 computation
    elif bad == "att_x1-width":
        state.att_x[1] = mx.zeros((1, 1))
    else:
        state.wkv[1] = mx.zeros((1, 2, 64, 1))
    with pytest.raises(StateError):
        mx.eval(model.forward([1], state))


@pytest.mark.parametrize("kind", ["random", "empty", "bad-header", "truncated", "foreign", "unknown-suffix"])
def test_garbage_state_file_is_refused(kind, tmp_path):
    model = model_for("c128-h2")
    path = tmp_path / "s.safetensors"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bad-header":
        path.write_bytes((100).to_bytes(8, "little") + b"{not json")
    elif kind == "truncated":
        _, state = model.forward([1, 2, 3])
        state.save(path, model)
        path.write_bytes(path.read_bytes()[:40000])
    elif kind == "foreign":  # a valid safetensors file that is not a state
        mx.save_safetensors(str(path), {"0.wkv": mx.zeros((1, 2, 64, 64))})
    else:
        path = tmp_path / "s.bin"
        path.write_bytes(os.urandom(100))
    with pytest.raises(StateError, match="state file"):
        State.load(path, model)


def test_state_file_missing_a_tensor_is_refused(tmp_path):
    model = model_for("c128-h2")
    _, state = model.forward([1, 2, 3])
    path = tmp_path / "s.safetensors"
    state.save(path, model)
    tensors, meta = mx.load(str(path), return_metadata=True)
    del tensors["1.ffn_x"]
    mx.save_safetensors(str(path), tensors, metadata=meta)
    with pytest.raises(StateError, match="missing tensor"):
        State.load(path, model)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, message", [
    ([], "empty input"),
    ([[]], "empty input"),
    (mx.array([], dtype=mx.int32), "empty input"),
    (mx.zeros((2, 0), mx.int32), "empty input"),
    ([3, -1, 4], r"token id -1 is out of range .*\(0\.\.511\)"),
    (mx.array([3, -7]), r"token id -7 is out of range"),
    ([1, 512], r"token id 512 is out of range .*\(0\.\.511\)"),
    (mx.array([[1, 2], [3, 10**6]]), r"token id 1000000 is out of range"),
    (mx.zeros((1, 2, 3), mx.int32), r"tokens must be \(T,\) or \(B, T\), got shape \(1, 2, 3\)"),
    ([[[1, 2]]], r"tokens must be \(T,\) or \(B, T\), got shape \(1, 1, 2\)"),
    (7, r"tokens must be \(T,\) or \(B, T\), got shape \(\)"),
], ids=["empty-list", "empty-row", "empty-mx", "empty-batch", "negative", "negative-mx", "V",
        "large-mx-2d", "3d-mx", "3d-list", "scalar"])
def test_bad_tokens_raise_value_error(tokens, message):
    model = model_for("c128-h2")
    with pytest.raises(ValueError, match=message):
        model.forward(tokens)



def test_int64_token_ids_beyond_int32_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        model_for("c128-h2").forward(mx.array([2**32 + 5], dtype=mx.int64))  # runs as token 5



def test_non_integer_token_ids_are_refused():
    with pytest.raises((ValueError, TypeError)):
        model_for("c128-h2").forward([1.7, 2.2])  # runs as [1, 2]


# ---- long decode ------------------------------------------------------------------------------

LONG = 2000
LONG_CONFIG = _config(n_layer=2, n_embd=64, vocab_size=256, d_decay=16, d_aaa=16, d_mv=16, d_gate=32)


def decode(model: RWKV7, tokens: list[int]) -> tuple[np.ndarray, State, float]:
    """Feed tokens one by one through `step`: all logits (float32), final state, max |WKV| seen."""
    ids, state, rows, wkv_max = mx.array(tokens, dtype=mx.int32), model.new_state(1), [], 0.0
    for i in range(len(tokens)):
        logits, state = model.step(ids[i:i + 1], state)
        rows.append(logits)
        if i % 100 == 99:
            mx.eval(rows, state.arrays())
            wkv_max = max(wkv_max, *(float(mx.abs(s).max()) for s in state.wkv))
    return np32(mx.concatenate(rows)), state, wkv_max


@pytest.fixture(scope="module")
def long_run():
    weights = synthesize(LONG_CONFIG, seed=4)
    tokens = [int(t) for t in np.random.default_rng(4).integers(0, LONG_CONFIG.vocab_size, LONG)]
    ref_logits, ref_state = oracle_forward(weights, LONG_CONFIG, tokens)
    model = build_model(weights, LONG_CONFIG, "float32")
    return weights, tokens, model, decode(model, tokens), ref_logits, ref_state


def test_long_decode_matches_prefill_and_oracle(long_run):
    # Measured (C=64, 2 layers, 2,000 tokens): decode vs prefill bit-identical (0.0); decode vs
    # the oracle 7e-7 worst row, no growth between the first and last 500 tokens, WKV state
    # 8e-7; max |S| ~ 14-18, the same as the oracle's.
    _, tokens, model, (rows, state, wkv_max), ref_logits, ref_state = long_run
    assert np.isfinite(rows).all() and all(np.isfinite(np32(s)).all() for s in state.arrays())
    prefill, prefill_state = model.forward(tokens, all_logits=True)  # chunks of 1024
    prefill = np32(prefill)
    assert row_relative(rows[-1], prefill[-1]).max() < EXACT_TOL
    assert row_relative(rows, prefill).max() < EXACT_TOL
    assert state_max_diff(state, prefill_state) < EXACT_TOL
    rel = row_relative(rows, ref_logits)
    print(f"long decode vs oracle: worst row {rel.max():.2e}, last {rel[-1]:.2e}, |S| max {wkv_max:.1f}")
    assert rel.max() < F32_TOL
    assert max(state_relative(state, ref_state).values()) < F32_TOL


def test_long_decode_float16_state_stays_bounded(long_run):
    # Measured: float16 WKV state 1.05e-3 from the oracle's after 2,000 tokens (as after 24: no
    # drift), max |S| 14.33 vs 14.32 in float64; logits 1.6e-3 worst row. The recurrence is
    # float32 in every dtype, so the state may not grow beyond the float64 one or diverge from it.
    weights, tokens, _, (_, _, wkv_max32), ref_logits, ref_state = long_run
    rows, state, wkv_max = decode(build_model(weights, LONG_CONFIG, "float16"), tokens)
    assert np.isfinite(rows).all()
    assert all(np.isfinite(np32(s)).all() for s in state.arrays())
    assert wkv_max < 1.1 * wkv_max32
    ref_s_max = max(np.abs(ref_state[3 * i + 1]).max() for i in range(LONG_CONFIG.n_layer))
    assert max(float(mx.abs(s).max()) for s in state.wkv) < 1.1 * ref_s_max
    srel = state_relative(state, ref_state)
    assert max(v for k, v in srel.items() if k.endswith("wkv")) < 1e-2
    rel = row_relative(rows, ref_logits)
    print(f"long float16 decode vs oracle: worst row {rel.max():.2e}, wkv {srel}")
    assert np.median(rel) < HALF_TOL["float16"][0] and rel.max() < HALF_TOL["float16"][1]


# ---- the real tiny model ----------------------------------------------------------------------

def bits_per_byte(logits: np.ndarray, data: list[int]) -> float:
    probs = softmax(np.asarray(logits, dtype=np.float64)[:-1])
    return float(-np.log2(probs[np.arange(len(data) - 1), data[1:]]).mean())


def test_tiny_model_reference_logits(tiny_weights, tiny_reference_logits):
    # Measured 4.8e-7 max abs (logits up to 2.6).
    config, weights = tiny_weights
    logits, _ = build_model(weights, config, "float32").forward(TINY_PROMPT)
    diff = float(np.abs(np32(logits) - tiny_reference_logits).max())
    print(f"tiny model float32 vs reference logits: max abs {diff:.2e}")
    assert diff <= 1e-5


def test_tiny_model_bits_per_byte_matches_oracle(tiny_weights):
    # Measured: float32 5.1029 bpb, 1.2e-8 from the oracle's; float16 1.2e-4 from it.
    config, weights = tiny_weights
    data = list(ENGLISH)
    ref = bits_per_byte(oracle_forward(weights, config, data)[0], data)
    logits, _ = build_model(weights, config, "float32").forward(data, all_logits=True)
    ours = bits_per_byte(np32(logits), data)
    logits16, _ = build_model(weights, config, "float16").forward(data, all_logits=True)
    ours16 = bits_per_byte(np32(logits16), data)
    print(f"tiny model: {ours:.6f} bpb (oracle {ref:.6f}), float16 {ours16:.6f}")
    assert abs(ours - ref) < 1e-4
    assert abs(ours16 - ref) < 1e-3


def _arrays(obj, seen=None):
    """Every mx.array reachable from obj through our objects' attributes, lists, tuples, dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, mx.array):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _arrays(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _arrays(item, seen)
    elif type(obj).__module__.startswith("mlx_rwkv."):
        for item in vars(obj).values():
            yield from _arrays(item, seen)


def _has_pending_work(a: mx.array, tmp_path) -> bool:
    """Whether `a` is still a lazy computation (its graph has an operation node)."""
    mx.export_to_dot(str(tmp_path / "a.dot"), a)
    return "shape=rectangle" in (tmp_path / "a.dot").read_text()


@pytest.mark.parametrize("quant", [None, "q4k"])
@pytest.mark.parametrize("gpu_layout", [False, True])
def test_weights_are_materialized_at_load(quant, gpu_layout, tmp_path):
    """A lazy weight captured by the compiled decode step would be recomputed on every step
    (it happened twice: the packed mat-vec buffers, the cast embedding table).
    gpu_layout: build as on a GPU (packed mat-vec buffers), with emulated kernels."""
    import contextlib

    from kernel_emulator import emulated_kernels
    from mlx_rwkv.quant import quantize_model

    config = _config(n_layer=2, n_embd=256, vocab_size=300, d_decay=32, d_aaa=32, d_mv=32, d_gate=64)
    weights = synthesize(config, seed=SEED, dtype=np.float16)
    if quant:
        weights = quantize_model(weights, include_head=True)
    with emulated_kernels() if gpu_layout else contextlib.nullcontext():
        model = build_model(weights, config, "float16")
    assert (model.head.kernel is not None) == gpu_layout
    arrays = list(_arrays(model))
    assert len(arrays) > 10 * config.n_layer
    lazy = [a.shape for a in arrays if _has_pending_work(a, tmp_path)]
    assert not lazy, f"unevaluated model arrays of shapes {lazy[:5]}"
