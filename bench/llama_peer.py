"""llama.cpp as a peer on the same card: its `llama-bench` decoding our GGUF export of a synthetic model.

    python3 -m bench.llama_peer --llama-bench PATH --shape 1.5B --precisions q4k f16 --write

For each precision the synthetic checkpoint of --shape (mlx_rwkv.synth, seed 0, float16) is
written to a temporary folder, exported with `mlx_rwkv.convert` (q4k: Q4_K linear layers and
head, as `mlx-rwkv quantize` writes them; f16: F16), and timed by llama.cpp's own benchmark
tool: `llama-bench -p 0 -n TOKENS -r REPEATS -ngl 99 -o json` (text generation from an empty
context, one sequence, every layer on the GPU). Build it with CUDA, e.g. from the sources in
the llama-cpp-python sdist (the README gives the options used): `cmake -B build -DGGML_CUDA=ON
-DCMAKE_CUDA_ARCHITECTURES=90-real && cmake --build build --target llama-bench`.

Records (DESIGN.md's format): engine "llama.cpp", mode "decode", strategy "llama-bench",
batch 1, tokens TOKENS, tok_s the median of llama-bench's per-repeat rates, plus its build
commit and backends. --write merges them into <results-dir>/<device>-<date>.json, where the
same run's `mlx-rwkv bench` records line up with them. CUDA libraries that the binary links
(libcudart, libcublas) are looked up in the Python environment's `nvidia` wheels when the
system's loader path lacks them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench.results_io import RESULTS_DIR
from mlx_rwkv import cli_args as check
from mlx_rwkv.bench_records import record, write_results
from mlx_rwkv.benchmark import Plan
from mlx_rwkv.config import SHAPES
from mlx_rwkv.convert import convert
from mlx_rwkv.synth import write_synthetic

GGUF_TYPES = {"q4k": "q4_k", "f16": "f16"}


def cuda_library_dirs() -> list[str]:
    """Folders of the CUDA runtime libraries that pip's `nvidia-*` wheels install (cu13 and older layouts)."""
    found = []
    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        if base.is_dir():
            found += [str(p) for p in sorted(base.glob("*/lib")) if any(p.glob("lib*.so*"))]
    return found


def run_llama_bench(binary: Path, model: Path, tokens: int, repeats: int) -> dict[str, Any]:
    """llama-bench's JSON result for text generation of `tokens` tokens on `model`, all layers on the GPU."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(cuda_library_dirs() + [env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    cmd = [str(binary), "-m", str(model), "-p", "0", "-n", str(tokens), "-r", str(repeats), "-ngl", "99", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    results = json.loads(out.stdout)
    if not results:
        raise RuntimeError("llama-bench printed no result")
    if not results[0].get("gpu_info"):  # a CUDA build that found no GPU runs on the CPU
        raise RuntimeError(f"llama-bench ran on the CPU (no GPU found; backends {results[0].get('backends')!r}): "
                           "not a GPU peer figure")
    return results[0]


def peer_record(result: dict[str, Any], shape: str, precision: str) -> dict[str, Any]:
    """One DESIGN.md record of a llama-bench text-generation result."""
    rates = result.get("samples_ts") or [result["avg_ts"]]
    return record("llama.cpp", shape, precision, "decode", "llama-bench", tokens=int(result["n_gen"]),
                  rates=[float(r) for r in rates], weights="synthetic",
                  build_commit=result.get("build_commit"), backends=result.get("backends"),
                  gpu_info=result.get("gpu_info"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bench", type=check.existing_file, required=True, help="path of the llama-bench binary")
    p.add_argument("--shape", default="1.5B", choices=list(SHAPES), help="real model size to synthesize")
    p.add_argument("--precisions", nargs="+", default=["q4k", "f16"], choices=list(GGUF_TYPES), metavar="PREC",
                   help="q4k and/or f16")
    p.add_argument("--layers", type=check.int_at_least(1), help="override the layer count (quick runs)")
    p.add_argument("--embd", type=check.multiple_of(256), help="override the width C (a multiple of 256 for Q4_K)")
    p.add_argument("--tokens", type=check.int_at_least(1), default=128, help="tokens generated per repeat")
    p.add_argument("--repeats", type=check.int_at_least(1), default=3, help="llama-bench repeats")
    p.add_argument("--write", action="store_true", help="merge the records into <results-dir>/<device>-<date>.json")
    p.add_argument("--results-dir", type=check.directory_path, default=RESULTS_DIR, help="where --write writes")
    args = p.parse_args(argv)
    label = Plan(overrides={k: v for k, v in (("n_layer", args.layers), ("n_embd", args.embd)) if v}).label(args.shape)
    records = []
    with TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "synthetic.safetensors"
        write_synthetic(checkpoint, shape=args.shape, n_layer=args.layers, n_embd=args.embd)
        for precision in args.precisions:
            model = convert(checkpoint, Path(tmp) / f"synthetic-{precision}.gguf", GGUF_TYPES[precision])
            result = run_llama_bench(Path(args.llama_bench), model, args.tokens, args.repeats)
            records.append(peer_record(result, label, precision))
            print(f"llama.cpp {label} {precision}: {records[-1]['tok_s']} tok/s "
                  f"(spread {records[-1]['tok_s_spread']}, {result.get('backends')})", flush=True)
            model.unlink()
    if args.write:
        print("wrote", write_results(records, results_dir=args.results_dir))


if __name__ == "__main__":
    main()
