"""Every custom kernel, run on the CPU through the production wrappers (tests/kernel_emulator.py),
against the pure-MLX path the CPU uses. The same checks run on the real GPU kernels in
test_wkv_kernel.py / test_matvec_kernel.py (marked gpu); these keep the kernels' logic under CI.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kernel_emulator import emulated_kernels
from mlx_rwkv.config import ModelConfig
from mlx_rwkv.matvec import MAX_ROWS, ProjectionGroup, Segment
from mlx_rwkv import wkv
from mlx_rwkv.norm_mix import norm_mix
from mlx_rwkv.wkv import wkv7
from test_matvec_kernel import TOL, _segments
from test_wkv_kernel import random_inputs

RNG = np.random.default_rng(5)


def arr(*shape, dtype=mx.float32, scale=1.0):
    return mx.array(RNG.standard_normal(shape).astype(np.float32) * scale).astype(dtype)


def close(got, want, tol):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("B,T,C,M", [(1, 1, 512, 7), (2, 1, 320, 1), (1, 9, 256, 7), (2, 3, 320, 1)])
def test_norm_mix(dtype, B, T, C, M):
    x, dx, x_prev, ln, mix = (arr(B, T, C, dtype=dtype), arr(B, T, C, dtype=dtype), arr(B, C, dtype=dtype),
                              (arr(C, dtype=dtype), arr(C, dtype=dtype)), arr(M, C, dtype=dtype))
    want = norm_mix(x, dx, ln, x_prev, mix)
    with emulated_kernels():
        got = norm_mix(x, dx, ln, x_prev, mix)
    for g, w in zip(got, want):
        close(g, w, 4 * TOL[dtype])


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("q4k", [False, True])
@pytest.mark.parametrize("B,T,with_dx", [(1, 1, True), (3, 1, True), (2, 1, False), (1, 2, True), (12, 1, True),
                                         (16, 1, True)])
def test_matvec_after_norm(dtype, q4k, B, T, with_dx):
    """after_norm = norm_mix, then the group on mix row x_base / C: one launch in decode (the
    prologue; bit-identical norm), two otherwise: T > 1, more rows than one tile (12, 16), or
    more than the prologue's threadgroup memory (B = 16 rows of C = 512 in float32)."""
    C, M = 512, 3
    segments, _ = _segments([(40, C), (8, C), (24, C)], ["none", "tanh", "relu2"], q4k, [0, 2 * C, C])
    x, dx, x_prev = arr(B, T, C, dtype=dtype), arr(B, T, C, dtype=dtype) if with_dx else None, arr(B, C, dtype=dtype)
    ln, mix = (arr(C, dtype=dtype), arr(C, dtype=dtype)), arr(M, C, dtype=dtype)
    with emulated_kernels() as launched:
        group = ProjectionGroup(segments, dtype)
        want_x, want_h, xs = norm_mix(x, dx, ln, x_prev, mix)
        want = group(xs, B * T)
        del launched[:]
        got_x, got_h, got = group.after_norm(x, dx, ln, x_prev, mix)
    fused = T == 1 and B <= 8 and B * C * dtype.size <= 16384
    assert launched == (["matvec_norm"] if fused else ["norm_mix", "matvec"] if with_dx else ["matvec"])
    for g, w in ((got_x, want_x), (got_h, want_h), (got, want)):
        if fused and with_dx:  # norm_mix.inc's operations in the same order
            np.testing.assert_array_equal(np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32)))
        else:  # without dx norm_mix runs MLX's layer_norm
            close(g, w, 0 if not fused else 4 * TOL[dtype])


@pytest.mark.parametrize("shapes,bases", [([(16, 512)], [0]), ([(16, 128)], [256]), ([(8, 256), (16, 512)], [0, 256])])
def test_matvec_after_norm_needs_rows_of_width_c(shapes, bases):
    """The prologue holds each activation row's C values of one mix row: a segment whose K is not
    C (reading past the row: beyond the prologue's threadgroup memory for K > C) runs as
    norm_mix + the group, whose results after_norm must give."""
    C, M, B = 256, 3, 2
    segments, _ = _segments(shapes, ["none"] * len(shapes), False, bases)
    x, dx, x_prev = arr(B, 1, C), arr(B, 1, C), arr(B, C)
    ln, mix = (arr(C), arr(C)), arr(M, C)
    with emulated_kernels() as launched:
        group = ProjectionGroup(segments, mx.float32)
        want = group(norm_mix(x, dx, ln, x_prev, mix)[2], B)
        del launched[:]
        got = group.after_norm(x, dx, ln, x_prev, mix)[2]
    assert launched == ["norm_mix", "matvec"]
    close(got, want, 0)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("B,first", [(1, True), (3, False)])
def test_wkv7_lora(dtype, B, first):
    """wkv7_lora's one launch (the LoRA up-projections inside) = the lora_up group, then wkv7."""
    H, N = 2, 64
    C = H * N
    ranks = [32, 24, 16, 64]  # w, a, v, g; the hiddens start after r, k, v in the flat input
    bases = list(3 * C + np.cumsum([0] + ranks[:-1]))
    hid = arr(B * (3 * C + sum(ranks)), dtype=dtype)
    (r, k, v, *_), params, state = random_inputs(B, 1, H, N, dtype, seed=B)
    v_first = None if first else arr(B, 1, C, dtype=dtype)
    segments = [Segment(RNG.standard_normal((C, rank)).astype(np.float32) / 4, x_base=int(base))
                for rank, base in zip(ranks, bases)]
    with emulated_kernels() as launched:
        up = ProjectionGroup(segments, dtype)
        lw, la, lv, g = (t.reshape(B, 1, C) for t in up.split(up(hid, B), B))
        y_want, s_want = wkv7(r, k, v, g, lw, la, lv, v_first, params, state)
        del launched[:]
        y, s = wkv.wkv7_lora(r, k, v, hid, up, v_first, params, state)
    assert set(launched) == {"wkv7_lora"}  # (the first call also probes the 512-thread threadgroup)
    close(s, s_want, 1e-4)
    close(y, y_want, {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}[dtype])  # LoRA sums: own order


# T <= 4: the fused decode kernel; longer: scan + finish, with a partial last stage (21 = 8 + 8
# + 5: a pair without its second token; 38 = 4 x 8 + 6); N = 32: one float4 per lane, four tokens
# per preparation pass, two threadgroups per head; N = 128: no scan kernel, prefill on MLX ops
@pytest.mark.parametrize("B,T,H,N", [(1, 1, 2, 64), (2, 3, 2, 64), (2, 21, 2, 64), (1, 38, 3, 64),
                                     (1, 21, 2, 32), (1, 9, 1, 128)])
@pytest.mark.parametrize("first", [True, False])
def test_wkv7(B, T, H, N, first):
    (r, k, v, g, lw, la, lv, vf), params, state = random_inputs(B, T, H, N, mx.float32, seed=T)
    vf = None if first else vf
    y_want, s_want = wkv7(r, k, v, g, lw, la, lv, vf, params, state)
    assert (wkv.scan_launch(B, H, N) is None) == (N > 64)
    with emulated_kernels():
        y, s = wkv7(r, k, v, g, lw, la, lv, vf, params, state)
    close(s, s_want, 1e-4)
    close(y, y_want, 1e-4)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("q4k", [False, True])
@pytest.mark.parametrize("nt", [1, 3, 8, 13, MAX_ROWS + 1])
def test_matvec(dtype, q4k, nt):
    """Mixed segments: odd row counts (rows of a SIMD-group past the segment's end), tanh/sigmoid/relu2.
    nt = 13: tiles of 8 rows, the last one partial; above MAX_ROWS the matmul path, whose Q4_K
    segments come from one expansion of all their blocks."""
    shapes = [(5, 512), (3, 256), (33, 512), (2, 64)]
    acts, bases = ["none", "tanh", "relu2", "sigmoid"], [0, 512, 768, 1280]
    segments, _ = _segments(shapes, acts, q4k, bases)
    x = arr(nt * 1344, dtype=dtype)
    want = ProjectionGroup(segments, dtype)(x, nt)
    with emulated_kernels():
        group = ProjectionGroup(segments, dtype)
        assert group.kernel is not None
        got = group(x, nt)
    close(got, want, 1e-4 if q4k and dtype == mx.float32 else TOL[dtype])


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_expand_q4k_matches_dequantize(dtype):
    """The expansion kernel over the blocks of two matrices one after another: float32 equal to
    dequantize_q4k bit for bit, fp16 / bf16 its round-to-nearest-even."""
    from mlx_rwkv.q4k_linear import expand_q4k
    from mlx_rwkv.quant import dequantize_q4k, quantize_q4k

    mats = [RNG.standard_normal((3, 512)).astype(np.float32), RNG.standard_normal((5, 256)).astype(np.float32) * 40]
    blocks = [quantize_q4k(m) for m in mats]
    want = np.concatenate([dequantize_q4k(b, m.shape).reshape(-1) for b, m in zip(blocks, mats)])
    words = mx.view(mx.array(np.concatenate([b.reshape(-1) for b in blocks])), mx.uint32)
    with emulated_kernels():
        got = expand_q4k(words, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    rounded = mx.array(want).astype(dtype).astype(mx.float32)
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(rounded))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("quant", [None, "q4k"])
def test_whole_model_gpu_path(dtype, quant):
    """The model as it runs on a GPU (packed projections, every kernel, prefill and decode
    shapes, B = 2) against the same weights on the CPU path."""
    from conftest import _config
    from mlx_rwkv.loading import build_model
    from mlx_rwkv.quant import quantize_model
    from mlx_rwkv.synth import synthesize

    config = _config(n_layer=2, n_embd=256, vocab_size=300, d_decay=32, d_aaa=32, d_mv=32, d_gate=64)
    weights = synthesize(config, seed=3, dtype=np.float16)
    if quant:
        weights = quantize_model(weights, include_head=True)
    ids = mx.array(RNG.integers(0, config.vocab_size, (2, 19)), dtype=mx.int32)

    def run(model):  # a 17-token prefill, then two decode steps (uncompiled: the emulator is eager)
        logits, state = model._run(ids[:, :17], model.new_state(2), all_logits=True)
        outs = [logits]
        for t in (17, 18):
            logits, state = model._run(ids[:, t:t + 1], state, all_logits=True)
            outs.append(logits)
        return mx.concatenate(outs, axis=1), state

    want, want_state = run(build_model(weights, config, dtype))
    with emulated_kernels() as launched:
        model = build_model(weights, config, dtype)
        assert model.head.kernel is not None
        got, got_state = run(model)
        del launched[:]
        model._run(ids[:, :1], model.new_state(2), all_logits=False)  # decode: 5 launches per layer
    layer = ["matvec_norm", "wkv7_lora", "matvec", "matvec_norm", "matvec"]
    assert launched == layer * config.n_layer + ["matvec"]  # + the head
    tol = {"float32": 2e-4, "float16": 2e-2, "bfloat16": 5e-2}[dtype]  # measured: bf16 up to 1e-2
    close(got, want, tol)
    for a, b in zip(got_state.wkv, want_state.wkv):
        close(a, b, tol)


def test_matvec_falls_back_where_16_byte_loads_would_misalign():
    """x_base or K not a multiple of 8 (odd LoRA ranks, head sizes): the matmul path, same results."""
    for shapes, bases in (([(8, 64)], [12]), ([(8, 36)], [0])):
        segments, _ = _segments(shapes, ["none"], False, bases)
        x = arr(2 * (bases[0] + shapes[0][1]), dtype=mx.float16)
        want = ProjectionGroup(segments, mx.float16)(x, 2)
        with emulated_kernels():
            group = ProjectionGroup(segments, mx.float16)
            assert group.kernel is None
            close(group(x, 2), want, 0)


@pytest.mark.parametrize("first", [True, False])
def test_wkv7_falls_back_where_the_fused_threadgroup_does_not_fit(first):
    """A Metal pipeline that takes 256 threads (register pressure): the 512-thread fused decode
    kernel fails its one probe, and this and every later call run the 128-thread scan kernels,
    with the same results; where it fits, the probe passes once and the fused kernel runs."""
    from mlx_rwkv import kernels

    (r, k, v, g, lw, la, lv, vf), params, state = random_inputs(1, 1, 2, 64, mx.float32, seed=1)
    vf = None if first else vf
    y_want, s_want = wkv7(r, k, v, g, lw, la, lv, vf, params, state)
    with emulated_kernels(max_threads=256) as launched:
        for _ in range(2):
            y, s = wkv7(r, k, v, g, lw, la, lv, vf, params, state)
            close(s, s_want, 1e-4)
            close(y, y_want, 1e-4)
        assert launched == ["wkv7_scan", "wkv7_finish"] * 2  # the failed probe launched nothing
        assert list(kernels._threadgroup_fits.values()) == [False]
    with emulated_kernels(max_threads=1024) as launched:
        for _ in range(2):
            close(wkv7(r, k, v, g, lw, la, lv, vf, params, state)[0], y_want, 1e-4)
        assert launched == ["wkv7"] * 3  # the probe, then one launch per call


def test_threadgroup_fits_passes_other_errors_on():
    from mlx_rwkv import kernels

    def probe():
        raise ValueError("[metal_kernel] something else")

    with emulated_kernels(), pytest.raises(ValueError, match="something else"):
        kernels.threadgroup_fits("other", probe)




def _run_probe(monkeypatch, body: str) -> np.ndarray:
    """y (128,) of a 2 x 64-thread kernel with `body`, emulated."""
    from kernel_emulator import EmulatedKernel
    from mlx_rwkv import kernels

    real = kernels.read_source
    monkeypatch.setattr(kernels, "read_source", lambda f: body if f == "probe.inc" else real(f))
    spec = kernels.KernelSpec(name="probe", inputs=("x",), outputs=("y",))
    with emulated_kernels():
        (y,) = EmulatedKernel(spec, 1024, [])(
            inputs=[mx.arange(128, dtype=mx.float32)], template=[("N", 64)], grid=(128, 1, 1),
            threadgroup=(64, 1, 1), output_shapes=[(128,)], output_dtypes=[mx.float32])
    return np.array(y)


def test_threadgroup_memory_read_before_write_fails(monkeypatch):
    """Threadgroup memory starts as NaN in every threadgroup: a read before any write, or of
    what another threadgroup wrote, gives NaN (on a GPU: whatever was there)."""
    ok = "SHARED float s[N];\ns[tid] = x[gid * N + tid];\nBARRIER();\ny[gid * N + tid] = s[(tid + 1) % N];\n"
    np.testing.assert_array_equal(_run_probe(monkeypatch, ok), np.roll(np.arange(128).reshape(2, 64), -1, 1).ravel())
    planted = "SHARED float s[N];\ny[gid * N + tid] = s[tid];\ns[tid] = x[gid * N + tid];\n"
    assert np.isnan(_run_probe(monkeypatch, planted)).all()
    group_one_reads_group_zero = "SHARED float s[N];\nif (gid == 0) { s[tid] = x[tid]; }\nBARRIER();\ny[gid * N + tid] = s[tid];\n"
    assert np.isnan(_run_probe(monkeypatch, group_one_reads_group_zero)[64:]).all()


def _layer_model(vocab_size: int = 300) -> tuple[ModelConfig, dict]:
    """The layer-kernel tests' model: 2 layers, C = 256 (4 heads of 64), float16 synthetic weights."""
    from conftest import _config
    from mlx_rwkv.synth import synthesize

    config = _config(n_layer=2, n_embd=256, vocab_size=vocab_size, d_decay=32, d_aaa=32, d_mv=32, d_gate=64)
    return config, synthesize(config, seed=4, dtype=np.float16)


@pytest.mark.parametrize("dtype,quant,B", [("float32", False, 1), ("float16", True, 1), ("bfloat16", False, 2),
                                           ("float16", False, 2)])
def test_layer_kernel_matches_the_five_launches(monkeypatch, dtype, quant, B):
    """Decode through the persistent layer kernel (one launch per layer, 3 threadgroups that take
    turns over every phase's virtual threadgroups and meet at grid barriers) against the five
    launches per layer, three steps from a zero state (layer 0 without a pending update, then with)."""
    from mlx_rwkv.loading import build_model
    from mlx_rwkv.quant import quantize_model

    config, weights = _layer_model()
    if quant:
        weights = quantize_model(weights, include_head=True)
    ids = mx.array(np.random.default_rng(B).integers(0, config.vocab_size, (B, 3)), dtype=mx.int32)

    def decode(threadgroups: str) -> tuple[list[mx.array], list[str]]:
        monkeypatch.setenv("MLX_RWKV_LAYER_KERNEL", threadgroups)
        with emulated_kernels() as launched:
            model = build_model(weights, config, dtype)
            state, outs = model.new_state(B), []
            for t in range(3):
                logits, state = model._run(ids[:, t:t + 1], state, all_logits=True)
                outs.append(logits)
            mx.eval(outs, state.arrays())
            words = None if model.barrier_words is None else np.array(model.barrier_words).reshape(-1, 32)
        return outs + state.arrays(), launched, words

    want, five, _ = decode("0")
    got, one, words = decode("3")
    # after a step: each launch counted 4 barriers x 3 threadgroups in its layer's words and zeroed
    # the next layer's count, so layer 0's count is zero (the last launch zeroed it) and no wait gave up
    assert words[:, 0].tolist() == [0] + [12] * (config.n_layer - 1) and not words[:, 16].any()
    assert "layer_decode" not in five and five.count("matvec_norm") == 2 * config.n_layer * 3
    assert one == (["layer_decode"] * config.n_layer + ["matvec"]) * 3  # + the head
    # the same operations, but the WKV phase has 4 lanes per state row instead of 8 (another sum
    # order), rounded to the activation dtype: bf16 as in test_whole_model_gpu_path (measured 3e-2)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 5e-2}[dtype]
    for a, b in zip(got, want):
        close(a, b, tol)


@pytest.mark.parametrize("every,syncs", [("op", 3), ("layer", 2)])
def test_sync_strategies_wait_after_the_layer_kernel(monkeypatch, every, syncs):
    """The per-op and per-layer strategies of the sync experiment with decode in one launch per
    layer: a layer's launch is one op and a layer end (2 layers, then the head for "op")."""
    from mlx_rwkv.loading import build_model
    from mlx_rwkv.sync_strategies import EvalHook

    config, weights = _layer_model()
    monkeypatch.setenv("MLX_RWKV_LAYER_KERNEL", "2")
    with emulated_kernels() as launched:
        model = build_model(weights, config, "float16")
        with EvalHook(model, every) as hook:
            model._run(mx.zeros((1, 1), dtype=mx.int32), model.new_state(), all_logits=True)
    assert launched == ["layer_decode", "layer_decode", "matvec"] and hook.syncs == syncs


def test_layer_kernel_gives_up_without_hanging_and_recovers(monkeypatch):
    """Threadgroups that are not all resident (here one at a time): every grid-barrier wait gives
    up after its polls instead of hanging, the flag says so, and each launch still leaves its
    layer's count as a full launch does, so a later step with all threadgroups resident gives the
    five launches' logits (nothing carried over but the flag)."""
    import kernel_emulator
    from mlx_rwkv import layer_kernel
    from mlx_rwkv.loading import build_model

    config, weights = _layer_model()
    token = mx.array([[5]], dtype=mx.int32)
    monkeypatch.setattr(kernel_emulator, "GRID_WAIT_POLLS", 300)
    monkeypatch.setenv("MLX_RWKV_LAYER_KERNEL", "0")
    with emulated_kernels():
        five = build_model(weights, config, "float16")
        want = five._run(token, five.new_state(), all_logits=False)[0]
    monkeypatch.setenv("MLX_RWKV_LAYER_KERNEL", "3")
    with emulated_kernels(resident=1):
        model = build_model(weights, config, "float16")
        mx.eval(model._run(token, model.new_state(), all_logits=False)[0])
    words = np.array(model.barrier_words).reshape(-1, 32)
    assert layer_kernel.gave_up(model.barrier_words) and words[:, 0].tolist() == [0, 12]
    with emulated_kernels():
        got = model._run(token, model.new_state(), all_logits=False)[0]
    close(got, want, 2e-3)


def test_generation_reports_a_grid_barrier_that_gave_up(monkeypatch):
    """A generation through the layer kernel whose waits gave up ends in GridBarrierError (the
    text is wrong; the CLI prints it as one line), and a bad MLX_RWKV_LAYER_KERNEL fails at load
    on any device."""
    import kernel_emulator
    from mlx_rwkv import layer_kernel
    from mlx_rwkv.generate import generate
    from mlx_rwkv.loading import build_model
    from mlx_rwkv.tokenizer import ByteTokenizer

    config, weights = _layer_model(vocab_size=256)  # ByteTokenizer's ids
    monkeypatch.setattr(kernel_emulator, "GRID_WAIT_POLLS", 300)
    monkeypatch.setattr(mx, "compile", lambda f: f)  # the emulator runs eagerly
    monkeypatch.setenv("MLX_RWKV_LAYER_KERNEL", "3")
    with emulated_kernels(resident=1):
        model = build_model(weights, config, "float16")
        with pytest.raises(layer_kernel.GridBarrierError, match="MLX_RWKV_LAYER_KERNEL=0"):
            generate(model, ByteTokenizer(), [1, 2], max_tokens=2, stop_tokens=[])
    monkeypatch.setenv("MLX_RWKV_LAYER_KERNEL", "abc")
    with pytest.raises(ValueError, match="MLX_RWKV_LAYER_KERNEL must be"):
        build_model(weights, config, "float32")  # the CPU path, where the kernel never runs


def test_server_fails_requests_after_a_grid_barrier_gave_up(monkeypatch):
    """The server's batching engine, through a layer kernel whose waits gave up: a finishing
    request fails with the layer kernel's error instead of ending well, and its state is not cached."""
    import queue

    import kernel_emulator
    from mlx_rwkv.loading import build_model
    from mlx_rwkv.serve.cache import PrefixCache
    from mlx_rwkv.serve.engine import Delta, Engine, Failed, Request
    from mlx_rwkv.serve.row_sampler import RowParams
    from mlx_rwkv.tokenizer import ByteTokenizer

    config, weights = _layer_model(vocab_size=256)
    monkeypatch.setattr(kernel_emulator, "GRID_WAIT_POLLS", 300)
    monkeypatch.setattr(mx, "compile", lambda f: f)  # the emulator runs eagerly
    monkeypatch.setenv("MLX_RWKV_LAYER_KERNEL", "3")
    with emulated_kernels(resident=1):
        model = build_model(weights, config, "float16")
        engine = Engine(model, ByteTokenizer(), max_batch=2, cache=PrefixCache(2**20), pad_batches=False)
        engine.start()
        try:
            events = queue.Queue()
            engine.submit(Request((1, 2), RowParams(temperature=0), 3), events.put)
            while isinstance(ev := events.get(timeout=120), Delta):
                pass
        finally:
            engine.stop()
    assert isinstance(ev, Failed) and ev.status == 500 and "MLX_RWKV_LAYER_KERNEL=0" in ev.message, ev
    assert engine.stats()["cache"]["entries"] == 1  # the prompt's state (prefill: no layer kernel), not the answer's
