"""Decode in one launch per layer: the persistent kernel of metal_kernels/layer_decode.inc.

The five launches of a decode layer (model.py) become five phases of one kernel whose
threadgroups meet at a grid-wide barrier between phases, so a 1.5B step is 28 kernel nodes
instead of 124 (24 layer launches, and the step's 4 other nodes). A grid barrier only works
while every threadgroup of the launch is resident at once, so a launch has at most as many
threadgroups as the GPU holds (`resident_threadgroups`):
- `MLX_RWKV_LAYER_KERNEL=sm` (CUDA): one 256-thread block per SM (any register count fits one
  such block on an SM), the SMs counted once per process by a probe kernel that records the
  %smid of many short blocks;
- `MLX_RWKV_LAYER_KERNEL=N`: N threadgroups. Metal documents no forward-progress guarantee for
  threadgroups that spin on device memory, so on a Mac `mlx-rwkv doctor` checks the kernel with
  4 threadgroups against the five launches first;
- `MLX_RWKV_LAYER_KERNEL=0` (the default, DEFAULT, until the kernel has run on the GPU host):
  off, the five-launch path.

`LayerArena.build` packs what a layer's launch reads into few buffers (Metal allows 31): its
vectors, its WKV parameters, the five segment tables, and the dense and Q4_K weight words of
all its projection groups in one buffer each. The groups' own weights become views of those
buffers, so nothing is stored twice.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from . import kernels
from .kernels import KernelSpec, get_kernel, int_params
from .matvec import (Q4K_BLOCKS_IN_FLIGHT, Q4K_KIND, ROWS_PER_SIMDGROUP, ROWS_PER_SIMDGROUP_MULTI, TILE_ROWS,
                     WARPS, ProjectionGroup, weight_format)

if TYPE_CHECKING:
    from .model import Layer

_MV = ("matvec_head.inc", "layer_mix.inc", "matvec.inc", "layer_mv_close.inc")
LAYER_DECODE = KernelSpec(
    name="layer_decode",
    inputs=("x_in", "dx", "att_prev", "ffn_prev", "v_first", "vecs", "params", "segs", "wd", "wq", "state_in",
            "dims", "words", "after"),
    outputs=("x1", "h1", "proj", "y_att", "state_out", "dx_att", "x2", "h2", "kbuf", "dx_ffn"),
    sources=("load8.inc", "layer_decode.inc",
             "layer_att_in.inc", "row_norm.inc", "layer_mv_open.inc", *_MV,
             "layer_wkv.inc", "wkv7_lora.inc", "wkv7.inc", "layer_wkv_close.inc",
             "layer_att_out.inc", "layer_mv_open.inc", *_MV,
             "layer_ffn_key.inc", "row_norm.inc", "layer_mv_open.inc", *_MV,
             "layer_ffn_value.inc", "layer_mv_open.inc", *_MV),
    writes_inputs=("words",),
)
THREADS = WARPS * 32  # threads per threadgroup in every phase
MAX_TILE_BYTES = 8192  # s_h and s_x hold the rows of one phase: 2 x 8 KB of the 32 KiB Metal allows
BARRIER_WORDS = 32  # per layer: GRID_BARRIER's count (word 0) and give-up flag (word 16), 64 bytes apart
GAVE_UP = 16
ENV = "MLX_RWKV_LAYER_KERNEL"
# What an unset MLX_RWKV_LAYER_KERNEL means. "0" (off) until the kernel has run on the GPU host:
# the session that built it got no GPU (README, "One launch per layer").
DEFAULT = "0"


def requested_threadgroups() -> int | None:
    """MLX_RWKV_LAYER_KERNEL (else DEFAULT) as a threadgroup count: a number N, 0 for off, or
    None for "sm" (CUDA: one threadgroup per SM)."""
    value = os.environ.get(ENV, "").strip() or DEFAULT
    if value == "sm":
        return None
    if not value.isdigit():
        raise ValueError(f"{ENV} must be 'sm' (one threadgroup per SM, CUDA) or a whole number of "
                         f"threadgroups (0: off), got {value!r}")
    return int(value)


def resident_threadgroups() -> int:
    """How many threadgroups the layer kernel launches (0: the kernel is off): the requested
    count; for "sm" one per SM on CUDA, and off on Metal (which has no SM count to read)."""
    requested = requested_threadgroups()  # (a bad value fails here, on every device)
    if get_kernel(LAYER_DECODE) is None:
        return 0
    if requested is not None:
        return requested
    return count_sms() if kernels.gpu_backend() == "cuda" else 0


@functools.cache
def count_sms() -> int:
    """The CUDA device's SM count: 4096 short blocks each mark the SM they ran on (%smid)."""
    kernel = mx.fast.cuda_kernel(
        name="rwkv_sm_count", input_names=["unused"], output_names=["seen"],
        source="unsigned sm; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(sm));\n"
               "if (threadIdx.x == 0 && sm < 1024) { seen[sm] = 1; }\n")
    (seen,) = kernel(inputs=[mx.zeros((16,), mx.int32)], grid=(4096 * 32, 1, 1), threadgroup=(32, 1, 1),
                     output_shapes=[(1024,)], output_dtypes=[mx.int32], init_value=0)
    return int(mx.sum(seen).item())


@dataclass
class LayerArena:
    """What one layer's launch reads, in few buffers; `step` launches it."""

    vecs: mx.array  # (12, C) activation dtype: ln1 w, b, the 7 att mixes, ln2 w, b, the ffn mix
    params: mx.array  # (8 C,) fp32, wkv.PARAM_NAMES order
    segs: mx.array  # the five segment tables, offsets into wd / wq
    wd: mx.array
    wq: mx.array
    groups: tuple[ProjectionGroup, ...]  # att_in, lora_up, att_out, ffn_key, ffn_value

    @classmethod
    def build(cls, layer: "Layer", param_names: tuple[str, ...], C: int) -> "LayerArena | None":
        """The layer's arena, or None where the kernel does not apply (a group without the mat-vec
        kernel, Q4_K LoRA up-projections, inputs other than whole C-wide rows). Rebases the groups'
        weights onto the arena's buffers."""
        groups = (layer.att_in, layer.lora_up, layer.att_out, layer.ffn_key, layer.ffn_value)
        if any(g.kernel is None for g in groups) or layer.lora_up.has_q4k:
            return None
        normed = (layer.att_in, layer.ffn_key)  # their inputs come from the norm: whole rows of C
        if any(k != C or base % C for g in normed for (_, k), base in zip(g.shapes, g.x_bases)):
            return None
        (wd, d_offsets), (wq, q_offsets) = _concat_words(groups, "wd"), _concat_words(groups, "wq")
        tables = []
        for g, d_off, q_off in zip(groups, d_offsets, q_offsets):
            table = np.array(g.table, np.int64).reshape(-1, 6)
            table[:, 2] += np.where(table[:, 5] & Q4K_KIND, q_off, d_off)
            tables.append(table)
            g.rebase(wd[d_off: d_off + g.wd.size], wq[q_off: q_off + g.wq.size])
        arena = cls(vecs=mx.concatenate([layer.ln1[0][None], layer.ln1[1][None], layer.att_mix,
                                         layer.ln2[0][None], layer.ln2[1][None], layer.ffn_mix]),
                    params=mx.concatenate([layer.wkv_params[n] for n in param_names]),
                    segs=mx.array(np.concatenate(tables).reshape(-1).astype(np.int32)), wd=wd, wq=wq,
                    groups=groups)
        mx.eval(arena.vecs, arena.params, arena.segs, arena.wd, arena.wq, [vars(g) for g in groups])
        return arena

    def step(self, x: mx.array, dx: mx.array | None, att_prev: mx.array, ffn_prev: mx.array,
             v_first: mx.array | None, state: mx.array, barrier: tuple[mx.array, int], after: mx.array,
             threadgroups: int) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array, mx.array]:
        """The layer for one token per row: x, dx (B, 1, C) (dx None in layer 0), the token-shift
        states att_prev, ffn_prev (B, C), v_first (B, 1, C) or None in layer 0, the WKV state
        (B, H, N, N); `barrier` the model's barrier words (`barrier_words`) and this layer's
        index; `after` an output of the launch that must finish before this one starts (MLX
        orders launches only through shared arrays, and two of these must never run at once),
        `threadgroups` at most the resident count. Returns x and the pending update dx for the
        next layer, the new token-shift states h1, h2, the WKV state and this layer's v (B, 1, C)."""
        B, _, C = x.shape
        H, N = state.shape[1], state.shape[-1]
        att_in, lora_up, att_out, ffn_key, ffn_value = self.groups
        nr = ROWS_PER_SIMDGROUP if B == 1 else ROWS_PER_SIMDGROUP_MULTI
        virtual = [g._threadgroups([("NR", nr), ("TG_ALIGN", align)])
                   for g, align in ((att_in, WARPS), (att_out, 1), (ffn_key, WARPS), (ffn_value, 1))]
        threadgroups = min(threadgroups, max(*virtual, B * H))
        template = [("TX", x.dtype), ("T", x.dtype), ("XFMT", weight_format(x.dtype)),
                    ("WFMT", weight_format(att_in.dtype)), ("NT", B), ("NR", nr), ("QU", Q4K_BLOCKS_IN_FLIGHT),
                    ("WARPS", WARPS), ("TILED", 0), ("CX", C), ("H", H), ("N", N), ("LPR", THREADS // N),
                    ("FIRST", int(v_first is None)), ("HAS_DX", int(dx is not None)),
                    ("NSEG_IN", len(att_in.shapes)), ("NSEG_UP", len(lora_up.shapes)),
                    *((f"Q_{name}", int(g.has_q4k)) for name, g in
                      (("IN", att_in), ("OUT", att_out), ("KEY", ffn_key), ("VAL", ffn_value)))]
        row, flat = (B, C), (B * C,)
        words, layer = barrier
        x1, h1, proj, y_att, new_state, dx_att, x2, h2, kbuf, dx_ffn = get_kernel(LAYER_DECODE)(
            inputs=[x, x if dx is None else dx, att_prev, ffn_prev, x if v_first is None else v_first, self.vecs,
                    self.params, self.segs, self.wd, self.wq, state,
                    int_params(1, B, threadgroups, *virtual, layer, words.size // BARRIER_WORDS), words, after],
            template=template, grid=(threadgroups * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[row, row, (B * att_in.rows,), flat, state.shape, flat, x.shape, row,
                           (B * ffn_key.rows,), x.shape],
            output_dtypes=[x.dtype] * 4 + [mx.float32] + [x.dtype] * 5)
        v = proj[2 * B * C: 3 * B * C].reshape(B, 1, C)
        return x2, dx_ffn, h1, new_state, h2, v


def barrier_words(n_layer: int) -> mx.array:
    """A model's grid-barrier words: BARRIER_WORDS per layer, zero (evaluated: they are written
    in place by the launches, so they must be a buffer of their own)."""
    words = mx.zeros((n_layer * BARRIER_WORDS,), mx.uint32)
    mx.eval(words)
    return words


class GridBarrierError(RuntimeError):
    """A grid-barrier wait of the layer kernel gave up: the results since are wrong."""


def barrier_error(words: mx.array | None) -> str | None:
    """What went wrong if a layer-kernel launch on these words (a model's `barrier_words`; None:
    the kernel is off) gave up a wait, else None."""
    if words is None or not gave_up(words):
        return None
    return (f"the layer kernel's threadgroups were not all resident at once (a grid-barrier wait gave up), so "
            f"this output is wrong: set {ENV}=0, or fewer threadgroups than the GPU holds at once")


def check_barriers(words: mx.array | None) -> None:
    """Raise GridBarrierError with `barrier_error`'s message if a wait gave up."""
    error = barrier_error(words)
    if error:
        raise GridBarrierError(error)


def gave_up(words: mx.array) -> bool:
    """Whether a grid-barrier wait of any launch on these words gave up (its threadgroups were
    not all resident at once): the flag stays set."""
    return bool(mx.any(words.reshape(-1, BARRIER_WORDS)[:, GAVE_UP] != 0).item())


def fits(rows: int, C: int, N: int, dtype: mx.Dtype) -> bool:
    """Whether a decode step of `rows` sequences of a model with arenas (so a GPU kernel exists)
    can take the layer kernel: the rows are one mat-vec tile and fit the phase's threadgroup
    memory, and N * (THREADS / N) lanes cover a head as wkv7.inc needs."""
    lanes = THREADS // N
    return (rows <= TILE_ROWS and rows * C * dtype.size <= MAX_TILE_BYTES and THREADS % N == 0
            and 32 % lanes == 0 and N % lanes == 0)


def _concat_words(groups: tuple[ProjectionGroup, ...], name: str) -> tuple[mx.array, list[int]]:
    """The groups' `name` word buffers in one, each starting 16-byte aligned; their offsets."""
    parts, offsets, at = [], [], 0
    for g in groups:
        words = getattr(g, name)
        pad = -words.size % 4
        parts.append(words if not pad else mx.concatenate([words, mx.zeros((pad,), mx.uint32)]))
        offsets.append(at)
        at += words.size + pad
    return mx.concatenate(parts), offsets
