"""The RWKV-7 (x070) forward pass in MLX, written next to the equations of DESIGN.md.

Per layer:  x += TimeMix(ln1(x));  x += ChannelMix(ln2(x)).  One forward call builds one lazy
graph; on a GPU the decode step (T = 1) runs under `mx.compile`. Kernel launches per layer in decode on a
GPU (5): one grouped mat-vec for r, k, v and the four LoRA down-projections with their
activations, whose prologue does the residual add, ln1 and the seven token-shift lerps; the WKV
kernel with the four LoRA up-projections inside (decay, value residual, recurrence, per-head
norm, bonus, gate); the output projection; the FFN key with its squared ReLU, whose prologue does
the add, ln2 and the lerp; the FFN value. Prefill runs norm_mix and the LoRA up-projections as
launches of their own (and matmuls in place of mat-vecs).

On the CPU in float32, `_run_host` runs the same ops in numpy: there are no custom kernels, MLX's
Linux wheels do matmuls in the reference BLAS (numpy: OpenBLAS), and every MLX evaluation is a
round trip to MLX's CPU thread, slow while the BLAS threads spin. Other dtypes on the CPU run the
MLX ops (norm_mix, matmuls, wkv7_reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from .config import ModelConfig
from .layer_kernel import LayerArena, barrier_words, resident_threadgroups
from .layer_kernel import fits as layer_fits
from .matvec import ProjectionGroup, pack_host_weights
from .norm_mix import layer_norm_host, norm_mix_host
from .state import State
from .wkv import PARAM_NAMES, host_params, wkv7_host, wkv7_lora

# Row order of the token-shift mix vectors: the inputs of r, k, v, then of the four LoRAs
# (w, a, v, g); x_v appears twice because both paths read it.
MIX_ORDER = ("x_r", "x_k", "x_v", "x_w", "x_a", "x_v", "x_g")
LORAS = ("w", "a", "v", "g")  # decay (tanh), in-context rate, value residual, gate (sigmoid)


@dataclass
class Layer:
    ln1: tuple[mx.array, mx.array]
    ln2: tuple[mx.array, mx.array]
    att_mix: mx.array  # (7, C) in MIX_ORDER
    att_in: ProjectionGroup  # r, k, v, then the LoRA down-projections (+ activations), on xs
    lora_up: ProjectionGroup  # the LoRA up-projections on the LoRA hiddens
    wkv_params: dict[str, mx.array]  # fp32 (C,) w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b
    att_out: ProjectionGroup
    ffn_mix: mx.array  # (1, C)
    ffn_key: ProjectionGroup  # with the squared ReLU
    ffn_value: ProjectionGroup

    def groups(self) -> tuple[ProjectionGroup, ...]:
        return self.att_in, self.lora_up, self.att_out, self.ffn_key, self.ffn_value


@dataclass
class HostLayer:
    """A layer's vectors as float32 numpy arrays, read once for the CPU path (`RWKV7._run_host`)."""

    ln1: tuple[np.ndarray, np.ndarray]
    ln2: tuple[np.ndarray, np.ndarray]
    att_mix: np.ndarray
    ffn_mix: np.ndarray
    wkv_params: dict[str, np.ndarray]  # wkv.host_params

    @classmethod
    def of(cls, layer: Layer, config: ModelConfig) -> "HostLayer":
        f32 = lambda a: np.array(a, np.float32)  # noqa: E731
        return cls((f32(layer.ln1[0]), f32(layer.ln1[1])), (f32(layer.ln2[0]), f32(layer.ln2[1])),
                   f32(layer.att_mix), f32(layer.ffn_mix),
                   host_params(layer.wkv_params, config.n_head, config.head_size))


class RWKV7:
    """An x070 model in MLX. `forward` runs prefill or decode; state lives in `State`."""

    def __init__(self, config: ModelConfig, emb: mx.array, layers: Sequence[Layer],
                 ln_out: tuple[mx.array, mx.array], head: ProjectionGroup, dtype: mx.Dtype):
        self.config = config
        self.emb = emb  # (V, C), ln0 already applied
        self.layers = list(layers)
        self.ln_out = ln_out
        self.head = head
        self.dtype = dtype
        # CPU, float32: the forward pass runs in numpy (_run_host), which mx.compile cannot trace
        groups = [head, *(g for layer in self.layers for g in layer.groups())]
        self.on_host = all(g.on_host for g in groups)
        if self.on_host:  # for _run_host: the projection weights in one buffer, the vectors as numpy arrays
            pack_host_weights(groups)
            self.host_layers = [HostLayer.of(layer, config) for layer in self.layers]
            self.host_ln_out = tuple(np.array(a, np.float32) for a in ln_out)
        else:  # e.g. Q4_K on the CPU: the float32 LoRA groups must be MLX ops too
            for g in groups:
                g.to_mlx()
        # decode in one launch per layer where the GPU allows (layer_kernel.py); else five
        # (two layers at least: a launch re-zeroes the next layer's barrier count, see layer_decode.inc)
        requested = resident_threadgroups()  # (checks MLX_RWKV_LAYER_KERNEL on every device)
        self.layer_threadgroups = 0 if self.on_host or len(self.layers) < 2 else requested
        arenas = [LayerArena.build(layer, PARAM_NAMES, config.n_embd) for layer in self.layers] \
            if self.layer_threadgroups else []
        self.arenas = arenas if all(arenas) else []  # every layer's, or none
        self.barrier_words = barrier_words(len(self.layers)) if self.arenas else None
        self._compiled_step = self._step_arrays if self.on_host else mx.compile(self._step_arrays)

    def one_launch_per_layer(self, rows: int) -> bool:
        """Whether a decode step of `rows` sequences runs each layer in one launch (layer_kernel.py)."""
        return bool(self.arenas) and layer_fits(rows, self.config.n_embd, self.config.head_size, self.emb.dtype)

    # -- public API ---------------------------------------------------------------------
    def new_state(self, batch_size: int = 1) -> State:
        return State.zeros(self.config, batch_size, self.dtype)

    def forward(self, tokens: Sequence[int] | mx.array, state: State | None = None,
                all_logits: bool = False, chunk_size: int = 1024) -> tuple[mx.array, State]:
        """Logits for `tokens` and the state after them.

        tokens: list of ints or mx.array (T,) -> logits (V,) or (T, V) with all_logits;
        mx.array (B, T) -> (B, V) or (B, T, V). Long inputs run in chunks of `chunk_size`
        tokens (evaluated between chunks so memory stays bounded). The result is lazy.
        """
        ids, batched = self._check_tokens(tokens)
        B, T = ids.shape
        state = self.new_state(B) if state is None else state
        state.check(self.config, B)
        outs = []
        for start in range(0, T, chunk_size):
            if start:  # bound the graph: materialize the state between chunks
                mx.eval(state.arrays(), outs)
            chunk = ids[:, start:start + chunk_size]
            if chunk.shape[1] == 1:
                logits, state = self.step(chunk[:, 0], state)
                logits = logits[:, None, :]
            else:
                logits, state = self._run(chunk, state, all_logits)
            outs.append(logits)
        logits = mx.concatenate(outs, axis=1) if all_logits and len(outs) > 1 else outs[-1]
        logits = logits if all_logits else logits[:, -1, :]
        return (logits if batched else logits[0]), state

    def step(self, tokens: mx.array, state: State) -> tuple[mx.array, State]:
        """One decode step for (B,) token ids (compiled; numpy on the CPU path): logits (B, V) and the new state."""
        if self.on_host:  # no MLX op before or after the numpy pass: each evaluation costs thread switches
            return self._run_host(np.asarray(tokens), state, all_logits=True)
        logits, att_x, wkv, ffn_x = self._compiled_step(tokens, state.att_x, state.wkv, state.ffn_x)
        return logits, State(att_x, wkv, ffn_x)

    # -- the forward pass -----------------------------------------------------------------
    def _step_arrays(self, tokens, att_x, wkv, ffn_x):
        logits, new = self._run(tokens[:, None], State(att_x, wkv, ffn_x), all_logits=True)
        return logits[:, 0, :], new.att_x, new.wkv, new.ffn_x

    def _run(self, ids: mx.array, state: State, all_logits: bool) -> tuple[mx.array, State]:
        if self.on_host:
            return self._run_host(ids, state, all_logits)
        B, T = ids.shape
        x, dx = self.emb[ids], None  # (B, T, C); dx: the pending residual update
        att_x, wkv, ffn_x = [], [], []
        v_first = None
        nt = B * T  # activation rows of every projection
        one_launch = T == 1 and self.one_launch_per_layer(nt)
        for i, layer in enumerate(self.layers):
            if one_launch:  # layer 0 after the previous step's last layer (whose state it reads), the rest after x
                after = state.ffn_x[-1] if i == 0 else x
                x, dx, h_att, s, h_ffn, v = self.arenas[i].step(x, dx, state.att_x[i], state.ffn_x[i], v_first,
                                                                state.wkv[i], (self.barrier_words, i), after,
                                                                self.layer_threadgroups)
                v_first = v if v_first is None else v_first
                att_x.append(h_att)
                wkv.append(s)
                ffn_x.append(h_ffn)
                continue
            # x += dx; h = ln1(x); r, k, v and the LoRA hiddens of the seven token-shift mixes of h
            x, h, proj = layer.att_in.after_norm(x, dx, layer.ln1, state.att_x[i], layer.att_mix)
            dx, v_first, s = self._time_mix(layer, proj, state.wkv[i], v_first, (B, T))
            att_x.append(h[:, -1, :])
            wkv.append(s)
            x, h, k = layer.ffn_key.after_norm(x, dx, layer.ln2, state.ffn_x[i], layer.ffn_mix)
            dx = layer.ffn_value(k, nt).reshape(x.shape)  # relu(mix(ln2(x)) K)^2 V
            ffn_x.append(h[:, -1, :])
        x = x + dx
        if not all_logits:
            x = x[:, -1:, :]
        x = mx.fast.layer_norm(x, self.ln_out[0], self.ln_out[1], 1e-5)
        logits = self.head(x, x.shape[0] * x.shape[1])
        return logits.reshape(*x.shape[:2], -1), State(att_x, wkv, ffn_x)

    def _run_host(self, ids: mx.array | np.ndarray, state: State, all_logits: bool) -> tuple[mx.array, State]:
        """`_run` in float32 numpy (the CPU path): the same ops, MLX arrays only in and out.
        ids (B, T) -> logits (B, T, V) as `_run`; ids (B,), one decode step -> logits (B, V)."""
        mx.eval(ids, state.arrays())  # one round trip (a new state's zeros are lazy); numpy ids pass through
        one_step = ids.ndim == 1
        ids = np.asarray(ids).reshape(ids.shape[0], -1)
        B, T = ids.shape
        nt, C = B * T, self.config.n_embd
        x, dx = np.asarray(self.emb)[ids], None  # (B, T, C)
        att_x, wkv, ffn_x = [], [], []
        v_first = None
        for i, (layer, hl) in enumerate(zip(self.layers, self.host_layers)):
            x, h, xs = norm_mix_host(x, dx, hl.ln1, np.asarray(state.att_x[i]), hl.att_mix)
            proj = layer.att_in.host(xs, nt)
            r, k, v = proj[: 3 * nt * C].reshape(3, B, T, C)  # att_in's first three segments
            lora = layer.lora_up.host(proj, nt)  # lw, la, lv, g
            y, s = wkv7_host(r, k, v, lora, v_first, hl.wkv_params, np.asarray(state.wkv[i]))
            v_first = v if v_first is None else v_first
            dx = layer.att_out.host(y, nt).reshape(B, T, C)
            att_x.append(h[:, -1, :])
            wkv.append(s)
            x, h, xk = norm_mix_host(x, dx, hl.ln2, np.asarray(state.ffn_x[i]), hl.ffn_mix)
            dx = layer.ffn_value.host(layer.ffn_key.host(xk, nt), nt).reshape(B, T, C)
            ffn_x.append(h[:, -1, :])
        x = layer_norm_host(x + dx if all_logits else x[:, -1:] + dx[:, -1:], *self.host_ln_out)
        head = lambda h: self.head.host(h, h.shape[0] * h.shape[1]).reshape(*h.shape[:2], -1)  # noqa: E731
        # a row's bits depend on whether its call is a few mat-vecs or row blocks (_host_matmul):
        # the last token gets its own call, as without all_logits, so that both give the same bits
        logits = np.concatenate([head(x[:, :-1]), head(x[:, -1:])], axis=1) if x.shape[1] > 1 else head(x)
        logits = mx.array(logits[:, 0] if one_step else logits)
        return logits, State(*([mx.array(a) for a in part] for part in (att_x, wkv, ffn_x)))

    def _time_mix(self, layer: Layer, proj: mx.array, s: mx.array, v_first: mx.array | None,
                  bt: tuple[int, int]) -> tuple[mx.array, mx.array, mx.array]:
        """proj: r, k, v (nt, C) each, then the four LoRA hiddens (att_in's output)."""
        nt, C = bt[0] * bt[1], self.config.n_embd
        r, k, v = (t.reshape(*bt, C) for t in layer.att_in.split(proj, nt)[:3])
        y, s = wkv7_lora(r, k, v, proj, layer.lora_up, v_first, layer.wkv_params, s)  # lora_up reads the hiddens
        return layer.att_out(y, nt).reshape(*bt, C), v if v_first is None else v_first, s

    # -- input checks -------------------------------------------------------------------
    def _check_tokens(self, tokens: Sequence[int] | mx.array) -> tuple[mx.array, bool]:
        host = None if isinstance(tokens, mx.array) else np.asarray(tokens)
        shape = tuple(tokens.shape) if host is None else host.shape
        if len(shape) not in (1, 2):
            raise ValueError(f"tokens must be (T,) or (B, T), got shape {shape}")
        if shape[-1] == 0:
            raise ValueError("empty input: forward needs at least one token")
        if host is None:
            if not mx.issubdtype(tokens.dtype, mx.integer):
                raise ValueError(f"token ids must be integers, got an array of {tokens.dtype}")
            lo, hi = mx.stack([mx.min(tokens), mx.max(tokens)]).tolist()
            ids = tokens.astype(mx.int32)
        else:
            if host.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got {host.dtype} values such as {host.flat[0]!r}")
            ids = mx.array(host.astype(np.int32))
            lo, hi = int(host.min()), int(host.max())
        batched = ids.ndim == 2
        ids = ids if batched else ids[None]
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for this model's vocabulary (0..{self.config.vocab_size - 1})")
        return ids, batched
