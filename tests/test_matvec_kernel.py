"""The grouped mat-vec kernel (metal_kernels/matvec.inc) against float64 numpy.

GPU tests run the kernel through ProjectionGroup on Metal or CUDA; the CPU test checks the
matmul path that CPU runs and that prefill uses, on the same segment layout.
"""
from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest

from mlx_rwkv.matvec import MAX_ROWS, ProjectionGroup, Segment
from mlx_rwkv.quant import Q4KTensor, dequantize_q4k, quantize_q4k

RNG = np.random.default_rng(11)
ACT = {"none": lambda y: y, "tanh": np.tanh, "sigmoid": lambda y: 1 / (1 + np.exp(-y)),
       "relu2": lambda y: np.square(np.maximum(y, 0))}
TOL = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}
TF32_TOL = 2e-3  # MLX-CUDA runs float32 matmuls (the path above MAX_ROWS) in TF32


def _segments(shapes, acts, q4k: bool, x_bases) -> tuple[list[Segment], list[np.ndarray]]:
    segments, dense = [], []
    for (rows, k), act, base in zip(shapes, acts, x_bases):
        w = RNG.standard_normal((rows, k)).astype(np.float32) / np.sqrt(k)
        if q4k and k % 256 == 0:
            qt = Q4KTensor(quantize_q4k(w), (rows, k))
            segments.append(Segment(qt, act, base))
            dense.append(dequantize_q4k(qt.blocks, (rows, k)))
        else:
            segments.append(Segment(w, act, base))
            dense.append(w)
    return segments, dense


def _check(group: ProjectionGroup, dense, acts, x_bases, nt: int, dtype: mx.Dtype) -> None:
    n_in = max(b + w.shape[1] for b, w in zip(x_bases, dense))
    x = RNG.standard_normal(nt * n_in).astype(np.float32)
    xm = mx.array(x).astype(dtype)
    xq = np.array(xm.astype(mx.float32)).astype(np.float64)  # the rounded input the kernel reads
    outs = group.split(group(xm, nt), nt)
    for out, w, act, base in zip(outs, dense, acts, x_bases):
        k = w.shape[1]
        want = ACT[act](xq[nt * base: nt * (base + k)].reshape(nt, k) @ w.astype(np.float64).T)
        got = np.array(out.astype(mx.float32))
        assert got.shape == want.shape
        err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
        tol = TF32_TOL if dtype == mx.float32 and nt > MAX_ROWS and group.kernel is not None else TOL[dtype]
        assert err <= tol, f"{act} segment {w.shape}: relative error {err:.2e}"


def test_matmul_path_matches_numpy():
    """CPU (and prefill): every segment as a matmul over its slice of the flat input."""
    shapes, acts = [(64, 96), (32, 64), (48, 96)], ["tanh", "none", "relu2"]
    bases = [0, 96, 160]
    segments, dense = _segments(shapes, acts, False, bases)
    group = ProjectionGroup(segments, mx.float32)
    for nt in (1, 5, 12):
        _check(group, dense, acts, bases, nt, mx.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("q4k", [False, True])
@pytest.mark.parametrize("nt", [1, 2, 5, MAX_ROWS, MAX_ROWS + 1])
def test_att_in_layout(dtype, q4k, nt):
    """r/k/v (Q4_K or dense) + LoRA downs of mixed ranks in one launch, as a layer uses it."""
    C = 512
    ranks = [96, 64, 32, 128]
    shapes = [(C, C)] * 3 + [(r, C) for r in ranks]
    acts = ["none"] * 3 + ["tanh", "none", "none", "sigmoid"]
    bases = [i * C for i in range(7)]
    segments, dense = _segments(shapes, acts, q4k, bases)
    group = ProjectionGroup(segments, dtype)
    assert group.kernel is not None
    _check(group, dense, acts, bases, nt, dtype)
    # the LoRA up-projections read the hiddens of that output, rows of different lengths
    up_shapes = [(C, r) for r in ranks]
    up_bases = list(np.cumsum([0] + ranks[:-1]))
    up, up_dense = _segments(up_shapes, ["none"] * 4, False, up_bases)
    _check(ProjectionGroup(up, dtype), up_dense, ["none"] * 4, up_bases, nt, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k", [(2048, 2048), (8192, 2048), (2048, 8192), (4096, 4096),
                                     (2560, 2560), (65536, 2048)])
@pytest.mark.parametrize("q4k", [False, True])
@pytest.mark.parametrize("nt", [1, 3, 8])
def test_large_shapes(rows, k, q4k, nt):
    group, dense = _large_group(rows, k, q4k)
    _check(group, dense, ["relu2"], [0], nt, mx.float16)


@functools.cache
def _large_group(rows: int, k: int, q4k: bool) -> tuple[ProjectionGroup, list[np.ndarray]]:
    """One group per shape for every token count (quantizing 65536 x 2048 takes seconds)."""
    segments, dense = _segments([(rows, k)], ["relu2"], q4k, [0])
    return ProjectionGroup(segments, mx.float16), dense
