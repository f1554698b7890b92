"""The fused WKV-7 kernel against its pure-MLX version (run on a GPU backend)."""
import mlx.core as mx
import numpy as np
import pytest

from mlx_rwkv.wkv import wkv7, wkv7_reference


def random_inputs(B: int, T: int, H: int, N: int, dtype: mx.Dtype, seed: int):
    rng = np.random.default_rng(seed)
    C = H * N
    act = lambda scale=1.0: mx.array(rng.standard_normal((B, T, C)).astype(np.float32) * scale).astype(dtype)  # noqa: E731
    vec = lambda lo, hi: mx.array(rng.uniform(lo, hi, C).astype(np.float32))  # noqa: E731
    params = {"k_k": vec(0.5, 1.0), "k_a": vec(0.5, 1.5), "r_k": vec(-0.1, 0.2),
              "ln_w": vec(0.5, 1.5), "ln_b": vec(-0.1, 0.1)}
    state = mx.array(rng.standard_normal((B, H, N, N)).astype(np.float32) * 0.3)
    return (act(), act(), act(), act(), act(2.0), act()), params, state


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H", [(1, 1, 2), (1, 37, 3), (3, 5, 12), (2, 128, 4)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_kernel_matches_reference(B, T, H, dtype):
    (r, k, v, g, w, a), params, state = random_inputs(B, T, H, 64, dtype, seed=B * 100 + T)
    y, s = wkv7(r, k, v, g, w, a, params, state)
    y_ref, s_ref = wkv7_reference(r, k, v, g, w, a, params, state)
    # the state is fp32 in both: only summation order differs
    np.testing.assert_allclose(np.array(s), np.array(s_ref), rtol=1e-4, atol=1e-4)
    tol = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 2e-2}[dtype]
    yf, yr = np.array(y.astype(mx.float32)), np.array(y_ref.astype(mx.float32))
    assert np.abs(yf - yr).max() <= tol * max(1.0, np.abs(yr).max())


@pytest.mark.gpu
def test_kernel_long_sequence_no_recompile_and_chunk_consistency():
    """Prompt lengths change without recompiling, and 2 chunks equal one sequence."""
    (r, k, v, g, w, a), params, state = random_inputs(1, 300, 2, 64, mx.float32, seed=7)
    y_all, s_all = wkv7(r, k, v, g, w, a, params, state)
    cut = 123
    y1, s1 = wkv7(*(x[:, :cut] for x in (r, k, v, g, w, a)), params, state)
    y2, s2 = wkv7(*(x[:, cut:] for x in (r, k, v, g, w, a)), params, s1)
    np.testing.assert_allclose(np.array(mx.concatenate([y1, y2], axis=1)), np.array(y_all), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(s2), np.array(s_all), rtol=1e-5, atol=1e-5)


def test_reference_state_stays_fp32_with_half_inputs():
    (r, k, v, g, w, a), params, state = random_inputs(1, 4, 2, 64, mx.float16, seed=3)
    y, s = wkv7_reference(r, k, v, g, w, a, params, state)
    assert s.dtype == mx.float32 and y.dtype == mx.float16
