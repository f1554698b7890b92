"""MLX engine throughput: decode and prefill tok/s against the official `rwkv` package, same run.

    python -m bench.bench_mlx --shape 0.1B 1.5B --precision f16 q4k [--official] [--write]

Synthetic weights at real shapes (mlx_rwkv.synth). Decode: batch 1, greedy sampling on the
device, one host sync per token. Strategies: `compiled` (the engine's decode step) and
`whole-pass` (the same step uncompiled). Prefill: T tokens in one forward call.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import mlx.core as mx
import numpy as np

from bench.graph_nodes import count_kernel_nodes
from bench.results_io import measure_bandwidth_gb_s, record, write_results
from mlx_rwkv.config import ModelConfig, config_for_shape
from mlx_rwkv.loading import build_model
from mlx_rwkv.model import RWKV7
from mlx_rwkv.quant import quantize_model
from mlx_rwkv.synth import synthesize

PRECISIONS = {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "q4k": "float16"}
MATRIX_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "q4k": 144 / 256}  # Q4_K: 144-byte blocks of 256


def synthetic_model(shape: str, precision: str, n_layer: int | None = None,
                    vocab_size: int | None = None) -> tuple[RWKV7, ModelConfig, dict]:
    """An MLX model with synthetic weights at `shape` (Q4_K quantized for precision q4k),
    its config and its canonical weights (what the official package loads)."""
    config = config_for_shape(shape, n_layer=n_layer, vocab_size=vocab_size)
    weights = synthesize(config, seed=0, dtype=np.float32 if precision == "f32" else np.float16)
    if precision == "q4k":
        weights = quantize_model(weights, include_head=True)
    return build_model(weights, config, PRECISIONS[precision]), config, weights


def weight_bytes_per_token(config: ModelConfig, precision: str) -> float:
    """Bytes a decode step must read: every matrix once plus the head (one embedding row)."""
    C, F, L, V = config.n_embd, config.d_ffn, config.n_layer, config.vocab_size
    lora = C * (config.d_decay + config.d_aaa + config.d_mv + config.d_gate) * 2
    small = 4 if precision == "f32" else 2  # LoRA stays in the activation dtype
    return (L * (4 * C * C + 2 * C * F) + V * C) * MATRIX_BYTES[precision] + (L * lora + C) * small


def time_decode(model, steps: int, compiled: bool, repeats: int) -> tuple[list[float], int]:
    step = model.step if compiled else (lambda t, s: _uncompiled_step(model, t, s))
    state, tok = model.new_state(), mx.array([0], dtype=mx.int32)
    for _ in range(3):  # warm-up (compilation)
        logits, state = step(tok, state)
        tok = mx.argmax(logits, axis=-1).astype(mx.int32)
        mx.eval(tok)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = step(tok, state)
            tok = mx.argmax(logits, axis=-1).astype(mx.int32)
            mx.eval(tok)  # the one host sync per token
        rates.append(steps / (time.perf_counter() - t0))
    logits, s = step(tok, state)
    nodes = sum(count_kernel_nodes(logits, *s.arrays()).values())
    return rates, nodes


def _uncompiled_step(model, tok, state):
    logits, new = model._run(tok[:, None], state, all_logits=True)
    return logits[:, 0, :], new


def time_prefill(model, tokens: int, repeats: int) -> list[float]:
    ids = mx.array(np.random.default_rng(0).integers(1, model.config.vocab_size, tokens), dtype=mx.int32)
    logits, state = model.forward(ids)
    mx.eval(logits, state.arrays())
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, state = model.forward(ids)
        mx.eval(logits, state.arrays())
        rates.append(tokens / (time.perf_counter() - t0))
    return rates


def bench_official(weights: dict, config: ModelConfig, shape: str, precision: str, decode_steps: int,
                   prefill_tokens: int, repeats: int) -> list[dict]:
    """The official package on torch CUDA (RWKV_CUDA_ON=1 when its kernel builds)."""
    os.environ.setdefault("RWKV_V7_ON", "1")
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "1")
    import torch
    from rwkv.model import RWKV

    with tempfile.TemporaryDirectory() as tmp:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, f"{tmp}/m.pth")
        model = RWKV(model=f"{tmp}/m", strategy=f"cuda {'fp16' if precision == 'f16' else 'fp32'}")
    out = []
    state, tok = None, 0
    for _ in range(3):
        logits, state = model.forward([tok], state)
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            logits, state = model.forward([tok], state)
            tok = int(torch.argmax(logits))
        rates.append(decode_steps / (time.perf_counter() - t0))
    out.append(record("rwkv-official", shape, precision, "decode", "per-op", tokens=decode_steps, rates=rates,
                      syncs_per_token=1.0))
    ids = np.random.default_rng(0).integers(1, config.vocab_size, prefill_tokens).tolist()
    model.forward(ids, None)
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, _ = model.forward(ids, None)
        torch.cuda.synchronize()
        rates.append(prefill_tokens / (time.perf_counter() - t0))
    out.append(record("rwkv-official", shape, precision, "prefill", "per-op", tokens=prefill_tokens, rates=rates))
    return out


def bench_engine(shape: str, precision: str, args: argparse.Namespace, bandwidth: float | None) -> list[dict]:
    """Decode (compiled and not) and prefill records of one synthetic model, plus the official
    package's on the same weights when asked (not for Q4_K, which it cannot run)."""
    model, config, weights = synthetic_model(shape, precision, args.layers, args.vocab)
    bpt = weight_bytes_per_token(config, precision)
    records = []
    for strategy, compiled in (("compiled", True), ("whole-pass", False)):
        mx.reset_peak_memory()
        rates, nodes = time_decode(model, args.decode_steps, compiled, args.repeats)
        rec = record("mlx", shape, precision, "decode", strategy, tokens=args.decode_steps, rates=rates,
                     kernels_per_token=nodes, syncs_per_token=1.0,
                     peak_memory_mb=round(mx.get_peak_memory() / 2**20, 1))
        if bandwidth:  # from the recorded median, so the two fields agree
            rec["roofline_fraction"] = round(rec["tok_s"] * bpt / (bandwidth * 1e9), 4)
        records.append(rec)
        print(f"{shape} {precision} decode {strategy}: {rec['tok_s']} tok/s, {nodes} graph nodes/token", flush=True)
    mx.reset_peak_memory()
    rates = time_prefill(model, args.prefill_tokens, args.repeats)
    records.append(record("mlx", shape, precision, "prefill", "whole-pass", tokens=args.prefill_tokens,
                          rates=rates, syncs_per_token=1 / args.prefill_tokens,
                          peak_memory_mb=round(mx.get_peak_memory() / 2**20, 1)))
    print(f"{shape} {precision} prefill T={args.prefill_tokens}: {records[-1]['tok_s']} tok/s", flush=True)
    del model
    if args.official and precision != "q4k":
        try:
            recs = bench_official(weights, config, shape, precision, min(args.decode_steps, 64),
                                  args.prefill_tokens, args.repeats)
        except Exception as e:  # noqa: BLE001 - report and keep the MLX figures
            print(f"official rwkv failed: {type(e).__name__}: {e}", file=sys.stderr)
            recs = []
        for r in recs:
            print(f"{shape} official {r['mode']}: {r['tok_s']} tok/s", flush=True)
        records += recs
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["0.1B"])
    ap.add_argument("--precision", nargs="+", default=["f16"], choices=PRECISIONS)
    ap.add_argument("--layers", type=int, help="override the layer count (quick runs)")
    ap.add_argument("--vocab", type=int, help="override the vocabulary size (quick runs)")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--official", action="store_true", help="also run the official rwkv package (torch CUDA)")
    ap.add_argument("--write", action="store_true", help="merge the records into bench/results/")
    args = ap.parse_args(argv)
    bandwidth = measure_bandwidth_gb_s()
    records = [rec for shape in args.shape for precision in args.precision
               for rec in bench_engine(shape, precision, args, bandwidth)]
    if args.write:
        print("wrote", write_results(records, "python -m bench.bench_mlx " + " ".join(argv or sys.argv[1:])))


if __name__ == "__main__":
    main()
