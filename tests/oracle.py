"""Reference RWKV-7 (x070) forward pass in plain numpy float64: the oracle every engine is tested against.

Written from the equations in DESIGN.md, one token at a time. Weights come from the canonical
dict (official key names and shapes, any float dtype); they are converted to float64 once per call.

State: a flat list of 3 * n_layer arrays in the official `rwkv` package's order, per layer i:
  state[3*i + 0]  att x_prev [C]     the previous token's ln1 output
  state[3*i + 1]  wkv S [H, N, N]    S[h, value index, key index]
  state[3*i + 2]  ffn x_prev [C]     the previous token's ln2 output
Functions never mutate the state they are given; they return a new list.

Pass `trace={}` to `forward` to collect intermediates for debugging a parity failure: each
name ("r", "k", "v", "decay", "a", "g", "wkv_out", "att_out", "ffn_out", "x") maps to a list
with one array per (token, layer), token-major.

Test files import it as `from oracle import forward, zero_state` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mlx_rwkv.config import ModelConfig

State = list[np.ndarray]
Trace = dict[str, list[np.ndarray]]

DECAY_SCALE = 0.606531  # exp(-0.5), as written in the official code: decay = exp(-0.606531 * sigmoid(.))
LN_EPS = 1e-5  # torch LayerNorm default
GN_EPS = 64e-5  # ln_x GroupNorm eps (per head)
L2_EPS = 1e-12  # torch F.normalize eps


def zero_state(config: ModelConfig) -> State:
    """The all-zero state: [att x_prev [C], wkv [H, N, N], ffn x_prev [C]] per layer, float64."""
    C, H, N = config.n_embd, config.n_head, config.head_size
    state: State = []
    for _ in range(config.n_layer):
        state += [np.zeros(C), np.zeros((H, N, N)), np.zeros(C)]
    return state


def to_float64(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights as float64 with the [1, 1, C] vectors flattened to [C]."""
    out = {}
    for key, value in weights.items():
        a = np.asarray(value).astype(np.float64)
        out[key] = a.reshape(-1) if a.ndim == 3 else a
    return out


def forward(
    weights: Mapping[str, np.ndarray], config: ModelConfig, tokens: Sequence[int], state: State | None = None,
    trace: Trace | None = None,
) -> tuple[np.ndarray, State]:
    """Logits [T, V] float64 for each token, and the state after the last one."""
    w = to_float64(weights)
    state = zero_state(config) if state is None else [np.array(s, dtype=np.float64) for s in state]
    logits = np.empty((len(tokens), config.vocab_size))
    for t, token in enumerate(tokens):
        logits[t], state = step(w, config, int(token), state, trace)
    return logits, state


def step(
    w: Mapping[str, np.ndarray], config: ModelConfig, token: int, state: State, trace: Trace | None = None
) -> tuple[np.ndarray, State]:
    """One token: logits [V] and the new state. `w` as returned by `to_float64`."""
    x = layer_norm(w["emb.weight"][token], w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"])
    new_state: State = []
    v_first = None
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        xa = layer_norm(x, w[p + "ln1.weight"], w[p + "ln1.bias"])
        att, wkv, v_first = time_mix(w, p + "att.", i, config, xa, state[3 * i], state[3 * i + 1], v_first, trace)
        x = x + att
        xf = layer_norm(x, w[p + "ln2.weight"], w[p + "ln2.bias"])
        ffn = channel_mix(w, p + "ffn.", xf, state[3 * i + 2])
        x = x + ffn
        record(trace, att_out=att, ffn_out=ffn, x=x)
        new_state += [xa, wkv, xf]
    x = layer_norm(x, w["ln_out.weight"], w["ln_out.bias"])
    return w["head.weight"] @ x, new_state


def time_mix(
    w: Mapping[str, np.ndarray], p: str, layer: int, config: ModelConfig,
    x: np.ndarray, x_prev: np.ndarray, S: np.ndarray, v_first: np.ndarray | None, trace: Trace | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TMix for one token: (output [C], new wkv state [H, N, N], v_first [C])."""
    H, N = config.n_head, config.head_size
    xx = x_prev - x  # token shift
    xr, xw, xk, xv, xa, xg = (x + xx * w[p + m] for m in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))

    r = w[p + "receptance.weight"] @ xr
    k = w[p + "key.weight"] @ xk
    v = w[p + "value.weight"] @ xv
    decay = np.exp(-DECAY_SCALE * sigmoid(w[p + "w0"] + np.tanh(xw @ w[p + "w1"]) @ w[p + "w2"]))  # in (0.545, 1)
    a = sigmoid(w[p + "a0"] + (xa @ w[p + "a1"]) @ w[p + "a2"])  # in-context learning rate
    g = sigmoid(xg @ w[p + "g1"]) @ w[p + "g2"]

    kk = l2_normalize((k * w[p + "k_k"]).reshape(H, N))  # (H, N), unit rows
    k = k * (1 + (a - 1) * w[p + "k_a"])
    if layer == 0:
        v_first = v
    else:
        v = v + (v_first - v) * sigmoid(w[p + "v0"] + (xv @ w[p + "v1"]) @ w[p + "v2"])

    r_h, k_h, v_h, a_h, w_h = (t.reshape(H, N) for t in (r, k, v, a, decay))
    # S = S diag(w) + (S (-kk)) (kk*a)^T + v k^T, per head; S[h, value, key]
    S = (
        S * w_h[:, None, :]
        + np.einsum("hij,hj->hi", S, -kk)[:, :, None] * (kk * a_h)[:, None, :]
        + v_h[:, :, None] * k_h[:, None, :]
    )
    y = np.einsum("hij,hj->hi", S, r_h)  # (H, N)
    record(trace, r=r, k=k, v=v, decay=decay, a=a, g=g, wkv_out=y.reshape(-1))

    y = group_norm(y, w[p + "ln_x.weight"].reshape(H, N), w[p + "ln_x.bias"].reshape(H, N))
    y = y + (r_h * k_h * w[p + "r_k"]).sum(axis=1, keepdims=True) * v_h  # bonus: per head (r.k.r_k) v
    return w[p + "output.weight"] @ (y.reshape(-1) * g), S, v_first


def channel_mix(w: Mapping[str, np.ndarray], p: str, x: np.ndarray, x_prev: np.ndarray) -> np.ndarray:
    """CMix for one token: W_value relu(W_key xk)^2."""
    xk = x + (x_prev - x) * w[p + "x_k"]
    return w[p + "value.weight"] @ np.maximum(w[p + "key.weight"] @ xk, 0.0) ** 2


def record(trace: Trace | None, **values: np.ndarray) -> None:
    """Append intermediates to `trace` when one is given."""
    if trace is not None:
        for name, value in values.items():
            trace.setdefault(name, []).append(value)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def group_norm(y: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """GroupNorm with one group per head: y (H, N) normalised over N."""
    return layer_norm(y, weight, bias, eps=GN_EPS)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), L2_EPS)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)
