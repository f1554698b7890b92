"""Initial-state files: RWKV state-tuning `.pth` files and our own `State` files.

State tuning (RWKV-PEFT, `--train_type state`) trains only the initial WKV state of every
layer and saves it as a flat dict `{"blocks.{i}.att.time_state": (H, N, N)}` (torch.save,
usually bfloat16): the parameter `RWKV_Tmix_x070_State.time_state = torch.zeros(n_head,
head_size, head_size)` in RWKV-PEFT `rwkvt/rwkv7/att.py`. For x070 its layout is S[h, v, k]
(value index first), which is exactly our `State.wkv[i][b]` and the official `rwkv`
package's x070 `state[3*i+1]`:
- RWKV-PEFT `rwkvt/operator/rwkvop.py`: the Triton kernel loads it as `state[v, k]`
  (`y = q @ state^T`, `state += v^T @ k`) with no transposition, and the fla path passes
  `time_state.transpose(1, 2)` to `chunk_rwkv7`, whose `initial_state` is [K, V];
- RWKV-Runner `backend-python/utils/rwkv.py` `load_rwkv_state`: for `model.version >= 7` it
  uses `time_state` as-is as the official package's `state[i*3+1]` (float32), and transposes
  it (`.transpose(1, 2)`) only for v5/v6 models, whose official state is S[k, v];
- the token-shift parts of the state (att x_prev, ffn x_prev) are not tuned and start at zero
  (RWKV-Runner and ChatRWKV `API_DEMO_CHAT.py` fill `state[i*3+0]` and `state[i*3+2]` with zeros).
The file is read without torch (`mlx_rwkv.checkpoint.read_tensors`); other keys in it (a whole
model checkpoint with time_state tensors merged in) are ignored.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .checkpoint import read_tensors
from .config import CheckpointError
from .loading import to_mx
from .state import State, StateError

if TYPE_CHECKING:
    from .model import RWKV7

TIME_STATE = "blocks.{}.att.time_state"
SAFETENSORS_STATE = "mlx-rwkv-state"


def load_tuned_state(path: str | os.PathLike, model: "RWKV7") -> State:
    """The batch-1 `State` a state-tuning file describes: wkv[i] = time_state of layer i (fp32),
    token-shift states zero. Raises StateError when the file does not fit `model`."""
    try:
        tensors = read_tensors(path)
    except (CheckpointError, OSError) as e:
        raise StateError(f"{path}: not a readable state-tuning file ({e})") from None
    c = model.config
    shape = (c.n_head, c.head_size, c.head_size)
    layers = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.endswith(".att.time_state"))
    if layers != list(range(c.n_layer)):
        found = f"layers {layers[0]}..{layers[-1]} ({len(layers)} tensors)" if layers else "no time_state tensors"
        raise StateError(f"{path}: a state-tuning file for this model needs blocks.0..{c.n_layer - 1}.att.time_state; "
                         f"it has {found}")
    wkv = []
    for i in range(c.n_layer):
        t = tensors[TIME_STATE.format(i)]
        if tuple(t.shape) != shape:
            raise StateError(f"{path}: {TIME_STATE.format(i)} has shape {tuple(t.shape)}; this model needs {shape} "
                             f"(heads, head size, head size)")
        wkv.append(to_mx(np.asarray(t), mx.float32)[None])  # (1, H, N, N) S[v, k], no transposition
    zeros = [mx.zeros((1, c.n_embd), model.dtype) for _ in range(c.n_layer)]
    state = State(zeros, wkv, [mx.zeros((1, c.n_embd), model.dtype) for _ in range(c.n_layer)])
    mx.eval(state.arrays())
    return state


def load_state_file(path: str | os.PathLike, model: "RWKV7") -> State:
    """A state from either kind of file: ours (`State.save`, .safetensors with our metadata) or a
    state-tuning `.pth`/.safetensors with `blocks.{i}.att.time_state` tensors."""
    try:
        _, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception:  # noqa: BLE001 - not a safetensors file: MLX raises several types
        meta = {}
    if meta.get("format") == SAFETENSORS_STATE:
        return State.load(path, model)
    return load_tuned_state(path, model)
