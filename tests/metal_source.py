"""The complete Metal source of our kernels as `mx.fast.metal_kernel` generates it, for a host
C++ compile check on machines without Apple tools.

  registered_specs()        every module-level KernelSpec in the mlx_rwkv package (found, no list)
  EXAMPLE_CALLS             spec name -> f(dtype) calling the kernel's public wrapper on tiny inputs
  record_launches(f, dt)    the kernel launches that wrapper makes, with the Metal path forced on
  full_metal_source(...)    MLX's source: a stand-in for metal::utils(), our header, the generated
                            signature, our body and the explicit instantiation (mimics
                            write_signature/write_template of mlx/backend/metal/custom_kernel.cpp)
  mlx_generated_source(...) the same source from MLX itself (export tracing + verbose), or None
  compile_check(source)     (ok, compiler output) of `clang++ -fsyntax-only -include metal_shim.h`,
                            plus Apple's limits (buffers, threadgroup memory)
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from unittest import mock

import mlx.core as mx

import mlx_rwkv
from mlx_rwkv import kernels
from mlx_rwkv.kernels import KernelSpec, render

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "metal_kernels" / "metal_shim.h"

# What metal::utils() starts with; the compile check replaces it with metal_shim.h.
UTILS_STANDIN = "#include <metal_stdlib>\nusing namespace metal;\n// ... MLX's metal::utils() ...\n"

# ---- MLX's rules (mlx/backend/metal/custom_kernel.cpp, MLX 0.32) -------------------------------
MAX_THREADS_PER_THREADGROUP = 1024  # Apple GPUs' maxTotalThreadsPerThreadgroup (checked at launch)
MAX_CONSTANT_ARRAY_SIZE = 8  # inputs with fewer elements are `constant`, others `device`
METAL_ATTRIBUTES = (  # declared as kernel parameters, in this order, when the body mentions them
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
TYPE_STRINGS = {  # get_type_string
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.complex64: "complex64_t", mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t",
    mx.int32: "int32_t", mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t",
    mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}
TemplateArg = tuple[str, "int | bool | mx.Dtype"]


def type_string(dtype: mx.Dtype) -> str:
    if dtype not in TYPE_STRINGS:
        raise ValueError(f"MLX cannot pass {dtype} to a Metal kernel")
    return TYPE_STRINGS[dtype]


def _template_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))  # std::ostream << bool
    if isinstance(value, int):
        return str(value)
    return type_string(value)


def _template_kind(value) -> str:
    return "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "typename"


def kernel_name(spec: KernelSpec) -> str:
    """The name `kernels._build` gives MLX."""
    return f"rwkv_{spec.name}"


# ---- the registry: found, not listed ----------------------------------------------------------

def registered_specs() -> dict[str, KernelSpec]:
    """Every KernelSpec bound at module level in an mlx_rwkv module whose source says `KernelSpec(`."""
    specs: dict[str, KernelSpec] = {}
    for info in pkgutil.walk_packages(mlx_rwkv.__path__, "mlx_rwkv."):
        origin = importlib.util.find_spec(info.name).origin
        if not origin or not origin.endswith(".py") or "KernelSpec(" not in Path(origin).read_text():
            continue
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, KernelSpec):
                if specs.setdefault(value.name, value) != value:
                    raise AssertionError(f"two different KernelSpecs are named {value.name!r}")
    return specs


def _wkv7_call(dtype: mx.Dtype) -> None:
    from mlx_rwkv.wkv import PARAM_NAMES, wkv7

    B, T, H, N = 1, 1, 2, 64  # N is the real head size (it sizes arrays); decode: T = 1
    act = mx.zeros((B, T, H * N), dtype=dtype)
    params = {name: mx.zeros((H * N,)) for name in PARAM_NAMES}
    state = mx.zeros((B, H, N, N))
    wkv7(act, act, act, act, act, act, act, None, params, state)  # layer 0: FIRST = 1
    wkv7(act, act, act, act, act, act, act, act, params, state)  # later layers: FIRST = 0


def _wkv7_lora_call(dtype: mx.Dtype) -> None:  # decode's WKV launch, the LoRA up-projections inside
    import numpy as np

    from mlx_rwkv.matvec import ProjectionGroup, Segment
    from mlx_rwkv.wkv import PARAM_NAMES, wkv7_lora

    B, H, N, rank = 2, 2, 64, 32
    C = H * N
    up = ProjectionGroup([Segment(np.zeros((C, rank), np.float32), x_base=3 * C + i * rank) for i in range(4)],
                         dtype)
    act = mx.zeros((B, 1, C), dtype=dtype)
    hid = mx.zeros((B * (3 * C + 4 * rank),), dtype=dtype)
    params = {name: mx.zeros((C,)) for name in PARAM_NAMES}
    for v_first in (None, act):  # FIRST = 1, 0
        wkv7_lora(act, act, act, hid, up, v_first, params, mx.zeros((B, H, N, N)))


def _wkv7_scan_call(dtype: mx.Dtype) -> None:  # prefill: wkv7_scan + wkv7_finish
    from mlx_rwkv import wkv

    B, T, H, N = 1, wkv.FUSED_MAX_T + 1, 2, 64
    act = mx.zeros((B, T, H * N), dtype=dtype)
    params = {n: mx.zeros((H * N,)) for n in wkv.PARAM_NAMES}
    state = mx.zeros((B, H, N, N))
    wkv.wkv7(act, act, act, act, act, act, act, None, params, state)
    wkv.wkv7(act, act, act, act, act, act, act, act, params, state)


def _norm_mix_call(dtype: mx.Dtype) -> None:
    from mlx_rwkv.norm_mix import norm_mix

    B, C, M = 2, 256, 6
    ln = (mx.zeros((C,), dtype=dtype), mx.zeros((C,), dtype=dtype))
    for T in (1, 40):  # rows split over threadgroups (decode), whole rows (prefill)
        x = mx.zeros((B, T, C), dtype=dtype)
        norm_mix(x, x, ln, mx.zeros((B, C), dtype=dtype), mx.zeros((M, C), dtype=dtype))


def _q4k_call(dtype: mx.Dtype) -> None:  # Q4_K dequant (the prefill path of Q4_K weights)
    import numpy as np

    from mlx_rwkv.q4k_linear import Q4KLinear
    from mlx_rwkv.quant import Q4KTensor, quantize_q4k

    rows, k = 8, 512
    layer = Q4KLinear(Q4KTensor(quantize_q4k(np.zeros((rows, k), np.float32)), (rows, k)))
    layer(mx.zeros((16, k), dtype=dtype))  # q4k_dequant + matmul


def _matvec_call(dtype: mx.Dtype) -> None:  # grouped mat-vec: dense + Q4_K segments, 1 and 3 rows
    import numpy as np

    from mlx_rwkv.matvec import ProjectionGroup, Segment
    from mlx_rwkv.quant import Q4KTensor, quantize_q4k

    k = 256
    q4k = Q4KTensor(quantize_q4k(np.zeros((8, k), np.float32)), (8, k))
    mixed = ProjectionGroup([Segment(np.zeros((16, k), np.float32), "tanh"), Segment(q4k, "relu2", k)], dtype)
    dense = ProjectionGroup([Segment(np.zeros((16, k), np.float32))], dtype)  # no Q4_K segment
    for nt in (1, 3, 12):  # 12: tiles of 8 rows
        mixed(mx.zeros((2, nt, k), dtype=dtype), nt)
        dense(mx.zeros((nt, k), dtype=dtype), nt)


def _matvec_norm_call(dtype: mx.Dtype) -> None:  # the mat-vec with norm_mix's work in its prologue
    import numpy as np

    from mlx_rwkv.matvec import ProjectionGroup, Segment
    from mlx_rwkv.quant import Q4KTensor, quantize_q4k

    C = 256
    q4k = Q4KTensor(quantize_q4k(np.zeros((8, C), np.float32)), (8, C))
    group = ProjectionGroup([Segment(np.zeros((16, C), np.float32), "tanh"), Segment(q4k, "relu2", C)], dtype)
    ln = (mx.zeros((C,), dtype=dtype), mx.zeros((C,), dtype=dtype))
    for B in (1, 3):
        x = mx.zeros((B, 1, C), dtype=dtype)
        for dx in (None, x):  # layer 0 has no pending residual update
            group.after_norm(x, dx, ln, mx.zeros((B, C), dtype=dtype), mx.zeros((2, C), dtype=dtype))


def _layer_decode_call(dtype: mx.Dtype) -> None:  # the persistent layer kernel (opted in on Metal)
    import numpy as np

    from conftest import _config
    from mlx_rwkv.loading import build_model
    from mlx_rwkv.quant import quantize_model
    from mlx_rwkv.synth import synthesize

    config = _config(n_layer=2, n_embd=256, vocab_size=64, d_decay=32, d_aaa=32, d_mv=32, d_gate=64)
    weights = synthesize(config, seed=1, dtype=np.float16)
    with mock.patch.dict(os.environ, {"MLX_RWKV_LAYER_KERNEL": "4"}):
        for w in (weights, quantize_model(weights, include_head=False)):
            model = build_model(w, config, {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype, "float32"))
            for B in (1, 2):  # layer 0 (FIRST, no pending update) and layer 1
                model._run(mx.zeros((B, 1), dtype=mx.int32), model.new_state(B), all_logits=False)


# One entry per KernelSpec name: call the public code that launches it, on tiny inputs whose
# activation dtype is `dtype`, so the check sees the launch arguments production passes.
EXAMPLE_CALLS: dict[str, Callable[[mx.Dtype], None]] = {
    "wkv7": _wkv7_call,
    "wkv7_scan": _wkv7_scan_call,
    "wkv7_finish": _wkv7_scan_call,
    "norm_mix": _norm_mix_call,
    "q4k_dequant": _q4k_call,
    "matvec": _matvec_call,
    "matvec_norm": _matvec_norm_call,
    "layer_decode": _layer_decode_call,
    "wkv7_lora": _wkv7_lora_call,
    "simd_probe": lambda dtype: importlib.import_module("mlx_rwkv.doctor").simd_probe(256),
}


# ---- what the wrapper launches ------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """One `kernel(...)` call as the wrapper makes it (the arguments that shape the source)."""

    spec: KernelSpec
    input_dtypes: tuple[mx.Dtype, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    template: tuple[TemplateArg, ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]


def record_launches(call: Callable[[mx.Dtype], None], dtype: mx.Dtype) -> list[Launch]:
    """Run `call(dtype)` with `get_kernel` forced onto Metal, recording instead of launching."""
    launches: list[Launch] = []

    def build(spec: KernelSpec, backend: str) -> Callable:
        assert backend == "metal"

        def kernel(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                   **_options):
            if len(inputs) != len(spec.inputs) or len(output_shapes) != len(spec.outputs) \
                    or len(output_dtypes) != len(spec.outputs):
                raise AssertionError(f"{spec.name}: {len(inputs)} inputs, {len(output_shapes)} "
                                     f"output shapes and {len(output_dtypes)} output dtypes for "
                                     f"{spec.inputs} -> {spec.outputs}")
            if threadgroup[0] * threadgroup[1] * threadgroup[2] > MAX_THREADS_PER_THREADGROUP:
                raise AssertionError(f"{spec.name}: threadgroup {threadgroup} exceeds "
                                     f"{MAX_THREADS_PER_THREADGROUP} threads (Metal's limit)")
            launches.append(Launch(
                spec, tuple(x.dtype for x in inputs), tuple(tuple(x.shape) for x in inputs),
                tuple(output_dtypes), tuple(tuple(s) for s in output_shapes),
                tuple(tuple(t) for t in (template or ())), tuple(grid), tuple(threadgroup)))
            return [mx.zeros(shape, dtype=dt) for shape, dt in zip(output_shapes, output_dtypes)]

        return kernel

    with mock.patch.object(kernels, "gpu_backend", lambda: "metal"), \
            mock.patch.object(kernels, "_build", build), \
            mock.patch.object(kernels, "_threadgroup_fits", {}):  # probes here prove nothing
        call(dtype)
    return launches


# ---- the source -------------------------------------------------------------------------------

def full_metal_source(spec: KernelSpec, input_dtypes: Sequence[mx.Dtype],
                      template: Sequence[TemplateArg], output_dtypes: Sequence[mx.Dtype], *,
                      input_shapes: Sequence[Sequence[int]] | None = None,
                      atomic_outputs: bool = False, utils: bool = True,
                      line_markers: bool = False) -> str:
    """The MSL that MLX compiles for `spec` (what `kernels._build` + a call with these arguments give).

    input_shapes: only their size (< 8 elements: `constant`) and ndim (0: a reference) matter;
    default: every input a large 1-D array. utils=False drops the metal::utils() stand-in (the
    compile check -includes metal_shim.h instead). line_markers adds `#line` directives so that
    compiler messages name metal_kernels/<file>:<line> (MLX's source has none).
    """
    header, body = render(spec, "metal")
    names = spec.inputs
    shapes = [tuple(s) for s in input_shapes] if input_shapes is not None else [(4096,)] * len(names)
    if not len(input_dtypes) == len(shapes) == len(names) or len(output_dtypes) != len(spec.outputs):
        raise ValueError(f"{spec.name}: expected {len(names)} inputs and {len(spec.outputs)} outputs")

    # metal_kernel(): what the body mentions decides the extra parameters
    shape_infos = [(f"{n}_shape" in body, f"{n}_strides" in body, f"{n}_ndim" in body) for n in names]
    attributes = [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in body]

    # the kernel's name: template hash, then how every input and output is passed
    name = "custom_kernel_" + kernel_name(spec)
    template_def = ""
    if template:
        template_def = "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        name += "_" + re.sub(r"<|>|(, )", "_", template_def)[:-1]
    for dtype, shape in zip(input_dtypes, shapes):
        name += "_" + type_string(dtype)
        size = 1
        for d in shape:
            size *= d
        name += "s" if len(shape) == 0 else "c" if size < MAX_CONSTANT_ARRAY_SIZE else ""
    for dtype in output_dtypes:
        name += "_" + type_string(dtype)

    # write_signature()
    src = []
    if line_markers:
        src.append('#line 1 "metal_kernels/prelude_metal.h"\n')
    src.append(header)
    if line_markers:
        src.append('\n#line 1 "<mlx signature>"\n')
    if template:
        src.append("template <" + ", ".join(f"{_template_kind(v)} {n}" for n, v in template) + ">\n")
    src.append(f"[[kernel]] void {name}(\n")
    index = 0
    for i, (n, dtype, shape) in enumerate(zip(names, input_dtypes, shapes)):
        size = 1
        for d in shape:
            size *= d
        location = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if len(shape) == 0 else "*"
        src.append(f"  const {location} {type_string(dtype)}{ref} {n} [[buffer({index})]],\n")
        index += 1
        if len(shape) > 0:
            has_shape, has_strides, has_ndim = shape_infos[i]
            if has_shape:
                src.append(f"  const constant int* {n}_shape [[buffer({index})]],\n")
                index += 1
            if has_strides:
                src.append(f"  const constant int64_t* {n}_strides [[buffer({index})]],\n")
                index += 1
            if has_ndim:
                src.append(f"  const constant int& {n}_ndim [[buffer({index})]],\n")
                index += 1
    for n, dtype in zip(spec.outputs, output_dtypes):
        t = type_string(dtype)
        src.append(f"  device {'atomic<' + t + '>' if atomic_outputs else t}* {n} [[buffer({index})]]")
        # (sic: MLX compares the buffer index, shape buffers included, with the argument count)
        last = not (index < len(names) + len(spec.outputs) - 1 or attributes)
        src.append(") {\n" if last else ",\n")
        index += 1
    for i, attr in enumerate(attributes):
        src.append(attr + (") {\n" if i == len(attributes) - 1 else ",\n"))
    if line_markers:
        for filename, text in kernels.body_parts(spec, "metal"):
            src.append(f'#line 1 "metal_kernels/{filename}"\n' + text if filename else text)
        src.append('\n#line 1 "<mlx instantiation>"')
    else:
        src.append(body)
    src.append("\n}\n")
    # metal_kernel(): the explicit instantiation
    if template:
        full = name + template_def
        src.append(f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({full}) {full};\n')
    return (UTILS_STANDIN if utils else "") + "".join(src)


def launch_source(launch: Launch, **options) -> str:
    return full_metal_source(launch.spec, launch.input_dtypes, launch.template,
                             launch.output_dtypes, input_shapes=launch.input_shapes, **options)


def mlx_generated_source(launch: Launch) -> str | None:
    """MLX's own source for `launch` (without metal::utils()), or None where this MLX cannot give it.

    Without Metal, MLX builds the source only while exporting a function (export tracing); with
    verbose=True it prints it from C++ to fd 1, which is captured here.
    """
    if not hasattr(mx, "export_function"):
        return None
    build = getattr(kernels._build, "__wrapped__", kernels._build)
    try:
        kernel = build(launch.spec, "metal")  # the factory call production makes
    except Exception:
        return None

    def traced(*inputs):
        return kernel(inputs=list(inputs), template=list(launch.template), grid=launch.grid,
                      threadgroup=launch.threadgroup, output_shapes=list(launch.output_shapes),
                      output_dtypes=list(launch.output_dtypes), verbose=True)

    inputs = [mx.zeros(s, dtype=d) for s, d in zip(launch.input_shapes, launch.input_dtypes)]
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(tmp, "out"), "w+b") as out:
        os.dup2(out.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp, "k.mlxfn"), traced, *inputs)
        except Exception:
            return None
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        text = out.read().decode()
    match = re.search(r"Generated source code for `[^`]*`:\n```\n(.*)\n```", text, re.S)
    return match.group(1) if match else None


# ---- the compiler -------------------------------------------------------------------------------

def find_compiler() -> str | None:
    """$METAL_CHECK_CXX, else clang++: Metal's front end is clang, and the shim needs clang's
    address spaces, ext vectors and native __fp16."""
    return shutil.which(os.environ.get("METAL_CHECK_CXX") or "clang++")


def compile_command(cxx: str) -> list[str]:
    return [cxx, "-std=c++17", "-fsyntax-only", "-Wno-unknown-attributes",  # [[buffer(0)]], ...
            "-Xclang", "-fnative-half-type", "-Xclang", "-fnative-half-arguments-and-returns",
            "-include", str(SHIM), "-x", "c++", "-"]


# ---- Apple's limits per kernel (Metal feature set tables, every Apple GPU family) ----------------
MAX_THREADGROUP_MEMORY = 32768  # bytes of threadgroup memory
MAX_BUFFER_ARGUMENTS = 31  # [[buffer(0)]] .. [[buffer(30)]]
THREADGROUP_ALIGNMENT = 16  # Metal rounds each threadgroup allocation up to 16 bytes

# Host compilers reject attributes on an explicit instantiation.
_INSTANTIATION_ATTRIBUTES = re.compile(r'^template \[\[host_name\("[^"]*"\)\]\] \[\[kernel\]\] ', re.M)
# A threadgroup variable declared in a body: `SHARED float s[2 * N];  // comment`
_SHARED_DECLARATION = re.compile(r"^(\s*)((?:SHARED|threadgroup)\s+[\w:<>, ]+?\s+(\w+)\s*(?:\[[^;]*\])?\s*;)",
                                 re.M)


def _count_threadgroup_memory(source: str) -> str:
    """Each threadgroup variable becomes `static` (clang gives automatic variables no address
    space; Metal's threadgroup variables are per threadgroup anyway) and is followed, on the same
    line, by a running total of the threadgroup memory and a static_assert against Apple's 32 KiB:
    evaluated per template instantiation, reported at the declaration's line."""
    count = 0

    def rewrite(match: re.Match) -> str:
        nonlocal count
        indent, declaration, name = match.groups()
        before = f"rwkv_tg_bytes_{count}" if count else "0ul"
        count += 1
        total = f"rwkv_tg_bytes_{count}"
        return (f"{indent}static {declaration} constexpr unsigned long {total} = {before} + "
                f"(sizeof({name}) + {THREADGROUP_ALIGNMENT - 1}) / {THREADGROUP_ALIGNMENT} * "
                f"{THREADGROUP_ALIGNMENT}; static_assert({total} <= {MAX_THREADGROUP_MEMORY}, "
                f"\"Apple GPUs: more than 32 KiB of threadgroup memory (at {name})\");")

    return _SHARED_DECLARATION.sub(rewrite, source)


def compile_check(source: str, cxx: str) -> tuple[bool, str]:
    """(compiled, compiler output) for `source` against metal_shim.h (in place of metal::utils()),
    plus Apple's per-kernel limits on buffer arguments and threadgroup memory."""
    buffers = len(re.findall(r"\[\[buffer\(\d+\)\]\]", source))
    if buffers > MAX_BUFFER_ARGUMENTS:
        return False, f"{buffers} buffer arguments: Apple GPUs take at most {MAX_BUFFER_ARGUMENTS}"
    source = _INSTANTIATION_ATTRIBUTES.sub("template ", source.removeprefix(UTILS_STANDIN))
    proc = subprocess.run(compile_command(cxx), input=_count_threadgroup_memory(source),
                          capture_output=True, text=True, timeout=60)
    return proc.returncode == 0, proc.stdout + proc.stderr


if __name__ == "__main__":  # python tests/metal_source.py [SPEC [DTYPE]]: print what MLX compiles
    specs = registered_specs()
    wanted = sys.argv[1:2] or sorted(specs)
    dtype = getattr(mx, sys.argv[2]) if len(sys.argv) > 2 else mx.float16
    for spec_name in wanted:
        for launch in record_launches(EXAMPLE_CALLS[spec_name], dtype):
            print(launch_source(launch))
