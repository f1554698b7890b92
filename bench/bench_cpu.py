"""CPU throughput against the official `rwkv` package: same process, same weights, interleaved.

    python -m bench.bench_cpu --models 0.1B-L4 0.1B [--rounds 7] [--write]

A model is a shape name, optionally with `-L<layers>` (0.1B-L4: the 0.1B shape cut to 4 layers);
weights are synthetic float32 (mlx_rwkv.synth), ours in float32 (the CPU default), the official
package with strategy "cpu fp32" and torch's default thread count. Decode: greedy tokens, one
host read per token; prefill: T tokens in one call. The machine is shared and noisy, so each
round times both engines back to back (alternating which goes first) and the ratio is taken per
round: every mlx record carries `ratio_vs_official`, the median of the per-round ratios, and the
records hold the medians over rounds with their spread. A pause before each timed run lets the
other engine's thread pools go idle (in one process, torch's spinning threads slowed our numpy
calls and OpenBLAS's slowed torch: the official prefill ran 2x faster with ours single-threaded).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

import mlx.core as mx
import numpy as np

from bench.bench_mlx import weight_bytes_per_token
from bench.results_io import record, write_results
from mlx_rwkv.config import ModelConfig, config_for_shape
from mlx_rwkv.loading import build_model
from mlx_rwkv.synth import synthesize


def parse_model(name: str) -> ModelConfig:
    """`0.1B` or `0.1B-L4` -> its config."""
    m = re.fullmatch(r"(.+?)(?:-L(\d+))?", name)
    return config_for_shape(m.group(1), n_layer=int(m.group(2)) if m.group(2) else None)


def load_official(weights: dict):
    """The official package's x070 model on the CPU in fp32, from the same weights."""
    os.environ["RWKV_V7_ON"] = "1"  # read when rwkv.model is first imported
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    import torch
    from rwkv.model import RWKV

    with tempfile.TemporaryDirectory() as tmp:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, f"{tmp}/m.pth")
        return RWKV(model=f"{tmp}/m", strategy="cpu fp32")


class Ours:
    """Decode and prefill timers for our engine."""

    def __init__(self, model):
        self.model = model
        self.state, self.token = model.new_state(), mx.array([0], dtype=mx.int32)

    def decode(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, self.state = self.model.step(self.token, self.state)
            # the one host read per token: the step's logits are already computed (numpy on the CPU
            # path), so the greedy token is read in numpy; an MLX argmax cost ~0.1-0.3 ms per token
            self.token = mx.array(np.argmax(np.asarray(logits), axis=-1), mx.int32)
        return steps / (time.perf_counter() - t0)

    def prefill(self, ids: list[int]) -> float:
        tokens = mx.array(ids, dtype=mx.int32)
        t0 = time.perf_counter()
        logits, state = self.model.forward(tokens)
        mx.eval(logits, state.arrays())
        return len(ids) / (time.perf_counter() - t0)


class Official:
    """The same timers for the official package (torch on CPU runs each op synchronously)."""

    def __init__(self, model):
        self.model = model
        self.state, self.token = None, 0

    def decode(self, steps: int) -> float:
        import torch

        t0 = time.perf_counter()
        for _ in range(steps):
            logits, self.state = self.model.forward([self.token], self.state)
            self.token = int(torch.argmax(logits))
        return steps / (time.perf_counter() - t0)

    def prefill(self, ids: list[int]) -> float:
        t0 = time.perf_counter()
        self.model.forward(ids, None)
        return len(ids) / (time.perf_counter() - t0)


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    config = parse_model(name)
    weights = synthesize(config, seed=0, dtype=np.float32)
    engines = {"mlx": Ours(build_model(weights, config, "float32")), "rwkv-official": Official(load_official(weights))}
    ids = np.random.default_rng(0).integers(1, config.vocab_size, args.prefill_tokens).tolist()
    for engine in engines.values():  # warm-up
        engine.decode(2)
        engine.prefill(ids)
    rates = {(e, mode): [] for e in engines for mode in ("decode", "prefill")}
    for rnd in range(args.rounds):
        order = list(engines) if rnd % 2 == 0 else list(engines)[::-1]
        for mode in ("decode", "prefill"):
            for e in order:
                run = engines[e].decode if mode == "decode" else engines[e].prefill
                time.sleep(args.pause)  # the other engine's BLAS / OpenMP threads stop spinning
                rates[e, mode].append(run(args.decode_steps if mode == "decode" else ids))
    # MLX evaluations per decode step: the step's inputs (RWKV7._run_host; the rest is numpy, run
    # as it is called, and so is the token read). torch on the CPU runs every op as it is called.
    syncs = {"mlx": 1, "rwkv-official": None}
    bpt = weight_bytes_per_token(config, "f32")
    records = []
    for mode in ("decode", "prefill"):
        tokens = args.decode_steps if mode == "decode" else args.prefill_tokens
        ratio = float(np.median(np.array(rates["mlx", mode]) / np.array(rates["rwkv-official", mode])))
        for e in engines:
            rec = record(e, name, "f32", mode, "per-op", tokens=tokens, rates=rates[e, mode],
                         syncs_per_token=syncs[e] if mode == "decode" else None)
            if e == "mlx":
                rec["ratio_vs_official"] = round(ratio, 3)
            records.append(rec)
            extra = f", {rec['tok_s'] * bpt / 1e9:.1f} GB/s of weights" if mode == "decode" else ""
            print(f"{name} {mode} {e}: {rec['tok_s']} tok/s {rec['tok_s_spread']}{extra}", flush=True)
        print(f"{name} {mode}: ours / official = {ratio:.2f} (median of {args.rounds} rounds)", flush=True)
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["0.1B-L4", "0.1B"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--pause", type=float, default=0.5,
                    help="seconds between timed runs: idle BLAS (OpenBLAS) and OpenMP (torch) threads spin "
                         "for up to ~0.1-0.2 s after a call and took a core from the engine timed next")
    ap.add_argument("--write", action="store_true", help="merge the records into bench/results/")
    args = ap.parse_args(argv)
    if mx.default_device() != mx.cpu:
        sys.exit("bench_cpu compares CPU engines: run it where MLX's default device is the CPU")
    import torch

    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)
    records = [rec for name in args.models for rec in bench_model(name, args)]
    if args.write:
        print("wrote", write_results(records, "python -m bench.bench_cpu " + " ".join(argv or sys.argv[1:])))


if __name__ == "__main__":
    main()
