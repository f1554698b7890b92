"""Projection groups: several y_s = act_s(x_s @ W_s^T) that decode runs as one kernel launch.

A decode step is bound by launches, not arithmetic: on MLX-CUDA every graph node costs
microseconds of dispatch. So the projections that read the same kind of input run together:
r/k/v with the four LoRA down-projections (their activations fused), the four LoRA
up-projections, and the FFN key with its squared ReLU. `metal_kernels/matvec.inc` does up to
MAX_ROWS activation rows (batch x tokens), each SIMD-group computing ROWS_PER_SIMDGROUP output rows
(ROWS_PER_SIMDGROUP_MULTI for several activation rows), reading dense
(fp16/bf16/fp32) or Q4_K weights with 16-byte loads (so every K and x_base must be a multiple
of 8, and x must start 16-byte aligned; other groups never use the kernel). Above MAX_ROWS
(prefill) each segment is an ordinary matmul (`Dense` or `Q4KLinear`).

On the CPU, float32 groups run in numpy instead (`host`, for RWKV7's CPU path): MLX's Linux CPU
wheels do their matmuls in the reference (netlib) BLAS they ship, numpy in OpenBLAS. Measured on
2 Xeon cores (MLX 0.32.4, numpy 2.4 with OpenBLAS 0.3.31): the 65536 x 768 head mat-vec 99 ms in
MLX, 5.5 ms in numpy (torch with MKL, the official package's engine: 4.9 ms).

Layout: the input `x` is one flat buffer in which segment s reads its (nt, K_s) rows at
nt * x_base_s; the output is one flat buffer with segment s's (nt, rows_s) at nt * y_base_s
(y_base_s = rows of the segments before it). `split` views the segments without copying.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .kernels import KernelSpec, get_kernel, gpu_backend, int_params
from .norm_mix import norm_mix
from .quant import BLOCK_WORDS, QK_K, Q4KTensor

if TYPE_CHECKING:
    from .q4k_linear import Q4KLinear

MATVEC = KernelSpec(name="matvec", inputs=("seg", "wd", "wq", "x", "dims"), outputs=("y",),
                    sources=("load8.inc", "matvec_head.inc", "matvec_x.inc", "matvec.inc"))
# the same with norm_mix's work (residual add, LayerNorm, token-shift mix) in a prologue
MATVEC_NORM = KernelSpec(name="matvec_norm",
                         inputs=("seg", "wd", "wq", "x_in", "dx", "x_prev", "ln_w", "ln_b", "mix", "dims"),
                         outputs=("y", "x_out", "h_out"),
                         sources=("load8.inc", "matvec_head.inc", "matvec_norm.inc", "row_norm.inc", "matvec.inc"))
ACTIVATIONS = {"none": 0, "tanh": 1, "sigmoid": 2, "relu2": 3}
Q4K_KIND = 4
TILE_ROWS = 8  # activation rows a SIMD-group computes at once (NT template: one build per count)
MAX_ROWS = 64  # activation rows per launch (batched decode); more (prefill) run as matmuls
NORM_TILE_BYTES = 16384  # MATVEC_NORM's prologue output in threadgroup memory (Metal: 32 KiB in all)
# output rows per SIMD-group for one activation row / several: the activations a SIMD-group
# loads serve all its rows, and with several tokens each weight (Q4_K: dequantized once) serves
# every token, so more rows pay off there. H100 sweep: python -m bench.bench_q4k
# (Q4_K at 8 tokens and 4 rows takes 182 of the 255 registers a thread may have: check
# `python -m bench.kernel_resources` before adding work to that branch.)
ROWS_PER_SIMDGROUP = 2
ROWS_PER_SIMDGROUP_MULTI = 4
Q4K_BLOCKS_IN_FLIGHT = 1  # Q4_K super-blocks each lane loads ahead per row (registers vs latency)
WARPS = 8  # SIMD-groups per threadgroup
_FMT = {mx.float16: 0, mx.bfloat16: 1, mx.float32: 2}
# CPU (numpy) matmuls (see _host_matmul): up to HOST_MATVEC_ROWS activation rows one mat-vec each,
# more in blocks of exactly HOST_ROWS rows. OpenBLAS's matmul has a fixed cost per call (it repacks
# the weights): the 0.1B shape's layer matrices took, per 4 layers, 3.3 ms for one row (mat-vec),
# 12.5 ms for 2 rows, 23 for 64, 36 for 128, 56 for 256 (2 Xeon cores), so a row costs 0.28 ms in
# 128-row blocks, 0.37 in 64-row ones, and mat-vecs win below ~10 rows.
HOST_ROWS = 128
HOST_MATVEC_ROWS = 8


@dataclass
class Segment:
    """One projection: weight (rows, K) dense or Q4_K, its activation, where its input starts."""

    weight: np.ndarray | Q4KTensor
    act: str = "none"
    x_base: int = 0


class Dense:
    """y = x W^T for W (out, in)."""

    def __init__(self, weight: mx.array):
        self.weight = weight

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.T


def _activate(y: mx.array, act: str) -> mx.array:
    if act == "tanh":
        return mx.tanh(y)
    if act == "sigmoid":
        return mx.sigmoid(y)
    if act == "relu2":
        return mx.square(mx.maximum(y, 0))
    return y


def _host_matmul(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out = x w^T for x (n, K), w (rows, K), each row's bits independent of the other rows.

    Up to HOST_MATVEC_ROWS rows (decode, small batches) are one mat-vec each. More rows go in
    blocks of exactly HOST_ROWS, the last one zero-padded: OpenBLAS picks its kernels and blocking
    by the matrix sizes, so a row's result changed with the row count of the call (a prompt split
    over two calls differed in the last bits from one call), never with its place in a call of a
    given size (tests/test_cpu_path.py). So rows of calls longer than HOST_MATVEC_ROWS always agree
    bit for bit; a mat-vec row and a block row agree to float32 rounding (as decode and prefill).
    """
    n = x.shape[0]
    if n <= HOST_MATVEC_ROWS:
        for i in range(n):
            np.matmul(x[i: i + 1], w.T, out=out[i: i + 1])
        return
    for start in range(0, n, HOST_ROWS):
        block = x[start: start + HOST_ROWS]
        if len(block) == HOST_ROWS:
            np.matmul(block, w.T, out=out[start: start + HOST_ROWS])
        else:
            padded = np.zeros((HOST_ROWS, x.shape[1]), x.dtype)
            padded[: len(block)] = block
            out[start:] = (padded @ w.T)[: len(block)]


def sigmoid_host(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) in numpy, in place (no temporaries: each new array is cold memory)."""
    with np.errstate(over="ignore"):  # exp(-x) -> inf gives the right limit, 0
        np.exp(np.negative(x, out=x), out=x)
    x += 1
    return np.reciprocal(x, out=x)


def _activate_host(y: np.ndarray, act: str) -> None:
    """`_activate` in numpy, in place."""
    if act == "tanh":
        np.tanh(y, out=y)
    elif act == "sigmoid":
        sigmoid_host(y)
    elif act == "relu2":
        np.maximum(y, 0, out=y)
        np.square(y, out=y)


def pack_host_weights(groups: list["ProjectionGroup"]) -> None:
    """Move the numpy weights of these groups into one buffer. numpy asks Linux for transparent huge
    pages only for arrays of 4 MB or more, so each 768 x 768 or LoRA matrix of the 0.1B shape sat on
    4 KB pages (TLB misses): in one buffer, decode ran 2-4% faster (2 Xeon cores)."""
    buf = np.empty(sum(w.size for g in groups for w in g.host_weights), np.float32)
    start = 0
    for g in groups:
        views = []
        for w in g.host_weights:
            views.append(buf[start: start + w.size].reshape(w.shape))
            views[-1][...] = w
            start += w.size
        g.set_host_weights(views)  # the group's own arrays are freed here


class ProjectionGroup:
    """Segments applied to one flat input; `group(x, nt)` -> flat output, `split` -> views."""

    def __init__(self, segments: list[Segment], dtype: mx.Dtype):
        self.shapes = [tuple(s.weight.shape) for s in segments]
        self.acts = [s.act for s in segments]
        self.x_bases = [s.x_base for s in segments]
        self.y_bases = list(np.cumsum([0] + [rows for rows, _ in self.shapes[:-1]]))
        self.rows = sum(rows for rows, _ in self.shapes)  # output rows of all segments
        self.dtype = dtype
        self.has_q4k = any(isinstance(s.weight, Q4KTensor) for s in segments)
        self.kernel = get_kernel(MATVEC)
        self.host_weights = None
        if self.kernel is not None and all(k % 8 == 0 for _, k in self.shapes) \
                and all(base % 8 == 0 for base in self.x_bases):
            self._pack(segments)
        elif gpu_backend() is None and dtype == mx.float32 and not self.has_q4k:
            # CPU float32 (`host`): the weights as new numpy arrays only. numpy asks Linux for
            # transparent huge pages on large arrays, MLX does not: the head mat-vec took 5.5 ms
            # over numpy's memory, 7.2 ms over MLX's (TLB misses)
            self.kernel, self.linears = None, []
            self.set_host_weights([np.array(s.weight, dtype=np.float32) for s in segments])
        else:
            self.kernel = None
            self.linears = [_linear(s.weight, dtype) for s in segments]
        # materialize now: a lazy weight captured by the compiled decode step would be
        # recomputed (re-packed) on every step
        mx.eval([vars(layer) for layer in self.linears if layer is not None], self.__dict__)

    def to_mlx(self) -> None:
        """Run as MLX ops from now on (a model that is not all on the host is traced by mx.compile)."""
        if self.host_weights is not None:
            self.linears = [_linear(w, self.dtype) for w in self.host_weights]
            self.host_weights = self._host_segments = None
            mx.eval([vars(layer) for layer in self.linears])

    def set_host_weights(self, weights: list[np.ndarray]) -> None:
        """Run in numpy (`host`) on these float32 (rows, K) weights, one per segment."""
        self.host_weights = weights
        self._host_segments = [(w, slice(xb, xb + k), slice(yb, yb + rows), act) for w, (rows, k), act, xb, yb
                               in zip(weights, self.shapes, self.acts, self.x_bases, self.y_bases)]

    @property
    def on_host(self) -> bool:
        """Whether this group runs in numpy (`host`): dense float32 weights on the CPU."""
        return self.host_weights is not None

    def __call__(self, x: mx.array, nt: int) -> mx.array:
        """All segments for nt activation rows: flat (nt * rows,) in the activation dtype."""
        if self.host_weights is not None:
            return mx.array(self.host(np.asarray(x), nt))
        if self.kernel is not None and nt <= MAX_ROWS:
            template = kernel_template(x.dtype, self.dtype, nt, len(self.shapes), self.has_q4k, 1)
            (y,) = self.kernel(
                inputs=[self.table, self.wd, self.wq, x, int_params(nt)], template=template,
                grid=(self._threadgroups(template) * WARPS * 32, 1, 1), threadgroup=(WARPS * 32, 1, 1),
                output_shapes=[(nt * self.rows,)], output_dtypes=[x.dtype])
            return y
        flat = x.reshape(-1)
        outs = []
        for linear, (_, k), act, base in zip(self._matmul_layers(x.dtype), self.shapes, self.acts, self.x_bases):
            xi = flat[nt * base: nt * (base + k)].reshape(nt, k)
            outs.append(_activate(linear(xi), act).reshape(-1))
        return mx.concatenate(outs) if len(outs) > 1 else outs[0]

    def after_norm(self, x: mx.array, dx: mx.array | None, ln: tuple[mx.array, mx.array], x_prev: mx.array,
                   mix: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """`norm_mix(x, dx, ln, x_prev, mix)`, then this group on its output: (x, h, y), segment s
        reading mix row x_base_s / C. In decode (one token per row) on a GPU this is one launch
        (MATVEC_NORM: each threadgroup recomputes the norm of its rows), else two."""
        B, T, C = x.shape
        nt = B * T
        norm_kernel = get_kernel(MATVEC_NORM) if self.kernel is not None else None
        # the prologue fills one tile with rows of C values: every segment must read whole rows
        # (K = C; another K read past the row, and past the threadgroup memory for K > C)
        if norm_kernel is None or T != 1 or nt > TILE_ROWS or nt * C * x.dtype.size > NORM_TILE_BYTES \
                or any(k != C or base % C for (_, k), base in zip(self.shapes, self.x_bases)):
            x, h, xs = norm_mix(x, dx, ln, x_prev, mix)
            return x, h, self(xs, nt)
        template = kernel_template(x.dtype, self.dtype, nt, len(self.shapes), self.has_q4k, WARPS)
        y, x_out, h = norm_kernel(
            inputs=[self.table, self.wd, self.wq, x, x if dx is None else dx, x_prev, ln[0], ln[1], mix,
                    int_params(nt)],
            template=template + [("CX", C), ("HAS_DX", int(dx is not None))],
            grid=(self._threadgroups(template) * WARPS * 32, 1, 1), threadgroup=(WARPS * 32, 1, 1),
            output_shapes=[(nt * self.rows,), x.shape, x.shape], output_dtypes=[x.dtype] * 3)
        return x_out, h, y

    def _threadgroups(self, template: list[tuple[str, mx.Dtype | int]]) -> int:
        """Threadgroups of a launch: each segment's SIMD-groups of NR rows, rounded up to TG_ALIGN."""
        args = dict(template)
        nr, align = args["NR"], args["TG_ALIGN"]
        groups = sum(_ceil_div(_ceil_div(rows, nr), align) * align for rows, _ in self.shapes)
        return _ceil_div(groups, WARPS)

    def host(self, x: np.ndarray, nt: int) -> np.ndarray:
        """`group(x, nt)` in numpy (OpenBLAS) on float32 arrays, for the CPU path (on_host)."""
        flat = x.reshape(-1)
        out = np.empty(nt * self.rows, np.float32)
        if nt == 1:  # decode: _host_matmul's mat-vecs (the same bits) on 1-D views, fewer Python steps
            for w, xs, ys, act in self._host_segments:  # np.dot: ~0.25 us less per call than np.matmul
                np.dot(w, flat[xs], out=out[ys])
                if act != "none":
                    _activate_host(out[ys], act)
            return out
        for w, (rows, k), act, x_base, y_base in zip(self.host_weights, self.shapes, self.acts,
                                                     self.x_bases, self.y_bases):
            y = out[nt * y_base: nt * (y_base + rows)].reshape(nt, rows)
            _host_matmul(flat[nt * x_base: nt * (x_base + k)].reshape(nt, k), w, y)
            if act != "none":
                _activate_host(y, act)
        return out

    def split(self, y: mx.array, nt: int) -> list[mx.array]:
        """The (nt, rows_s) output of every segment, as views of the flat output."""
        return [y[nt * base: nt * (base + rows)].reshape(nt, rows)
                for (rows, _), base in zip(self.shapes, self.y_bases)]

    # -- GPU layout -----------------------------------------------------------------------
    def _pack(self, segments: list[Segment]) -> None:
        """Concatenate dense and Q4_K weights into two word buffers plus a segment table."""
        dense, q4k, table = [], [], []
        n_dense = n_q4k = 0
        for s, (rows, k), base, y_base in zip(segments, self.shapes, self.x_bases, self.y_bases):
            if isinstance(s.weight, Q4KTensor):
                words = mx.view(mx.array(s.weight.blocks).reshape(-1), mx.uint32)
                q4k.append(words)
                table.append((rows, k, n_q4k, base, y_base, ACTIVATIONS[s.act] + Q4K_KIND))
                n_q4k += words.size
            else:
                words = mx.view(_to_mx(s.weight, self.dtype).reshape(-1), mx.uint32)
                dense.append(words)
                table.append((rows, k, n_dense, base, y_base, ACTIVATIONS[s.act]))
                n_dense += words.size
        # 8 words of padding: Metal passes inputs under 8 elements in `constant` memory
        pad = mx.zeros((8,), mx.uint32)
        self.wd = mx.concatenate(dense + [pad])
        self.wq = mx.concatenate(q4k + [pad])
        self.table = mx.array(np.array(table, np.int32).reshape(-1))
        self.q4k_words = n_q4k
        self.linears = self._dense_linears()
        self.q4k_segments = [(i, rows, k, off // BLOCK_WORDS * QK_K)
                             for i, (rows, k, off, _, _, kind) in enumerate(table) if kind & Q4K_KIND]

    def rebase(self, wd: mx.array, wq: mx.array) -> None:
        """Read the packed weights from `wd` and `wq`, the same words elsewhere (views of one
        layer's buffer, mlx_rwkv/layer_kernel.py), so that the group's own buffers can go."""
        self.wd, self.wq = wd, wq
        self.linears = self._dense_linears()

    def _dense_linears(self) -> list[Dense | None]:
        """The matmul layers: dense segments as views of the packed buffer (no copy); the Q4_K
        ones (None here) come from one expansion of all their blocks per call (_matmul_layers)."""
        table = np.array(self.table).reshape(-1, 6).tolist()
        return [None if kind & Q4K_KIND else self._dense_view(rows, k, off) for rows, k, off, _, _, kind in table]

    def _dense_view(self, rows: int, k: int, off: int) -> Dense:
        words = rows * k * (4 if self.dtype == mx.float32 else 2) // 4
        return Dense(mx.view(self.wd[off: off + words], self.dtype).reshape(rows, k))

    def _matmul_layers(self, dtype: mx.Dtype) -> list["Dense | Q4KLinear"]:
        """The segments as matmul layers (more than MAX_ROWS activation rows, or no kernel). With
        the kernel all Q4_K segments are expanded to `dtype` in one launch and multiplied as
        dense views of the expansion."""
        if self.kernel is None or not self.q4k_segments:
            return self.linears
        from .q4k_linear import expand_q4k

        expanded = expand_q4k(self.wq[: self.q4k_words], dtype)
        layers = list(self.linears)
        for i, rows, k, start in self.q4k_segments:
            layers[i] = Dense(expanded[start: start + rows * k].reshape(rows, k))
        return layers


def kernel_template(x_dtype: mx.Dtype, w_dtype: mx.Dtype, nt: int, n_segments: int,
                    has_q4k: bool, tg_align: int) -> list[tuple[str, mx.Dtype | int]]:
    """Template arguments of metal_kernels/matvec_head.inc for nt activation rows (each distinct
    list is one build: NT is the tile, at most TILE_ROWS)."""
    tile = min(nt, TILE_ROWS)
    return [("TX", x_dtype), ("XFMT", _FMT[x_dtype]), ("WFMT", _FMT[w_dtype]), ("NT", tile),
            ("NSEG", n_segments), ("NR", ROWS_PER_SIMDGROUP if tile == 1 else ROWS_PER_SIMDGROUP_MULTI),
            ("QU", Q4K_BLOCKS_IN_FLIGHT), ("WARPS", WARPS), ("HAS_Q4K", int(has_q4k)), ("TG_ALIGN", tg_align),
            ("TILED", int(nt > tile))]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def weight_format(dtype: mx.Dtype) -> int:
    """The XFMT / WFMT template value of a dtype (0 fp16, 1 bf16, 2 fp32)."""
    return _FMT[dtype]


def _to_mx(w: np.ndarray, dtype: mx.Dtype) -> mx.array:
    from .loading import to_mx  # loading builds models from this module

    return to_mx(w, dtype)


def _linear(w: np.ndarray | Q4KTensor, dtype: mx.Dtype) -> "Dense | Q4KLinear":
    if isinstance(w, Q4KTensor):
        from .q4k_linear import Q4KLinear

        return Q4KLinear(w)
    return Dense(_to_mx(w, dtype))
