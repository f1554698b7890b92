"""Custom GPU kernels: one portable source per kernel, instantiated for Metal and for CUDA.

A kernel body in `metal_kernels/<name>.inc` is written in a small portable vocabulary
(`SHARED`, `BARRIER()`, `tid`, `gid`, plain C++ arithmetic); a per-backend prelude maps it onto
Metal (`mx.fast.metal_kernel`) or CUDA (`mx.fast.cuda_kernel`). Grids count threads on both
backends. On CPU `get_kernel` returns None and callers use their pure-MLX fallback.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Hashable, Literal, Sequence

import mlx.core as mx

Backend = Literal["metal", "cuda"]

# Index variables every body may use; the Metal names make MLX declare the attributes.
# Bodies take lane = tid % SIMD_WIDTH and SIMD-group = tid / SIMD_WIDTH (SIMD_SUM and
# SIMD_SHUFFLE_XOR combine threads 32 g .. 32 g + 31). CUDA documents that warps are formed from
# consecutive threadIdx.x (Programming Guide, "SIMT Architecture"), so tid is threadIdx.x. Apple
# documents no such order, so on Metal tid is built from the SIMD-group and lane the hardware
# reports: a renumbering of the threadgroup's threads under which the bodies' assumption holds
# whatever the device's order (one multiply-add per thread, outside every loop).
_INDEX_LINES: dict[str, str] = {
    "metal": "const uint tid = simdgroup_index_in_threadgroup * SIMD_WIDTH + thread_index_in_simdgroup;\n"
    "const uint gid = threadgroup_position_in_grid.x;\n",
    "cuda": "const uint tid = threadIdx.x;\nconst uint gid = blockIdx.x;\n",
}


@dataclass(frozen=True)
class KernelSpec:
    """A kernel: its argument names and its body, the files `sources` of metal_kernels/ in order
    (default: <name>.inc alone). Variants of a kernel share files this way: a small file in front
    defines the macros through which the shared body reads its inputs. MLX treats inputs as read
    only; `writes_inputs` names those the body writes anyway (a buffer the caller keeps for the
    kernel alone, such as grid-barrier words)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sources: tuple[str, ...] = ()
    writes_inputs: tuple[str, ...] = ()  # inputs the body writes in place (buffers kept for that job)

    @property
    def files(self) -> tuple[str, ...]:
        return self.sources or (f"{self.name}.inc",)


def read_source(filename: str) -> str:
    return resources.files("metal_kernels").joinpath(filename).read_text()


def body_parts(spec: KernelSpec, backend: Backend) -> list[tuple[str, str]]:
    """The body as (file name, text) pairs, the backend's index lines first ("" names them)."""
    return [("", _INDEX_LINES[backend])] + [(f, read_source(f)) for f in spec.files]


def render(spec: KernelSpec, backend: Backend) -> tuple[str, str]:
    """The (header, body) pair handed to MLX for `backend`."""
    header = read_source(f"prelude_{backend}.h")
    return header, "".join(text for _, text in body_parts(spec, backend))


def int_params(*values: int) -> mx.array:
    """Small int32 kernel parameters, zero-padded to 16 elements. MLX-CUDA allocates arrays of
    at most 8 bytes from managed memory, and a kernel reading one paid 10-14 us more per
    dependent launch on the H100 (DESIGN.md, "MLX-CUDA's 8-byte trap")."""
    return mx.array(list(values) + [0] * (16 - len(values)), dtype=mx.int32)


def gpu_backend() -> Backend | None:
    """The GPU backend MLX runs on by default, or None on CPU."""
    if mx.default_device().type != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


@functools.cache
def _build(spec: KernelSpec, backend: Backend) -> Callable:
    header, body = render(spec, backend)
    factory = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return factory(name=f"rwkv_{spec.name}", input_names=list(spec.inputs),
                   output_names=list(spec.outputs), source=body, header=header)


def get_kernel(spec: KernelSpec) -> Callable | None:
    """The compiled-on-first-use kernel for the current backend, or None on CPU."""
    backend = gpu_backend()
    return None if backend is None else _build(spec, backend)


# Threads per threadgroup that every launch may use without a probe. Apple's limit is per
# pipeline (maxTotalThreadsPerThreadgroup: up to 1024, lower under register pressure) and MLX
# raises "Thread group size (n) is greater than the maximum allowed threads per threadgroup (m)"
# when a launch exceeds it, at evaluation, so wrappers with larger threadgroups probe first.
SAFE_THREADS = 256
_THREADGROUP_ERROR = "thread group size"
_threadgroup_fits: dict[Hashable, bool] = {}


def threadgroup_fits(key: Hashable, probe: Callable[[], Sequence[mx.array]]) -> bool:
    """Whether the launch configuration `key` (a kernel instantiation whose threadgroup exceeds
    SAFE_THREADS) runs on this device. The first call per key evaluates `probe()`, the same
    instantiation on tiny inputs, and catches MLX's thread-group-size error; the answer holds
    for the rest of the process, so callers fall back (a smaller configuration or MLX ops) at
    first use instead of failing mid-generation. Any other error propagates."""
    if key not in _threadgroup_fits:
        try:
            mx.eval(probe())
            _threadgroup_fits[key] = True
        except (ValueError, RuntimeError) as error:
            if _THREADGROUP_ERROR not in str(error).lower():
                raise
            _threadgroup_fits[key] = False
    return _threadgroup_fits[key]
