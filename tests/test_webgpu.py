"""The WebGPU reference engine against the float64 oracle, the MLX engine and the real tiny model.

Tolerances (max abs logit error; logits are O(8)) were measured on lavapipe over the small
configs and two seeds, then given a margin of 5-10x:
  f32 weights vs oracle                       <= 7.4e-6  -> 1e-4
  f16 weights vs oracle on f16-rounded weights <= 1e-5    -> 1e-4
  f16 weights vs oracle on the f32 weights     <= 1.2e-2  -> 5e-2 (the cost of f16 storage)
  Q4_K vs oracle on the dequantized weights    <= 3.7e-5  -> 2e-4
  tiny real model vs its reference logits      2.4e-7     -> 1e-5
"""
from __future__ import annotations

import numpy as np
import pytest
import wgpu

from mlx_rwkv.config import ModelConfig
from mlx_rwkv.quant import Q4KTensor, dequantize_model, quantize_model, quantize_q4k, save_quantized
from mlx_rwkv.synth import synthesize
from oracle import forward as oracle_forward
from webgpu_ref import NoAdapterError, WebGPUError, WebGPUModel
from webgpu_ref import device as webgpu_device
from webgpu_ref import ops
from webgpu_ref.weights import Linear, to_matrix, upload

from conftest import SMALL_CONFIGS

pytestmark = pytest.mark.webgpu

F32_TOL, F16_ROUNDED_TOL, F16_TOL, Q4K_TOL, TINY_TOL = 1e-4, 1e-4, 5e-2, 2e-4, 1e-5
# The smallest shape Q4_K takes (K a multiple of 256).
C256 = ModelConfig(n_layer=2, n_embd=256, head_size=64, vocab_size=512, d_decay=32, d_aaa=32, d_mv=16,
                   d_gate=64, d_ffn=1024)


@pytest.fixture(scope="session")
def gpu():
    try:
        return webgpu_device.get_gpu()
    except NoAdapterError as e:
        pytest.skip(str(e))


def tokens_for(config: ModelConfig, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, n)


def f16_rounded(weights: dict) -> dict:
    """The weights as the f16 engine stores them: matrices and the embedding in f16, vectors f32."""
    vectors = ("ln", "x_", "w0", "a0", "v0", "k_k", "k_a", "r_k")
    out = {}
    for key, value in weights.items():
        stored_f16 = not isinstance(value, Q4KTensor) and not any(part in key for part in vectors)
        out[key] = np.asarray(value).astype(np.float16).astype(np.float32) if stored_f16 else value
    return out


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max())


# ---- numerics against the oracle --------------------------------------------------------------

def test_f32_matches_oracle(gpu, small_config):
    weights = synthesize(small_config, seed=0)
    tokens = tokens_for(small_config, 20)
    reference, _ = oracle_forward(weights, small_config, tokens)
    model = WebGPUModel.from_weights(weights, small_config, dtype="float32", prefill_chunk=8)
    logits, state = model.forward(tokens[:17], all_logits=True)  # chunks of 8, 8, 1
    assert logits.shape == (17, small_config.vocab_size) and logits.dtype == np.float32
    for t in range(17, 20):  # then one token at a time (the mat-vec path)
        step_logits, state = model.forward([tokens[t]], state)
        assert step_logits.shape == (small_config.vocab_size,)
        assert max_err(step_logits, reference[t]) < F32_TOL
    assert max_err(logits, reference[:17]) < F32_TOL


def test_f16_matches_oracle(gpu):
    config = SMALL_CONFIGS["c320-h5"]
    weights = synthesize(config, seed=1)
    tokens = tokens_for(config, 12)
    logits, _ = WebGPUModel.from_weights(weights, config).forward(tokens, all_logits=True)
    assert max_err(logits, oracle_forward(f16_rounded(weights), config, tokens)[0]) < F16_ROUNDED_TOL
    assert max_err(logits, oracle_forward(weights, config, tokens)[0]) < F16_TOL


@pytest.mark.parametrize("f16, subgroups", [(False, False), (False, True), (True, False)])
def test_feature_fallbacks(gpu, f16, subgroups):
    """Packed-f16 weights without shader-f16, shared-memory sums without subgroups."""
    offered = set(webgpu_device.adapter().features)
    for wanted, feature in ((f16, webgpu_device.F16), (subgroups, webgpu_device.SUBGROUPS)):
        if wanted and feature not in offered:  # e.g. lavapipe of Mesa 22 (Debian 12) has no subgroups
            pytest.skip(f"the adapter lacks {feature!r}")
    config = SMALL_CONFIGS["c128-h2"]
    weights = synthesize(config, seed=2)
    tokens = tokens_for(config, 12)
    model = WebGPUModel.from_weights(weights, config, f16=f16, subgroups=subgroups)
    assert (model.gpu.f16, model.gpu.subgroups) == (f16, subgroups)
    reference, _ = oracle_forward(f16_rounded(weights), config, tokens)
    logits, state = model.forward(tokens[:-1], all_logits=True)
    assert max_err(logits, reference[:-1]) < F16_ROUNDED_TOL
    assert max_err(model.forward(tokens[-1:], state)[0], reference[-1]) < F16_ROUNDED_TOL


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_q4k_matches_dequantized_oracle(gpu, dtype):
    weights = quantize_model(synthesize(C256, seed=1), progress=False)
    tokens = tokens_for(C256, 10)
    oracle_weights = dequantize_model(f16_rounded(weights) if dtype == "float16" else weights)
    reference, _ = oracle_forward(oracle_weights, C256, tokens)
    model = WebGPUModel.from_weights(weights, C256, dtype=dtype)
    assert {b.fmt for b in model.head} == {"q4k"}
    logits, state = model.forward(tokens[:-2], all_logits=True)  # tiled matmul on Q4_K
    assert max_err(logits, reference[:-2]) < Q4K_TOL
    for t in (8, 9):  # Q4_K mat-vec
        step_logits, state = model.forward([tokens[t]], state)
        assert max_err(step_logits, reference[t]) < Q4K_TOL


@pytest.mark.usefixtures("gpu")  # skips where no adapter exists
@pytest.mark.parametrize("subgroups", [None, False], ids=["default", "shared-memory-sums"])
@pytest.mark.parametrize("form", ops.Q4K_MATVECS, ids=lambda f: f.label)
def test_q4k_matvec_matches_dequantized_weights(subgroups, form):
    """The Q4_K mat-vec alone in each of its forms, several groups in one dispatch: odd
    super-block counts, rows not a multiple of 8 or 16 (and fewer than either), a K whose
    super-blocks outnumber a workgroup's step (more loop steps, the last one partial), the
    token shift and the epilogues."""
    dev = webgpu_device.get_gpu(subgroups=subgroups)
    rng = np.random.default_rng(5)
    shapes = [(13, 768, "mix", "none"), (8, 256, None, "tanh"), (21, 2560, "mix", "add"), (5, 16640, None, "relu_sq")]
    items, xs, mus, expected, x_off, mu_off, out_off = [], [], [], [], 0, 0, 0
    for i, (rows, k, mix, act) in enumerate(shapes):
        q4k = Q4KTensor(quantize_q4k(rng.standard_normal((rows, k), dtype=np.float32)), (rows, k))
        prev, cur = rng.standard_normal((2, k), dtype=np.float32)
        mu = rng.random(k, dtype=np.float32) if mix else None
        x = cur if mu is None else cur + (prev - cur) * mu
        y = q4k.dequantize().astype(np.float64) @ x.astype(np.float64)
        expected.append({"none": y, "tanh": np.tanh(y), "add": 1.0 + y, "relu_sq": np.maximum(y, 0) ** 2}[act])
        items.append(Linear(f"w{i}", to_matrix(q4k, "f32"), x_off + k, mu_off if mix else None, out_off, act))
        xs += [prev, cur]
        if mix:
            mus.append(mu)
            mu_off += k
        x_off += 2 * k
        out_off += rows
    got = run_linear(dev, items, xs, mus, out_off, 1, "q4k", q4k=form)
    want = np.concatenate(expected)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def run_linear(dev, items: list[Linear], xs: list[np.ndarray], mus: list[np.ndarray], out_size: int, tokens: int,
               fmt: str, **options) -> np.ndarray:
    """One linear op over `items` (one batch) on `tokens` tokens; the output buffer starts at 1."""
    [batch] = upload(dev, items, dev.max_binding)
    device, usage = dev.device, wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
    x = device.create_buffer_with_data(data=np.concatenate(xs).astype(np.float32), usage=usage)
    vecs = device.create_buffer_with_data(data=np.concatenate([*mus, np.zeros(4, np.float32)]), usage=usage)
    out = device.create_buffer_with_data(data=np.ones(out_size, np.float32), usage=usage)
    step = device.create_buffer_with_data(data=np.array([tokens, 0, 0, 0], np.uint32), usage=wgpu.BufferUsage.UNIFORM)
    op = ops.linear(dev, "linear", fmt, batch.groups, batch.buffer, x, vecs, out, step, tokens > 1, **options)
    encoder = device.create_command_encoder()
    compute_pass = encoder.begin_compute_pass()
    ops.encode(compute_pass, [op], tokens)
    compute_pass.end()
    device.queue.submit([encoder.finish()])
    return np.frombuffer(device.queue.read_buffer(out), np.float32)


@pytest.mark.parametrize("fmt", ["f32", "q4k"])
def test_tiled_matmul_matches_numpy(gpu, fmt):
    """The prefill matmul alone, several groups in one dispatch, on 100 tokens (a partial second
    tile of 64): rows past two 64-row tiles and fewer than one, the token shift across the whole
    chunk and the epilogues."""
    rng = np.random.default_rng(6)
    T = 100
    shapes = ([(130, 48, "mix", "none"), (64, 272, None, "tanh"), (3, 16, "mix", "add")] if fmt == "f32" else
              [(130, 256, "mix", "none"), (64, 512, None, "relu_sq"), (3, 256, "mix", "add")])
    items, xs, mus, expected, x_off, mu_off, out_off = [], [], [], [], 0, 0, 0
    for i, (rows, k, mix, act) in enumerate(shapes):
        w = rng.standard_normal((rows, k), dtype=np.float32)
        weight = Q4KTensor(quantize_q4k(w), (rows, k)) if fmt == "q4k" else w
        dense = weight.dequantize() if fmt == "q4k" else w
        x_rows = rng.standard_normal((T + 1, k), dtype=np.float32)  # row 0: the previous token
        mu = rng.random(k, dtype=np.float32) if mix else None
        inputs = x_rows[1:] if mu is None else x_rows[1:] + (x_rows[:-1] - x_rows[1:]) * mu
        y = inputs.astype(np.float64) @ dense.astype(np.float64).T  # (T, rows)
        expected.append({"none": y, "tanh": np.tanh(y), "add": 1.0 + y, "relu_sq": np.maximum(y, 0) ** 2}[act])
        items.append(Linear(f"w{i}", to_matrix(weight, "f32"), x_off + k, mu_off if mix else None, out_off, act))
        xs.append(x_rows.reshape(-1))
        if mix:
            mus.append(mu)
            mu_off += k
        x_off += (T + 1) * k
        out_off += T * rows
    got = run_linear(gpu, items, xs, mus, out_off, T, fmt)
    want = np.concatenate([e.reshape(-1) for e in expected])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_quant_option_quantizes_at_load(gpu):
    weights = synthesize(C256, seed=4)
    tokens = tokens_for(C256, 4)
    model = WebGPUModel.from_weights(weights, C256, dtype="float32", quant="q4k", quant_head=False)
    assert {b.fmt for b in model.head} == {"f32"} and model.stages[0]["ffn_key"][0].fmt == "q4k"
    reference, _ = oracle_forward(dequantize_model(quantize_model(weights, include_head=False, progress=False)),
                                  C256, tokens)
    assert max_err(model.forward(tokens)[0], reference[-1]) < Q4K_TOL


def test_loads_a_quantized_file(gpu, tmp_path):
    weights = quantize_model(synthesize(C256, seed=3), progress=False)
    path = save_quantized(weights, tmp_path / "q4k.safetensors")
    tokens = tokens_for(C256, 5)
    loaded = WebGPUModel.load(path, dtype="float32").forward(tokens, all_logits=True)[0]
    direct = WebGPUModel.from_weights(weights, C256, dtype="float32").forward(tokens, all_logits=True)[0]
    np.testing.assert_array_equal(loaded, direct)


# ---- one pass, several ways -------------------------------------------------------------------

@pytest.mark.parametrize("subgroups", [None, False], ids=["default", "shared-memory-sums"])
@pytest.mark.parametrize("stage", [None, 8, 4], ids=["adapter-limit", "stage-8", "stage-4"])
def test_chunked_wkv_over_many_stages(monkeypatch, subgroups, stage):
    """A 45-token chunk through the WKV scan: several staged groups of tokens and a partial
    last one, with the stage the adapter's workgroup memory allows (16 tokens on lavapipe) and
    smaller ones forced by a lower limit (six f32 vectors of 64 per token, plus a vec4 per
    invocation for shared-memory sums)."""
    dev = webgpu_device.get_gpu(subgroups=subgroups)
    if stage:
        reduction = 0 if dev.subgroups else 16 * 256
        monkeypatch.setitem(dev.limits, "max-compute-workgroup-storage-size", 24 * 64 * stage + reduction)
    config = SMALL_CONFIGS["c128-h2"]
    weights = synthesize(config, seed=7)
    tokens = tokens_for(config, 45)
    reference, _ = oracle_forward(weights, config, tokens)
    model = WebGPUModel.from_weights(weights, config, dtype="float32", prefill_chunk=64, subgroups=subgroups)
    assert any(op.name.endswith(".scan") for op in model.op_list("body", True))
    logits, _ = model.forward(tokens, all_logits=True)
    assert max_err(logits, reference) < F32_TOL


@pytest.mark.parametrize("head_size", [16, 32, 128])
def test_other_head_sizes_match_oracle(gpu, head_size):
    """Head sizes other than 64, prefill and decode: 16 and 32 run the chunked scan with
    subgroup sums, 128 with shared-memory sums where workgroup memory allows (else the fused
    kernel over the chunk)."""
    config = ModelConfig(n_layer=2, n_embd=2 * head_size if head_size > 16 else 64, head_size=head_size,
                         vocab_size=300, d_decay=16, d_aaa=16, d_mv=16, d_gate=32, d_ffn=256)
    weights = synthesize(config, seed=8)
    tokens = tokens_for(config, 21)
    reference, _ = oracle_forward(weights, config, tokens)
    model = WebGPUModel.from_weights(weights, config, dtype="float32")
    logits, state = model.forward(tokens[:-1], all_logits=True)
    assert max_err(logits, reference[:-1]) < F32_TOL
    assert max_err(model.forward(tokens[-1:], state)[0], reference[-1]) < F32_TOL


def test_prefill_equals_steps(gpu):
    config = SMALL_CONFIGS["c128-h2"]
    weights = synthesize(config, seed=5)
    tokens = tokens_for(config, 13)
    model = WebGPUModel.from_weights(weights, config, dtype="float32", prefill_chunk=5)
    whole, _ = model.forward(tokens, all_logits=True)
    state, steps = None, []
    for token in tokens:
        logits, state = model.forward([token], state)
        steps.append(logits)
    assert max_err(whole, np.array(steps)) < F32_TOL  # two f32 summation orders: measured 4e-5
    last, _ = model.forward(tokens)
    assert max_err(last, whole[-1]) < F32_TOL


def test_per_op_sync_gives_the_same_logits(gpu):
    config = SMALL_CONFIGS["v37-c192-h3"]
    weights = synthesize(config, seed=6)
    tokens = tokens_for(config, 6)
    model = WebGPUModel.from_weights(weights, config)
    one_submit, _ = model.forward(tokens, all_logits=True)
    model.per_op_sync = True
    per_op, _ = model.forward(tokens, all_logits=True)
    np.testing.assert_array_equal(per_op, one_submit)


def test_split_buffers_match_unsplit(gpu):
    """A binding limit below the head's size splits matrices by rows instead of failing."""
    config = SMALL_CONFIGS["c320-h5"]
    weights = synthesize(config, seed=7)
    tokens = tokens_for(config, 7)
    whole = WebGPUModel.from_weights(weights, config)
    split = WebGPUModel.from_weights(weights, config, max_binding=256 * 1024)  # head: 640 KB in f16
    assert len(whole.head) == 1 and len(split.head) == 3
    assert split.dispatches_per_token > whole.dispatches_per_token == 1 + 8 * config.n_layer + 2
    np.testing.assert_allclose(split.forward(tokens, all_logits=True)[0],
                               whole.forward(tokens, all_logits=True)[0], atol=1e-5)
    np.testing.assert_allclose(split.forward(tokens[:1])[0], whole.forward(tokens[:1])[0], atol=1e-5)


# ---- state ------------------------------------------------------------------------------------

def test_state_round_trip(gpu):
    config = SMALL_CONFIGS["c128-h2"]
    weights = synthesize(config, seed=8)
    tokens = tokens_for(config, 10)
    model = WebGPUModel.from_weights(weights, config, dtype="float32")
    _, oracle_state = oracle_forward(weights, config, tokens[:6])
    reference, _ = oracle_forward(weights, config, tokens[6:], oracle_state)

    _, state = model.forward(tokens[:6])
    arrays = state.to_numpy()
    assert [a.shape for a in arrays] == [s.shape for s in oracle_state]
    assert all(a.dtype == np.float32 for a in arrays)
    assert max(max_err(a, b) for a, b in zip(arrays, oracle_state)) < F32_TOL

    branch = state.copy()
    first, _ = model.forward(tokens[6:], state, all_logits=True)  # advances `state` in place
    again, _ = model.forward(tokens[6:], branch, all_logits=True)
    uploaded, _ = model.forward(tokens[6:], model.state_from_numpy(arrays), all_logits=True)
    from_oracle, _ = model.forward(tokens[6:], oracle_state, all_logits=True)
    for logits in (first, again, uploaded, from_oracle):
        assert max_err(logits, reference) < F32_TOL
    np.testing.assert_array_equal(again, first)
    assert max_err(state.to_numpy()[1], branch.to_numpy()[1]) == 0.0


def test_zero_state_is_zero(gpu):
    config = SMALL_CONFIGS["l1-c64"]
    model = WebGPUModel.from_weights(synthesize(config), config)
    assert all(not a.any() for a in model.new_state().to_numpy())


# ---- errors -----------------------------------------------------------------------------------

def test_clear_errors(gpu):
    config = SMALL_CONFIGS["l1-c64"]
    weights = synthesize(config)
    model = WebGPUModel.from_weights(weights, config)
    with pytest.raises(ValueError, match="token ids"):
        model.forward([config.vocab_size])
    with pytest.raises(ValueError, match="at least one token"):
        model.forward([])
    with pytest.raises(ValueError, match="dtype"):
        WebGPUModel.from_weights(weights, config, dtype="bfloat16")
    with pytest.raises(ValueError, match="quant"):
        WebGPUModel.from_weights(weights, config, quant="q8")
    with pytest.raises(WebGPUError, match="max-storage-buffer-binding-size"):
        WebGPUModel.from_weights(weights, config, max_binding=4096)
    other = WebGPUModel.from_weights(weights, config)
    with pytest.raises(ValueError, match="another model"):
        model.forward([1], other.new_state())
    with pytest.raises(ValueError, match="3 arrays per layer"):
        model.state_from_numpy([np.zeros(config.n_embd)])
    with pytest.raises(ValueError, match="no Q4_K mat-vec form"):
        ops.Q4KMatvec("bits", cols=48)


def test_no_adapter_is_a_clear_error(monkeypatch):
    def fail(**kwargs):
        raise RuntimeError("Request adapter failed")

    monkeypatch.setattr(wgpu.gpu, "request_adapter_sync", fail)
    webgpu_device.adapter.cache_clear()
    try:
        with pytest.raises(NoAdapterError, match="Vulkan driver"):
            webgpu_device.get_gpu()
    finally:
        webgpu_device.adapter.cache_clear()


# ---- other engines and real weights -----------------------------------------------------------

def test_tiny_real_model_reproduces_reference(gpu, tiny_model_path, tiny_reference_logits):
    for dtype in ("float32", "float16"):
        logits, _ = WebGPUModel.load(tiny_model_path, dtype=dtype).forward([34, 105, 110])
        assert max_err(logits, tiny_reference_logits) < TINY_TOL


@pytest.mark.parametrize("config, quant", [(SMALL_CONFIGS["c128-h2"], None), (C256, "q4k")], ids=["f32", "q4k"])
def test_matches_mlx_engine(gpu, synthetic_checkpoint, config, quant):
    mlx_rwkv = pytest.importorskip("mlx_rwkv")
    checkpoint = synthetic_checkpoint(config, fmt="safetensors", seed=9)
    tokens = tokens_for(config, 11).tolist()
    mx = pytest.importorskip("mlx.core")
    with mx.stream(mx.cpu):  # MLX-CUDA runs float32 matmuls in TF32; its kernels have their own tests
        mlx_model, _ = mlx_rwkv.load(checkpoint.path, dtype="float32", quant=quant)
        mlx_logits, mlx_state = mlx_model.forward(tokens, all_logits=True)
        mlx_logits, mlx_wkv = np.array(mlx_logits), [np.array(s[0]) for s in mlx_state.wkv]
    logits, state = WebGPUModel.load(checkpoint.path, dtype="float32", quant=quant).forward(tokens, all_logits=True)
    assert max_err(logits, mlx_logits) < F32_TOL
    ours = state.to_numpy()
    for i in range(config.n_layer):
        assert max_err(ours[3 * i + 1], mlx_wkv[i]) < F32_TOL
