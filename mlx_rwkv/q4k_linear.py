"""A Q4_K linear layer for MLX: y = x @ W.T with W stored as llama.cpp Q4_K blocks.

On a GPU backend (Metal, CUDA) the blocks stay as they are: `expand_q4k`
(`metal_kernels/q4k_dequant.inc`) expands the whole matrix for each call, then MLX's matmul
runs (prefill is compute-bound). Decode does not come here: `matvec.ProjectionGroup` reads the
blocks directly in its grouped mat-vec kernel, and expands all of a group's Q4_K matrices in
one `expand_q4k` launch for prefill.

On CPU (no custom kernels) the layer uses the fallback: every Q4_K sub-block of 32 weights is
an affine 4-bit group w = (d*sc) * q - (dmin*m), exactly MLX's `mx.quantize(bits=4,
group_size=32)` form w = scale * q + bias, so the blocks are repacked once (nibbles reordered
into MLX's uint32 words, 8 nibbles per word, low nibble first) for `mx.quantized_matmul`.

Exactness: with float32 scales/biases (the default) the repack is lossless: d*sc and dmin*m
are exact in float32 (an 11-bit fp16 mantissa times a 6-bit integer) and scale*q is exact too
(21 bits), so mx.dequantize gives dequantize_q4k's values bit for bit. With
scale_dtype=mx.float16 the scales and biases are rounded to fp16 (relative error <= 2^-11, well
below the 4-bit quantization error) and the matmul runs in fp16.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_rwkv.kernels import KernelSpec, get_kernel
from mlx_rwkv.quant import BLOCK_BYTES, BLOCK_WORDS, QK_K, SUB, Q4KTensor, unpack_scales

GROUP, BITS = SUB, 4
# wq / wh: the same blocks viewed as uint32 words and as halves (d, dmin readable as float)
Q4K_DEQUANT = KernelSpec(name="q4k_dequant", inputs=("wq", "wh"), outputs=("w",))
_OUTPUT_FORMAT = {mx.float16: 0, mx.bfloat16: 1, mx.float32: 2}  # OFMT of q4k_dequant.inc


def expand_q4k(words: mx.array, dtype: mx.Dtype) -> mx.array:
    """Q4_K blocks on the GPU (uint32 words, 36 per block; blocks of several matrices may follow
    each other) -> their weights, flat (blocks * 256,) in `dtype`, in one kernel launch."""
    kernel = get_kernel(Q4K_DEQUANT)
    if kernel is None:
        raise RuntimeError("expand_q4k needs a GPU backend (Metal or CUDA)")
    blocks = words.size // BLOCK_WORDS
    per_word = 1 if dtype == mx.float32 else 2  # weights per output word
    (w,) = kernel(
        inputs=[words, mx.view(words, mx.float16)], template=[("OFMT", _OUTPUT_FORMAT[dtype]), ("BLOCKS", blocks)],
        grid=(-(-blocks * 32 // 256) * 256, 1, 1), threadgroup=(256, 1, 1),  # 32 threads per block
        output_shapes=[(blocks * QK_K // per_word,)], output_dtypes=[mx.uint32])
    return mx.view(w, dtype)


def repack_q4k(weight: Q4KTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K blocks -> MLX affine 4-bit group-32 arrays (wq uint32 [rows, K/8], scales, biases
    float32 [rows, K/32]) that mx.dequantize maps to the same weights."""
    rows, k = weight.shape
    b = np.ascontiguousarray(weight.blocks).reshape(rows, k // QK_K, BLOCK_BYTES)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [rows, nb, 1]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = unpack_scales(b[..., 4:16])  # [rows, nb, 8]
    scales = (d * sc.astype(np.float32)).reshape(rows, k // GROUP)
    biases = -(dmin * m.astype(np.float32)).reshape(rows, k // GROUP)
    qs = b[..., 16:].reshape(rows, -1, 1, 32)  # [rows, nb*4 chunks, 1, 32]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(rows, k)  # weights in order
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # two nibbles per byte, the earlier one low
    wq = np.ascontiguousarray(packed).view("<u4")  # little-endian words: nibble 0 in bits 0-3
    return wq, scales, biases


class Q4KLinear:
    """One Q4_K weight [rows, K] as an MLX layer: `layer(x[..., K]) -> y[..., rows]` in x.dtype.

    scale_dtype applies to the CPU fallback only (see the module docstring).
    """

    def __init__(self, weight: Q4KTensor, scale_dtype: mx.Dtype = mx.float32) -> None:
        self.shape = weight.shape
        self.on_gpu = get_kernel(Q4K_DEQUANT) is not None
        if self.on_gpu:
            self.words = mx.view(mx.array(weight.blocks).reshape(-1), mx.uint32)
        else:
            wq, scales, biases = repack_q4k(weight)
            self.wq = mx.array(wq)
            self.scales = mx.array(scales).astype(scale_dtype)
            self.biases = mx.array(biases).astype(scale_dtype)

    def __call__(self, x: mx.array) -> mx.array:
        rows, k = self.shape
        if x.shape[-1] != k:
            raise ValueError(f"Q4KLinear expects inputs [..., {k}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)  # 2-D: quantized_matmul fails on 1-D input on CUDA
        if self.on_gpu:
            y = x2 @ self._dense(x.dtype).T
        else:
            y = mx.quantized_matmul(x2.astype(self.scales.dtype), self.wq, self.scales, self.biases,
                                    transpose=True, group_size=GROUP, bits=BITS).astype(x.dtype)
        return y.reshape(*lead, rows)

    def _dense(self, dtype: mx.Dtype) -> mx.array:
        return expand_q4k(self.words, dtype).reshape(self.shape)

    def dequantize(self) -> mx.array:
        """The weights [rows, K] as this layer uses them, float32 (for tests)."""
        if self.on_gpu:
            return self._dense(mx.float32)
        return mx.dequantize(self.wq, self.scales, self.biases, group_size=GROUP, bits=BITS)
