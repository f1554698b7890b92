"""The persistent layer kernel on the GPU (metal_kernels/layer_decode.inc, one launch per layer in
decode) against the five launches per layer, over a long decode: the grid barrier's waits never
give up, and logits and state stay as close as the WKV phase's other sum order allows. The same
comparison runs emulated on the CPU in test_kernels_emulated.py. On CUDA it runs one block per SM
(MLX_RWKV_LAYER_KERNEL=sm); on a Mac only when MLX_RWKV_LAYER_KERNEL=N asks for it."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import _config
from mlx_rwkv import kernels, layer_kernel
from mlx_rwkv.loading import build_model
from mlx_rwkv.quant import quantize_model
from mlx_rwkv.synth import synthesize

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("quant,B", [(False, 1), (True, 1), (True, 2)])
def test_layer_kernel_decode_matches_five_launches(monkeypatch, quant, B):
    if kernels.gpu_backend() == "cuda":
        monkeypatch.setenv(layer_kernel.ENV, "sm")
    if layer_kernel.resident_threadgroups() == 0:
        pytest.skip("the layer kernel is off on this device (Metal: set MLX_RWKV_LAYER_KERNEL=N)")
    config = _config(n_layer=4, n_embd=1024, vocab_size=512, d_decay=64, d_aaa=64, d_mv=32, d_gate=128)
    weights = synthesize(config, seed=7, dtype=np.float16)
    if quant:
        weights = quantize_model(weights, include_head=True)
    ids = mx.array(np.random.default_rng(2).integers(0, config.vocab_size, (B, 200)), dtype=mx.int32)

    def decode(model):
        state, rows = model.new_state(B), []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            rows.append(logits)
        mx.eval(rows, state.arrays())
        return np.array(mx.stack(rows).astype(mx.float32)), [np.array(a) for a in state.wkv]

    one = build_model(weights, config, "float16")
    assert one.arenas
    got, got_wkv = decode(one)  # compiled steps, one evaluation at the end: the launches must order themselves
    assert not layer_kernel.gave_up(one.barrier_words), "a grid-barrier wait gave up: a threadgroup was not resident"
    monkeypatch.setenv(layer_kernel.ENV, "0")
    five = build_model(weights, config, "float16")
    assert not five.arenas
    want, want_wkv = decode(five)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-2, err  # fp16 activations, another sum order in the WKV phase
    for a, b in zip(got_wkv, want_wkv):
        assert np.abs(a - b).max() / np.abs(b).max() < 2e-2
