"""The Q4_K dequant kernel (metal_kernels/q4k_dequant.inc) against dequantize_q4k + a float matmul.

Q4KLinear is the prefill (and CPU) path of Q4_K weights; decode reads the blocks in the grouped
mat-vec kernel (tests/test_matvec_kernel.py, tests/test_kernels_emulated.py). GPU tests run the
real kernel on Metal or CUDA; the CPU test runs the same body through tests/kernel_emulator.py.
"""
from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest

from kernel_emulator import emulated_kernels
from mlx_rwkv.q4k_linear import Q4KLinear
from mlx_rwkv.quant import Q4KTensor, dequantize_q4k, quantize_q4k

RNG = np.random.default_rng(7)


@functools.cache
def _weight(rows: int, k: int) -> Q4KTensor:
    w = RNG.standard_normal((rows, k)).astype(np.float32) * 0.02
    return Q4KTensor(quantize_q4k(w), (rows, k))


def _reference(weight: Q4KTensor, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ dequantize_q4k(weight.blocks, weight.shape).T.astype(np.float64)


@pytest.mark.parametrize("rows, k", [(3, 256), (17, 1024)])
def test_dequant_body_on_cpu_is_exact(rows: int, k: int) -> None:
    weight = _weight(rows, k)
    with emulated_kernels():
        w = np.array(Q4KLinear(weight).dequantize())
    np.testing.assert_array_equal(w.view(np.uint32), dequantize_q4k(weight.blocks, weight.shape).view(np.uint32))


# ---- the kernels on a GPU -----------------------------------------------------------------------

SHAPES = [(2048, 2048), (2560, 2560), (4096, 4096), (8192, 2048), (2048, 8192), (65536, 2048), (100, 768)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k", SHAPES)
@pytest.mark.parametrize("t", [1, 9, 64])
def test_kernel_matches_dequantized_matmul(rows: int, k: int, t: int) -> None:
    weight = _weight(rows, k)
    layer = Q4KLinear(weight)
    assert layer.on_gpu
    x = RNG.standard_normal((t, k)).astype(np.float32)
    ref = _reference(weight, x)
    scale = np.abs(ref).max()
    # MLX's matmul runs float32 on TF32 tensor cores on CUDA (10-bit mantissa): hence the
    # loose float32 bound.
    for dtype, tol in [(mx.float32, 2e-3), (mx.float16, 4e-3), (mx.bfloat16, 3e-2)]:
        xd = mx.array(x).astype(dtype)
        y = layer(xd)
        assert y.dtype == dtype and y.shape == (t, rows)
        exact_x = np.array(xd.astype(mx.float32)).astype(np.float64)
        ref_d = exact_x @ dequantize_q4k(weight.blocks, weight.shape).T.astype(np.float64)
        np.testing.assert_allclose(np.array(y.astype(mx.float32)), ref_d, rtol=0, atol=tol * scale)


@pytest.mark.gpu
def test_kernel_shapes_and_dequant_exact() -> None:
    weight = _weight(300, 1024)
    layer = Q4KLinear(weight)
    np.testing.assert_array_equal(np.array(layer.dequantize()).view(np.uint32),
                                  dequantize_q4k(weight.blocks, weight.shape).view(np.uint32))
    x = mx.array(RNG.standard_normal((2, 3, 1024)).astype(np.float32))
    assert layer(x).shape == (2, 3, 300) and layer(x[0, 0]).shape == (300,)
