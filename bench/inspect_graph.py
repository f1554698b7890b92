"""Which primitives a decode step launches: per-type node counts, compiled and not.

    python -m bench.inspect_graph [--shape 1.5B] [--layers 2] [--precision f16]
"""
from __future__ import annotations

import argparse

import mlx.core as mx

from bench.bench_mlx import PRECISIONS, synthetic_model
from bench.graph_nodes import count_kernel_nodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5B")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--precision", default="f16", choices=PRECISIONS)
    args = p.parse_args()
    model, _, _ = synthetic_model(args.shape, args.precision, args.layers)
    state, tok = model.new_state(), mx.array([1], dtype=mx.int32)
    logits, new = model._run(tok[:, None], state, all_logits=True)
    print("uncompiled:", count_kernel_nodes(logits, *new.arrays()))
    logits, new = model.step(tok, state)
    print("compiled:  ", count_kernel_nodes(logits, *new.arrays()))


if __name__ == "__main__":
    main()
