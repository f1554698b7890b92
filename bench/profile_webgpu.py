"""Where the WebGPU engine's time goes: wall time of every op of one chunk, summed per kind.

    python -m bench.profile_webgpu --shape 1.5B --precision f16 --tokens 256
    python -m bench.profile_webgpu --shape 0.1B --tokens 1            # a decode step

Each op is submitted alone and waited for (like the per-op strategy of bench_webgpu); the wall
time of an empty submit is subtracted, so small ops read close to their GPU time only when they
take well over that floor (printed). Ops of every layer are summed by kind (the name without its
`L<i>.` prefix), with the multiply-add rate of the linear ops (2 M K T flops per matrix).
"""
from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict

import numpy as np

from bench.bench_webgpu import SubmitTimer, build
from mlx_rwkv.config import config_for_shape
from mlx_rwkv.synth import synthesize
from webgpu_ref import WebGPUModel, ops


def op_kind(name: str) -> str:
    """'L3.att_in.1' -> 'att_in'."""
    return re.sub(r"\.\d+$", "", re.sub(r"^L\d+\.", "", name))


def time_ops(model: WebGPUModel, op_list: list[ops.Op], tokens: int, repeats: int) -> tuple[list[float], float]:
    """Median wall seconds per op (empty-submit floor subtracted) and that floor."""
    submit = SubmitTimer(model.gpu)
    floor = statistics.median(submit([], tokens) for _ in range(20))
    samples = [[submit([op], tokens) for op in op_list] for _ in range(repeats)]
    return [max(0.0, statistics.median(s) - floor) for s in zip(*samples)], floor


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.5B")
    ap.add_argument("--precision", default="f16", choices=["f16", "q4k"])
    ap.add_argument("--tokens", type=int, default=256, help="chunk length (1 = a decode step)")
    ap.add_argument("--layers", type=int, help="override the layer count (quick runs)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    config = config_for_shape(args.shape, **({"n_layer": args.layers} if args.layers else {}))
    model = build(synthesize(config, seed=0), config, args.precision, args.tokens)
    ids = np.random.default_rng(0).integers(1, config.vocab_size, args.tokens)
    model.forward(ids)  # compiles the pipelines and sets this chunk's length and embeddings
    many = args.tokens > 1
    body, head = model.op_list("body", many), model.op_list("head", False)  # the last token's logits
    op_list = body + head
    seconds, floor = time_ops(model, op_list, args.tokens, args.repeats)

    per_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for i, (op, s) in enumerate(zip(op_list, seconds)):
        entry = per_kind[op_kind(op.name)]
        entry[0] += s
        entry[1] += 2.0 * op.macs * (args.tokens if i < len(body) else 1)
        entry[2] += 1
    total = sum(seconds)
    print(f"{model.gpu.name}: {args.shape} {args.precision}, {config.n_layer} layers, T={args.tokens}; "
          f"empty-submit floor {floor * 1e6:.0f} us (subtracted)")
    print(f"{'op':<12} {'count':>5} {'ms':>9} {'share':>6} {'TFLOP/s':>8}")
    for kind, (s, flops, count) in sorted(per_kind.items(), key=lambda kv: -kv[1][0]):
        rate = f"{flops / s / 1e12:8.2f}" if flops and s > 0 else " " * 8
        print(f"{kind:<12} {count:>5} {s * 1e3:9.2f} {s / total:6.1%} {rate}")
    print(f"{'total':<12} {len(op_list):>5} {total * 1e3:9.2f}   -> {args.tokens / total:,.0f} tok/s without sync gaps")


if __name__ == "__main__":
    main()
