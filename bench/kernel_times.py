"""GPU time per kernel for one decode step or one prefill, measured by Nsight Compute (ncu).

    ncu --csv --metrics gpu__time_duration.sum -o - python -m bench.kernel_times run decode > k.csv
    python -m bench.kernel_times summarize k.csv
    ncu --csv --metrics gpu__time_duration.sum python -m bench.bench_q4k --shapes 4096x4096 --calls 4 \
        --repeats 1 > q.csv && python -m bench.kernel_times summarize --all q.csv   (kernel durations)

`run` executes the workload twice (the first pass compiles and warms up) with a marker kernel
in between; `summarize` keeps the launches after the marker (the measured pass) and prints GPU microseconds per kernel
name, the total GPU time, and the launch count. Comparing the total with the wall time per
token tells whether a step is bound by the GPU or by dispatch:

    python -m bench.kernel_times wall --precision q4k     (no ncu: host and wall time per decode step)

prints, per compiled decode step (batch 1, greedy), the host time to build and issue it (graph
construction and the compiled call, before any wait) and the wall time of a step including its
wait; wall minus the ncu kernel total is the time the GPU sat idle between kernels.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections import defaultdict

import mlx.core as mx
import numpy as np

from mlx_rwkv.benchmark import synthetic_model
from mlx_rwkv.config import ModelConfig, config_for_shape


def _config(shape: str, layers: int | None) -> ModelConfig:
    return config_for_shape(shape, **({"n_layer": layers} if layers else {}))


def wall(shape: str, layers: int | None, precision: str, steps: int = 200) -> None:
    """Host time to issue a compiled decode step, and wall time per step with its wait."""
    model = synthetic_model(_config(shape, layers), precision)
    state, token = model.new_state(), mx.zeros((1,), mx.int32)
    mx.eval(state.arrays(), token)
    issue, warmup = [], 10
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        t0 = time.perf_counter()
        logits, state = model.step(token, state)
        token = mx.argmax(logits, axis=-1).astype(mx.int32)
        issue.append(time.perf_counter() - t0)
        mx.eval(token, state.arrays())
    issue = issue[warmup:]
    per_step = (time.perf_counter() - start) / steps
    print(f"{shape} {precision}: host issue {1e6 * np.median(issue):.1f} us/step (median), "
          f"wall {1e6 * per_step:.1f} us/step ({1 / per_step:.1f} tok/s)")


def run(mode: str, shape: str, layers: int | None, precision: str, tokens: int) -> None:
    config = _config(shape, layers)
    model = synthetic_model(config, precision)
    ids = mx.array(np.random.default_rng(0).integers(1, config.vocab_size, tokens), dtype=mx.int32)
    state = model.new_state()
    mx.eval(state.arrays())
    for i in range(2):
        if i:
            _marker()
        if mode == "decode":
            logits, new = model.step(ids[:1], state)
        else:
            logits, new = model.forward(ids, state)
        mx.eval(logits, new.arrays())


MARKER = "rwkv_pass_marker"


def _marker() -> None:
    """A uniquely named launch that separates the warm-up pass from the measured one."""
    kernel = mx.fast.cuda_kernel(name=MARKER, input_names=["a"], output_names=["b"], source="b[0] = a[0];")
    (out,) = kernel(inputs=[mx.ones((1,))], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                    output_shapes=[(1,)], output_dtypes=[mx.float32])
    mx.eval(out)


def summarize(path: str, every_launch: bool = False) -> None:
    """Per-kernel GPU time of the launches after the last marker (every launch: all of them)."""
    rows = [r for r in csv.DictReader(_csv_lines(path)) if r.get("Metric Name") == "gpu__time_duration.sum"]
    last = -1 if every_launch else max(i for i, r in enumerate(rows) if MARKER in r["Kernel Name"])
    measured = rows[last + 1:]
    per_name: dict[str, list[float]] = defaultdict(list)
    for r in measured:
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[r["Metric Unit"]]
        per_name[_short(r["Kernel Name"])].append(float(r["Metric Value"].replace(",", "")) * scale)
    total = sum(sum(v) for v in per_name.values())
    print(f"{len(measured)} launches, {total:.1f} us of GPU time")
    for name, times in sorted(per_name.items(), key=lambda kv: -sum(kv[1])):
        print(f"{sum(times):9.1f} us {100 * sum(times) / total:5.1f}%  {len(times):4d} x {np.mean(times):7.2f} us  {name}")


def _csv_lines(path: str):
    with open(path) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    return lines[start:]


def _short(name: str) -> str:
    name = re.sub(r"\(.*", "", name)
    return name[:90]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("mode", choices=["decode", "prefill"])
    r.add_argument("--shape", default="1.5B")
    r.add_argument("--layers", type=int)
    r.add_argument("--precision", default="f16", choices=["f16", "q4k"])
    r.add_argument("--tokens", type=int, default=1024)
    w = sub.add_parser("wall")
    w.add_argument("--shape", default="1.5B")
    w.add_argument("--layers", type=int)
    w.add_argument("--precision", default="f16", choices=["f16", "q4k"])
    s = sub.add_parser("summarize")
    s.add_argument("csv")
    s.add_argument("--all", action="store_true", help="every launch (a profile without the marker)")
    args = p.parse_args()
    if args.cmd == "run":
        run(args.mode, args.shape, args.layers, args.precision, args.tokens)
    elif args.cmd == "wall":
        wall(args.shape, args.layers, args.precision)
    else:
        summarize(args.csv, args.all)


if __name__ == "__main__":
    sys.exit(main())
