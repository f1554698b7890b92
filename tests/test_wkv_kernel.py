"""The custom kernels (fused WKV-7, WKV-7 scan, norm_mix) against their pure-MLX versions.

GPU-marked tests run where MLX has a GPU backend (the CUDA host, a Mac); on CPU they skip.
"""
import mlx.core as mx
import numpy as np
import pytest

from mlx_rwkv import kernels, wkv
from mlx_rwkv.norm_mix import norm_mix
from mlx_rwkv.wkv import PARAM_NAMES, wkv7, wkv7_reference


def random_inputs(B: int, T: int, H: int, N: int, dtype: mx.Dtype, seed: int):
    rng = np.random.default_rng(seed)
    C = H * N
    act = lambda scale=1.0: mx.array(rng.standard_normal((B, T, C)).astype(np.float32) * scale).astype(dtype)  # noqa: E731
    vec = lambda lo, hi: mx.array(rng.uniform(lo, hi, C).astype(np.float32))  # noqa: E731
    ranges = {"w0": (-2, 1), "a0": (-1, 1), "v0": (-1, 1), "k_k": (0.5, 1.0), "k_a": (0.5, 1.5),
              "r_k": (-0.1, 0.2), "ln_w": (0.5, 1.5), "ln_b": (-0.1, 0.1)}
    params = {n: vec(*ranges[n]) for n in PARAM_NAMES}
    state = mx.array(rng.standard_normal((B, H, N, N)).astype(np.float32) * 0.3)
    acts = [act() for _ in range(8)]  # r, k, v, g, lw, la, lv, v_first
    return acts, params, state


def assert_close(y, y_ref, s, s_ref, dtype):
    np.testing.assert_allclose(np.array(s), np.array(s_ref), rtol=1e-4, atol=1e-4)  # fp32 in both
    tol = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 3e-2}[dtype]
    yf, yr = np.array(y.astype(mx.float32)), np.array(y_ref.astype(mx.float32))
    assert np.abs(yf - yr).max() <= tol * max(1.0, np.abs(yr).max())


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H", [(1, 1, 2), (1, 3, 3), (3, 1, 12), (2, 4, 4), (1, 37, 3), (2, 200, 4),
                                   (1, 300, 32)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("first", [True, False])
def test_kernels_match_reference(B, T, H, dtype, first):
    """T <= FUSED_MAX_T exercises the fused kernel, longer T the scan kernel (H = 32: the 1.5B
    model's head count)."""
    (r, k, v, g, lw, la, lv, vf), params, state = random_inputs(B, T, H, 64, dtype, seed=B * 100 + T)
    vf = None if first else vf
    y, s = wkv7(r, k, v, g, lw, la, lv, vf, params, state)
    y_ref, s_ref = _on_cpu(wkv7_reference, r, k, v, g, lw, la, lv, vf, params, state)
    assert_close(y, y_ref, s, s_ref, dtype)


def _on_cpu(fn, *args):
    """Run `fn` with kernels disabled (pure MLX ops) on the CPU device."""
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        out = fn(*args)
        mx.eval(out)
    finally:
        mx.set_default_device(prev)
    return out


@pytest.mark.gpu
def test_prompt_lengths_do_not_change_results_across_chunks():
    """A new length runs without recompiling, and two chunks equal one sequence."""
    (r, k, v, g, lw, la, lv, vf), params, state = random_inputs(1, 300, 2, 64, mx.float32, seed=7)
    y_all, s_all = wkv7(r, k, v, g, lw, la, lv, vf, params, state)
    cut = 123
    y1, s1 = wkv7(*(x[:, :cut] for x in (r, k, v, g, lw, la, lv, vf)), params, state)
    y2, s2 = wkv7(*(x[:, cut:] for x in (r, k, v, g, lw, la, lv, vf)), params, s1)
    np.testing.assert_allclose(np.array(mx.concatenate([y1, y2], axis=1)), np.array(y_all), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(s2), np.array(s_all), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("B,T,C,M", [(1, 1, 768, 7), (3, 1, 2048, 1), (2, 1, 320, 7), (1, 37, 2048, 7),
                                     (2, 5, 320, 1), (1, 100, 768, 7)])
def test_norm_mix_kernel_matches_ops(dtype, B, T, C, M):
    """Decode rows (each split over threadgroups) and prefill rows (token shift inside the chunk).

    The reference is float32 math from the same inputs with the rounding points of the ops:
    x and h rounded to the activation dtype, the mixes computed from the rounded h. (Comparing
    with the ops run in half precision would measure the ops' own rounding of h + (h' - h) mix.)
    """
    rng = np.random.default_rng(C + M + T)
    arr = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)  # noqa: E731
    x, dx, x_prev, ln, mix = arr(B, T, C), arr(B, T, C), arr(B, C), (arr(C), arr(C)), arr(M, C)
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    x_out, h, xs = (f32(a) for a in norm_mix(x, dx, ln, x_prev, mix))
    rounded = lambda a: f32(mx.array(a).astype(dtype))  # noqa: E731
    eps = {mx.float32: 1e-5, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}[dtype]
    np.testing.assert_array_equal(x_out, rounded(f32(x) + f32(dx)))
    mean, var = x_out.mean(-1, keepdims=True), x_out.var(-1, keepdims=True)
    h_ref = rounded((x_out - mean) / np.sqrt(var + 1e-5) * f32(ln[0]) + f32(ln[1]))
    np.testing.assert_allclose(h, h_ref, rtol=eps, atol=eps)
    shifted = np.concatenate([f32(x_prev)[:, None], h[:, :-1]], axis=1)
    xs_ref = rounded(h[None] + (shifted - h)[None] * f32(mix)[:, None, None]).reshape(M, B * T, C)
    np.testing.assert_allclose(xs, xs_ref, rtol=eps, atol=eps)


def test_reference_keeps_state_fp32_with_half_inputs():
    (r, k, v, g, lw, la, lv, vf), params, state = random_inputs(1, 4, 2, 64, mx.float16, seed=3)
    y, s = wkv7_reference(r, k, v, g, lw, la, lv, vf, params, state)
    assert s.dtype == mx.float32 and y.dtype == mx.float16


def test_no_kernel_on_cpu():
    if mx.default_device().type == mx.cpu:
        assert kernels.get_kernel(wkv.WKV7_FUSED) is None and kernels.get_kernel(wkv.WKV7_SCAN) is None
