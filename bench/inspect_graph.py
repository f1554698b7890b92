"""Which primitives a decode step launches: per-type node counts, compiled and not.

    python -m bench.inspect_graph [--shape 1.5B] [--layers 2] [--precision f16]
"""
from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from bench.bench_mlx import PRECISIONS
from bench.graph_nodes import count_kernel_nodes
from mlx_rwkv.config import config_for_shape
from mlx_rwkv.loading import build_model
from mlx_rwkv.quant import quantize_model
from mlx_rwkv.synth import synthesize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5B")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--precision", default="f16", choices=PRECISIONS)
    args = p.parse_args()
    config = config_for_shape(args.shape, n_layer=args.layers)
    weights = synthesize(config, seed=0, dtype=np.float16)
    if args.precision == "q4k":
        weights = quantize_model(weights, include_head=True)
    model = build_model(weights, config, PRECISIONS[args.precision])
    state, tok = model.new_state(), mx.array([1], dtype=mx.int32)
    logits, new = model._run(tok[:, None], state, all_logits=True)
    print("uncompiled:", count_kernel_nodes(logits, *new.arrays()))
    logits, new = model.step(tok, state)
    print("compiled:  ", count_kernel_nodes(logits, *new.arrays()))


if __name__ == "__main__":
    main()
