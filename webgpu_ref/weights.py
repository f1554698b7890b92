"""Weights on the GPU: matrices (f16, f32 or Q4_K) packed into storage buffers under the binding
limit, split by rows when one matrix alone exceeds it, and the f32 table of per-layer vectors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import wgpu

from mlx_rwkv.quant import Q4KTensor

from .device import GPU
from .ops import MAX_GROUPS, Group

W4_BYTES = {"f16": 8, "f32": 16, "q4k": 16}  # bytes of one W4 element (linear.wgsl `w`)
ALIGN = 256  # byte alignment of each matrix inside a buffer
VEC_ALIGN = 16  # float alignment of each vector in the table


@dataclass(frozen=True)
class Matrix:
    """A [rows, K] weight in its GPU encoding: `data` is [rows, bytes per row]-shaped."""

    fmt: str  # "f16" | "f32" | "q4k"
    rows: int
    k: int
    data: np.ndarray

    @property
    def row_bytes(self) -> int:
        return self.data.nbytes // self.rows


def to_matrix(w: np.ndarray | Q4KTensor, fmt: str, transpose: bool = False) -> Matrix:
    """A checkpoint tensor (Linear [out, in], or a LoRA [in, out] with transpose) as a Matrix.
    Q4KTensor values stay Q4_K whatever `fmt` says."""
    if isinstance(w, Q4KTensor):
        return Matrix("q4k", *w.shape, np.ascontiguousarray(w.blocks))
    a = np.asarray(w)
    a = np.ascontiguousarray((a.T if transpose else a).astype(np.float16 if fmt == "f16" else np.float32))
    return Matrix(fmt, a.shape[0], a.shape[1], a)


@dataclass(frozen=True)
class Linear:
    """A matrix and where it reads and writes (floats; out_stride None = its own row count)."""

    name: str
    matrix: Matrix
    in_off: int
    mu_off: int | None
    out_off: int
    act: str = "none"
    out_stride: int | None = None


@dataclass(frozen=True)
class Batch:
    """Matrices of one format sharing a buffer: one linear op."""

    fmt: str
    buffer: wgpu.GPUBuffer
    groups: tuple[Group, ...]


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def upload(gpu: GPU, items: Sequence[Linear], limit: int) -> list[Batch]:
    """Pack `items` into as few buffers (<= limit bytes, <= MAX_GROUPS matrices) as they fit."""
    parts: list[tuple[Linear, int, int]] = []  # (item, first row, rows)
    for item in items:
        m = item.matrix
        per_part = limit // m.row_bytes
        if per_part == 0:
            gpu.check_binding(f"one row of {item.name}", m.row_bytes, limit)
        parts += [(item, r0, min(per_part, m.rows - r0)) for r0 in range(0, m.rows, per_part)]
    batches = []
    for fmt in dict.fromkeys(item.matrix.fmt for item in items):
        pending: list[tuple[Linear, int, int, int]] = []  # (item, first row, rows, byte offset)
        end = 0
        for item, r0, rows in (p for p in parts if p[0].matrix.fmt == fmt):
            offset = _round_up(end, ALIGN)
            nbytes = rows * item.matrix.row_bytes
            if pending and (len(pending) == MAX_GROUPS or offset + nbytes > limit):
                batches.append(_make_batch(gpu, fmt, pending, end))
                pending, offset = [], 0
            pending.append((item, r0, rows, offset))
            end = offset + nbytes
        batches.append(_make_batch(gpu, fmt, pending, end))
    return batches


def _make_batch(gpu: GPU, fmt: str, parts: list[tuple[Linear, int, int, int]], size: int) -> Batch:
    label = "+".join(item.name for item, *_ in parts)
    # COPY_SRC: the hybrid strategy (mlx_rwkv.sync_strategies) reads the Q4_K blocks back
    usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC
    buffer = gpu.device.create_buffer(label=label, size=_round_up(size, 4), usage=usage)
    groups = []
    for item, r0, rows, offset in parts:
        m = item.matrix
        gpu.device.queue.write_buffer(buffer, offset, m.data[r0:r0 + rows])
        groups.append(Group(w_off=offset // W4_BYTES[fmt], k=m.k, m=rows, in_off=item.in_off, mu_off=item.mu_off,
                            out_off=item.out_off + r0, out_stride=item.out_stride or m.rows, act=item.act))
    return Batch(fmt, buffer, tuple(groups))


class VectorTable:
    """Every small f32 vector of the model in one buffer, each at an aligned offset."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}
        self._parts: list[np.ndarray] = []
        self._size = 0

    def add(self, name: str, value: np.ndarray) -> int:
        v = np.asarray(value, dtype=np.float32).reshape(-1)
        padded = np.zeros(_round_up(v.size, VEC_ALIGN), np.float32)
        padded[: v.size] = v
        self.offsets[name] = self._size
        self._parts.append(padded)
        self._size += padded.size
        return self.offsets[name]

    def __getitem__(self, name: str) -> int:
        return self.offsets[name]

    def data(self) -> np.ndarray:
        """The whole table as uploaded: float32, each vector at its offset."""
        return np.concatenate(self._parts)

    def upload(self, gpu: GPU) -> wgpu.GPUBuffer:
        data = self.data()
        gpu.check_binding("the vector table", data.nbytes)
        return gpu.device.create_buffer_with_data(label="vecs", data=data, usage=wgpu.BufferUsage.STORAGE)

