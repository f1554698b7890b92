"""WebGPUModel: the RWKV-7 (x070) forward pass as a flat list of WGSL ops over preallocated
buffers, recorded into one compute pass and submitted once per step or prefill chunk.

Per layer (DESIGN.md's equations), with the token shift fused into the linear ops' input:
    ln1 (+ att x_prev) -> [r, k, v, LoRA downs] -> [LoRA ups] -> wkv7 -> output (+= x)
    ln2 (+ ffn x_prev) -> ffn.key (relu^2) -> ffn.value (+= x)
Q4_K splits the first linear op in two (Q4_K r/k/v, float LoRA); so does a matrix beyond the
binding limit (each buffer is its own op).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import wgpu

from mlx_rwkv.checkpoint import load_checkpoint
from mlx_rwkv.config import ModelConfig
from mlx_rwkv.quant import Q4KTensor, is_quantized_file, load_quantized, quantize_model

from . import ops
from .device import GPU, WebGPUError, get_gpu
from .ops import Op, WkvVectors
from .state import STATE_USAGE, StateLayout, WebGPUState
from .weights import Batch, Linear, VectorTable, to_matrix, upload

FORMATS = {"float16": "f16", "float32": "f32"}
# LoRA of the time mix: (name, its mixing vector, activation after the down-projection).
LORAS = (("w", "x_w", "tanh"), ("a", "x_a", "none"), ("v", "x_v", "none"), ("g", "x_g", "sigmoid"))
MIX_REGION = {"w": 0, "a": 1, "v": 2, "g": 3}  # regions of the `mix` buffer read by wkv7.wgsl
DECODE = (False, True, False)  # (many tokens, head, all logits) of a decode step
SCRATCH_USAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC


@dataclass(frozen=True)
class LinearIO:
    """A linear op's matrices and the activation buffers (names in `buffers`) it reads and writes."""

    batch: Batch
    src: str
    dst: str


class WebGPUModel:
    """An RWKV-7 model on a wgpu device. Build with `load` or `from_weights`."""

    def __init__(self, gpu: GPU, config: ModelConfig, weights: Mapping[str, np.ndarray | Q4KTensor], fmt: str,
                 prefill_chunk: int, max_binding: int | None) -> None:
        self.gpu, self.config, self.fmt = gpu, config, fmt
        self.limit = min(gpu.max_binding, max_binding or gpu.max_binding)
        self.per_op_sync = False  # True: submit and wait after every op (the sync experiment)
        # ops run by a host callable instead, between submits: op name -> f(tokens); the callable
        # reads its inputs back and writes its outputs (the hybrid strategy, mlx_rwkv.sync_strategies)
        self.host_ops: dict[str, Callable[[int], None]] = {}
        self.linear_io: dict[str, LinearIO] = {}  # every linear op built so far, by op name
        self.ranks = {"w": config.d_decay, "a": config.d_aaa, "v": config.d_mv, "g": config.d_gate}
        self.t_max = self._chunk_size(prefill_chunk)
        self.state_layout = StateLayout(config)
        gpu.check_binding("the recurrent state", self.state_layout.nbytes, self.limit)
        self.emb = np.ascontiguousarray(weights["emb.weight"], dtype=np.float16 if fmt == "f16" else np.float32)
        self.vectors = self._vector_table(weights)
        self.buffers = self._allocate()
        self.buffers["vecs"] = self.vectors.upload(gpu)
        self.stages = [self._layer_stages(weights, i) for i in range(config.n_layer)]
        self.head = upload(gpu, [Linear("head", to_matrix(weights["head.weight"], fmt), 0, None, 0)], self.limit)
        self._ops: dict[tuple[str, bool], list[Op]] = {}
        self._resident: weakref.ref[WebGPUState] | None = None
        self._spare_step: wgpu.GPUCommandBuffer | None = None  # the next decode step, encoded ahead
        self._staging = gpu.device.create_buffer(
            size=4 * self.t_max * config.vocab_size, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        self._fence = gpu.device.create_buffer(size=4, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float16", quant: str | None = None, **options) -> "WebGPUModel":
        """A checkpoint file (.pth, .safetensors, rwkv.cpp .bin, or a Q4_K file from mlx_rwkv.quant)."""
        checkpoint = load_quantized(path) if is_quantized_file(path) else load_checkpoint(path)
        return cls.from_weights(checkpoint.weights, checkpoint.config, dtype=dtype, quant=quant, **options)

    @classmethod
    def from_weights(cls, weights: Mapping[str, np.ndarray | Q4KTensor], config: ModelConfig,
                     dtype: str = "float16", quant: str | None = None, *, quant_head: bool = True,
                     prefill_chunk: int = 512, max_binding: int | None = None,
                     f16: bool | None = None, subgroups: bool | None = None) -> "WebGPUModel":
        """A model from the canonical weight dict. dtype: "float16" | "float32" (matrices; activations
        and the WKV state are always fp32). quant="q4k" stores the Linear weights (and the head
        unless quant_head=False) as Q4_K; Q4KTensor values in `weights` are used as they are.
        max_binding lowers the per-binding byte limit (to test splitting); f16 / subgroups force
        the shader features on (True) or off (False) instead of using what the adapter has."""
        if dtype not in FORMATS:
            raise ValueError(f"dtype must be one of {', '.join(FORMATS)}, got {dtype!r}")
        if quant not in (None, "q4k"):
            raise ValueError(f"quant must be None or 'q4k', got {quant!r}")
        if quant == "q4k":
            weights = quantize_model(weights, include_head=quant_head, progress=False)
        return cls(get_gpu(f16, subgroups), config, weights, FORMATS[dtype], prefill_chunk, max_binding)

    def _chunk_size(self, prefill_chunk: int) -> int:
        """Tokens per submit: the chunk asked for, fewer if the widest scratch row would overflow a binding."""
        cfg = self.config
        widest = max(cfg.vocab_size, cfg.d_ffn, 3 * cfg.n_embd + sum(self.ranks.values()), 4 * cfg.n_embd)
        t_max = min(prefill_chunk, self.limit // (4 * widest), self.limit // (4 * cfg.n_embd) - 1)
        if t_max < 1:
            raise WebGPUError(f"a {4 * widest:,}-byte activation row exceeds the storage binding limit {self.limit:,}")
        return t_max

    def _vector_table(self, w: Mapping[str, np.ndarray]) -> VectorTable:
        table = VectorTable()
        names = ["blocks.0.ln0.weight", "blocks.0.ln0.bias", "ln_out.weight", "ln_out.bias"]
        for i in range(self.config.n_layer):
            p = f"blocks.{i}."
            names += [p + n for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "ffn.x_k")]
            names += [p + "att." + n for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k",
                                               "k_a", "r_k", "ln_x.weight", "ln_x.bias")]
            names += [p + "att.v0"] if i > 0 else []
        for name in names:
            table.add(name, w[name])
        return table

    def _allocate(self) -> dict[str, wgpu.GPUBuffer]:
        """Activation buffers for t_max tokens (floats), the working state, the step uniform."""
        cfg, T = self.config, self.t_max
        C = cfg.n_embd
        sizes = {
            "emb": T * C,  # embedding rows, written by the host
            "x": T * C,  # residual stream
            "xln": (T + 1) * C,  # ln1 / ln2 output; row 0 = previous token (token shift)
            "att": T * (3 * C + sum(self.ranks.values())),  # r, k, v, then the LoRA down outputs
            "mix": 4 * T * C,  # LoRA up outputs: w, a, v, g
            "v_first": T * C,
            "y": T * C,  # wkv7 output (gated)
            "ffn": T * cfg.d_ffn,
            "xo": T * C,  # ln_out output
            "logits": T * cfg.vocab_size,
        }
        device = self.gpu.device
        buffers = {name: device.create_buffer(label=name, size=4 * n, usage=SCRATCH_USAGE) for name, n in sizes.items()}
        buffers["state"] = device.create_buffer(label="state", size=self.state_layout.nbytes, usage=STATE_USAGE)
        step_usage = wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC
        buffers["step"] = device.create_buffer(label="step", size=16, usage=step_usage)  # Step in prelude.wgsl
        return buffers

    def _lora_offsets(self) -> dict[str, int]:
        """Float offset of each LoRA down output region in `att` (after r, k, v)."""
        T, offset, out = self.t_max, 3 * self.t_max * self.config.n_embd, {}
        for name, _, _ in LORAS:
            out[name] = offset
            offset += T * self.ranks[name]
        return out

    def _layer_stages(self, w: Mapping[str, np.ndarray | Q4KTensor], i: int) -> dict[str, list]:
        """The linear stages of layer i, uploaded: {stage: [Batch, ...]}."""
        C, T, fmt = self.config.n_embd, self.t_max, self.fmt
        p, vec = f"blocks.{i}.", lambda n: self.vectors[f"blocks.{i}.{n}"]  # noqa: E731
        mat = lambda key, transpose=False: to_matrix(w[p + key], fmt, transpose)  # noqa: E731
        loras = [(n, mu, act) for n, mu, act in LORAS if self.ranks[n] and (n != "v" or i > 0)]
        down = self._lora_offsets()
        att_in = [Linear(f"L{i}.{name}", mat(f"att.{key}.weight"), C, vec(f"att.x_{name}"), j * T * C)
                  for j, (name, key) in enumerate((("r", "receptance"), ("k", "key"), ("v", "value")))]
        att_in += [Linear(f"L{i}.{n}1", mat(f"att.{n}1", True), C, vec(f"att.{mu}"), down[n], act)
                   for n, mu, act in loras]
        lora_up = [Linear(f"L{i}.{n}2", mat(f"att.{n}2", True), down[n], None, MIX_REGION[n] * T * C)
                   for n, _, _ in loras]
        stages = {
            "att_in": att_in,
            "lora_up": lora_up,
            "att_out": [Linear(f"L{i}.output", mat("att.output.weight"), 0, None, 0, "add")],
            "ffn_key": [Linear(f"L{i}.ffn.key", mat("ffn.key.weight"), C, vec("ffn.x_k"), 0, "relu_sq")],
            "ffn_value": [Linear(f"L{i}.ffn.value", mat("ffn.value.weight"), 0, None, 0, "add")],
        }
        return {name: upload(self.gpu, items, self.limit) for name, items in stages.items()}

    # ---- the op lists --------------------------------------------------------------------------

    def _linear(self, name: str, batches: list, src: str, dst: str, many: bool) -> list[Op]:
        b = self.buffers
        built = [ops.linear(self.gpu, f"{name}.{j}" if len(batches) > 1 else name, batch.fmt, batch.groups,
                            batch.buffer, b[src], b["vecs"], b[dst], b["step"], many)
                 for j, batch in enumerate(batches)]
        self.linear_io.update((op.name, LinearIO(batch, src, dst)) for op, batch in zip(built, batches))
        return built

    def _norm(self, name: str, key: str, src: str, dst: str, **kw) -> Op:
        b = self.buffers
        return ops.layer_norm(self.gpu, name, self.config.n_embd, self.vectors[key + ".weight"],
                              self.vectors[key + ".bias"], b[src], b[dst], b["vecs"], b["step"], b["state"], **kw)

    def _layer_ops(self, i: int, many: bool) -> list[Op]:
        cfg, b, s, st = self.config, self.buffers, self.stages[i], self.state_layout
        vec = lambda n: self.vectors[f"blocks.{i}.att.{n}"]  # noqa: E731
        wkv_vectors = WkvVectors(vec("w0"), vec("a0"), vec("v0") if i > 0 else 0, vec("k_k"), vec("k_a"),
                                 vec("r_k"), vec("ln_x.weight"), vec("ln_x.bias"))
        return [
            self._norm(f"L{i}.ln1", f"blocks.{i}.ln1", "x", "xln", shift_state=st.att_x(i)),
            *self._linear(f"L{i}.att_in", s["att_in"], "xln", "att", many),
            *self._linear(f"L{i}.lora_up", s["lora_up"], "att", "mix", many),
            *ops.wkv7(self.gpu, f"L{i}.wkv7", cfg.n_head, cfg.head_size, self.t_max, st.wkv(i), i == 0,
                      wkv_vectors, b["att"], b["mix"], b["vecs"], b["v_first"], b["state"], b["y"], b["step"], many),
            *self._linear(f"L{i}.att_out", s["att_out"], "y", "x", many),
            self._norm(f"L{i}.ln2", f"blocks.{i}.ln2", "x", "xln", shift_state=st.ffn_x(i)),
            *self._linear(f"L{i}.ffn_key", s["ffn_key"], "xln", "ffn", many),
            *self._linear(f"L{i}.ffn_value", s["ffn_value"], "ffn", "x", many),
        ]

    def op_list(self, part: str, many: bool) -> list[Op]:
        """"body" (ln0 and every layer) or "head" (ln_out and the head), for one token or a chunk.
        The chunk head computes every token's logits; the one-token head only the last one's."""
        key = (part, many)
        if key not in self._ops:
            if part == "body":
                built = [self._norm("ln0", "blocks.0.ln0", "emb", "x")]
                for i in range(self.config.n_layer):
                    built += self._layer_ops(i, many)
            else:
                built = [self._norm("ln_out", "ln_out", "x", "xo", last_only=not many),
                         *self._linear("head", self.head, "xo", "logits", many)]
            self._ops[key] = built
        return self._ops[key]

    @property
    def weight_bytes(self) -> int:
        """Bytes of every matrix on the GPU: what one decode step reads (the embedding is on the host)."""
        batches = [b for stages in self.stages for bs in stages.values() for b in bs] + self.head
        return sum(b.buffer.size for b in batches)

    @property
    def dispatches_per_token(self) -> int:
        """Compute dispatches of one decode step."""
        return len(self.op_list("body", False)) + len(self.op_list("head", False))

    # ---- state ---------------------------------------------------------------------------------

    def new_state(self) -> WebGPUState:
        """The zero state (wgpu zero-initialises new buffers)."""
        return WebGPUState(self, self.gpu.device.create_buffer(size=self.state_layout.nbytes, usage=STATE_USAGE))

    def state_from_numpy(self, arrays: Sequence[np.ndarray]) -> WebGPUState:
        """A state from the oracle's flat list [att_x [C], wkv [H, N, N], ffn_x [C]] * n_layer."""
        data = self.state_layout.pack(arrays)
        return WebGPUState(self, self.gpu.device.create_buffer_with_data(data=data, usage=STATE_USAGE))

    def _is_resident(self, state: WebGPUState) -> bool:
        if state.model is not self:
            raise ValueError("this state belongs to another model")
        return self._resident is not None and self._resident() is state

    def _holding(self, state: WebGPUState) -> wgpu.GPUBuffer:
        """The buffer that holds `state`'s current contents."""
        return self.buffers["state"] if self._is_resident(state) else state.buffer

    def read_state(self, state: WebGPUState) -> list[np.ndarray]:
        raw = self.gpu.device.queue.read_buffer(self._holding(state))
        return self.state_layout.unpack(np.frombuffer(raw, np.float32))

    def copy_state(self, state: WebGPUState) -> WebGPUState:
        twin = self.new_state()
        encoder = self.gpu.device.create_command_encoder()
        encoder.copy_buffer_to_buffer(self._holding(state), 0, twin.buffer, 0, self.state_layout.nbytes)
        self.gpu.device.queue.submit([encoder.finish()])
        return twin

    def _make_resident(self, state: WebGPUState, encoder: wgpu.GPUCommandEncoder) -> None:
        """Move `state` into the working buffer the ops bind (saving the previous occupant)."""
        if self._is_resident(state):
            return
        live, size = self.buffers["state"], self.state_layout.nbytes
        resident = self._resident() if self._resident else None
        if resident is not None:
            encoder.copy_buffer_to_buffer(live, 0, resident.buffer, 0, size)
        encoder.copy_buffer_to_buffer(state.buffer, 0, live, 0, size)
        self._resident = weakref.ref(state)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, tokens: Sequence[int] | np.ndarray | int, state: WebGPUState | Sequence[np.ndarray] | None = None,
                all_logits: bool = False) -> tuple[np.ndarray, WebGPUState]:
        """Run `tokens` from `state` (zero when None; numpy arrays in the oracle layout are uploaded).

        Returns float32 logits [V] of the last token ([T, V] with all_logits) and the state,
        advanced in place (use state.copy() to keep the old one)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        V = self.config.vocab_size
        if ids.size == 0:
            raise ValueError("forward needs at least one token")
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token ids must be in [0, {V}), got {ids.min()}..{ids.max()}")
        if state is None:
            state = self.new_state()
        elif not isinstance(state, WebGPUState):
            state = self.state_from_numpy(state)
        rows = []
        for start in range(0, ids.size, self.t_max):
            chunk = ids[start:start + self.t_max]
            last = start + chunk.size == ids.size
            logits = self._run_chunk(chunk, state, all_logits or last, all_logits)
            if logits is not None:
                rows.append(logits)
        return (np.concatenate(rows) if all_logits else rows[-1][-1]), state

    def _run_chunk(self, ids: np.ndarray, state: WebGPUState, head: bool, all_logits: bool) -> np.ndarray | None:
        """One submit (one per op with per_op_sync, one around each host op) for up to t_max tokens;
        logits [rows, V] if head."""
        T, device, b = ids.size, self.gpu.device, self.buffers
        device.queue.write_buffer(b["emb"], 0, self.emb[ids].astype(np.float32))
        device.queue.write_buffer(b["step"], 0, np.array([T, 0, 0, 0], np.uint32))
        key = (T > 1, head, all_logits)
        rows = (T if all_logits else 1) if head else 0
        encoder = device.create_command_encoder()
        self._make_resident(state, encoder)
        if self.per_op_sync or self.host_ops:
            encoder = self._run_split(encoder, self._op_sequence(key), T)
            self._copy_logits(encoder, rows)
            device.queue.submit([encoder.finish()])
        else:
            commands = self._spare_step if key == DECODE and self._spare_step else self._commands(key, T, rows)
            self._spare_step = None
            device.queue.submit([encoder.finish(), commands])
            if key == DECODE:  # encode the next step while the GPU runs this one (no data in it)
                self._spare_step = self._commands(DECODE, 1, 1)
        if not rows:
            return None
        nbytes = 4 * rows * self.config.vocab_size
        self._staging.map_sync(wgpu.MapMode.READ, 0, nbytes)
        logits = np.frombuffer(self._staging.read_mapped(0, nbytes), np.float32).reshape(rows, -1).copy()
        self._staging.unmap()
        return logits

    def _run_split(self, encoder: wgpu.GPUCommandEncoder, op_list: list[Op], tokens: int) -> wgpu.GPUCommandEncoder:
        """Submit and wait after every op (per_op_sync), and/or run the ops in host_ops on the
        host: the GPU ops before one are submitted in one pass first. Returns the open encoder."""
        device, pending = self.gpu.device, []
        for op in op_list:
            host = self.host_ops.get(op.name)
            if host is None:
                pending.append(op)
                if not self.per_op_sync:
                    continue
            if pending:
                self._record(encoder, pending, tokens)
                pending = []
            if host is None:
                encoder.copy_buffer_to_buffer(self.buffers["step"], 0, self._fence, 0, 4)
            device.queue.submit([encoder.finish()])
            if host is None:
                self._fence.map_sync(wgpu.MapMode.READ)  # waits for the op
                self._fence.unmap()
            else:
                host(tokens)  # reads back what it needs (a wait), writes its output
            encoder = device.create_command_encoder()
        if pending:
            self._record(encoder, pending, tokens)
        return encoder

    def _op_sequence(self, key: tuple[bool, bool, bool]) -> list[Op]:
        many, head, all_logits = key
        return self.op_list("body", many) + (self.op_list("head", many and all_logits) if head else [])

    def _commands(self, key: tuple[bool, bool, bool], tokens: int, rows: int) -> wgpu.GPUCommandBuffer:
        """The whole chunk in one compute pass, then the logits copy to the staging buffer."""
        encoder = self.gpu.device.create_command_encoder()
        self._record(encoder, self._op_sequence(key), tokens)
        self._copy_logits(encoder, rows)
        return encoder.finish()

    def _copy_logits(self, encoder: wgpu.GPUCommandEncoder, rows: int) -> None:
        if rows:
            nbytes = 4 * rows * self.config.vocab_size
            encoder.copy_buffer_to_buffer(self.buffers["logits"], 0, self._staging, 0, nbytes)

    @staticmethod
    def _record(encoder: wgpu.GPUCommandEncoder, op_list: list[Op], tokens: int) -> None:
        compute_pass = encoder.begin_compute_pass()
        ops.encode(compute_pass, op_list, tokens)
        compute_pass.end()
