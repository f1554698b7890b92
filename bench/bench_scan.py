"""Prefill WKV-7 recurrence (scan + finish kernels) per call.

    python -m bench.bench_scan [--shape 1.5B 0.1B] [--tokens 1024] [--batch 1] [--calls 32]
                               [--repeats 5] [--write]

Runs `calls` independent wkv7() calls (a later layer: value residual on) on the same float16
activations inside one evaluation, so the per-node launch cost is amortized; the graph is built
before the clock starts. Printed: microseconds per call (scan + finish) and tokens per second.
Records: engine mlx, mode kernel, shape scan-<shape>-T<tokens>, precision f16, strategy
whole-pass, tok_s = tokens / seconds per call. (Records of the layout comparison that chose
the kernel's layout carry precision f16-<layout>.)
"""
from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

from bench.results_io import record, write_results
from mlx_rwkv import wkv
from mlx_rwkv.config import config_for_shape
from mlx_rwkv.kernels import get_kernel


def scan_inputs(B: int, T: int, H: int, N: int, seed: int = 0):
    """float16 activations (r, k, v, g, lw, la, lv, v_first), fp32 parameters and state, in the
    ranges trained models have (as tests/test_wkv_kernel.py draws them)."""
    rng = np.random.default_rng(seed)
    C = H * N
    acts = [mx.array(rng.standard_normal((B, T, C)).astype(np.float32)).astype(mx.float16) for _ in range(8)]
    ranges = {"w0": (-2, 1), "a0": (-1, 1), "v0": (-1, 1), "k_k": (0.5, 1.0), "k_a": (0.5, 1.5),
              "r_k": (-0.1, 0.2), "ln_w": (0.5, 1.5), "ln_b": (-0.1, 0.1)}
    params = {n: mx.array(rng.uniform(*ranges[n], C).astype(np.float32)) for n in wkv.PARAM_NAMES}
    state = mx.array(rng.standard_normal((B, H, N, N)).astype(np.float32) * 0.3)
    mx.eval(acts, params, state)
    return acts, params, state


def time_scan(acts, params, state, calls: int, repeats: int) -> list[float]:
    """Seconds per wkv7() call, one value per repeat."""
    run = lambda: [wkv.wkv7(*acts, params, state) for _ in range(calls)]  # noqa: E731
    mx.eval(run())  # compile, warm up
    seconds = []
    for _ in range(repeats):
        outs = run()
        t0 = time.perf_counter()
        mx.eval(outs)
        seconds.append((time.perf_counter() - t0) / calls)
    return seconds


def bench_shape(shape: str, args) -> dict:
    config = config_for_shape(shape)
    H, N, B, T = config.n_head, config.head_size, args.batch, args.tokens
    acts, params, state = scan_inputs(B, T, H, N)
    kernel = wkv.scan_launch(B, H, N) is not None and get_kernel(wkv.WKV7_SCAN) is not None
    path = "wkv7_scan" if kernel else "MLX ops"
    seconds = time_scan(acts, params, state, args.calls, args.repeats)
    best = min(seconds)
    print(f"{shape:>5} B={B} T={T} H={H} N={N} ({path}): {best * 1e6:8.1f} us/call "
          f"(median {sorted(seconds)[len(seconds) // 2] * 1e6:.1f}), {T / best:,.0f} tok/s", flush=True)
    return record("mlx", f"scan-{shape}-T{T}", "f16", "kernel", "whole-pass", batch=B, tokens=T,
                  rates=[T / sec for sec in seconds])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["1.5B", "0.1B"])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=32, help="wkv7() calls per evaluation")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="merge the records into bench/results/")
    args = ap.parse_args(argv)
    records = []
    for shape in args.shape:
        records.append(bench_shape(shape, args))
        if args.write:  # after every shape: a cut-off run keeps what it measured
            path = write_results(records, "python -m bench.bench_scan " + " ".join(argv or sys.argv[1:]))
    if args.write:
        print("wrote", path)


if __name__ == "__main__":
    main()
