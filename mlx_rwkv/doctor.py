"""`mlx-rwkv doctor`: the self-check a user runs first on a new machine, and the report to send.

Why it exists: MLX compiles a custom kernel at the first call that needs each instantiation, so
a kernel that does not compile, or computes wrong, on some device (CI has no Apple GPU) would
surface in the middle of `generate`. The doctor builds and runs every instantiation the engine
uses, up front and on small inputs, and names the one that fails.

Contract: `run_doctor(report_path, out)` runs every check below, prints one line per check to
`out`, writes a JSON report (atomically) when `report_path` is given and returns 0 if no check
failed, else 1 (a skip is not a failure). Each check has a name, a status (pass / fail / skip),
a detail (for comparisons: the max abs error against the reference and the tolerance, which is
a relative tolerance times max(1, max |reference|)) and its seconds. A check that raises is a
fail with the one-line error (the report keeps the whole message); the other checks still run.

The checks, in order (tiny shapes: seconds on a CPU):
- reference/*: the pure-MLX paths, on the CPU device so that they are the same on every machine,
  against numpy float64: WKV-7, norm_mix, a projection group with activations, a Q4_K layer.
- kernel/*: every custom kernel instantiation the engine uses (activations float16 / bfloat16 /
  float32; decode and prefill; dense and Q4_K weights) against the pure-MLX path on the same
  inputs, then the whole small model per dtype and weight format (prefills of 3 and 9 tokens and a
  compiled decode step: every launch shape a model makes). The reference runs with the CPU as the
  default device, where `kernels.get_kernel` gives None. On CPU: "skipped: no GPU backend".
- simd/lanes: the kernels take SIMD-group = tid / 32 and lane = tid % 32, and rely on it through
  SIMD_SUM and SIMD_SHUFFLE_XOR only; `metal_kernels/simd_probe.inc` records what those return
  on the device at every threadgroup size the kernels launch, and the doctor checks that they
  combine exactly the threads the kernels mean.
- model/prefill-vs-steps, generation/*: the engine as it runs here (kernels on a GPU, MLX ops on
  a CPU): a T-token prefill gives the logits of T single steps; greedy generation picks the argmax
  of a teacher-forced prefill; on a GPU, greedy generation with kernels equals it without.
- timing/decode-step: one compiled decode step of the small model (median), for the report.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, TextIO

import mlx.core as mx
import numpy as np

from . import __version__, kernels, layer_kernel
from .checkpoint.files import atomic_output
from .config import config_for_shape
from .generate import generate_tokens
from .kernels import KernelSpec, get_kernel
from .loading import build_model
from .matvec import ProjectionGroup, Segment
from .norm_mix import norm_mix
from .q4k_linear import Q4KLinear, expand_q4k
from .quant import Q4KTensor, dequantize_q4k, quantize_model, quantize_q4k
from .sampling import Sampler, SamplingParams
from .synth import synthesize
from .wkv import DECAY_SCALE, FUSED_MAX_T, GROUP_NORM_EPS, PARAM_NAMES, wkv7

Status = Literal["pass", "fail", "skip"]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# The probe: one float in, six out per thread (metal_kernels/simd_probe.inc lists them).
SIMD_PROBE = KernelSpec(name="simd_probe", inputs=("x",), outputs=("probe",))
PROBE_FIELDS = 6
LANES = 32
# The threadgroup sizes the kernels launch: wkv7_finish 32, wkv7_scan 128, norm_mix and matvec
# 256, the fused wkv7 512 (head size 64 x 8 lanes per row)
PROBE_THREADGROUPS = (32, 128, 256, 512)

# Relative tolerances against the pure-MLX path (the kernel tests' values): per activation dtype
OP_TOL = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}
STATE_TOL = 1e-4  # the WKV state is fp32 on both paths
# whole model logits; float32 prefills run MLX-CUDA's matmuls in TF32
MODEL_TOL = {mx.float32: 2e-3, mx.float16: 2e-2, mx.bfloat16: 5e-2}
F64_TOL = 1e-4  # float32 MLX ops against numpy float64

# The small synthetic model: real LoRA ranks and head size, C a multiple of 256 for Q4_K
MODEL_CONFIG = config_for_shape("0.1B", n_layer=2, n_embd=256, vocab_size=256)
PROMPT = [(37 * i + 11) % 256 for i in range(13)]  # 3 + 9 prefill tokens, then one decode step
GENERATED = 12
TIMED_STEPS = 20


@dataclass
class CheckResult:
    """One line of the doctor's output and one entry of its report."""

    name: str
    status: Status
    detail: str
    seconds: float
    max_abs_error: float | None = None
    tolerance: float | None = None
    exception: str | None = None  # the whole message of an exception (the detail has one line)


@dataclass
class Outcome:
    """What a check function returns."""

    passed: bool
    detail: str
    max_abs_error: float | None = None
    tolerance: float | None = None


class Skip(Exception):
    """Raised by a check that does not apply on this machine; the message says why."""


class Comparison:
    """The worst of several (got, want) comparisons, each with its own relative tolerance."""

    def __init__(self) -> None:
        self.worst: tuple[float, float, float, str] | None = None  # (error / tolerance, error, tolerance, what)

    def add(self, what: str, got: mx.array | np.ndarray, want: mx.array | np.ndarray, rel_tol: float) -> None:
        g, w = _f64(got), _f64(want)
        if g.shape != w.shape:
            raise ValueError(f"{what}: shape {g.shape}, the reference has {w.shape}")
        err = float(np.abs(g - w).max()) if np.isfinite(g).all() else float("inf")
        tol = rel_tol * max(1.0, float(np.abs(w).max()))
        ratio = err / tol if tol else (0.0 if err == 0 else float("inf"))
        if self.worst is None or ratio > self.worst[0]:
            self.worst = (ratio, err, tol, what)

    def outcome(self) -> Outcome:
        ratio, err, tol, what = self.worst
        return Outcome(ratio <= 1.0, f"max abs error {err:.2e} (tol {tol:.2e}) in {what}", err, tol)


def _f64(a: mx.array | np.ndarray) -> np.ndarray:
    if isinstance(a, mx.array):
        return np.array(a.astype(mx.float32), dtype=np.float64)
    return np.asarray(a, dtype=np.float64)


def _require_gpu() -> None:
    if kernels.gpu_backend() is None:
        raise Skip("no GPU backend")


def _reference(fn: Callable, *args):
    """`fn(*args)` with the CPU as the default device, where every wrapper takes its MLX path (the
    arrays it returns are evaluated later, on the CPU stream they were made on)."""
    with mx.stream(mx.cpu):
        return fn(*args)


# ---- inputs ------------------------------------------------------------------------------------

def _wkv_inputs(B: int, T: int, H: int, N: int, dtype: mx.Dtype, seed: int):
    """Activations r, k, v, g, lw, la, lv, v_first (B, T, C), fp32 params, an fp32 state."""
    rng = np.random.default_rng(seed)
    C = H * N
    acts = [mx.array(rng.standard_normal((B, T, C)).astype(np.float32)).astype(dtype) for _ in range(8)]
    ranges = {"w0": (-2, 1), "a0": (-1, 1), "v0": (-1, 1), "k_k": (0.5, 1.0), "k_a": (0.5, 1.5),
              "r_k": (-0.1, 0.2), "ln_w": (0.5, 1.5), "ln_b": (-0.1, 0.1)}
    params = {n: mx.array(rng.uniform(*ranges[n], C).astype(np.float32)) for n in PARAM_NAMES}
    state = mx.array(rng.standard_normal((B, H, N, N)).astype(np.float32) * 0.3)
    return acts, params, state


def _array(rng: np.random.Generator, *shape: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


_ACT = {"none": lambda y: y, "tanh": np.tanh, "sigmoid": lambda y: 1 / (1 + np.exp(-y)),
        "relu2": lambda y: np.square(np.maximum(y, 0))}
# A projection group like a layer's: odd row counts, every activation, inputs at offsets
_SEG_SHAPES = [(5, 512), (3, 256), (33, 512), (2, 256)]
_SEG_ACTS = ["none", "tanh", "relu2", "sigmoid"]
_SEG_BASES = [0, 512, 768, 1280]
_SEG_INPUT = 1536


def _segments(q4k: bool, seed: int) -> tuple[list[Segment], list[np.ndarray]]:
    """The segments and their float32 weights as used (Q4_K: dequantized)."""
    rng = np.random.default_rng(seed)
    segments, dense = [], []
    for (rows, k), act, base in zip(_SEG_SHAPES, _SEG_ACTS, _SEG_BASES):
        w = rng.standard_normal((rows, k)).astype(np.float32) / np.sqrt(k)
        if q4k:
            qt = Q4KTensor(quantize_q4k(w), (rows, k))
            segments.append(Segment(qt, act, base))
            dense.append(qt.dequantize())
        else:
            segments.append(Segment(w, act, base))
            dense.append(w)
    return segments, dense


# ---- numpy float64 references of the pure-MLX paths ----------------------------------------------

def wkv7_numpy(r, k, v, g, lw, la, lv, v_first, params, state) -> tuple[np.ndarray, np.ndarray]:
    """DESIGN.md's time-mix core in float64, token by token: y (B, T, C) and the state."""
    B, T, C = r.shape
    _, H, N, _ = state.shape
    f = lambda x: _f64(x).reshape(B, T, H, N)  # noqa: E731
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p = {n: _f64(x).reshape(H, N) for n, x in params.items()}
    r, k, v, lw, la = f(r), f(k), f(v), f(lw), f(la)
    if v_first is not None:
        v = v + (f(v_first) - v) * sig(p["v0"] + f(lv))
    w = np.exp(-DECAY_SCALE * sig(p["w0"] + lw))
    a = sig(p["a0"] + la)
    kk = k * p["k_k"]
    kk = kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
    k = k * (1 + (a - 1) * p["k_a"])
    S = _f64(state)  # (B, H, N, N): S[v, k]
    y = np.empty_like(r)
    for t in range(T):
        sa = S @ -kk[:, t, :, :, None]  # (B, H, N, 1)
        S = S * w[:, t, :, None, :] + sa * (kk * a)[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        y[:, t] = (S @ r[:, t, :, :, None])[..., 0]
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + GROUP_NORM_EPS)
    y = y * p["ln_w"] + p["ln_b"] + (r * k * p["r_k"]).sum(-1, keepdims=True) * v
    return y.reshape(B, T, C) * _f64(g), S


def norm_mix_numpy(x, dx, ln, x_prev, mix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x + dx, its LayerNorm h and the token-shift mixes (M, B*T, C), in float64."""
    x = _f64(x) + _f64(dx)
    h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * _f64(ln[0]) + _f64(ln[1])
    shifted = np.concatenate([_f64(x_prev)[:, None], h[:, :-1]], axis=1)
    xs = h[None] + (shifted - h)[None] * _f64(mix)[:, None, None]
    return x, h, xs.reshape(mix.shape[0], -1, x.shape[-1])


def projections_numpy(dense: list[np.ndarray], x: np.ndarray, nt: int) -> list[np.ndarray]:
    """Every segment's act(x_s W_s^T), (nt, rows), in float64."""
    x = _f64(x)
    return [_ACT[act](x[nt * base: nt * (base + w.shape[1])].reshape(nt, -1) @ w.astype(np.float64).T)
            for w, act, base in zip(dense, _SEG_ACTS, _SEG_BASES)]


# ---- reference checks (every backend) -------------------------------------------------------------

def check_reference_wkv7() -> Outcome:
    cmp = Comparison()
    for T, first in ((1, True), (5, False)):
        (r, k, v, g, lw, la, lv, vf), params, state = _wkv_inputs(2, T, 2, 16, mx.float32, seed=T)
        vf = None if first else vf
        y, s = _reference(wkv7, r, k, v, g, lw, la, lv, vf, params, state)  # wkv7_reference
        y64, s64 = wkv7_numpy(r, k, v, g, lw, la, lv, vf, params, state)
        cmp.add(f"y (T={T})", y, y64, F64_TOL)
        cmp.add(f"state (T={T})", s, s64, F64_TOL)
    return cmp.outcome()


def check_reference_norm_mix() -> Outcome:
    rng = np.random.default_rng(1)
    cmp = Comparison()
    for T in (1, 6):
        B, C, M = 2, 64, 7
        args = (_array(rng, B, T, C), _array(rng, B, T, C), (_array(rng, C), _array(rng, C)),
                _array(rng, B, C), _array(rng, M, C))
        got = _reference(norm_mix, *args)
        for name, a, b in zip(("x", "h", "xs"), got, norm_mix_numpy(*args)):
            cmp.add(f"{name} (T={T})", a, b, F64_TOL)
    return cmp.outcome()


def check_reference_projections() -> Outcome:
    rng = np.random.default_rng(2)
    segments, dense = _segments(False, seed=12)
    cmp = Comparison()
    group = _reference(lambda: ProjectionGroup(segments, mx.float32))
    for nt in (1, 3):
        x = _array(rng, nt * _SEG_INPUT)
        got = _reference(lambda: group.split(group(x, nt), nt))
        for s, (a, b) in enumerate(zip(got, projections_numpy(dense, x, nt))):
            cmp.add(f"segment {s} {_SEG_ACTS[s]} (nt={nt})", a, b, F64_TOL)
    return cmp.outcome()


def check_reference_q4k() -> Outcome:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 512)).astype(np.float32)
    weight = Q4KTensor(quantize_q4k(w), w.shape)
    x = _array(rng, 3, 512)
    layer = _reference(lambda: Q4KLinear(weight))
    cmp = Comparison()
    cmp.add("y", _reference(layer, x), _f64(x) @ dequantize_q4k(weight.blocks, w.shape).astype(np.float64).T,
            F64_TOL)
    return cmp.outcome()


# ---- kernel checks (GPU backends) ---------------------------------------------------------------

def check_kernel_wkv7(dtype: mx.Dtype, prefill: bool) -> Outcome:
    """The fused kernel (T <= FUSED_MAX_T) or scan + finish (longer T; 21 = 8 + 8 + 5: a partial
    stage), in layer 0 (v_first = v) and later layers."""
    _require_gpu()
    cmp = Comparison()
    lengths = (21,) if prefill else (1, FUSED_MAX_T)
    for T in lengths:
        for first in (True, False):
            (r, k, v, g, lw, la, lv, vf), params, state = _wkv_inputs(1, T, 2, 64, dtype, seed=T)
            vf = None if first else vf
            args = (r, k, v, g, lw, la, lv, vf, params, state)
            y, s = wkv7(*args)
            y_ref, s_ref = _reference(wkv7, *args)
            where = f"T={T}, {'layer 0' if first else 'layer > 0'}"
            cmp.add(f"y ({where})", y, y_ref, OP_TOL[dtype])
            cmp.add(f"state ({where})", s, s_ref, STATE_TOL)
    return cmp.outcome()


def check_kernel_norm_mix(dtype: mx.Dtype) -> Outcome:
    """Decode rows (split over threadgroups) and prefill rows (whole rows, shift inside the chunk)."""
    _require_gpu()
    rng = np.random.default_rng(4)
    cmp = Comparison()
    for B, T, C, M in ((1, 1, 512, 7), (2, 1, 256, 1), (1, 64, 256, 7)):
        args = (_array(rng, B, T, C, dtype=dtype), _array(rng, B, T, C, dtype=dtype),
                (_array(rng, C, dtype=dtype), _array(rng, C, dtype=dtype)),
                _array(rng, B, C, dtype=dtype), _array(rng, M, C, dtype=dtype))
        for name, a, b in zip(("x", "h", "xs"), norm_mix(*args), _reference(norm_mix, *args)):
            cmp.add(f"{name} (B={B}, T={T}, C={C}, M={M})", a, b, 4 * OP_TOL[dtype])
    return cmp.outcome()


def check_kernel_matvec(dtype: mx.Dtype, q4k: bool) -> Outcome:
    """The grouped mat-vec for 1 and 3 activation rows (2 / 4 rows per SIMD-group), then 9 rows
    (the matmul path; Q4_K weights expanded in one launch)."""
    _require_gpu()
    rng = np.random.default_rng(5)
    segments, _ = _segments(q4k, seed=15)
    group = ProjectionGroup(segments, dtype)
    if group.kernel is None:
        return Outcome(False, "the projection group did not select its kernel")
    reference = _reference(lambda: ProjectionGroup(segments, dtype))
    cmp = Comparison()
    for nt in (1, 3, 9):
        x = _array(rng, nt * _SEG_INPUT, dtype=dtype)
        want = _reference(lambda: reference.split(reference(x, nt), nt))
        for s, (a, b) in enumerate(zip(group.split(group(x, nt), nt), want)):
            tf32 = dtype == mx.float32 and nt > 8  # MLX-CUDA's float32 matmul runs in TF32
            cmp.add(f"segment {s} {_SEG_ACTS[s]} (nt={nt})", a, b, 2e-3 if tf32 else OP_TOL[dtype])
    return cmp.outcome()


def check_kernel_q4k_dequant(dtype: mx.Dtype) -> Outcome:
    """The expansion of the blocks of two matrices in one launch: dequantize_q4k, rounded to dtype."""
    _require_gpu()
    rng = np.random.default_rng(6)
    mats = [rng.standard_normal((3, 512)).astype(np.float32), rng.standard_normal((5, 256)).astype(np.float32) * 40]
    blocks = [quantize_q4k(m) for m in mats]
    want = np.concatenate([dequantize_q4k(b, m.shape).reshape(-1) for b, m in zip(blocks, mats)])
    words = mx.view(mx.array(np.concatenate([b.reshape(-1) for b in blocks])), mx.uint32)
    cmp = Comparison()
    cmp.add("weights", expand_q4k(words, dtype), mx.array(want).astype(dtype), 0.0)
    return cmp.outcome()


@functools.cache
def _weights(quant: bool) -> dict:
    weights = synthesize(MODEL_CONFIG, seed=0, dtype=np.float32)
    return quantize_model(weights, include_head=True, progress=False) if quant else weights


def _model_logits(model) -> mx.array:
    """Logits of prefills of 3 tokens (fused WKV, multi-row mat-vec) and 9 tokens (scan + finish,
    matmuls), then a compiled decode step: (13, V)."""
    state = model.new_state()
    outs = []
    for start, end in ((0, 3), (3, 12), (12, 13)):
        logits, state = model.forward(PROMPT[start:end], state, all_logits=True)
        outs.append(logits)
    out = mx.concatenate(outs)
    mx.eval(out)
    return out


def check_kernel_model(dtype_name: str, quant: bool) -> Outcome:
    _require_gpu()
    model = build_model(_weights(quant), MODEL_CONFIG, dtype_name)
    reference = _reference(lambda: build_model(_weights(quant), MODEL_CONFIG, dtype_name))
    cmp = Comparison()
    cmp.add("logits", _model_logits(model), _reference(_model_logits, reference), MODEL_TOL[DTYPES[dtype_name]])
    return cmp.outcome()


# ---- the persistent layer kernel -----------------------------------------------------------------

LAYER_THREADGROUPS = 4  # few enough to be resident on every Apple GPU (7 cores and up)
LAYER_STEPS = 16


@contextmanager
def _layer_kernel_env(value: str):
    saved = os.environ.get(layer_kernel.ENV)
    os.environ[layer_kernel.ENV] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[layer_kernel.ENV]
        else:
            os.environ[layer_kernel.ENV] = saved


def _decode_logits(model) -> mx.array:
    state, rows = model.new_state(), []
    for token in (PROMPT * (LAYER_STEPS // len(PROMPT) + 1))[:LAYER_STEPS]:
        logits, state = model.step(mx.array([token], dtype=mx.int32), state)
        rows.append(logits)
    out = mx.stack(rows)
    mx.eval(out, state.arrays())
    return out


def check_layer_kernel(quant: bool) -> Outcome:
    """Decode in one launch per layer (its threadgroups meet at grid barriers) against the five
    launches per layer. On a Mac this is how the kernel is proven before MLX_RWKV_LAYER_KERNEL=N
    turns it on: Metal documents no forward progress for threadgroups that wait for each other."""
    _require_gpu()
    count = layer_kernel.requested_threadgroups() or LAYER_THREADGROUPS
    with _layer_kernel_env(str(count)):
        model = build_model(_weights(quant), MODEL_CONFIG, "float16")
    if not model.arenas:
        raise Skip("the layer kernel does not apply to this model on this device")
    got = _decode_logits(model)
    if layer_kernel.gave_up(model.barrier_words):
        return Outcome(False, f"a grid-barrier wait gave up with {count} threadgroups: they were not all "
                              "resident at once (or did not make progress while waiting)")
    with _layer_kernel_env("0"):
        want = _decode_logits(build_model(_weights(quant), MODEL_CONFIG, "float16"))
    cmp = Comparison()
    cmp.add(f"{LAYER_STEPS} decode steps' logits, {count} threadgroups", got, want, MODEL_TOL[mx.float16])
    return cmp.outcome()


# ---- the SIMD lane probe ------------------------------------------------------------------------

def simd_probe(threads: int, groups: int = 2) -> tuple[mx.array, mx.array]:
    """Launch the probe over `groups` threadgroups of `threads`: (x, records (groups * threads, 8))."""
    kernel = get_kernel(SIMD_PROBE)
    if kernel is None:
        raise Skip("no GPU backend")
    n = groups * threads
    x = mx.arange(n, dtype=mx.float32) * 3 + 1  # distinct, exact in float sums
    (records,) = kernel(inputs=[x], template=[("TG", threads)], grid=(n, 1, 1), threadgroup=(threads, 1, 1),
                        output_shapes=[(n * PROBE_FIELDS,)], output_dtypes=[mx.float32])
    return x, records.reshape(n, PROBE_FIELDS)


def probe_problems(x: np.ndarray, records: np.ndarray, threads: int) -> list[str]:
    """What in the probe's records contradicts SIMD-groups of threads 32g .. 32g + 31 with lanes
    tid % 32, as SIMD_SUM and SIMD_SHUFFLE_XOR see them (empty: nothing). Lanes numbered
    tid % 32 ^ c for a constant c pass: xor shuffles and sums cannot tell, nor can the kernels."""
    n = x.size
    at = np.arange(n)
    want = {"simd_sum": np.repeat(x.reshape(-1, LANES).sum(1), LANES)}
    want |= {f"shuffle_xor {1 << j}": x[at ^ (1 << j)] for j in range(5)}
    problems = []
    for column, (what, expected) in enumerate(want.items()):
        bad = np.flatnonzero(records[:, column] != expected)
        if bad.size:
            i = bad[0]
            problems.append(f"{what}: {bad.size} of {n} threads differ (thread {i % threads} of threadgroup "
                            f"{i // threads}: {records[i, column]:g}, expected {expected[i]:g})")
    return problems


def check_simd_lanes() -> Outcome:
    _require_gpu()
    problems = []
    for threads in PROBE_THREADGROUPS:
        x, records = simd_probe(threads)
        problems += [f"threadgroup {threads}: {p}" for p in probe_problems(np.array(x), np.array(records), threads)]
    if problems:
        return Outcome(False, "; ".join(problems))
    return Outcome(True, f"SIMD_SUM and SIMD_SHUFFLE_XOR combine threads 32g .. 32g + 31 by lane tid % 32 "
                         f"(threadgroups of {', '.join(map(str, PROBE_THREADGROUPS))})")


# ---- the engine as it runs here ------------------------------------------------------------------

def _path() -> str:
    backend = kernels.gpu_backend()
    return f"{backend} kernels" if backend else "MLX ops on the CPU"


def check_prefill_vs_steps() -> Outcome:
    model = build_model(_weights(False), MODEL_CONFIG, "float32")
    T = 7  # above FUSED_MAX_T: the prefill kernels on a GPU
    prefill, _ = model.forward(PROMPT[:T], all_logits=True)
    state, steps = model.new_state(), []
    for token in PROMPT[:T]:
        logits, state = model.forward([token], state)
        steps.append(logits)
    cmp = Comparison()
    cmp.add(f"logits of {T} tokens", prefill, mx.stack(steps), MODEL_TOL[mx.float32])
    outcome = cmp.outcome()
    outcome.detail += f"; {_path()}"
    return outcome


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` through the production decode loop (compiled steps)."""
    sampler = Sampler(SamplingParams(temperature=0.0), model.config.vocab_size)
    return [token for token, _ in generate_tokens(model, prompt, sampler, n)]


def check_generation_vs_prefill() -> Outcome:
    """Each generated token has the highest logit (up to the tolerance: ties) of one prefill over
    the prompt and the generated tokens."""
    model = build_model(_weights(False), MODEL_CONFIG, "float32")
    prompt = PROMPT[:8]
    tokens = greedy(model, prompt, GENERATED)
    logits, _ = model.forward(prompt + tokens[:-1], all_logits=True)
    logits = np.array(logits[len(prompt) - 1:], dtype=np.float64)  # (GENERATED, V)
    shortfall = logits.max(-1) - logits[np.arange(GENERATED), tokens]  # 0 where the token is the argmax
    tol = MODEL_TOL[mx.float32] * max(1.0, float(np.abs(logits).max()))
    worst = int(np.argmax(shortfall))
    if shortfall[worst] > tol:
        return Outcome(False, f"generated token {worst} ({tokens[worst]}) is {shortfall[worst]:.2e} below the "
                              f"prefill's max logit (tol {tol:.2e}); tokens {tokens}; {_path()}",
                       float(shortfall[worst]), tol)
    return Outcome(True, f"{GENERATED} greedy tokens {tokens} are the prefill's argmax (largest shortfall "
                         f"{shortfall[worst]:.2e}, tol {tol:.2e}); {_path()}", float(shortfall[worst]), tol)


def check_generation_kernels() -> Outcome:
    _require_gpu()
    prompt = PROMPT[:8]
    got = greedy(build_model(_weights(False), MODEL_CONFIG, "float32"), prompt, GENERATED)
    want = _reference(lambda: greedy(build_model(_weights(False), MODEL_CONFIG, "float32"), prompt, GENERATED))
    if got == want:
        return Outcome(True, f"{GENERATED} greedy tokens equal with and without kernels: {got}")
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return Outcome(False, f"token {i} differs: kernels {got}, MLX ops {want}")


def check_decode_timing() -> Outcome:
    model = build_model(_weights(False), MODEL_CONFIG, "float16")
    logits, state = model.forward(PROMPT[:4])
    token = mx.array([PROMPT[4]], dtype=mx.int32)
    times = []
    for i in range(TIMED_STEPS + 3):  # 3 warm-up steps (the first one compiles)
        t0 = time.perf_counter()
        logits, state = model.step(token, state)
        mx.eval(logits, state.arrays())
        if i >= 3:
            times.append(time.perf_counter() - t0)
    c = MODEL_CONFIG
    return Outcome(True, f"{statistics.median(times) * 1e3:.3f} ms per step (median of {TIMED_STEPS}, min "
                         f"{min(times) * 1e3:.3f}); float16, {c.n_layer} layers, C={c.n_embd}, V={c.vocab_size}; "
                         f"{_path()}")


# ---- running -------------------------------------------------------------------------------------

def all_checks() -> list[tuple[str, Callable[[], Outcome]]]:
    checks: list[tuple[str, Callable[[], Outcome]]] = [
        ("reference/wkv7", check_reference_wkv7),
        ("reference/norm_mix", check_reference_norm_mix),
        ("reference/projections", check_reference_projections),
        ("reference/q4k", check_reference_q4k),
    ]
    for name, dtype in DTYPES.items():
        p = functools.partial
        checks += [
            (f"kernel/wkv7/decode/{name}", p(check_kernel_wkv7, dtype, False)),
            (f"kernel/wkv7/prefill/{name}", p(check_kernel_wkv7, dtype, True)),
            (f"kernel/norm_mix/{name}", p(check_kernel_norm_mix, dtype)),
            (f"kernel/matvec/dense/{name}", p(check_kernel_matvec, dtype, False)),
            (f"kernel/matvec/q4k/{name}", p(check_kernel_matvec, dtype, True)),
            (f"kernel/q4k_dequant/{name}", p(check_kernel_q4k_dequant, dtype)),
            (f"kernel/model/dense/{name}", p(check_kernel_model, name, False)),
            (f"kernel/model/q4k/{name}", p(check_kernel_model, name, True)),
        ]
    checks += [
        ("kernel/layer/dense", functools.partial(check_layer_kernel, False)),
        ("kernel/layer/q4k", functools.partial(check_layer_kernel, True)),
        ("simd/lanes", check_simd_lanes),
        ("model/prefill-vs-steps", check_prefill_vs_steps),
        ("generation/vs-prefill", check_generation_vs_prefill),
        ("generation/kernels-vs-reference", check_generation_kernels),
        ("timing/decode-step", check_decode_timing),
    ]
    return checks


def run_check(name: str, fn: Callable[[], Outcome]) -> CheckResult:
    """Run one check; an exception is a fail with its first line (the report keeps all of it)."""
    t0 = time.perf_counter()
    try:
        o = fn()
        result = CheckResult(name, "pass" if o.passed else "fail", o.detail, 0.0, o.max_abs_error, o.tolerance)
    except Skip as e:
        result = CheckResult(name, "skip", f"skipped: {e}", 0.0)
    except Exception as e:  # noqa: BLE001 - any failure of a check is a result, not a crash
        text = str(e).strip()
        first = text.splitlines()[0] if text else ""
        result = CheckResult(name, "fail", f"{type(e).__name__}: {first}", 0.0, exception=f"{type(e).__name__}: {text}")
    result.seconds = round(time.perf_counter() - t0, 4)
    return result


def environment() -> dict:
    backend = kernels.gpu_backend()
    info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    return {"device": str(info.get("device_name", mx.default_device())), "device_info": info,
            "backend": backend or "cpu", "mlx": mx.__version__, "mlx_rwkv": __version__,
            "python": platform.python_version(), "platform": platform.platform()}


def run_doctor(report_path: Path | None = None, out: TextIO = sys.stdout) -> int:
    """Run every check, print one line per check, write the JSON report (atomically) if asked; 0 if all pass."""
    env = environment()
    backend = env["backend"] if env["backend"] != "cpu" else "cpu (no GPU backend: kernel checks are skipped)"
    print(f"mlx-rwkv {env['mlx_rwkv']} doctor\n  device:  {env['device']}\n  mlx:     {env['mlx']}\n"
          f"  backend: {backend}\n  python:  {env['python']} on {env['platform']}", file=out)
    results = []
    for name, fn in all_checks():
        r = run_check(name, fn)
        results.append(r)
        print(f"{r.status.upper():4}  {name:34} {r.detail}  [{r.seconds:.2f} s]", file=out, flush=True)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    ok = counts["fail"] == 0
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped: "
          f"{'all checks pass' if ok else 'FAILED'}", file=out)
    if report_path is not None:
        report = {"tool": "mlx-rwkv doctor", "ok": ok,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "environment": env, "summary": counts, "checks": [asdict(r) for r in results]}
        with atomic_output(Path(report_path)) as f:
            f.write((json.dumps(report, indent=1) + "\n").encode())
        print(f"report: {report_path}", file=out)
    return 0 if ok else 1
