"""GGUF Q4_K quantization (llama.cpp `block_q4_K`) in vectorized numpy.

A row of K weights (K a multiple of 256) is stored as K/256 super-blocks of 144 bytes:
`half d; half dmin; uint8 scales[12]; uint8 qs[128]`. Each super-block holds 8 sub-blocks of
32 weights with a 6-bit scale sc_j and a 6-bit min m_j; weight = d*sc_j*q - dmin*m_j, q in 0..15.
Nibbles: chunk c (0..3) of qs holds sub-block 2c in its low nibbles and 2c+1 in its high ones.

The quantizer follows llama.cpp's `quantize_row_q4_K_ref`: a weighted least-squares search of
scale/min per sub-block (`make_qkx2_quants`, weights av|x| + |x|, 21 candidate scales), the
6-bit quantization of those scales/mins against d = max_scale/63 and dmin = max_min/63, then
the requantization of every weight with the quantized sub-block scales. It runs over all
sub-blocks at once, in cache-sized chunks spread over the CPU cores.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from mlx_rwkv.config import CheckpointError, ModelConfig, shapes_of

if TYPE_CHECKING:  # mlx_rwkv.checkpoint is imported lazily: its loader may dispatch to this module
    from mlx_rwkv.checkpoint import Checkpoint

QK_K = 256  # weights per super-block
BLOCK_BYTES = 144  # 2 + 2 + 12 + 128
BLOCK_WORDS = BLOCK_BYTES // 4  # a super-block as uint32 words (the GPU kernels' view)
SUB = 32  # weights per sub-block
_CHUNK_SUBBLOCKS = 8192  # 256K weights (1 MiB of fp32) per work item: stays in cache

# Linear weights [out, in] that are stored as Q4_K (the head only on request).
LINEAR_SUFFIXES = (
    "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
    "ffn.key.weight", "ffn.value.weight",
)
HEAD_KEY = "head.weight"


@dataclass(frozen=True)
class Q4KTensor:
    """One Q4_K weight matrix: `blocks` uint8 [rows, K/256*144] for a logical fp shape (rows, K)."""

    blocks: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        rows, k = self.shape
        if k % QK_K:
            raise ValueError(f"Q4_K needs the row length to be a multiple of {QK_K}, got {k}")
        expected = (rows, k // QK_K * BLOCK_BYTES)
        if self.blocks.dtype != np.uint8 or self.blocks.shape != expected:
            raise ValueError(f"Q4_K blocks for shape {self.shape} must be uint8 {expected}, "
                             f"got {self.blocks.dtype} {self.blocks.shape}")

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def dequantize(self) -> np.ndarray:
        """The float32 [rows, K] weights these blocks encode."""
        return dequantize_q4k(self.blocks, self.shape)


def is_quantizable(key: str, include_head: bool = True) -> bool:
    """Whether `key` names a weight that quantize_model turns into Q4_K."""
    return key.endswith(LINEAR_SUFFIXES) or (include_head and key == HEAD_KEY)


# ---------------------------------------------------------------- quantization

def _check_matrix(w: np.ndarray) -> np.ndarray:
    if not isinstance(w, np.ndarray) or w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        raise TypeError(f"quantize_q4k needs a float numpy array, got {getattr(w, 'dtype', type(w))}")
    if w.ndim != 2:
        raise ValueError(f"quantize_q4k needs a 2-D [rows, K] matrix, got shape {w.shape}")
    if w.shape[1] % QK_K:
        raise ValueError(f"Q4_K needs the row length K to be a multiple of {QK_K}; "
                         f"shape {w.shape} has K % {QK_K} = {w.shape[1] % QK_K}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError("cannot quantize a matrix with NaN or infinite values")
    return w


def _subblock_scales(xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qkx2_quants(nmax=15, rmin=-1, rdelta=0.1, nstep=20) on each column of xt [32, n].

    Returns (scale [n], min [n]): the sub-block dequantizes to scale*l - min, with min >= 0.
    Sub-blocks are columns so that every pass is a contiguous SIMD loop. Each candidate grid
    costs one pass to form the codes l and three weighted sums; its squared error is expanded,
    sum w (a l + b - x)^2 = a^2 Swll + 2ab Swl - 2a Swlx + b^2 Sw - 2b Swx + Swxx (the last
    term is common to all candidates and dropped), and the best of the 22 is picked at the end
    (the first on ties, as llama.cpp keeps the earlier one unless strictly better).
    """
    f32 = np.float32
    n = xt.shape[1]
    w = np.abs(xt)
    w += np.sqrt(np.einsum("ij,ij->j", xt, xt) / f32(SUB))  # weights av|x| + |x|
    lo = np.minimum(xt.min(axis=0), f32(0))
    rng = xt.max(axis=0) - lo
    flat = rng == 0
    rng = np.where(flat, f32(1), rng)
    xm = xt - lo
    wx = w * xt
    sw = w.sum(axis=0)
    swx = wx.sum(axis=0)

    # Candidate grids: first the plain min/max one (nmax/range), then (nmax + rmin + rdelta*is)/range.
    factors = [f32(15)] + [f32(-1) + f32(0.1) * f32(i) + f32(15) for i in range(21)]
    swl, swll, swlx = (np.empty((len(factors), n), dtype=f32) for _ in range(3))
    iscale0 = f32(15) / rng
    l = np.empty_like(xt)
    wl = np.empty_like(xt)
    cap = np.full(n, 15, dtype=f32)
    for i, f in enumerate(factors):
        np.multiply(xm, f / rng, out=l)
        np.rint(l, out=l)
        if f > f32(15.4):  # codes reach 16 only when f >= 15.5; xm >= 0, so none is below 0
            np.minimum(l, cap, out=l)
        np.multiply(w, l, out=wl)
        swl[i] = wl.sum(axis=0)
        swll[i] = np.einsum("ij,ij->j", wl, l)
        swlx[i] = np.einsum("ij,ij->j", l, wx)

    det = sw * swll - swl * swl
    ok = det > 0
    det[~ok] = 1
    a = (sw * swlx - swx * swl) / det  # weighted least-squares fit x ~ a l + b
    b = (swll * swx - swl * swlx) / det
    clamp = b > 0  # a positive offset would need codes below 0: pin it to 0 and refit the scale
    b[clamp] = 0
    a[clamp] = swlx[clamp] / swll[clamp]  # swll > 0 where det > 0
    # At a least-squares optimum the residual is orthogonal to the fitted terms, so the error
    # is Swxx - a Swlx - b Swx (also with b pinned to 0, where a is the fit through the origin).
    err = -(a * swlx + b * swx)
    a[0] = f32(1) / iscale0  # the plain grid keeps its own scale and offset: full expansion
    b[0] = lo
    ok[0] = True
    err[0] = a[0] * (a[0] * swll[0] + 2 * b[0] * swl[0] - 2 * swlx[0]) + b[0] * (b[0] * sw - 2 * swx)
    err[~ok] = np.inf
    best = np.argmin(err, axis=0)
    cols = np.arange(n)
    scale = np.where(flat, f32(0), a[best, cols])
    return scale.astype(f32), (-b[best, cols]).astype(f32)


def _quantize_superblocks(x: np.ndarray) -> np.ndarray:
    """x float32 [nb, 256] -> uint8 [nb, 144]."""
    f32 = np.float32
    nb = x.shape[0]
    scale, mn = _subblock_scales(np.ascontiguousarray(x.reshape(nb * 8, SUB).T))
    scale = scale.reshape(nb, 8)
    mn = mn.reshape(nb, 8)
    max_scale = scale.max(axis=1)
    max_min = mn.max(axis=1)
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.minimum(np.rint(inv_scale[:, None] * scale), 63).astype(np.uint8)  # [nb, 8]
    lm = np.minimum(np.rint(inv_min[:, None] * mn), 63).astype(np.uint8)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)

    # Requantize with the scales as the decoder will see them.
    dsc = d.astype(f32)[:, None] * ls.astype(f32)  # [nb, 8]
    dm = dmin.astype(f32)[:, None] * lm.astype(f32)
    zero = dsc == 0
    xs = x.reshape(nb, 8, SUB) + dm[:, :, None]
    xs /= np.where(zero, f32(1), dsc)[:, :, None]
    np.rint(xs, out=xs)
    np.clip(xs, 0, 15, out=xs)
    q = xs.astype(np.uint8)
    q[zero] = 0  # a zero scale decodes to -dm whatever the codes are

    out = np.empty((nb, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = _pack_scales(ls, lm)
    q = q.reshape(nb, 4, 2, SUB)  # chunk c: sub-blocks 2c (low nibble) and 2c+1 (high nibble)
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    return out


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales/mins [nb, 8] -> the 12 packed bytes of block_q4_K."""
    s = np.empty((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    s[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return s


def unpack_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes [..., 12] -> (sc, m) uint8 [..., 8] (DESIGN.md formula)."""
    q = packed
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, m


def quantize_q4k(w: np.ndarray) -> np.ndarray:
    """Quantize a float matrix [rows, K] to Q4_K blocks uint8 [rows, K/256*144].

    Raises TypeError for a non-float array, ValueError when w is not 2-D, when K is not a
    multiple of 256 (Q4_K has no partial super-blocks; pad or keep such tensors in float) or
    when w holds NaN/inf.
    """
    w = _check_matrix(w)
    rows, k = w.shape
    sb = w.reshape(-1, QK_K)
    out = np.empty((sb.shape[0], BLOCK_BYTES), dtype=np.uint8)
    step = _CHUNK_SUBBLOCKS // 8

    def work(start: int) -> None:
        out[start:start + step] = _quantize_superblocks(sb[start:start + step])

    starts = range(0, sb.shape[0], step)
    if len(starts) == 1:
        work(0)
    else:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(work, starts))  # numpy releases the GIL inside the big ufuncs
    return out.reshape(rows, k // QK_K * BLOCK_BYTES)


def dequantize_q4k(blocks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Q4_K blocks uint8 [rows, K/256*144] -> float32 [rows, K] (same arithmetic as gguf.quants)."""
    rows, k = shape
    if k % QK_K or blocks.dtype != np.uint8 or blocks.size != rows * k // QK_K * BLOCK_BYTES:
        raise ValueError(f"not Q4_K blocks of a {rows}x{k} matrix: {blocks.dtype} {blocks.shape}")
    b = np.ascontiguousarray(blocks).reshape(-1, BLOCK_BYTES)
    nb = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = unpack_scales(b[:, 4:16])
    dsc = (d * sc.astype(np.float32))[:, :, None]  # [nb, 8, 1]
    dm = (dmin * m.astype(np.float32))[:, :, None]
    qs = b[:, 16:].reshape(nb, 4, 1, SUB) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & np.uint8(15)).reshape(nb, 8, SUB).astype(np.float32)
    return (dsc * q - dm).reshape(rows, k)


# ---------------------------------------------------------------- whole models

def quantize_model(weights: Mapping[str, np.ndarray], include_head: bool = True,
                   progress: bool = True) -> dict[str, np.ndarray | Q4KTensor]:
    """Replace the linear weights (att r/k/v/o, ffn key/value, and head if asked) by Q4KTensor.

    Keys and every other tensor (embedding, norms, LoRA, mixing vectors) are unchanged; a value
    that is already a Q4KTensor stays as it is.
    """
    todo = [k for k, v in weights.items() if is_quantizable(k, include_head) and not isinstance(v, Q4KTensor)]
    bad = [f"{k} {list(weights[k].shape)}" for k in todo if weights[k].ndim != 2 or weights[k].shape[1] % QK_K]
    if bad:
        raise ValueError(f"Q4_K needs 2-D weights with a row length that is a multiple of {QK_K}; "
                         f"{len(bad)} tensor(s) are not: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    out: dict[str, np.ndarray | Q4KTensor] = dict(weights)
    total = sum(weights[k].size for k in todo)
    with tqdm(total=total, unit="w", unit_scale=True, desc="Q4_K", disable=not progress or not todo) as bar:
        for key in todo:
            w = weights[key]
            try:
                out[key] = Q4KTensor(quantize_q4k(w), tuple(w.shape))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{key}: {e}") from None
            bar.update(w.size)
    return out


def dequantize_model(weights: Mapping[str, np.ndarray | Q4KTensor]) -> dict[str, np.ndarray]:
    """Every Q4KTensor replaced by its float32 weights (for oracles and tests)."""
    return {k: v.dequantize() if isinstance(v, Q4KTensor) else v for k, v in weights.items()}


# ---------------------------------------------------------------- files
# A quantized model is a .safetensors file: Q4_K tensors as uint8 blocks under "<key>.q4k",
# every other tensor as it was, and metadata {"mlx_rwkv.format": "q4k",
# "mlx_rwkv.q4k_shapes": JSON {key: [rows, K]}}.

FORMAT_KEY, FORMAT, SHAPES_KEY, SUFFIX = "mlx_rwkv.format", "q4k", "mlx_rwkv.q4k_shapes", ".q4k"


def save_quantized(weights: Mapping[str, np.ndarray | Q4KTensor], path: str | Path, replace: bool = False) -> Path:
    """Write a (partly) Q4_K model as .safetensors, atomically (temp file + rename); an existing
    file is replaced only with replace=True (else OutputExistsError, a FileExistsError)."""
    from mlx_rwkv.checkpoint.files import atomic_path

    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in weights.items():
        if isinstance(value, Q4KTensor):
            tensors[key + SUFFIX] = np.ascontiguousarray(value.blocks)
            shapes[key] = list(value.shape)
        else:
            tensors[key] = np.ascontiguousarray(value)
    metadata = {FORMAT_KEY: FORMAT, SHAPES_KEY: json.dumps(shapes)}
    with atomic_path(path, replace) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def is_quantized_file(path: str | Path) -> bool:
    """Whether `path` is a .safetensors file written by save_quantized."""
    try:
        with safe_open(str(path), "np") as f:
            return (f.metadata() or {}).get(FORMAT_KEY) == FORMAT
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return False


def load_quantized(path: str | Path) -> "Checkpoint":
    """Read a file written by save_quantized -> Checkpoint(config, weights, path, "q4k")."""
    from mlx_rwkv.checkpoint import Checkpoint

    path = Path(path)
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            if meta.get(FORMAT_KEY) != FORMAT:
                raise CheckpointError(f"{path} is not a Q4_K model written by mlx-rwkv "
                                      f"(metadata {FORMAT_KEY!r} is {meta.get(FORMAT_KEY)!r})")
            shapes = json.loads(meta.get(SHAPES_KEY, "{}"))
            raw = {key: f.get_tensor(key) for key in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read the quantized model {path}: {e}") from None
    weights: dict[str, np.ndarray | Q4KTensor] = {}
    for key, value in raw.items():
        if key.endswith(SUFFIX) and key[: -len(SUFFIX)] in shapes:
            name = key[: -len(SUFFIX)]
            try:
                weights[name] = Q4KTensor(value, tuple(shapes[name]))
            except ValueError as e:
                raise CheckpointError(f"{path}: {name}: {e}") from None
        else:
            weights[key] = value
    return Checkpoint(ModelConfig.from_shapes(shapes_of(weights)), weights, path, FORMAT)
