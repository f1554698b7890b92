"""Where the host waits: the drivers behind the sync strategies of DESIGN.md that the engines
do not run themselves (`mlx-rwkv bench`, mlx_rwkv.benchmark).

    compiled            RWKV7.step: the decode step under mx.compile, one eval per token
    whole-pass          the same forward uncompiled, one eval per token
    per-layer           EvalHook(model, "layer"): an eval after every layer
    per-op              EvalHook(model, "op"): an eval after every op of the engine (each
                        projection group, with or without its norm prologue, and the WKV kernel:
                        one kernel launch each on a GPU)
    webgpu-one-submit   WebGPUModel: one submit and one logits read-back per token
    webgpu-per-op       WebGPUModel.per_op_sync: submit and wait after every dispatch
    hybrid              Hybrid(model): the WebGPU forward with every Q4_K linear op handed to our
                        MLX Q4_K mat-vec, the activations crossing the two APIs through host memory

The hybrid rebuilds the design that started this project (a WebGPU engine calling a faster
Metal Q4_K kernel): per Q4_K op, the GPU work before it is submitted, its input is copied back
from wgpu (a wait), mixed on the host, handed to MLX (`mx.array`), multiplied by the MLX kernel,
brought back (`np.array`, a second wait) and written into the wgpu buffer. Its cost is what
this file exists to measure.

On the CPU (no custom kernels) the projections of float32 models run in numpy, which evaluates
their inputs: host round trips that no strategy asks for. `syncs` counts only the evaluations
a strategy asks for.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx
import numpy as np
import wgpu

from . import model as model_module
from .layer_kernel import LayerArena
from .matvec import ProjectionGroup, Segment
from .quant import BLOCK_BYTES, QK_K, Q4KTensor

if TYPE_CHECKING:
    from webgpu_ref import WebGPUModel
    from webgpu_ref.model import LinearIO

    from .model import RWKV7

# Primitives that only change metadata (no kernel launch) in MLX.
VIEW_OPS = {"Broadcast", "Reshape", "Slice", "ExpandDims", "Squeeze", "Transpose", "AsStrided",
            "StopGradient", "Split", "Flatten", "Unflatten", "BroadcastAxes", "Depends"}
# WebGPU linear activations -> the MLX projection groups' ("add": added to the output on the host)
HOST_ACTS = {"none": "none", "tanh": "tanh", "sigmoid": "sigmoid", "relu_sq": "relu2", "add": "none"}


def count_kernel_nodes(*outputs: Any) -> dict[str, int]:
    """Per-primitive counts of the nodes MLX would launch to compute `outputs` (arrays or nested
    tuples/lists of them; not evaluated). Evaluated arrays are inputs, not nodes."""
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *_flat_arrays(outputs))
        with open(path) as f:
            text = f.read()
    finally:
        os.unlink(path)
    counts: dict[str, int] = {}
    for label in re.findall(r'label ="([^"]+)", shape=rectangle', text):
        name = label.split(" ")[0]
        if name not in VIEW_OPS:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _flat_arrays(tree: Any) -> list[mx.array]:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [a for item in tree for a in _flat_arrays(item)]
    return []


class EvalHook:
    """While active (`with EvalHook(model, "op"):`), the MLX model's forward is evaluated as it is
    built: after every op of the engine (`"op"`: each projection group, with or without its norm
    prologue, and the WKV kernel; where such an op runs as two launches, each), or after every
    layer (`"layer"`: once its FFN value projection is built). Run it around the uncompiled
    forward; the patch (mlx_rwkv.model's wkv7_lora, ProjectionGroup's __call__ and after_norm,
    LayerArena's step: a decode layer in one launch is one op and a layer end) is undone on exit.

    syncs: evaluations so far. nodes: kernel nodes in those evaluations (with count_nodes, which
    inspects each graph before evaluating it: slow, for one counting step)."""

    def __init__(self, model: "RWKV7", every: Literal["op", "layer"], count_nodes: bool = False) -> None:
        if every not in ("op", "layer"):
            raise ValueError(f"every must be 'op' or 'layer', got {every!r}")
        self.every = every
        self.count_nodes = count_nodes
        self.layer_ends = {id(layer.ffn_value) for layer in model.layers}
        self.syncs = 0
        self.nodes = 0
        self._pending: list[Any] = []
        self._saved: tuple | None = None

    def __enter__(self) -> "EvalHook":
        wkv7, group_call, after_norm = model_module.wkv7_lora, ProjectionGroup.__call__, ProjectionGroup.after_norm
        layer_step = LayerArena.step
        self._saved = (wkv7, group_call, after_norm, layer_step)
        model_module.wkv7_lora = lambda *a, **k: self._built(wkv7(*a, **k), False)
        ProjectionGroup.__call__ = lambda group, x, nt: self._built(group_call(group, x, nt),
                                                                    id(group) in self.layer_ends)
        ProjectionGroup.after_norm = lambda group, *a: self._built(after_norm(group, *a), False)
        LayerArena.step = lambda arena, *a: self._built(layer_step(arena, *a), True)  # a layer in one launch
        return self

    def __exit__(self, *exc: object) -> None:
        model_module.wkv7_lora, ProjectionGroup.__call__, ProjectionGroup.after_norm, LayerArena.step = self._saved
        self._pending = []

    def _built(self, out: Any, layer_end: bool) -> Any:
        self._pending.append(out)
        if self.every == "op" or layer_end:
            if self.count_nodes:
                self.nodes += sum(count_kernel_nodes(self._pending).values())
            mx.eval(self._pending)
            self._pending = []
            self.syncs += 1
        return out


class _HostLinear:
    """One Q4_K linear op of a WebGPU model, run by the MLX projection-group kernel: reads its
    input rows (and, for `add` outputs, the rows it adds to) back from wgpu, applies the token
    shift on the host, multiplies in MLX and writes the result into the wgpu buffer."""

    def __init__(self, model: "WebGPUModel", io: "LinearIO", vecs: np.ndarray, counter: "Hybrid") -> None:
        self.device, self.counter = model.gpu.device, counter
        self.src, self.dst = model.buffers[io.src], model.buffers[io.dst]
        self.groups = io.batch.groups
        raw = np.frombuffer(self.device.queue.read_buffer(io.batch.buffer), np.uint8)
        segments, base = [], 0
        for g in self.groups:
            row_bytes = g.k // QK_K * BLOCK_BYTES
            start = g.w_off * 16  # W4 units of 16 bytes in linear.wgsl
            blocks = raw[start: start + g.m * row_bytes].reshape(g.m, row_bytes)
            segments.append(Segment(Q4KTensor(blocks.copy(), (g.m, g.k)), HOST_ACTS[g.act], base))
            base += g.k
        self.matvec = ProjectionGroup(segments, mx.float32)
        self.mus = [None if g.mu_off is None else vecs[g.mu_off: g.mu_off + g.k] for g in self.groups]
        self.staging: wgpu.GPUBuffer | None = None

    def spans(self, tokens: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """Float ranges [lo, hi) of the input rows (with the previous row where a group mixes)
        and of the output rows that `add` groups add to (None if none do)."""
        lo = min(g.in_off - (g.k if g.mu_off is not None else 0) for g in self.groups)
        hi = max(g.in_off + tokens * g.k for g in self.groups)
        adds = [g for g in self.groups if g.act == "add"]
        out = (min(g.out_off for g in adds), max(g.out_off + (tokens - 1) * g.out_stride + g.m for g in adds)) \
            if adds else None
        return (lo, hi), out

    def __call__(self, tokens: int) -> None:
        (lo, hi), out_span = self.spans(tokens)
        src, dst = self._read_back((lo, hi), out_span)
        xs = []
        for g, mu in zip(self.groups, self.mus):
            rows = src[g.in_off - lo: g.in_off - lo + tokens * g.k].reshape(tokens, g.k)  # (T, K)
            if mu is not None:  # token shift: x_t + (x_{t-1} - x_t) * mu, row -1 is the previous token
                prev = src[g.in_off - lo - g.k: g.in_off - lo + (tokens - 1) * g.k].reshape(tokens, g.k)
                rows = rows + (prev - rows) * mu
            xs.append(rows.reshape(-1))
        y = np.array(self.matvec(mx.array(np.concatenate(xs)), tokens))  # MLX eval: the second wait
        self.counter.syncs += 1
        for g, y_base in zip(self.groups, self.matvec.y_bases):
            out = y[tokens * y_base: tokens * (y_base + g.m)].reshape(tokens, g.m)
            if g.act == "add":
                starts = [g.out_off + t * g.out_stride - out_span[0] for t in range(tokens)]
                out = out + np.stack([dst[s: s + g.m] for s in starts])
            self._write(g, out)

    def _read_back(self, src_span: tuple[int, int],
                   dst_span: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The floats of both spans from the GPU, after everything submitted before: one wait."""
        sizes = [4 * (src_span[1] - src_span[0])] + ([4 * (dst_span[1] - dst_span[0])] if dst_span else [])
        if self.staging is None or self.staging.size < sum(sizes):
            self.staging = self.device.create_buffer(
                size=sum(sizes), usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        encoder = self.device.create_command_encoder()
        encoder.copy_buffer_to_buffer(self.src, 4 * src_span[0], self.staging, 0, sizes[0])
        if dst_span:
            encoder.copy_buffer_to_buffer(self.dst, 4 * dst_span[0], self.staging, sizes[0], sizes[1])
        self.device.queue.submit([encoder.finish()])
        self.staging.map_sync(wgpu.MapMode.READ, 0, sum(sizes))
        data = np.frombuffer(self.staging.read_mapped(0, sum(sizes)), np.float32).copy()
        self.staging.unmap()
        self.counter.syncs += 1
        n = sizes[0] // 4
        return data[:n], (data[n:] if dst_span else None)

    def _write(self, g: Any, out: np.ndarray) -> None:
        """(T, m) rows to the output at out_off, out_stride floats apart."""
        queue, T = self.device.queue, out.shape[0]
        if T == 1 or g.out_stride == g.m:
            queue.write_buffer(self.dst, 4 * g.out_off, np.ascontiguousarray(out, np.float32))
        else:
            for t in range(T):
                row = np.ascontiguousarray(out[t], np.float32)
                queue.write_buffer(self.dst, 4 * (g.out_off + t * g.out_stride), row)

    def mlx_nodes(self) -> int:
        """Kernel nodes MLX runs for one token of this op."""
        k = sum(g.k for g in self.groups)
        return sum(count_kernel_nodes(self.matvec(mx.zeros((k,), mx.float32), 1)).values())


class Hybrid:
    """`with Hybrid(model):` the WebGPU model runs every Q4_K linear op through MLX (see the
    module docstring); its `forward` is unchanged otherwise. syncs: host waits so far (two per
    handed-off op: the wgpu read-back and the MLX evaluation), not counting the engine's own
    logits read-back."""

    def __init__(self, model: "WebGPUModel") -> None:
        self.model = model
        self.syncs = 0
        decode = model.op_list("body", False) + model.op_list("head", False)  # builds linear_io
        vecs = model.vectors.data()
        self.ops = {name: _HostLinear(model, io, vecs, self) for name, io in model.linear_io.items()
                    if io.batch.fmt == "q4k"}
        if not self.ops:
            raise ValueError("the hybrid strategy needs a WebGPU model with Q4_K matrices")
        self.handed_off = sum(op.name in self.ops for op in decode)  # per decode step
        self.kernels_per_token = len(decode) - self.handed_off + sum(
            self.ops[op.name].mlx_nodes() for op in decode if op.name in self.ops)

    @property
    def syncs_per_token(self) -> int:
        """Host waits of one decode step: two per handed-off op plus the logits read-back."""
        return 2 * self.handed_off + 1

    def __enter__(self) -> "Hybrid":
        self.model.host_ops = dict(self.ops)
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.host_ops = {}
