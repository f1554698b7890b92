"""The per-head part of the x070 time mix (WKV-7 recurrence, norm, bonus, gate).

Three implementations of one computation:
- `wkv7` kernel: everything in one launch, for decode (T <= FUSED_MAX_T, head sizes a multiple
  of 8 up to 64; serial per token); `wkv7_lora` kernel: the same for one token, with the four
  LoRA up-projections that make its inputs computed inside (decode's launch of the layer);
- `wkv7_scan` + `wkv7_finish` kernels, for prefill: the recurrence with the per-token vector
  math fused in (8 lanes per state row, head sizes 32 and 64), then GroupNorm, bonus and gate
  token-parallel;
- `wkv7_reference`: MLX ops around a token-by-token recurrence (other head sizes on a GPU, the
  kernels' test oracle);
- `wkv7_host`: the reference's equations in numpy (the CPU path, RWKV7._run_host).
All keep the state and the decay in fp32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from .kernels import SAFE_THREADS, KernelSpec, get_kernel, int_params, threadgroup_fits
from .matvec import ProjectionGroup, sigmoid_host, weight_format

PARAM_NAMES = ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_w", "ln_b")
WKV7_FUSED = KernelSpec(
    name="wkv7",
    inputs=("r", "k", "v", "g", "lw", "la", "lv", "v_first", *PARAM_NAMES, "state_in", "seq_len"),
    outputs=("y_out", "state_out"),
    sources=("wkv7_inputs.inc", "wkv7.inc"),
)
# the same for one token with the LoRA up-projections inside (hid: the LoRA hiddens)
WKV7_LORA = KernelSpec(
    name="wkv7_lora",
    inputs=("r", "k", "v", "v_first", "hid", "up_w", "up_seg", *PARAM_NAMES, "state_in", "seq_len"),
    outputs=("y_out", "state_out"),
    sources=("load8.inc", "wkv7_lora.inc", "wkv7.inc"),
)
_SCAN_INPUTS = ("r", "k", "v", "lw", "la", "lv", "v_first", "w0", "a0", "v0", "k_k", "k_a", "r_k",
                "state_in", "seq_len")
WKV7_SCAN = KernelSpec(name="wkv7_scan", inputs=_SCAN_INPUTS, outputs=("y_raw", "bonus", "state_out"))
WKV7_FINISH = KernelSpec(name="wkv7_finish", inputs=("y_raw", "bonus", "g", "ln_w", "ln_b"),
                         outputs=("y",))

DECAY_SCALE = 0.606531  # e^-0.5: w = exp(-e^-0.5 sigmoid(.)) keeps every decay in (0.545, 1)
GROUP_NORM_EPS = 64e-5
FUSED_MAX_T = 4  # above this, scan + finish win (the fused kernel is serial per token)
FUSED_LANES_PER_ROW = 8  # fused kernel: lanes per state row (threadgroup: head size x 8 threads)
# ... at most 512 of them: MLX builds CUDA kernels without launch bounds, and the fused kernel
# takes 86 registers a thread at N = 64, 135 at N = 128 (nvcc sm_90), so a 1024-thread block
# would need more than the 65,536 registers a CUDA block can have
FUSED_MAX_THREADS = 512
SIMD_WIDTH = 32  # lanes per SIMD-group (CUDA warp, Apple SIMD-group)
# The scan's layout (metal_kernels/wkv7_scan.inc; the fastest of five measured on an H200, its header)
SCAN_LANES_PER_ROW = 8  # lanes sharing a state row: 3 shuffle levels per sum, 4 rows per SIMD-group
SCAN_GROUP_ROWS = 16  # state rows per threadgroup: 16 at 1.5B gives 128 threadgroups, ~1 per SM
SCAN_STAGE_TOKENS = 8  # tokens per stage, double-buffered: 22 KB of shared memory at N = 64


def wkv7(r: mx.array, k: mx.array, v: mx.array, g: mx.array, lw: mx.array, la: mx.array,
         lv: mx.array, v_first: mx.array | None, params: dict[str, mx.array],
         state: mx.array) -> tuple[mx.array, mx.array]:
    """Time-mix core over a chunk.

    r, k, v, g, lw, la, lv, v_first: (B, T, C) activations (lw/la/lv are the decay, rate and
    value-residual LoRA outputs; v_first is layer 0's v, None in layer 0 itself);
    params: fp32 (C,) vectors named in PARAM_NAMES; state: (B, H, N, N) fp32, S[b, h, v, k].
    Returns y (B, T, C) in the activation dtype, ready for the output projection, and the state.
    """
    T, N, lpr = r.shape[1], state.shape[-1], FUSED_LANES_PER_ROW
    fused = get_kernel(WKV7_FUSED) if T <= FUSED_MAX_T and _fused_layout_fits(N) else None
    if fused is not None and (N * lpr <= SAFE_THREADS or _fused_fits(fused, r.dtype, state.shape[1], N,
                                                                      v_first is None)):
        return _fused(fused, r, k, v, g, lw, la, lv, v_first, params, state)
    launch = scan_launch(*state.shape[:3])
    scan = get_kernel(WKV7_SCAN) if launch is not None else None
    if scan is not None:
        return _scan_and_finish(scan, launch, r, k, v, g, lw, la, lv, v_first, params, state)
    return wkv7_reference(r, k, v, g, lw, la, lv, v_first, params, state)


def wkv7_lora(r: mx.array, k: mx.array, v: mx.array, hid: mx.array, lora_up: ProjectionGroup,
              v_first: mx.array | None, params: dict[str, mx.array], state: mx.array) -> tuple[mx.array, mx.array]:
    """`wkv7` with lw, la, lv, g = lora_up(hid): the LoRA up-projections of the hiddens in `hid`,
    the flat output of the projection group that wrote them. Decode (one token) on a GPU: one
    launch (WKV7_LORA: each threadgroup computes its head's channels of the four up-projections);
    otherwise the group's launch, then `wkv7`."""
    B, T, C = r.shape
    H, N = state.shape[1], state.shape[-1]
    lora = get_kernel(WKV7_LORA) if T == 1 and lora_up.kernel is not None and not lora_up.has_q4k \
        and _fused_layout_fits(N) else None
    if lora is not None and (N * FUSED_LANES_PER_ROW <= SAFE_THREADS or _lora_fits(lora, r.dtype, lora_up, params,
                                                                                   H, N, v_first is None)):
        return _fused_lora(lora, r, k, v, hid, lora_up, v_first, params, state)
    lw, la, lv, g = (t.reshape(B, T, C) for t in lora_up.split(lora_up(hid, B * T), B * T))
    return wkv7(r, k, v, g, lw, la, lv, v_first, params, state)


def _lora_fits(lora: Callable, dtype: mx.Dtype, lora_up: ProjectionGroup, params: dict[str, mx.array],
               H: int, N: int, first: bool) -> bool:
    """Whether WKV7_LORA's threadgroup fits this instantiation's Metal pipeline (as _fused_fits;
    the probe's inputs are new arrays, so it may run while mx.compile traces the step)."""
    def probe() -> tuple[mx.array, mx.array]:
        act = mx.zeros((1, 1, H * N), dtype=dtype)
        hid = mx.zeros((max(base + k for (_, k), base in zip(lora_up.shapes, lora_up.x_bases)),), dtype=dtype)
        return _fused_lora(lora, act, act, act, hid, lora_up, None if first else act, params, mx.zeros((1, H, N, N)))

    return threadgroup_fits((WKV7_LORA, dtype, lora_up.dtype, H, N, first, FUSED_LANES_PER_ROW), probe)


def _fused_lora(lora: Callable, r: mx.array, k: mx.array, v: mx.array, hid: mx.array, lora_up: ProjectionGroup,
                v_first: mx.array | None, params: dict[str, mx.array], state: mx.array) -> tuple[mx.array, mx.array]:
    B, T, _ = r.shape
    front = [r, k, v, v if v_first is None else v_first, hid, lora_up.wd, lora_up.table]
    return _launch_fused(lora, front, params, state, int_params(T, B * T), v_first is None, r.dtype,
                         [("XFMT", weight_format(r.dtype)), ("WFMT", weight_format(lora_up.dtype))])


def _fused_layout_fits(N: int) -> bool:
    """Whether the fused kernels' layout (FUSED_LANES_PER_ROW lanes per state row) covers head size N."""
    lpr = FUSED_LANES_PER_ROW
    return N % lpr == 0 and N * lpr % SIMD_WIDTH == 0 and N * lpr <= FUSED_MAX_THREADS


def _fused(fused: Callable, r: mx.array, k: mx.array, v: mx.array, g: mx.array, lw: mx.array, la: mx.array,
           lv: mx.array, v_first: mx.array | None, params: dict[str, mx.array],
           state: mx.array) -> tuple[mx.array, mx.array]:
    first = v_first is None
    front = [r, k, v, g, lw, la, v if first else lv, v if first else v_first]
    return _launch_fused(fused, front, params, state, int_params(r.shape[1]), first, r.dtype)


def _launch_fused(kernel: Callable, front: list[mx.array], params: dict[str, mx.array], state: mx.array,
                  seq_len: mx.array, first: bool, dtype: mx.Dtype,
                  template: Sequence[tuple[str, int]] = ()) -> tuple[mx.array, mx.array]:
    """A launch of wkv7.inc behind either front file: one threadgroup of N * FUSED_LANES_PER_ROW
    threads per (batch, head); inputs `front`, the parameters, the state and `seq_len`."""
    B, H, N, _ = state.shape
    lpr = FUSED_LANES_PER_ROW
    y, new_state = kernel(
        inputs=[*front, *(params[n] for n in PARAM_NAMES), state, seq_len],
        template=[("T", dtype), ("H", H), ("N", N), ("FIRST", int(first)), ("LPR", lpr), *template],
        grid=(B * H * N * lpr, 1, 1), threadgroup=(N * lpr, 1, 1),
        output_shapes=[(*front[0].shape[:2], H * N), state.shape], output_dtypes=[dtype, mx.float32])
    return y, new_state


def _fused_fits(fused: Callable, dtype: mx.Dtype, H: int, N: int, first: bool) -> bool:
    """Whether the fused kernel's N * FUSED_LANES_PER_ROW threads fit this instantiation's Metal
    pipeline (probed once per process on a one-token input); otherwise decode runs on the scan
    kernels (SCAN_GROUP_ROWS * SCAN_LANES_PER_ROW threads) or on MLX ops."""
    def probe() -> tuple[mx.array, mx.array]:
        act = mx.zeros((1, 1, H * N), dtype=dtype)
        params = {n: mx.zeros((H * N,)) for n in PARAM_NAMES}
        return _fused(fused, act, act, act, act, act, act, act, None if first else act, params,
                      mx.zeros((1, H, N, N)))

    return threadgroup_fits((WKV7_FUSED, dtype, H, N, first, FUSED_LANES_PER_ROW), probe)


ScanLaunch = tuple[list[tuple[str, int]], int, int]  # layout template arguments, grid, threadgroup


def scan_launch(B: int, H: int, N: int) -> ScanLaunch | None:
    """wkv7_scan's layout template arguments (LPR, ROWS, CH) and its grid and threadgroup sizes in
    threads for this state shape; None where the kernel does not support the head size N, and then
    prefill runs on MLX ops (wkv7_reference). The kernel needs (its static_asserts) N <= 64, N a
    multiple of 4 x SCAN_LANES_PER_ROW, N / 4 dividing the SIMD width, SCAN_STAGE_TOKENS a multiple
    of 128 / N and SCAN_GROUP_ROWS dividing N: with this layout N = 32 or 64."""
    lpr, rows, ch = SCAN_LANES_PER_ROW, SCAN_GROUP_ROWS, SCAN_STAGE_TOKENS
    if not (N <= 64 and N % (4 * lpr) == 0 and SIMD_WIDTH % (N // 4) == 0 and ch % (128 // N) == 0
            and N % rows == 0):
        return None
    threads = rows * lpr
    return [("LPR", lpr), ("ROWS", rows), ("CH", ch)], B * H * (N // rows) * threads, threads


def _scan_and_finish(scan: Callable, launch: ScanLaunch, r: mx.array, k: mx.array, v: mx.array, g: mx.array,
                     lw: mx.array, la: mx.array, lv: mx.array, v_first: mx.array | None,
                     params: dict[str, mx.array], state: mx.array) -> tuple[mx.array, mx.array]:
    B, T, C = r.shape
    _, H, N, _ = state.shape
    first = v_first is None
    layout_template, grid, threads = launch
    y_raw, bonus, new_state = scan(
        inputs=[r, k, v, lw, la, v if first else lv, v if first else v_first,
                *(params[n] for n in PARAM_NAMES[:6]), state, int_params(T)],
        template=[("T", r.dtype), ("H", H), ("N", N), ("FIRST", int(first)), *layout_template],
        grid=(grid, 1, 1), threadgroup=(threads, 1, 1),
        output_shapes=[r.shape, r.shape, state.shape], output_dtypes=[mx.float32] * 3)
    (y,) = get_kernel(WKV7_FINISH)(
        inputs=[y_raw, bonus, g, params["ln_w"], params["ln_b"]],
        template=[("T", r.dtype), ("H", H), ("N", N)],
        grid=(B * T * H * SIMD_WIDTH, 1, 1), threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=[r.shape], output_dtypes=[r.dtype])
    return y, new_state


def wkv7_reference(r, k, v, g, lw, la, lv, v_first, params, state) -> tuple[mx.array, mx.array]:
    """Token-parallel MLX ops around a token-by-token recurrence (on a GPU, head sizes that the
    kernels do not support; the kernels' test oracle)."""
    B, T, C = r.shape
    _, H, N, _ = state.shape
    f32 = lambda x: x.astype(mx.float32).reshape(B, T, H, N)  # noqa: E731  (B, T, H, N)
    p = {name: x.reshape(H, N) for name, x in params.items()}
    r32, k32, v32 = f32(r), f32(k), f32(v)
    if v_first is not None:  # value residual toward layer 0's v
        v32 = v32 + (f32(v_first) - v32) * mx.sigmoid(p["v0"] + f32(lv))
    w = mx.exp(-DECAY_SCALE * mx.sigmoid(p["w0"] + f32(lw)))
    a = mx.sigmoid(p["a0"] + f32(la))
    kk = k32 * p["k_k"]
    kk = kk / mx.maximum(mx.sqrt(mx.sum(kk * kk, axis=-1, keepdims=True)), 1e-12)
    k32 = k32 * (1 + (a - 1) * p["k_a"])
    y, state = _recurrence(r32, w, k32, v32, -kk, kk * a, state)  # (B, T, H, N)
    mean = mx.mean(y, axis=-1, keepdims=True)
    var = mx.mean(mx.square(y - mean), axis=-1, keepdims=True)
    y = (y - mean) / mx.sqrt(var + GROUP_NORM_EPS) * p["ln_w"] + p["ln_b"]
    bonus = mx.sum(r32 * k32 * p["r_k"], axis=-1, keepdims=True) * v32
    y = (y + bonus).reshape(B, T, C) * g.astype(mx.float32)
    return y.astype(r.dtype), state


def _recurrence(r, w, k, v, a, b, state) -> tuple[mx.array, mx.array]:
    """y_t = S_t r_t with S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T; fp32 (B, T, H, N)."""
    ys = []
    for t in range(r.shape[1]):
        sa = state @ a[:, t, :, :, None]  # (B, H, N, 1) = S a
        state = state * w[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((state @ r[:, t, :, :, None])[..., 0])
    return mx.stack(ys, axis=1), state


def host_params(params: dict[str, mx.array], H: int, N: int) -> dict[str, np.ndarray]:
    """`wkv7_host`'s parameters from `wkv7`'s, read once: float32 numpy (H, N) arrays, with w0, a0
    and v0 stacked as "wav0" (3, 1, 1, H, N) to meet the stacked LoRA outputs lw, la, lv."""
    p = {name: np.array(x, np.float32).reshape(H, N) for name, x in params.items()}
    p["wav0"] = np.stack([p.pop("w0"), p.pop("a0"), p.pop("v0")])[:, None, None]
    return p


def wkv7_host(r: np.ndarray, k: np.ndarray, v: np.ndarray, lora: np.ndarray, v_first: np.ndarray | None,
              p: dict[str, np.ndarray], state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`wkv7_reference` on float32 numpy arrays: y (B, T, C) and a new state (B, H, N, N); `state`
    itself is not modified. lora: lw, la, lv, g stacked (4 * B * T * C values, the LoRA
    up-projections' flat output); p: from `host_params`. The three sigmoids run as one."""
    B, T, C = r.shape
    _, H, N, _ = state.shape
    r, k, v = (t.reshape(B, T, H, N) for t in (r, k, v))
    lora = lora.reshape(4, B, T, H, N)
    z = sigmoid_host(lora[:3] + p["wav0"])  # sigmoid(w0 + lw), a = sigmoid(a0 + la), sigmoid(v0 + lv)
    w, a = np.exp(-DECAY_SCALE * z[0]), z[1]
    if v_first is not None:  # value residual toward layer 0's v
        v = v + (v_first.reshape(B, T, H, N) - v) * z[2]
    kk = k * p["k_k"]
    kk /= np.maximum(np.sqrt(np.square(kk).sum(axis=-1, keepdims=True)), 1e-12)
    b_k = np.empty((B, T, H, 2, N), np.float32)  # the recurrence's b = kk a and k, computed in place
    b, k = np.multiply(kk, a, out=b_k[..., 0, :]), np.multiply(k, 1 + (a - 1) * p["k_a"], out=b_k[..., 1, :])
    y, state = host_recurrence(r, w, -kk, v, b_k, state)  # (B, T, H, N)
    y -= y.sum(axis=-1, keepdims=True) / N  # GroupNorm, one group per head
    y /= np.sqrt(np.square(y).sum(axis=-1, keepdims=True) / N + GROUP_NORM_EPS)
    y *= p["ln_w"]
    y += p["ln_b"]
    y += (r * k * p["r_k"]).sum(axis=-1, keepdims=True) * v  # bonus
    y *= lora[3]  # gate
    return y.reshape(B, T, C), state


def host_recurrence(r, w, a, v, b_k, S) -> tuple[np.ndarray, np.ndarray]:
    """`_recurrence` in numpy, fp32 (B, T, H, N) arrays but b_k: b and k stacked (B, T, H, 2, N).
    Returns y and the new state (S (B, H, N, N) itself is not modified).

    Per token S = S diag(w) + [S a, v] [b, k]^T: the two rank-1 updates as one small matmul (half
    the time of two broadcast products: 38 vs 77 us of CPU time per token at H = 12, N = 64).
    MLX's CPU backend spent ~0.5 ms per token and layer on `_recurrence`. A chunked matrix form
    would be faster still, but its rounding depends on where the chunks start: a sequence split
    over two calls would no longer give the bits of one call.
    """
    y = np.empty_like(r)
    sa_v = np.empty((*S.shape[:3], 2), np.float32)  # (B, H, N, 2): [S a, v]
    for t in range(r.shape[1]):
        np.matmul(S, a[:, t, :, :, None], out=sa_v[..., :1])
        sa_v[..., 1] = v[:, t]
        S = np.multiply(S, w[:, t, :, None, :], out=S if t else None)  # the first token: a new array
        S += sa_v @ b_k[:, t]
        np.matmul(S, r[:, t, :, :, None], out=y[:, t, :, :, None])
    return y, S
