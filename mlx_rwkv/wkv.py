"""The fused WKV-7 step (recurrence + per-head norm, bonus and gate): kernel and MLX fallback."""
from __future__ import annotations

import mlx.core as mx

from .kernels import KernelSpec, get_kernel

WKV7 = KernelSpec(
    name="wkv7",
    inputs=("r", "k", "v", "g", "w_raw", "a_raw", "k_k", "k_a", "r_k", "ln_w", "ln_b",
            "state_in", "seq_len"),
    outputs=("y_out", "state_out"),
)

DECAY_SCALE = 0.606531  # e^-0.5: w = exp(-e^-0.5 sigmoid(.)) keeps every decay in (e^-0.607, 1)
GROUP_NORM_EPS = 64e-5


def wkv7(r: mx.array, k: mx.array, v: mx.array, g: mx.array, w_raw: mx.array, a_raw: mx.array,
         params: dict[str, mx.array], state: mx.array) -> tuple[mx.array, mx.array]:
    """Run the x070 time-mix core over a chunk.

    r, k, v, g, w_raw, a_raw: (B, T, C) activations (w_raw = w0 + decay LoRA, a_raw = a0 + a LoRA);
    params: fp32 (C,) vectors k_k, k_a, r_k, ln_w, ln_b; state: (B, H, N, N) fp32, S[b, h, v, k].
    Returns y (B, T, C) = (GroupNorm(S r) + bonus) * g in the activation dtype, and the new state.
    """
    kernel = get_kernel(WKV7)
    if kernel is None:
        return wkv7_reference(r, k, v, g, w_raw, a_raw, params, state)
    B, T, C = r.shape
    _, H, N, _ = state.shape
    y, new_state = kernel(
        inputs=[r, k, v, g, w_raw, a_raw, params["k_k"], params["k_a"], params["r_k"],
                params["ln_w"], params["ln_b"], state, mx.array([T], dtype=mx.int32)],
        template=[("T", r.dtype), ("H", H), ("N", N)],
        grid=(B * H * N, 1, 1),
        threadgroup=(N, 1, 1),
        output_shapes=[(B, T, C), state.shape],
        output_dtypes=[r.dtype, mx.float32],
    )
    return y, new_state


def wkv7_reference(r: mx.array, k: mx.array, v: mx.array, g: mx.array, w_raw: mx.array,
                   a_raw: mx.array, params: dict[str, mx.array],
                   state: mx.array) -> tuple[mx.array, mx.array]:
    """Pure-MLX version of `wkv7` (the CPU path and the kernel's test oracle), fp32 inside."""
    B, T, C = r.shape
    _, H, N, _ = state.shape
    f32 = lambda x: x.astype(mx.float32).reshape(B, T, H, N)  # noqa: E731  (B, T, H, N)
    r32, k32, v32 = f32(r), f32(k), f32(v)
    p = {name: x.reshape(H, N) for name, x in params.items()}
    a = mx.sigmoid(f32(a_raw))
    w = mx.exp(-DECAY_SCALE * mx.sigmoid(f32(w_raw)))
    kk = k32 * p["k_k"]
    kk = kk / mx.maximum(mx.sqrt(mx.sum(kk * kk, axis=-1, keepdims=True)), 1e-12)
    k32 = k32 * (1 + (a - 1) * p["k_a"])
    ys = []
    for t in range(T):
        sa = state @ (-kk[:, t, :, :, None])  # (B, H, N, 1) = S(-kk)
        state = (state * w[:, t, :, None, :] + sa * (kk[:, t] * a[:, t])[:, :, None, :]
                 + v32[:, t, :, :, None] * k32[:, t, :, None, :])
        ys.append((state @ r32[:, t, :, :, None])[..., 0])  # (B, H, N)
    y = mx.stack(ys, axis=1)  # (B, T, H, N)
    mean = mx.mean(y, axis=-1, keepdims=True)
    var = mx.mean(mx.square(y - mean), axis=-1, keepdims=True)
    y = (y - mean) / mx.sqrt(var + GROUP_NORM_EPS) * p["ln_w"] + p["ln_b"]
    bonus = mx.sum(r32 * k32 * p["r_k"], axis=-1, keepdims=True) * v32
    y = (y + bonus).reshape(B, T, C) * g.astype(mx.float32)
    return y.astype(r.dtype), state
