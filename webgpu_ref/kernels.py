"""WGSL kernels: compose a shader from the shared prelude and an op family's files, build its
pipeline with an explicit bind-group layout, and cache both per device."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import wgpu

from .device import GPU

SHADER_DIR = Path(__file__).resolve().parent / "shaders"
BINDING_TYPES = {
    "uniform": wgpu.BufferBindingType.uniform,
    "read": wgpu.BufferBindingType.read_only_storage,
    "rw": wgpu.BufferBindingType.storage,
}


@dataclass(frozen=True)
class Kernel:
    """One compute entry point: its files, bindings and compile-time constants."""

    files: tuple[str, ...]  # op-family files, after the prelude, in order
    entry: str
    bindings: tuple[str, ...]  # "uniform" | "read" | "rw" for binding 0, 1, ...
    consts: tuple[tuple[str, int], ...]  # e.g. (("WG", 256), ("N", 64)); WG is required
    weights: str | None = None  # "f16" | "f32" | "q4k" for the linear family
    subgroup_sums: bool = True  # False: shared-memory sums even where the adapter has subgroups

    def sums_by_subgroup(self, gpu: GPU) -> bool:
        """Whether this kernel's sums (reduce_*.wgsl) use subgroup operations on `gpu`."""
        return gpu.subgroups and self.subgroup_sums

    @property
    def workgroup_size(self) -> int:
        return dict(self.consts)["WG"]


@cache
def _read(name: str) -> str:
    return (SHADER_DIR / name).read_text()


def source(gpu: GPU, kernel: Kernel) -> str:
    """The full WGSL text of `kernel` on `gpu` (features decide the weight and reduce snippets)."""
    parts = []
    if gpu.f16 and kernel.weights == "f16":
        parts.append("enable f16;")
    parts += [f"const {name}: u32 = {value}u;" for name, value in kernel.consts]
    parts.append(_read("prelude.wgsl"))
    parts.append(_read("reduce_subgroup.wgsl" if kernel.sums_by_subgroup(gpu) else "reduce_shared.wgsl"))
    if kernel.weights is not None:
        packed = kernel.weights == "f16" and not gpu.f16
        parts.append(_read("weights_f16_packed.wgsl" if packed else f"weights_{kernel.weights}.wgsl"))
    parts += [_read(name) for name in kernel.files]
    return "\n".join(parts)


@lru_cache(maxsize=None)
def pipeline(gpu: GPU, kernel: Kernel) -> tuple[wgpu.GPUComputePipeline, wgpu.GPUBindGroupLayout]:
    """The compiled pipeline of `kernel` and the layout its bind groups must follow."""
    wg = kernel.workgroup_size
    if not kernel.sums_by_subgroup(gpu) and wg & (wg - 1):
        raise ValueError(f"{kernel.entry}: the shared-memory reduction needs a power-of-two workgroup, got {wg}")
    device = gpu.device
    layout = device.create_bind_group_layout(entries=[
        {"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": BINDING_TYPES[kind]}}
        for i, kind in enumerate(kernel.bindings)
    ])
    module = device.create_shader_module(label=kernel.entry, code=source(gpu, kernel))
    compute = device.create_compute_pipeline(
        label=f"{kernel.files[-1]}:{kernel.entry}",
        layout=device.create_pipeline_layout(bind_group_layouts=[layout]),
        compute={"module": module, "entry_point": kernel.entry},
    )
    return compute, layout
