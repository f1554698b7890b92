"""Cost of one graph node on this backend: a compiled chain of N tiny dependent launches.

    python -m bench.bench_dispatch [--nodes 256] [--write]

The decode step is a chain of small kernels, so its floor is nodes x per-node cost. Each chain
link is a tiny (1 x 64) @ (64 x 64) matmul, or our grouped mat-vec kernel on a 64 x 64 weight;
the time per link is wall time / N (host dispatch plus GPU launch, the work itself is nil).
"""
from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from bench.results_io import record, write_results
from mlx_rwkv.matvec import ProjectionGroup, Segment


def us_per_node(link, nodes: int, repeats: int) -> list[float]:
    def chain(x):
        for _ in range(nodes):
            x = link(x)
        return x

    run = mx.compile(chain)
    x = mx.ones((1, 64), dtype=mx.float16)
    mx.eval(run(x))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            mx.eval(run(x))
        out.append((time.perf_counter() - t0) / (10 * nodes) * 1e6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    w_np = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float16) / 8
    w = mx.array(w_np)
    group = ProjectionGroup([Segment(w_np, "tanh")], mx.float16)
    links = {"matmul": lambda x: mx.tanh(x @ w.T), "matvec-kernel": lambda x: group(x, 1).reshape(1, 64)}
    records = []
    for name, link in links.items():
        times = us_per_node(link, args.nodes, args.repeats)
        print(f"{name}: {np.median(times):.2f} us per chain link", flush=True)
        records.append(record("mlx", "64x64", "f16", "kernel", name, tokens=args.nodes,
                              rates=[1 / t for t in times], rate_key="links_per_us"))
    if args.write:
        print("wrote", write_results(records))


if __name__ == "__main__":
    main()
