"""Registers, local memory and PTX size of the mat-vec, WKV-7 scan and layer CUDA builds, offline.

    python -m bench.kernel_resources [--nt 1 8] [--nr 2 4] [--qu 1 2] [--dtype half]
    python -m bench.kernel_resources --kernel wkv7_scan [--heads 32]

Needs only the CUDA toolkit's nvcc (no GPU): the portable body is compiled for sm_90 the way
`mx.fast.cuda_kernel` builds it (CUDA prelude, index lines, the body inside a templated
__global__ function) and ptxas reports registers per thread, stack frame and spills. Registers
set occupancy (65,536 per SM: 96 registers allow 21 SIMD-groups, 160 only 12), and a stack
frame means an array the compiler could not keep in registers (an accumulator indexed by a
loop it did not unroll): the signs to check before spending GPU time on a tuning.
"""
from __future__ import annotations

import argparse
import itertools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import mlx.core as mx

from mlx_rwkv import layer_kernel, matvec, wkv
from mlx_rwkv.kernels import KernelSpec, render

CUDA_TYPES = {"half": (mx.float16, "__half"), "bfloat16": (mx.bfloat16, "__nv_bfloat16"),
              "float": (mx.float32, "float")}
CUDA_NAMES = {mx_dtype: name for mx_dtype, name in CUDA_TYPES.values()}


def translation_unit(spec: KernelSpec, template: list[tuple[str, object]], types: dict[str, str]) -> str:
    """`spec`'s body as one CUDA translation unit, instantiated the way `mx.fast.cuda_kernel`
    builds it. template: (name, value) with mx dtypes for type parameters; types: the C type of
    every argument (a template type name, or a concrete type)."""
    header, body = render(spec, "cuda")
    concrete = {name: CUDA_NAMES[value] for name, value in template if isinstance(value, mx.Dtype)}
    names = ", ".join(("typename " if name in concrete else "int ") + name for name, _ in template)
    values = ", ".join(concrete.get(name, str(value)) for name, value in template)
    params = [f"const {types[n]}* {n}" for n in spec.inputs] + [f"{types[n]}* {n}" for n in spec.outputs]
    instance = ", ".join(re.sub(r"\b(\w+)\*", lambda m: concrete.get(m.group(1), m.group(1)) + "*", p)
                         for p in params)
    return (f"#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n{header}\n"
            f"template <{names}>\n__global__ void {spec.name}({', '.join(params)}) {{\n{body}\n}}\n"
            f"template __global__ void {spec.name}<{values}>({instance});\n")


def matvec_source(dtype: str, nt: int, nr: int, qu: int, has_q4k: int, norm: bool = False) -> str:
    """One instantiation of the grouped mat-vec (one segment, dense weights and activations in
    `dtype`; `norm`: MATVEC_NORM at width 2048) with the template arguments ProjectionGroup passes."""
    mx_dtype, _ = CUDA_TYPES[dtype]
    with mock.patch.multiple(matvec, ROWS_PER_SIMDGROUP=nr, ROWS_PER_SIMDGROUP_MULTI=nr, Q4K_BLOCKS_IN_FLIGHT=qu):
        template = matvec.kernel_template(mx_dtype, mx_dtype, nt, 1, bool(has_q4k), matvec.WARPS if norm else 1)
    spec = matvec.MATVEC_NORM if norm else matvec.MATVEC
    types = {"seg": "int", "wd": "uint", "wq": "uint", "dims": "int"}
    return translation_unit(spec, template + ([("CX", 2048), ("HAS_DX", 1)] if norm else []),
                            {n: types.get(n, "TX") for n in spec.inputs + spec.outputs})


def wkv7_source(dtype: str, heads: int, first: int, lora: bool = False) -> str:
    """The fused WKV-7 decode kernel for heads x 64 (`lora`: with the LoRA up-projections)."""
    mx_dtype, _ = CUDA_TYPES[dtype]
    spec = wkv.WKV7_LORA if lora else wkv.WKV7_FUSED
    template = [("T", mx_dtype), ("H", heads), ("N", 64), ("FIRST", first), ("LPR", wkv.FUSED_LANES_PER_ROW)]
    template += [("XFMT", matvec.weight_format(mx_dtype)), ("WFMT", matvec.weight_format(mx_dtype))] if lora else []
    types = {n: "float" for n in wkv.PARAM_NAMES + ("state_in", "state_out")}
    types |= {"seq_len": "int", "up_seg": "int", "up_w": "uint"}
    return translation_unit(spec, template, {n: types.get(n, "T") for n in spec.inputs + spec.outputs})


def layer_source(dtype: str, first: int, q4k: int) -> str:
    """The persistent layer kernel (layer_kernel.LAYER_DECODE) for the 1.5B shape (C = 2048, 32 heads
    of 64, 7 att_in segments, 4 LoRA up-projections), one row, with or without Q4_K projections."""
    mx_dtype, _ = CUDA_TYPES[dtype]
    fmt = matvec.weight_format(mx_dtype)
    template = [("TX", mx_dtype), ("T", mx_dtype), ("XFMT", fmt), ("WFMT", fmt), ("NT", 1),
                ("NR", matvec.ROWS_PER_SIMDGROUP), ("QU", matvec.Q4K_BLOCKS_IN_FLIGHT), ("WARPS", matvec.WARPS),
                ("TILED", 0), ("CX", 2048), ("H", 32), ("N", 64), ("LPR", layer_kernel.THREADS // 64),
                ("FIRST", first), ("HAS_DX", 1 - first), ("NSEG_IN", 7), ("NSEG_UP", 4),
                ("Q_IN", q4k), ("Q_OUT", q4k), ("Q_KEY", q4k), ("Q_VAL", q4k)]
    spec = layer_kernel.LAYER_DECODE
    types = {"params": "float", "state_in": "float", "state_out": "float", "segs": "int", "dims": "int",
             "wd": "uint", "wq": "uint", "words": "uint"}
    return translation_unit(spec, template, {n: types.get(n, "TX") for n in spec.inputs + spec.outputs})


def scan_source(dtype: str, heads: int, first: int) -> str:
    """The WKV-7 scan kernel for heads x 64 as a CUDA translation unit, with the template
    arguments wkv7() passes."""
    mx_dtype, _ = CUDA_TYPES[dtype]
    layout, _, _ = wkv.scan_launch(1, heads, 64)
    template = [("T", mx_dtype), ("H", heads), ("N", 64), ("FIRST", first), *layout]
    types = {n: "T" for n in wkv.WKV7_SCAN.inputs[:7]} | {"state_in": "float", "seq_len": "int"}
    return translation_unit(wkv.WKV7_SCAN, template,
                            {n: types.get(n, "float") for n in wkv.WKV7_SCAN.inputs + wkv.WKV7_SCAN.outputs})


def resources(source: str, nvcc: str) -> dict[str, int]:
    """ptxas registers / stack / spill bytes and the PTX instruction count of `source`."""
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp, "k.cu")
        cu.write_text(source)
        base = [nvcc, "-arch=sm_90", "-O3", str(cu)]
        info = subprocess.run(base + ["-cubin", "-Xptxas", "-v", "-o", str(Path(tmp, "k.cubin"))],
                              capture_output=True, text=True, check=True).stderr
        subprocess.run(base + ["-ptx", "-o", str(Path(tmp, "k.ptx"))], check=True)
        ptx = Path(tmp, "k.ptx").read_text()
    number = lambda pattern: int(re.search(pattern, info).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "stack": number(r"(\d+) bytes stack frame"),
            "spill": number(r"(\d+) bytes spill stores"),
            "ptx_instructions": len(re.findall(r"^\s+[a-z].*;$", ptx, re.M))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nt", type=int, nargs="+", default=[1, 8], help="activation rows")
    p.add_argument("--nr", type=int, nargs="+", default=[2, 4], help="output rows per SIMD-group")
    p.add_argument("--qu", type=int, nargs="+", default=[1, 2], help="Q4_K super-blocks in flight")
    p.add_argument("--has-q4k", type=int, nargs="+", default=[1, 0], help="1: dense + Q4_K branches")
    p.add_argument("--dtype", default="half", choices=sorted(CUDA_TYPES))
    p.add_argument("--nvcc", default=shutil.which("nvcc") or "nvcc")
    p.add_argument("--kernel", default="matvec", choices=["matvec", "wkv7_scan"])
    p.add_argument("--heads", type=int, default=32, help="wkv7_scan: heads of 64 (1.5B: 32)")
    args = p.parse_args()
    if args.kernel == "wkv7_scan":
        print(f"{'FIRST':>5} {'regs':>5} {'stack':>6} {'spill':>6} {'PTX':>6}")
        for first in [1, 0]:
            r = resources(scan_source(args.dtype, args.heads, first), args.nvcc)
            print(f"{first:>5} {r['registers']:>5} {r['stack']:>6} {r['spill']:>6} {r['ptx_instructions']:>6}",
                  flush=True)
        return
    print(f"{'NT':>3} {'NR':>3} {'QU':>3} {'Q4K':>4} {'regs':>5} {'stack':>6} {'spill':>6} {'PTX':>6}")
    for has_q4k, nt, nr, qu in itertools.product(args.has_q4k, args.nt, args.nr, args.qu):
        if not has_q4k and qu != args.qu[0]:
            continue  # QU only shapes the Q4_K branch
        r = resources(matvec_source(args.dtype, nt, nr, qu, has_q4k), args.nvcc)
        print(f"{nt:>3} {nr:>3} {qu:>3} {has_q4k:>4} {r['registers']:>5} {r['stack']:>6} {r['spill']:>6} "
              f"{r['ptx_instructions']:>6}", flush=True)


if __name__ == "__main__":
    main()
