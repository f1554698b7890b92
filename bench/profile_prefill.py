"""Where prefill time goes: each stage of one layer, timed alone at a real shape.

    python -m bench.profile_prefill [--shape 1.5B] [--tokens 1024]

Each stage runs `--copies` times (independent inputs) in one evaluation so dispatch overhead
is amortized; the table gives ms per layer and the share of the whole layer.
"""
from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from bench.bench_mlx import synthetic_model
from mlx_rwkv.config import config_for_shape
from mlx_rwkv.norm_mix import norm_mix
from mlx_rwkv.wkv import wkv7


def timed(fn, inputs: list, repeats: int = 5) -> float:
    mx.eval([fn(x) for x in inputs])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval([fn(x) for x in inputs])
        best = min(best, (time.perf_counter() - t0) / len(inputs))
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5B")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--copies", type=int, default=8)
    args = p.parse_args()
    model, config, _ = synthetic_model(args.shape, "f16", n_layer=2)
    n_layer = config_for_shape(args.shape).n_layer
    layer = model.layers[1]
    B, T, C = 1, args.tokens, config.n_embd
    nt = B * T
    rng = np.random.default_rng(0)
    act = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32) * 0.5).astype(mx.float16)  # noqa: E731
    state = model.new_state()
    xs_in = [act(7, nt, C) for _ in range(args.copies)]
    proj = [layer.att_in(x, nt) for x in xs_in]
    mx.eval(proj)
    wkv_in = [[act(B, T, C) for _ in range(8)] for _ in range(args.copies)]
    stages = {
        "norm_mix": (lambda x: norm_mix(x, x, layer.ln1, state.att_x[1], layer.att_mix),
                           [act(B, T, C) for _ in range(args.copies)]),
        "att_in (r,k,v + LoRA down)": (lambda x: layer.att_in(x, nt), xs_in),
        "lora_up": (lambda y: layer.lora_up(y, nt), proj),
        "wkv7 (scan + finish)": (lambda a: wkv7(*a, layer.wkv_params, state.wkv[1]), wkv_in),
        "att_out": (lambda x: layer.att_out(x, nt), [act(nt, C) for _ in range(args.copies)]),
        "ffn key + relu2": (lambda x: layer.ffn_key(x, nt), [act(nt, C) for _ in range(args.copies)]),
        "ffn value": (lambda x: layer.ffn_value(x, nt), [act(nt, config.d_ffn) for _ in range(args.copies)]),
    }
    times = {name: timed(fn, inputs) for name, (fn, inputs) in stages.items()}
    total = sum(times.values())
    for name, ms in times.items():
        print(f"{name:>28}: {ms:7.3f} ms/layer  {100 * ms / total:5.1f}%")
    print(f"{'sum':>28}: {total:7.3f} ms/layer -> {n_layer * total:.1f} ms for {n_layer} layers "
          f"({T / (n_layer * total / 1e3):.0f} tok/s if nothing else)")


if __name__ == "__main__":
    main()
