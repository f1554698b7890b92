"""A Q4_K linear layer for MLX: y = x @ W.T with W stored as llama.cpp Q4_K blocks.

Every Q4_K sub-block of 32 weights is an affine 4-bit group: w = (d*sc) * q - (dmin*m). That
is exactly MLX's `mx.quantize(bits=4, group_size=32)` form w = scale * q + bias, so the layer
repacks the blocks once (nibbles reordered into MLX's uint32 words, 8 nibbles per word, low
nibble first) and calls `mx.quantized_matmul`; this path runs on every backend (CPU included).

Exactness: with float32 scales/biases (the default) the repack is lossless: d*sc and dmin*m
are exact in float32 (an 11-bit fp16 mantissa times a 6-bit integer) and scale*q is exact too
(21 bits), so mx.dequantize gives dequantize_q4k's values bit for bit. With
scale_dtype=mx.float16 the scales and biases are rounded to fp16 (relative error <= 2^-11, well
below the 4-bit quantization error) and the matmul runs in fp16.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_rwkv.quant import BLOCK_BYTES, QK_K, SUB, Q4KTensor, unpack_scales

GROUP, BITS = SUB, 4


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
    """One Q4_K weight [rows, K] as an MLX layer: `layer(x[..., K]) -> y[..., rows]` in x.dtype."""

    def __init__(self, weight: Q4KTensor, scale_dtype: mx.Dtype = mx.float32) -> None:
        self.shape = weight.shape
        wq, scales, biases = repack_q4k(weight)
        self.wq = mx.array(wq)
        self.scales = mx.array(scales).astype(scale_dtype)
        self.biases = mx.array(biases).astype(scale_dtype)

    def __call__(self, x: mx.array) -> mx.array:
        rows, k = self.shape
        if x.shape[-1] != k:
            raise ValueError(f"Q4KLinear expects inputs [..., {k}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).astype(self.scales.dtype)  # 2-D: quantized_matmul fails on 1-D input on CUDA
        y = mx.quantized_matmul(x2, self.wq, self.scales, self.biases, transpose=True,
                                group_size=GROUP, bits=BITS)
        return y.astype(x.dtype).reshape(*lead, rows)

    def dequantize(self) -> mx.array:
        """The weights [rows, K] as MLX sees them (for tests)."""
        return mx.dequantize(self.wq, self.scales, self.biases, group_size=GROUP, bits=BITS)
