"""The CPU path: float32 models run their forward pass in numpy (RWKV7._run_host).

Checked here: which models take it, that it computes what the MLX ops compute (norm_mix,
wkv7_reference, the MLX matmuls), that a matmul row does not depend on the other rows of its call
(what keeps a prompt split over two calls bit-identical to one call), parity with the official
package, and float32 as the CPU default. The model-level tests (oracle, prefill == steps,
state files) in test_mlx_model.py run on this path too.
"""
from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from conftest import SMALL_CONFIGS
from mlx_rwkv.loading import build_model, load
from mlx_rwkv.matvec import HOST_MATVEC_ROWS, HOST_ROWS, _host_matmul
from mlx_rwkv.norm_mix import norm_mix, norm_mix_host
from mlx_rwkv.quant import quantize_model
from mlx_rwkv.synth import synthesize
from mlx_rwkv.wkv import PARAM_NAMES, host_params, wkv7_host, wkv7_reference

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU path (MLX's default device is a GPU)")

NAME = "c320-h5"  # 5 heads, 2 layers
# host vs MLX ops, float32: measured 9.1e-7 (logits), 9.3e-7 (states) on this config
TOL = 1e-5


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return synthesize(SMALL_CONFIGS[NAME], seed=5)


def test_float32_takes_the_host_path_other_dtypes_the_mlx_ops(weights):
    config = SMALL_CONFIGS[NAME]
    f32, f16 = build_model(weights, config, "float32"), build_model(weights, config, "float16")
    assert f32.on_host and not f16.on_host
    bases = [w.base for g in (f32.head, *(g for layer in f32.layers for g in layer.groups())) for w in g.host_weights]
    assert bases[0] is not None and all(b is bases[0] for b in bases)  # one buffer (pack_host_weights)
    assert f32._compiled_step == f32._step_arrays  # numpy cannot be traced: no mx.compile
    assert f16._compiled_step != f16._step_arrays


def test_q4k_float32_runs_all_groups_as_mlx_ops(weights):
    """Q4_K groups run on MLX ops, so the float32 LoRA groups must too: the compiled step traces them."""
    config = dataclasses.replace(SMALL_CONFIGS["c128-h2"], n_embd=256, d_ffn=1024)  # Q4_K rows of 256
    q4 = quantize_model(synthesize(config, seed=1), include_head=True, progress=False)
    model = build_model(q4, config, "float32")
    assert not model.on_host
    logits, state = model.forward([1, 2, 3])
    step_logits, _ = model.step(mx.array([4]), state)
    whole, _ = model.forward([1, 2, 3, 4])
    assert rel(step_logits[0], whole) < 1e-4


def test_float32_is_the_cpu_default(weights, synthetic_checkpoint):
    assert build_model(weights, SMALL_CONFIGS[NAME]).dtype == mx.float32
    ckpt = synthetic_checkpoint(SMALL_CONFIGS["l1-c64"])
    model, _ = load(ckpt.path)
    assert model.dtype == mx.float32 and model.on_host


def test_host_forward_equals_the_mlx_ops_forward(weights):
    """The same model through _run_host and through _run's MLX ops (norm_mix, wkv7_reference;
    the projection groups stay numpy): prefill with all logits, then decode steps from its state."""
    config = SMALL_CONFIGS[NAME]
    host = build_model(weights, config, "float32")
    ops = build_model(weights, config, "float32")
    ops.on_host = False  # the MLX-ops forward of the same weights
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, config.vocab_size, 21)]
    (a, sa), (b, sb) = host.forward(tokens, all_logits=True), ops.forward(tokens, all_logits=True)
    assert rel(a, b) < TOL
    for x, y in zip(sa.arrays(), sb.arrays(), strict=True):
        assert x.dtype == y.dtype and rel(x, y) < TOL
    for t in tokens[:4]:
        (a, sa), (b, sb) = host.forward([t], sa), ops.forward([t], sb)
        assert rel(a, b) < TOL
    assert max(rel(x, y) for x, y in zip(sa.arrays(), sb.arrays())) < TOL


@pytest.mark.parametrize("first_layer", [True, False])
@pytest.mark.parametrize("B, T", [(1, 1), (2, 19)])
def test_wkv7_host_equals_reference(first_layer, B, T):
    H, N = 3, 64
    C = H * N
    rng = np.random.default_rng(T)
    acts = [rng.standard_normal((B, T, C)).astype(np.float32) * s for s in (1, 1, 1, 1, 1, 1, 1, 1)]
    params = {n: rng.standard_normal(C).astype(np.float32) * 0.5 for n in PARAM_NAMES}
    state = rng.standard_normal((B, H, N, N)).astype(np.float32)
    v_first = None if first_layer else acts[7]
    state_before = state.copy()
    r, k, v, g, lw, la, lv = acts[:7]
    y, s = wkv7_host(r, k, v, np.stack([lw, la, lv, g]), v_first, host_params(params, H, N), state)
    mxa = [mx.array(a) for a in acts]
    y_ref, s_ref = wkv7_reference(*mxa[:7], None if first_layer else mxa[7],
                                  {n: mx.array(p) for n, p in params.items()}, mx.array(state))
    assert rel(y, y_ref) < TOL and rel(s, s_ref) < TOL
    assert np.array_equal(state, state_before)  # the caller's state is not modified


@pytest.mark.parametrize("first_layer", [True, False])
def test_norm_mix_host_equals_mlx(first_layer):
    B, T, C, M = 2, 5, 192, 7
    rng = np.random.default_rng(2)
    x, dx = (rng.standard_normal((B, T, C)).astype(np.float32) for _ in range(2))
    x_prev = rng.standard_normal((B, C)).astype(np.float32)
    ln = (mx.array(rng.standard_normal(C).astype(np.float32)), mx.array(rng.standard_normal(C).astype(np.float32)))
    mix = mx.array(rng.uniform(0, 1, (M, C)).astype(np.float32))
    dx = None if first_layer else dx
    got = norm_mix_host(x, dx, (np.asarray(ln[0]), np.asarray(ln[1])), x_prev, np.asarray(mix))
    want = norm_mix(mx.array(x), None if dx is None else mx.array(dx), ln, mx.array(x_prev), mix)
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape) and rel(g, w) < TOL


@pytest.mark.parametrize("rows, K", [(320, 320), (1280, 320), (32, 320), (37, 320), (64, 192), (768, 768),
                                     (3072, 768), (768, 3072)])
def test_host_matmul_rows_do_not_depend_on_the_call(rows, K):
    """A row's bits must not depend on how many rows share its call (beyond HOST_MATVEC_ROWS),
    or where it sits: otherwise a prompt split over two calls (or a saved state, continued)
    differs from one call. One plain np.matmul per call (OpenBLAS 0.3.31, 2 Xeon cores) failed
    this for 4 of these 8 shapes. Calls of up to HOST_MATVEC_ROWS rows: row by row, like decode."""
    rng = np.random.default_rng(rows + K)
    w = rng.standard_normal((rows, K)).astype(np.float32)
    x = rng.standard_normal((2 * HOST_ROWS + 11, K)).astype(np.float32)
    whole = np.empty((len(x), rows), np.float32)
    _host_matmul(x, w, whole)
    small = HOST_MATVEC_ROWS + 1
    for cut in (small, 2 * small, HOST_ROWS - 1, HOST_ROWS + 3, len(x) - small):
        parts = np.empty_like(whole)
        _host_matmul(x[:cut], w, parts[:cut])
        _host_matmul(x[cut:], w, parts[cut:])
        assert np.array_equal(parts, whole), f"rows differ when the call is split at {cut}"
    one_by_one = np.empty_like(whole[:HOST_MATVEC_ROWS])
    _host_matmul(x[:HOST_MATVEC_ROWS], w, one_by_one)
    for i in range(HOST_MATVEC_ROWS):
        row = np.empty((1, rows), np.float32)
        _host_matmul(x[i: i + 1], w, row)
        assert np.array_equal(one_by_one[i], row[0])


def test_matches_the_official_package(official_rwkv, synthetic_checkpoint):
    ckpt = synthetic_checkpoint(SMALL_CONFIGS[NAME], seed=7)
    official = official_rwkv(model=str(ckpt.path.with_suffix("")), strategy="cpu fp32")
    ours = build_model(ckpt.weights, ckpt.config, "float32")
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, ckpt.config.vocab_size, 12)]
    want, state = official.forward(tokens, None)
    got, ours_state = ours.forward(tokens)
    assert rel(got, want.numpy()) < 1e-4  # test_oracle.py's float32 bound
    want, _ = official.forward([5], state)  # one decode step from each state
    got, _ = ours.forward([5], ours_state)
    assert rel(got, want.numpy()) < 1e-4
