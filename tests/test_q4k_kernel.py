"""The Q4_K kernels (metal_kernels/q4k_*.inc) against dequantize_q4k + a float matmul.

GPU tests run the real kernels through Q4KLinear on Metal or CUDA. The CPU tests compile the
same portable kernel bodies as plain C++ (g++, one call per GPU thread, threadgroups in
sequence) so that the algorithm is checked in CI too, where no GPU exists.
"""
from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_rwkv.kernels import read_source
from mlx_rwkv.q4k_linear import MAX_MATVEC_ROWS, Q4KLinear
from mlx_rwkv.quant import Q4KTensor, dequantize_q4k, quantize_q4k

RNG = np.random.default_rng(7)


@functools.cache
def _weight(rows: int, k: int) -> Q4KTensor:
    w = RNG.standard_normal((rows, k)).astype(np.float32) * 0.02
    return Q4KTensor(quantize_q4k(w), (rows, k))


def _reference(weight: Q4KTensor, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ dequantize_q4k(weight.blocks, weight.shape).T.astype(np.float64)


# ---- the kernel bodies as C++ on the CPU ----------------------------------------------------------

# One GPU thread = one call of `body`. A kernel with one barrier runs each threadgroup twice:
# phase 0 stops every thread at the barrier (all shared-memory writes done), phase 1 runs them
# again (rewriting the same values) and lets them through.
HARNESS = """
#include <cstdint>
typedef unsigned int uint;
typedef float TX;
constexpr uint ROWS = {rows}, K = {k}, NT = {nt};
static int phase;
#define SHARED static
#define BARRIER() if (phase == 0) return
static void body(uint tid, uint gid, const uint32_t* wq, const _Float16* wh, const float* x,
                 float* {out}) {{
#include "{source}"
}}
extern "C" void run(const uint32_t* wq, const _Float16* wh, const float* x, float* out,
                    uint groups, uint threads, int phases) {{
  for (uint g = 0; g < groups; ++g)
    for (phase = 2 - phases; phase < 2; ++phase)
      for (uint t = 0; t < threads; ++t) body(t, g, wq, wh, x, out);
}}
"""


def _compile(tmp_path: Path, kernel: str, out: str, rows: int, k: int, nt: int = 1) -> ctypes.CDLL:
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to run the kernel bodies on the CPU")
    (tmp_path / f"{kernel}.inc").write_text(read_source(f"{kernel}.inc"))
    src = tmp_path / f"{kernel}_{rows}_{k}_{nt}.cpp"
    src.write_text(HARNESS.format(rows=rows, k=k, nt=nt, out=out, source=f"{kernel}.inc"))
    lib = src.with_suffix(".so")
    result = subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-o", str(lib), str(src)],
                            capture_output=True, text=True)
    if result.returncode and "_Float16" in result.stderr:
        pytest.skip("this g++ has no _Float16")
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(lib))


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


@pytest.mark.parametrize("rows, k, nt", [(7, 256, 1), (64, 512, 3), (130, 2048, 8), (4, 768, 2)])
def test_matvec_body_on_cpu(tmp_path: Path, rows: int, k: int, nt: int) -> None:
    weight = _weight(rows, k)
    lib = _compile(tmp_path, "q4k_matvec", "y", rows, k, nt)
    x = RNG.standard_normal((nt, k)).astype(np.float32)
    y = np.full((nt, rows), np.nan, np.float32)
    blocks = np.ascontiguousarray(weight.blocks)
    lib.run(_ptr(blocks), _ptr(blocks), _ptr(x), _ptr(y), -(-rows // 4), 64, 2)
    ref = _reference(weight, x)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("rows, k", [(3, 256), (17, 1024)])
def test_dequant_body_on_cpu_is_exact(tmp_path: Path, rows: int, k: int) -> None:
    weight = _weight(rows, k)
    lib = _compile(tmp_path, "q4k_dequant", "w", rows, k)
    w = np.full((rows, k), np.nan, np.float32)
    blocks = np.ascontiguousarray(weight.blocks)
    lib.run(_ptr(blocks), _ptr(blocks), None, _ptr(w), -(-rows * k // 8 // 256), 256, 1)
    np.testing.assert_array_equal(w.view(np.uint32), dequantize_q4k(weight.blocks, weight.shape).view(np.uint32))


# ---- the kernels on a GPU -----------------------------------------------------------------------

SHAPES = [(2048, 2048), (2560, 2560), (4096, 4096), (8192, 2048), (2048, 8192), (65536, 2048), (100, 768)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k", SHAPES)
@pytest.mark.parametrize("t", [1, 3, 8, 9, 64])
def test_kernel_matches_dequantized_matmul(rows: int, k: int, t: int) -> None:
    weight = _weight(rows, k)
    layer = Q4KLinear(weight)
    assert layer.kernel is not None
    x = RNG.standard_normal((t, k)).astype(np.float32)
    ref = _reference(weight, x)
    scale = np.abs(ref).max()
    # Beyond MAX_MATVEC_ROWS the layer dequantizes and calls MLX's matmul, which runs float32
    # on TF32 tensor cores on CUDA (10-bit mantissa): hence the looser float32 bound there.
    f32_tol = 1e-5 if t <= MAX_MATVEC_ROWS else 2e-3
    for dtype, tol in [(mx.float32, f32_tol), (mx.float16, 4e-3), (mx.bfloat16, 3e-2)]:
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
