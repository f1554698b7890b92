"""Residual add + LayerNorm + token-shift mixes: one fused kernel on a GPU, MLX ops otherwise;
`norm_mix_host`: the same in numpy, for the CPU path (RWKV7._run_host)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .kernels import KernelSpec, get_kernel, int_params

NORM_MIX = KernelSpec(name="norm_mix", inputs=("x_in", "dx", "x_prev", "ln_w", "ln_b", "mix", "dims"),
                      outputs=("x_out", "h", "xs"))
THREADS = 256
SPREAD_BELOW_ROWS = 64  # fewer rows (decode): split each row over C / THREADS threadgroups


def norm_mix(x: mx.array, dx: mx.array | None, ln: tuple[mx.array, mx.array], x_prev: mx.array,
             mix: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """x (B, T, C) += dx; h = LayerNorm(x); xs[m] = h + (shift(h) - h) * mix[m].

    x_prev (B, C) is the previous token's h (from the state); mix is (M, C).
    Returns x, h and xs (M, B*T, C), the inputs of the projections that follow.
    """
    B, T, C = x.shape
    M = mix.shape[0]
    kernel = get_kernel(NORM_MIX) if dx is not None else None
    if kernel is not None:
        spread = B * T < SPREAD_BELOW_ROWS and C % THREADS == 0
        nblk = C // THREADS if spread else 1
        x_out, h, xs = kernel(
            inputs=[x, dx, x_prev, ln[0], ln[1], mix, int_params(T, B)],
            template=[("T", x.dtype), ("C", C), ("M", M), ("TG", THREADS), ("NBLK", nblk)],
            grid=(B * T * nblk * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[x.shape, x.shape, (M, B * T, C)], output_dtypes=[x.dtype] * 3)
        return x_out, h, xs
    if dx is not None:
        x = x + dx
    h = mx.fast.layer_norm(x, ln[0], ln[1], 1e-5)
    shifted = mx.concatenate([x_prev[:, None, :], h[:, :-1, :]], axis=1) if T > 1 else x_prev[:, None, :]
    xs = h + (shifted - h) * mix[:, None, None, :]  # (M, B, T, C)
    return x, h, xs.reshape(M, B * T, C)


def norm_mix_host(x: np.ndarray, dx: np.ndarray | None, ln: tuple[np.ndarray, np.ndarray], x_prev: np.ndarray,
                  mix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`norm_mix` on float32 numpy arrays: x, h, xs (M, B*T, C)."""
    B, T, C = x.shape
    x = x if dx is None else x + dx
    h = layer_norm_host(x, *ln)
    shifted = np.concatenate([x_prev[:, None, :], h[:, :-1, :]], axis=1) if T > 1 else x_prev[:, None, :]
    xs = (shifted - h) * mix[:, None, None, :]  # (M, B, T, C)
    xs += h
    return x, h, xs.reshape(-1, B * T, C)


def layer_norm_host(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis in numpy (float32)."""
    n = x.shape[-1]
    y = x - x.sum(axis=-1, keepdims=True) / n  # sums: np.mean's per-call overhead was ~5 us
    y /= np.sqrt(np.square(y).sum(axis=-1, keepdims=True) / n + eps)
    y *= w
    y += b
    return y
