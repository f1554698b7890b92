"""Mat-vec throughput: our grouped kernel (Q4_K and f16) against MLX's matmul and
mx.quantized_matmul on the same weights, same run.

    python -m bench.bench_q4k [--shapes 4096x4096 65536x2048] [--rows 1 8] [--calls 64] [--write]
                              [--rows-per-simdgroup 2 4] [--blocks-in-flight 1 2]   (tuning sweep)

For each weight shape (out x in) and activation rows T, every implementation runs `calls`
independent products inside one evaluation (so launch overhead is amortized, as in a compiled
decode step), cycling through enough copies of the weights (>= 256 MB) that the 50 MB L2 cache
cannot serve them; the rate is the effective bandwidth: bytes of weights read per second.
  q4k        our matvec kernel on llama.cpp Q4_K blocks (4.5 bits/weight: 144 bytes per 256)
  q4-mlx     mx.quantized_matmul, MLX's affine 4-bit group-32 with fp16 scales (5 bits/weight)
  f16        our matvec kernel on float16 weights (16 bits/weight)
  f16-mlx    dense x @ W.T in float16 (MLX's matmul)
With a sweep, ours are labelled by their tuning instead: q4k-nr2-qu1 (2 output rows per
SIMD-group, 1 Q4_K super-block in flight per lane), f16-nr4, ...
"""
from __future__ import annotations

import argparse
import itertools
import time
from unittest import mock

import mlx.core as mx
import numpy as np

from bench.results_io import record, write_results
from mlx_rwkv import matvec
from mlx_rwkv.matvec import ProjectionGroup, Segment
from mlx_rwkv.quant import Q4KTensor, quantize_q4k

DEFAULT_SHAPES = ["2048x2048", "2560x2560", "4096x4096", "8192x2048", "2048x8192", "65536x2048"]


L2_DEFEAT_BYTES = 256 * 2**20


def rates_gb_s(fns: list, xs: list[mx.array], nbytes: int, repeats: int) -> list[float]:
    """Effective GB/s of len(xs) products, call i on weight copy i % len(fns).

    The graph is built before the clock starts: the Python cost of building it is not the
    kernel's (a compiled decode step does not pay it either)."""
    calls = lambda: [fns[i % len(fns)](x) for i, x in enumerate(xs)]  # noqa: E731
    mx.eval(calls())  # compile / warm up
    rates = []
    for _ in range(repeats):
        outs = calls()
        t0 = time.perf_counter()
        mx.eval(outs)
        rates.append(nbytes * len(xs) / (time.perf_counter() - t0) / 1e9)
    return rates


def bench_shape(rows: int, k: int, t: int, calls: int, repeats: int, nrs: list[int],
                blocks: list[int]) -> dict[str, list[float]]:
    """Rates of every implementation; ours once per tuning (rows per SIMD-group, Q4_K blocks in flight)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((rows, k)) * 0.02).astype(np.float32)
    qt = Q4KTensor(quantize_q4k(w), (rows, k))
    w16 = mx.array(w).astype(mx.float16)
    xs = [mx.array(rng.standard_normal((t, k)).astype(np.float32)).astype(mx.float16) for _ in range(calls)]
    copies = lambda nbytes: max(1, min(calls, -(-L2_DEFEAT_BYTES // nbytes)))  # noqa: E731

    def group(weight, nbytes: int) -> list:
        groups = [ProjectionGroup([Segment(weight)], mx.float16) for _ in range(copies(nbytes))]
        mx.eval([g.__dict__ for g in groups])
        return [lambda x, g=g: g(x, t) for g in groups]

    def ours(name: str, weight, nbytes: int) -> dict[str, list[float]]:
        """Our kernel with its defaults, or with each tuning of the sweep (labelled -nrN-quM)."""
        if not nrs and not blocks:
            return {name: rates_gb_s(group(weight, nbytes), xs, nbytes, repeats)}
        out = {}
        for nr, qu in itertools.product(nrs or [None], blocks if name == "q4k" and blocks else [None]):
            tuning = {k: getattr(matvec, k) if v is None else v for k, v in
                      {"ROWS_PER_SIMDGROUP": nr, "ROWS_PER_SIMDGROUP_MULTI": nr, "Q4K_BLOCKS_IN_FLIGHT": qu}.items()}
            with mock.patch.multiple(matvec, **tuning):
                tags = "".join(f"-{tag}{v}" for tag, v in zip(["nr", "qu"], [nr, qu]) if v is not None)
                out[name + tags] = rates_gb_s(group(weight, nbytes), xs, nbytes, repeats)
        return out

    def mlx_q4(i: int):
        wq, scales, biases = mx.quantize(w16 + 0 * i, group_size=32, bits=4)  # a distinct copy
        mx.eval(wq, scales, biases)
        return lambda x: mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=32, bits=4)

    def mlx_f16(i: int):
        wi = w16 + 0 * i
        mx.eval(wi)
        return lambda x: x @ wi.T

    mx.eval(w16, *xs)
    q4_bytes = rows * k // 32 * (16 + 2 + 2)  # nibbles + fp16 scale + fp16 bias per 32
    q4k_bytes = rows * k // 256 * 144
    mlx_impls = {
        "q4-mlx": ([mlx_q4(i) for i in range(copies(q4_bytes))], q4_bytes),
        "f16-mlx": ([mlx_f16(i) for i in range(copies(rows * k * 2))], rows * k * 2),
    }
    rates = ours("q4k", qt, q4k_bytes) | ours("f16", w, rows * k * 2)
    return rates | {name: rates_gb_s(fns, xs, nbytes, repeats) for name, (fns, nbytes) in mlx_impls.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="OUTxIN weight shapes")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8], help="activation rows T per call")
    p.add_argument("--calls", type=int, default=64, help="products per evaluation")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows-per-simdgroup", type=int, nargs="+", default=[],
                   help="sweep: output rows per SIMD-group of our kernel")
    p.add_argument("--blocks-in-flight", type=int, nargs="+", default=[],
                   help="sweep: Q4_K super-blocks each lane loads ahead per row")
    p.add_argument("--write", action="store_true", help="add the records to bench/results/")
    args = p.parse_args()
    records = []
    for shape in args.shapes:
        rows, k = (int(v) for v in shape.split("x"))
        for t in args.rows:
            rates = bench_shape(rows, k, t, args.calls, args.repeats,
                                args.rows_per_simdgroup, args.blocks_in_flight)
            summary = "  ".join(f"{name} {np.median(r):.0f}" for name, r in rates.items())
            print(f"{shape:>12} T={t} {summary} GB/s", flush=True)
            for name, r in rates.items():
                records.append(record("mlx", shape, name, "kernel", "whole-pass", batch=t, tokens=args.calls,
                                      rates=r, rate_key="gb_s"))
    if args.write:
        print("wrote", write_results(records))


if __name__ == "__main__":
    main()
