"""The measurements behind `mlx-rwkv bench`: every sync strategy of DESIGN.md on the same model and
tokens, model size, context length and prefill memory, as records of DESIGN.md's format.

    for batch in run(Plan(shapes=["0.1B"], precisions=["f16", "q4k"])):  # one list per model
        print(batch)

Weights are synthetic at real shapes, made for throughput, not text: layers 0 and 1 are drawn
(mlx_rwkv.synth) and layers 2.. reuse layer 1's host arrays, each layer still getting its own
device copy, so a step reads every byte a real model of that shape reads; Q4_K matrices are
random Q4_K blocks (`random_q4k`), since the kernels' work does not depend on the values. Drawing
and quantizing a real 7.2B model takes the host minutes (Q4_K quantization here: ~25 MB/s);
this takes seconds. Records say so (`"weights": "synthetic"`).

Decode: batch 1, greedy, the next token from the logits of the last, one wait per token
beyond what the strategy adds. Context: decode after prefilling N tokens (an RNN's state is
constant in size, so decode must not slow down). Prefill: the forward pass in chunks from a zero
state, with MLX's peak memory (bounded by the chunk, not the prompt).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .bench_records import KEY_FIELDS, MLX_STRATEGIES, STRATEGIES, record, engine_of
from .config import ModelConfig, config_for_shape
from .loading import build_model
from .model import RWKV7
from .quant import BLOCK_BYTES, QK_K, Q4KTensor, is_quantizable
from .state import State
from .sync_strategies import EvalHook, Hybrid, count_kernel_nodes
from .synth import synth_tensor

MLX_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "q4k": "float16"}  # activations
WEBGPU_PRECISIONS = ("f16", "f32", "q4k")
MATRIX_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "q4k": BLOCK_BYTES / QK_K}
# strategies that wait many times per token get fewer steps (Plan.slow_steps)
SLOW_STRATEGIES = ("per-layer", "per-op", "webgpu-per-op", "hybrid")
WEIGHTS_NOTE = "synthetic"  # the `weights` field of every record (see the module docstring)


@dataclass
class Plan:
    """What one benchmark run measures. Every (shape, precision) gets one set of weights that
    all its strategies share, so their records compare the same model on the same tokens."""

    shapes: list[str] = field(default_factory=lambda: ["0.1B"])
    precisions: list[str] = field(default_factory=lambda: ["f16", "q4k"])
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    decode_steps: int = 32  # timed tokens per repeat
    slow_steps: int = 8  # the same for SLOW_STRATEGIES
    repeats: int = 3
    contexts: list[int] = field(default_factory=list)  # decode after prefilling these many tokens
    batches: list[int] = field(default_factory=list)  # MLX decode of B sequences at once (aggregate tok/s)
    prefill_tokens: list[int] = field(default_factory=list)  # prefill lengths to time
    chunk_size: int = 1024  # prefill chunk (MLX; WebGPU submits chunks of at most this)
    official: bool = False  # the official `rwkv` package on the same weights (f16/f32)
    overrides: dict[str, int] = field(default_factory=dict)  # n_layer / n_embd / vocab_size
    bandwidth_gb_s: float | None = None  # for roofline fractions

    def label(self, shape: str) -> str:
        """The record's shape: the name, plus the overrides when some are set."""
        if not self.overrides:
            return shape
        c = config_for_shape(shape, **self.overrides)
        return f"{shape}-L{c.n_layer}-C{c.n_embd}-V{c.vocab_size}"


# ---- weights ----------------------------------------------------------------------------------

def random_q4k(shape: tuple[int, int], rng: np.random.Generator) -> Q4KTensor:
    """Random Q4_K blocks for a [rows, K] matrix with weights of mean ~0 and std ~1/sqrt(K).

    scales and quants are uniform bytes (6-bit sc and m, 4-bit q); with dmin = 7.5 d the mean
    d*sc*q - dmin*m is 0 and the std is ~258 d (E[sc]=E[m]=31.5, E[q]=7.5)."""
    rows, k = shape
    nb = k // QK_K
    blocks = rng.integers(0, 256, size=(rows, nb, BLOCK_BYTES), dtype=np.uint8)
    d = np.float16(1 / np.sqrt(k) / 258)
    blocks[..., 0:4] = np.array([d, np.float16(7.5 * d)], np.float16).view(np.uint8)
    return Q4KTensor(blocks.reshape(rows, nb * BLOCK_BYTES), shape)


def synthetic_weights(config: ModelConfig, precision: str, seed: int = 0) -> dict[str, np.ndarray | Q4KTensor]:
    """Canonical weights for `config` (see the module docstring): layers >= 2 share layer 1's
    arrays; Q4_K precision gives random Q4_K blocks for every linear weight and the head."""
    small = dataclasses.replace(config, n_layer=min(config.n_layer, 2))
    dtype = np.dtype(np.float32 if precision == "f32" else np.float16)
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray | Q4KTensor] = {}
    for key, shape in small.expected_shapes().items():
        if precision == "q4k" and is_quantizable(key):
            weights[key] = random_q4k(shape, rng)
        else:
            weights[key] = synth_tensor(small, key, shape, seed, dtype)
    for i in range(2, config.n_layer):
        weights.update({key.replace("blocks.1.", f"blocks.{i}.", 1): value
                        for key, value in list(weights.items()) if key.startswith("blocks.1.")})
    return weights


def synthetic_model(config: ModelConfig, precision: str) -> RWKV7:
    """An MLX model of `config` on `synthetic_weights` (seconds at any shape), in the precision's dtype."""
    return build_model(synthetic_weights(config, precision), config, MLX_DTYPES[precision])


def weight_bytes_per_token(config: ModelConfig, precision: str) -> float:
    """Bytes a decode step must read: every matrix once plus the head (one embedding row)."""
    C, F, L, V = config.n_embd, config.d_ffn, config.n_layer, config.vocab_size
    lora = C * (config.d_decay + config.d_aaa + config.d_mv + config.d_gate) * 2
    small = 4 if precision == "f32" else 2  # LoRA stays in the activation dtype
    return (L * (4 * C * C + 2 * C * F) + V * C) * MATRIX_BYTES[precision] + (L * lora + C) * small


# ---- timing ---------------------------------------------------------------------------------------

def time_steps(step: Callable[[], None], steps: int, repeats: int, warmup: int = 2) -> list[float]:
    """tok/s of `repeats` runs of `steps` calls of `step` (each one token, ending in a host wait)."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps / (time.perf_counter() - t0))
    return rates


def peak_mb() -> float:
    return round(mx.get_peak_memory() / 2**20, 1)


class MLXDecoder:
    """Greedy decode on an MLX model with one of MLX_STRATEGIES; `step()` is one token."""

    def __init__(self, model: RWKV7, strategy: str, state: State | None = None, batch: int = 1) -> None:
        self.model, self.strategy = model, strategy
        self.state = state or model.new_state(batch)
        self.token = mx.zeros((self.state.batch_size,), dtype=mx.int32)
        mx.eval(self.token, self.state.arrays())  # a lazy zero state would count as kernels
        self.hook = EvalHook(model, "op" if strategy == "per-op" else "layer") \
            if strategy in ("per-op", "per-layer") else None

    def _forward(self, token: mx.array, state: State) -> tuple[mx.array, State]:
        if self.strategy == "compiled":
            return self.model.step(token, state)
        logits, *parts = self.model._step_arrays(token, state.att_x, state.wkv, state.ffn_x)  # uncompiled
        return logits, State(*parts)

    def step(self) -> None:
        logits, self.state = self._forward(self.token, self.state)
        self.token = mx.argmax(logits, axis=-1).astype(mx.int32)
        mx.eval(self.token)  # the one wait per token every strategy has

    def kernels_per_token(self) -> int | None:
        """Kernel nodes of one step: the compiled graph's, or those the per-op hook evaluates
        (None for the CPU float32 path, which runs in numpy)."""
        if self.model.on_host:
            return None
        if self.strategy == "compiled":
            logits, state = self._forward(self.token, self.state)
            return sum(count_kernel_nodes(logits, state.arrays()).values())
        with EvalHook(self.model, "op", count_nodes=True) as counter:
            logits, state = self._forward(self.token, self.state)
            nodes = counter.nodes + sum(count_kernel_nodes(logits, state.arrays()).values())
        return nodes

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self.hook if self.hook else contextlib.nullcontext():
            yield


def _roofline(tok_s: float, config: ModelConfig, precision: str, bandwidth: float | None) -> float | None:
    return round(tok_s * weight_bytes_per_token(config, precision) / (bandwidth * 1e9), 4) if bandwidth else None


def mlx_decode(model: RWKV7, strategy: str, plan: Plan, shape: str, precision: str,
               state: State | None = None, context: int = 0, batch: int = 1) -> dict:
    """One decode record of an MLX strategy (from `state`, after `context` tokens; `batch`
    sequences at once from a zero state: tok_s counts the tokens of all of them)."""
    decoder = MLXDecoder(model, strategy, state, batch)
    kernels = decoder.kernels_per_token()
    steps = plan.slow_steps if strategy in SLOW_STRATEGIES else plan.decode_steps
    mx.reset_peak_memory()
    with decoder.active():
        decoder.step()
        syncs = 1 + (decoder.hook.syncs if decoder.hook else 0)  # the strategy's waits + the token's
        rates = [rate * batch for rate in time_steps(decoder.step, steps, plan.repeats)]
    rec = record("mlx", plan.label(shape), precision, "decode", strategy, batch=batch, tokens=steps, rates=rates,
                 kernels_per_token=kernels, syncs_per_token=float(syncs), peak_memory_mb=peak_mb(),
                 context=context, weights=WEIGHTS_NOTE)
    if model.one_launch_per_layer(batch):  # the persistent layer kernel's threadgroups (a record of its own)
        rec["layer_kernel"] = model.layer_threadgroups
    rec["roofline_fraction"] = _roofline(rec["tok_s"], model.config, precision, plan.bandwidth_gb_s)
    return rec


def random_ids(n: int, vocab: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(1, vocab, n), dtype=mx.int32)


def mlx_prefill(model: RWKV7, tokens: int, plan: Plan, shape: str, precision: str) -> dict:
    """Prefill of `tokens` from a zero state in chunks of plan.chunk_size, with peak memory."""
    ids = random_ids(tokens, model.config.vocab_size, 1)
    short = ids[: min(tokens, plan.chunk_size)]
    mx.eval(model.forward(short, chunk_size=plan.chunk_size)[0])  # warm-up: kernels and shapes
    rates, peak = [], 0.0
    for _ in range(plan.repeats if tokens <= 8192 else 1):  # long prompts: one timed run
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        logits, state = model.forward(ids, chunk_size=plan.chunk_size)
        mx.eval(logits, state.arrays())
        rates.append(tokens / (time.perf_counter() - t0))
        peak = max(peak, peak_mb())
    return record("mlx", plan.label(shape), precision, "prefill", "whole-pass", tokens=tokens, rates=rates,
                  syncs_per_token=round(-(-tokens // plan.chunk_size) / tokens, 6), peak_memory_mb=peak, context=0,
                  chunk_size=plan.chunk_size, weights=WEIGHTS_NOTE)


def mlx_contexts(model: RWKV7, plan: Plan, shape: str, precision: str, strategy: str) -> list[dict]:
    """Decode after each context length (prefilled in turn from one zero state; each decode runs
    on a copy), and a prefill record per length: the time from zero to it and MLX's peak memory
    so far (flat when memory is bounded by the chunk)."""
    records, state, done, seconds, peak, evals = [], model.new_state(), 0, 0.0, 0.0, 0
    # warm-up: the first chunked forward compiles the prefill kernels (~11 s on the H100 on
    # 2026-12-06, which the first records of this sweep included as prefill time)
    _, warm = model.forward(random_ids(plan.chunk_size, model.config.vocab_size, 1), chunk_size=plan.chunk_size)
    mx.eval(warm.arrays())
    for context in sorted(set(plan.contexts)):
        if context > done:
            evals += -(-(context - done) // plan.chunk_size)  # one evaluation per chunk
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            _, state = model.forward(random_ids(context - done, model.config.vocab_size, context), state,
                                     chunk_size=plan.chunk_size)
            mx.eval(state.arrays())
            seconds += time.perf_counter() - t0
            peak = max(peak, peak_mb())
            done = context
            records.append(record("mlx", plan.label(shape), precision, "prefill", "whole-pass", tokens=done,
                                  rates=[done / seconds], syncs_per_token=round(evals / done, 6),
                                  peak_memory_mb=peak, context=0, chunk_size=plan.chunk_size,
                                  weights=WEIGHTS_NOTE))
        records.append(mlx_decode(model, strategy, plan, shape, precision, state.copy(), context))
    return records


# ---- WebGPU and the hybrid -------------------------------------------------------------------------

def webgpu_decode(model, strategy: str, plan: Plan, shape: str, precision: str, bandwidth: float | None) -> dict:
    """One decode record of a WebGPU strategy or the hybrid (model: a webgpu_ref.WebGPUModel)."""
    state, token = model.new_state(), [0]

    def step() -> None:
        logits, _ = model.forward(token, state)
        token[0] = int(np.argmax(logits))

    steps = plan.slow_steps if strategy in SLOW_STRATEGIES else plan.decode_steps
    model.per_op_sync = strategy == "webgpu-per-op"
    try:
        if strategy == "hybrid":
            hybrid = Hybrid(model)
            with hybrid:
                rates = time_steps(step, steps, plan.repeats)
            kernels, syncs = hybrid.kernels_per_token, float(hybrid.syncs_per_token)
        else:
            rates = time_steps(step, steps, plan.repeats)
            kernels = model.dispatches_per_token
            syncs = float(kernels + 1 if model.per_op_sync else 1)
    finally:
        model.per_op_sync = False
    rec = record(engine_of(strategy), plan.label(shape), precision, "decode", strategy, tokens=steps, rates=rates,
                 kernels_per_token=kernels, syncs_per_token=syncs, context=0, weights=WEIGHTS_NOTE)
    rec["roofline_fraction"] = round(rec["tok_s"] * model.weight_bytes / (bandwidth * 1e9), 4) if bandwidth else None
    return rec


def webgpu_available() -> str | None:
    """The wgpu adapter's name, or None where there is none."""
    try:
        from webgpu_ref import get_gpu

        return get_gpu().name
    except Exception:  # noqa: BLE001 - no adapter, no driver, no wgpu-native: WebGPU is skipped
        return None


# ---- the official package ---------------------------------------------------------------------

def official_records(weights: dict, config: ModelConfig, plan: Plan, shape: str, precision: str) -> list[dict]:
    """Decode and prefill of the official `rwkv` package (torch; CUDA fp16 when available, else
    CPU fp32) on the same weights."""
    os.environ.setdefault("RWKV_V7_ON", "1")
    os.environ.setdefault("RWKV_JIT_ON", "1")
    import torch

    cuda = torch.cuda.is_available()
    os.environ.setdefault("RWKV_CUDA_ON", "1" if cuda else "0")
    from rwkv.model import RWKV

    dtype = "fp16" if cuda and precision == "f16" else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, f"{tmp}/m.pth")
        model = RWKV(model=f"{tmp}/m", strategy=f"{'cuda' if cuda else 'cpu'} {dtype}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    state, token = [None], [0]

    def step() -> None:
        logits, state[0] = model.forward(token, state[0])
        token[0] = int(torch.argmax(logits))

    steps = plan.decode_steps
    rates = time_steps(step, steps, plan.repeats, warmup=3)  # TorchScript settles over the first calls
    label, prec = plan.label(shape), dtype.replace("fp", "f")
    out = [record("rwkv-official", label, prec, "decode", "per-op", tokens=steps, rates=rates, syncs_per_token=1.0,
                  context=0, weights=WEIGHTS_NOTE)]
    for tokens in plan.prefill_tokens:
        ids = np.random.default_rng(1).integers(1, config.vocab_size, tokens).tolist()
        rates = []
        for _ in range(plan.repeats):
            sync()
            t0 = time.perf_counter()
            model.forward(ids, None)
            sync()
            rates.append(tokens / (time.perf_counter() - t0))
        out.append(record("rwkv-official", label, prec, "prefill", "per-op", tokens=tokens, rates=rates, context=0,
                          weights=WEIGHTS_NOTE))
    return out


# ---- the run ---------------------------------------------------------------------------------

def _guarded(what: str, log: Callable[[str], None], measure: Callable[[], list[dict] | dict]) -> list[dict]:
    """Run one measurement; a failure is reported and skipped, so the others still run."""
    try:
        out = measure()
    except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the rest
        log(f"{what}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return []
    out = out if isinstance(out, list) else [out]
    for rec in out:
        log(describe(rec))
    return out


def describe(rec: dict) -> str:
    """One progress line for a record."""
    rate = f"{rec['tok_s']:.1f} tok/s" if "tok_s" in rec else f"{rec.get('gb_s')} GB/s"
    syncs = rec.get("syncs_per_token") if rec["mode"] == "decode" else None
    extra = [f"context {rec['context']}" if rec.get("context") else "",
             f"{rec['kernels_per_token']} kernels/token" if rec.get("kernels_per_token") else "",
             f"{syncs:g} syncs/token" if syncs else "",
             f"peak {rec['peak_memory_mb']:.0f} MB" if rec.get("peak_memory_mb") else ""]
    return (f"{rec['shape']} {rec['precision']} {rec['mode']} {rec['strategy']} ({rec['engine']}, {rec['tokens']} "
            f"tokens): {rate}" + "".join(f", {e}" for e in extra if e))


def run(plan: Plan, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
        adapter: str | None = None) -> Iterator[list[dict]]:
    """The plan's records, one list per (shape, precision) as soon as it is measured (so a caller
    can write them before the next model is built). adapter: the wgpu adapter's name (None: the
    WebGPU strategies and the hybrid are skipped)."""
    for shape in plan.shapes:
        config = config_for_shape(shape, **plan.overrides)
        for precision in plan.precisions:
            what = f"{plan.label(shape)} {precision}"
            t0 = time.perf_counter()
            weights = synthetic_weights(config, precision)
            log(f"{what}: synthetic weights in {time.perf_counter() - t0:.1f} s")
            records: list[dict] = []
            records += _mlx_part(plan, shape, precision, config, weights, what, log)
            records += _webgpu_part(plan, shape, precision, config, weights, adapter, what, log)
            if plan.official and precision in ("f16", "f32"):
                records += _guarded(f"{what} official", log,
                                    lambda: official_records(weights, config, plan, shape, precision))
            weights = None  # the models went with their functions; free the host copies and MLX's cache
            gc.collect()
            mx.clear_cache()
            yield records


def _mlx_part(plan: Plan, shape: str, precision: str, config: ModelConfig, weights: dict, what: str,
              log: Callable[[str], None]) -> list[dict]:
    strategies = [s for s in plan.strategies if s in MLX_STRATEGIES]
    if not (strategies or plan.contexts or plan.prefill_tokens or plan.batches):
        return []
    t0 = time.perf_counter()
    model = build_model(weights, config, MLX_DTYPES[precision])
    log(f"{what}: MLX model built in {time.perf_counter() - t0:.1f} s")
    best = "whole-pass" if model.on_host else "compiled"  # for the context sweep
    if model.on_host:  # CPU float32: one numpy pass with no MLX graph to compile or to evaluate in parts
        skipped = [s for s in strategies if s != "whole-pass"]
        strategies = [s for s in strategies if s == "whole-pass"]
        if skipped:
            log(f"{what}: {', '.join(skipped)} skipped: the CPU float32 forward runs in numpy (whole-pass only)")
    records = []
    for strategy in strategies:
        records += _guarded(f"{what} mlx {strategy}", log, lambda: mlx_decode(model, strategy, plan, shape, precision))
    for batch in plan.batches:
        records += _guarded(f"{what} mlx {best} batch {batch}", log,
                            lambda: mlx_decode(model, best, plan, shape, precision, batch=batch))
    if plan.contexts:
        records += _guarded(f"{what} mlx contexts", log, lambda: mlx_contexts(model, plan, shape, precision, best))
    for tokens in plan.prefill_tokens:
        records += _guarded(f"{what} mlx prefill {tokens}", log, lambda: mlx_prefill(model, tokens, plan, shape,
                                                                                      precision))
    return dedupe(records)


def dedupe(records: list[dict]) -> list[dict]:
    """The last record of each key (e.g. the context sweep's context-0 decode replaces the same
    strategy's plain record), in first-seen order: what writing them keeps."""
    last = {tuple(r.get(f) for f in KEY_FIELDS): r for r in records}
    return list(last.values())


def _webgpu_part(plan: Plan, shape: str, precision: str, config: ModelConfig, weights: dict, adapter: str | None,
                 what: str, log: Callable[[str], None]) -> list[dict]:
    strategies = [s for s in plan.strategies if engine_of(s) != "mlx"]
    if precision != "q4k" and "hybrid" in strategies:
        strategies.remove("hybrid")  # the hybrid hands Q4_K matrices to MLX: it has none to hand
    if not strategies:
        return []
    if adapter is None:
        log(f"{what}: {', '.join(strategies)} skipped: no WebGPU adapter")
        return []
    if precision not in WEBGPU_PRECISIONS:
        log(f"{what}: {', '.join(strategies)} skipped: the WebGPU engine has no {precision}")
        return []
    from webgpu_ref import WebGPUModel

    t0 = time.perf_counter()
    try:
        model = WebGPUModel.from_weights(weights, config, dtype="float32" if precision == "f32" else "float16",
                                         prefill_chunk=plan.chunk_size)
    except Exception as e:  # noqa: BLE001 - e.g. a matrix beyond the adapter's limits: MLX results stand
        log(f"{what}: WebGPU model failed: {type(e).__name__}: {e}")
        return []
    log(f"{what}: WebGPU model built in {time.perf_counter() - t0:.1f} s")
    records = []
    for strategy in strategies:
        records += _guarded(f"{what} {strategy}", log,
                            lambda: webgpu_decode(model, strategy, plan, shape, precision, plan.bandwidth_gb_s))
    return records
