"""Ops as data: an op is a pipeline, a bind group over named preallocated buffers, and a grid.

A forward pass is a flat list of ops (see model.py); `encode` records one into a compute pass.
The constructors here turn shapes and buffer offsets into the uniform params of each kernel.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Callable, Sequence

import numpy as np
import wgpu

from .device import GPU, WebGPUError
from .kernels import Kernel, pipeline

MAX_GROUPS = 8  # groups per linear op (LinearParams.groups in linear.wgsl)
MATVEC_ROWS = 8  # rows per workgroup of the f16/f32 mat-vec (ROWS in matvec.wgsl)
TILE_ROWS, TILE_TOKENS = 64, 64  # rows and tokens per workgroup of the tiled matmul
GRID_X = 65535  # WebGPU's default max workgroups per dimension; more spill into y
ACTS = {"none": 0, "tanh": 1, "sigmoid": 2, "relu_sq": 3, "add": 4}  # ACT_* in prelude.wgsl
NO_MIX = 0xFFFFFFFF
LINEAR_BINDINGS = ("uniform", "uniform", "read", "read", "read", "rw")  # p, step, w, x, vecs, out
NORM_BINDINGS = ("uniform", "uniform", "read", "rw", "read", "rw")  # p, step, src, dst, vecs, state
WKV_BINDINGS = ("uniform", "uniform", "read", "read", "read", "rw", "rw", "rw")
WORKGROUP_STORAGE = "max-compute-workgroup-storage-size"
INVOCATIONS = "max-compute-invocations-per-workgroup"
WORKGROUP_SIZE_X = "max-compute-workgroup-size-x"
WKV_CHUNK_BINDINGS = ("uniform", "uniform", "rw", "rw", "read", "rw", "rw", "rw")  # the passes write proj, mix


@dataclass(frozen=True)
class Op:
    name: str  # e.g. "L3.att.rkv": shows which op a per-op timing or a failure belongs to
    pipeline: wgpu.GPUComputePipeline
    bind_group: wgpu.GPUBindGroup
    grid: Callable[[int], tuple[int, int, int]]  # workgroups for a chunk of T tokens
    macs: int = 0  # multiply-adds per token of a linear op's matrices (0 for other ops)


def encode(compute_pass: wgpu.GPUComputePassEncoder, ops: Sequence[Op], tokens: int) -> None:
    for op in ops:
        compute_pass.set_pipeline(op.pipeline)
        compute_pass.set_bind_group(0, op.bind_group)
        compute_pass.dispatch_workgroups(*op.grid(tokens))


def flat_grid(n: int) -> tuple[int, int, int]:
    """n workgroups as an (x, y, 1) grid; the kernels number them flat (flat_id in prelude.wgsl)."""
    return (min(n, GRID_X), -(-n // GRID_X), 1)


def make_op(gpu: GPU, kernel: Kernel, name: str, params: Sequence[int], buffers: Sequence[wgpu.GPUBuffer],
            grid: Callable[[int], tuple[int, int, int]], macs: int = 0) -> Op:
    """An op with its own uniform params (u32 words) at binding 0 and `buffers` after it."""
    compute, layout = pipeline(gpu, kernel)
    words = np.zeros(max(4, -(-len(params) // 4) * 4), np.uint32)
    words[: len(params)] = params
    uniform = gpu.device.create_buffer_with_data(data=words, usage=wgpu.BufferUsage.UNIFORM)
    entries = [{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}}
               for i, b in enumerate([uniform, *buffers])]
    bind_group = gpu.device.create_bind_group(label=name, layout=layout, entries=entries)
    return Op(name, compute, bind_group, grid, macs)


# ---- linear ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """One matrix of a linear op: out[t, row] = act(W[row] . x_t); offsets in floats (W: W4 units)."""

    w_off: int
    k: int
    m: int
    in_off: int
    mu_off: int | None  # the token-shift mixing vector in `vecs`, None for a plain input
    out_off: int
    out_stride: int
    act: str

    def words(self) -> list[int]:
        w = astuple(self)
        return [*w[:4], NO_MIX if self.mu_off is None else self.mu_off, *w[5:7], ACTS[self.act]]


@dataclass(frozen=True)
class Q4KMatvec:
    """A form of the Q4_K mat-vec (the constants DECODE, SHARES and ROWS of matvec_q4k.wgsl).

    The default is the fastest form on the decode-sized matrices of the H100 sweep
    (bench_webgpu --mode kernel --q4k-variants all, 2026-11-25: 836 GB/s at 4096x4096 and 829
    at 8192x2048, against 767 and 785 for the first form, ("bits", 32, 8)); 16 rows win on the
    65536-row head (1,451 against 1,361) and at 2048x8192 (762 against 746)."""

    decode: str = "f16pairs"  # nibbles to floats: "bits" one at a time as f32, "f16pairs" two at a time as f16
    cols: int = 32  # columns of each super-block an invocation takes: 32 (8 share a block) or 64 (4 do)
    rows: int = 8  # rows per workgroup: 8 or 16

    DECODES = ("bits", "f16pairs")  # DECODE_BITS, DECODE_F16_PAIRS

    def __post_init__(self) -> None:
        if self.decode not in self.DECODES or self.cols not in (32, 64) or self.rows not in (8, 16):
            raise ValueError(f"no Q4_K mat-vec form {self}")

    @property
    def label(self) -> str:
        """e.g. "q4k-f16pairs-c64-r8": the precision of its benchmark records."""
        return f"q4k-{self.decode}-c{self.cols}-r{self.rows}"

    def consts(self) -> tuple[tuple[str, int], ...]:
        return ("ROWS", self.rows), ("SHARES", self.cols // 32), ("DECODE", self.DECODES.index(self.decode))


Q4K_MATVECS = tuple(Q4KMatvec(d, c, r) for d in Q4KMatvec.DECODES for c in (32, 64) for r in (8, 16))


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, n - 1).bit_length()))


def linear(gpu: GPU, name: str, fmt: str, groups: Sequence[Group], weights: wgpu.GPUBuffer, src: wgpu.GPUBuffer,
           vecs: wgpu.GPUBuffer, dst: wgpu.GPUBuffer, step: wgpu.GPUBuffer, many_tokens: bool,
           q4k: Q4KMatvec = Q4KMatvec()) -> Op:
    """Up to MAX_GROUPS matrices of one format in one dispatch: a mat-vec for one token (Q4_K in
    the form `q4k`), a tiled matmul for a chunk (many_tokens)."""
    if not 0 < len(groups) <= MAX_GROUPS:
        raise ValueError(f"{name}: a linear op takes 1 to {MAX_GROUPS} groups, got {len(groups)}")
    for g in groups:
        if g.k % 16 or g.in_off % 4 or (g.mu_off or 0) % 4:
            raise WebGPUError(f"{name}: K={g.k} must be a multiple of 16 and offsets of 4 floats")
    params = [len(groups), 0, 0, 0] + [word for g in groups for word in g.words()]
    params += [0] * 8 * (MAX_GROUPS - len(groups))  # the uniform is bound at its full struct size
    buffers = [step, weights, src, vecs, dst]
    if many_tokens:
        kernel = Kernel(("linear.wgsl", "matmul.wgsl"), "main", LINEAR_BINDINGS, (("WG", 128),), fmt)
        grid = lambda t: flat_grid(sum(-(-g.m // TILE_ROWS) for g in groups) * -(-t // TILE_TOKENS))  # noqa: E731
    else:
        per_invocation = q4k.cols if fmt == "q4k" else 8  # columns one invocation takes per step
        wg = _pow2_between(max(g.k for g in groups) // per_invocation, 32, 256)
        if fmt == "q4k":
            body, consts, rows = "matvec_q4k.wgsl", (("WG", wg), *q4k.consts()), q4k.rows
        else:
            body, consts, rows = "matvec.wgsl", (("WG", wg),), MATVEC_ROWS
        kernel = Kernel(("linear.wgsl", body), "main", LINEAR_BINDINGS, consts, fmt)
        blocks = sum(-(-g.m // rows) for g in groups)
        grid = lambda t: flat_grid(blocks)  # noqa: E731
    return make_op(gpu, kernel, name, params, buffers, grid, sum(g.m * g.k for g in groups))


# ---- layer norm --------------------------------------------------------------------------------

def layer_norm(gpu: GPU, name: str, c: int, weight: int, bias: int, src: wgpu.GPUBuffer, dst: wgpu.GPUBuffer,
               vecs: wgpu.GPUBuffer, step: wgpu.GPUBuffer, state: wgpu.GPUBuffer, *,
               shift_state: int | None = None, last_only: bool = False) -> Op:
    """LayerNorm of (T, C) rows. With shift_state (x_prev's offset in `state`) it writes (T + 1, C)
    rows, row 0 being the previous token, and updates x_prev; last_only normalises token T - 1 only."""
    wg = _pow2_between(c // 4, 64, 256)
    entry = "layer_norm" if shift_state is None else "layer_norm_shift"
    kernel = Kernel(("layer_norm.wgsl",), entry, NORM_BINDINGS, (("WG", wg),))
    params = [c, weight, bias, shift_state or 0, int(last_only)]
    grid = (lambda t: (1, 1, 1)) if last_only else (lambda t: (t, 1, 1))
    return make_op(gpu, kernel, name, params, [step, src, dst, vecs, state], grid)


# ---- wkv7 --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WkvVectors:
    """Offsets (floats) of one layer's time-mix vectors in `vecs`; v0 is unused on layer 0."""

    w0: int
    a0: int
    v0: int
    k_k: int
    k_a: int
    r_k: int
    ln_w: int
    ln_b: int


def wkv7(gpu: GPU, name: str, n_head: int, head_size: int, t_max: int, state_off: int, layer0: bool,
         vectors: WkvVectors, proj: wgpu.GPUBuffer, mix: wgpu.GPUBuffer, vecs: wgpu.GPUBuffer,
         v_first: wgpu.GPUBuffer, state: wgpu.GPUBuffer, out: wgpu.GPUBuffer, step: wgpu.GPUBuffer,
         many_tokens: bool) -> list[Op]:
    """The time-mix core (decay, kk, v-residual, WKV-7 recurrence, GroupNorm, bonus, gate): one
    fused dispatch for a token, or prep / scan / finish for a chunk (wkv7_chunk.wgsl; these
    overwrite the projections in `proj` and `mix` with what they derive from them)."""
    params = [n_head * head_size, t_max, state_off, int(layer0), *astuple(vectors)]
    buffers = [step, proj, mix, vecs, v_first, state, out]
    n = head_size
    scan = _scan_layout(gpu, n) if many_tokens else None
    if scan is None:  # one token, or a head size / adapter the scan does not fit: token by token
        kernel = Kernel(("wkv7_common.wgsl", "wkv7.wgsl"), "main", WKV_BINDINGS, (("WG", n), ("N", n)))
        return [make_op(gpu, kernel, name, params, buffers, lambda t: (n_head, 1, 1))]
    lanes, stage, subgroup_sums = scan
    kernel = lambda entry, wg, sums=True: Kernel(  # noqa: E731
        ("wkv7_common.wgsl", "wkv7_chunk.wgsl"), entry, WKV_CHUNK_BINDINGS,
        (("WG", wg), ("N", n), ("STAGE", stage)), subgroup_sums=sums)
    per_token = lambda t: (n_head, t, 1)  # noqa: E731
    return [make_op(gpu, kernel("prep", n), f"{name}.prep", params, buffers, per_token),
            make_op(gpu, kernel("scan", n * lanes, subgroup_sums), f"{name}.scan", params, buffers,
                    lambda t: (n_head, 1, 1)),
            make_op(gpu, kernel("finish", n), f"{name}.finish", params, buffers, per_token)]


def _scan_layout(gpu: GPU, n: int) -> tuple[int, int, bool] | None:
    """(invocations per state row, tokens staged at a time, subgroup row sums) of the chunked
    WKV scan for head size n on this adapter, or None where it does not fit (the caller then
    runs the fused one-token kernel over the chunk).

    An invocation owns 16 columns of a state row. A row's sums are subgroup shuffles where the
    row's invocations surely share a subgroup (WebGPU subgroups have at least 4 invocations),
    else shared-memory sums, whose per-invocation vec4 then needs workgroup memory too. The
    stage holds six f32 vectors of n per token and is a multiple of the row's invocations."""
    lanes = n // 16
    if n % 16 or lanes & (lanes - 1) or not lanes:
        return None
    invocations = n * lanes
    if invocations > min(gpu.limits[INVOCATIONS], gpu.limits[WORKGROUP_SIZE_X]):
        return None
    subgroup_sums = gpu.subgroups and lanes <= 4
    reduction = 0 if subgroup_sums else 16 * invocations
    stage = next((s for s in (16, 8, 4, 2, 1)
                  if s >= lanes and 24 * n * s + reduction <= gpu.limits[WORKGROUP_STORAGE]), 0)
    return (lanes, stage, subgroup_sums) if stage else None
