"""The wgpu device: adapter choice, optional features (shader-f16, subgroups) and limits.

One `GPU` per feature set is created lazily and shared by every model in the process.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import wgpu

F16 = "shader-f16"  # wgpu-py 0.32 feature names
SUBGROUPS = "subgroup"
# Limits raised to whatever the adapter offers (the WebGPU defaults are far lower).
RAISED_LIMITS = (
    "max-storage-buffer-binding-size", "max-buffer-size", "max-storage-buffers-per-shader-stage",
    "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x", "max-compute-workgroups-per-dimension",
)


class WebGPUError(RuntimeError):
    """The WebGPU engine cannot run here (no adapter, a missing feature, a limit exceeded)."""


class NoAdapterError(WebGPUError):
    """wgpu found no usable adapter (no Vulkan/Metal/D3D12 driver)."""


@dataclass(frozen=True, eq=False)  # hashed by identity: kernels are cached per device
class GPU:
    """A wgpu device and what it may use."""

    device: wgpu.GPUDevice
    name: str  # the adapter, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"
    f16: bool  # shader-f16 enabled: weights are read as vec4<f16>
    subgroups: bool  # subgroup reductions enabled
    limits: dict[str, int]

    @property
    def max_binding(self) -> int:
        """The largest storage buffer one binding may cover, in bytes."""
        return min(self.limits["max-storage-buffer-binding-size"], self.limits["max-buffer-size"])

    def check_binding(self, what: str, nbytes: int, limit: int | None = None) -> None:
        limit = self.max_binding if limit is None else limit
        if nbytes > limit:
            raise WebGPUError(f"{what} needs a {nbytes:,}-byte storage binding; this adapter ({self.name}) "
                              f"allows {limit:,} (max-storage-buffer-binding-size)")


@lru_cache(maxsize=None)
def adapter() -> wgpu.GPUAdapter:
    """The high-performance adapter; NoAdapterError with the driver's reason when there is none."""
    try:
        found = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except RuntimeError as e:
        raise NoAdapterError(f"no WebGPU adapter: {e}. Install a Vulkan driver "
                             "(on Linux without a GPU: apt-get install mesa-vulkan-drivers libvulkan1)") from None
    if found is None:
        raise NoAdapterError("no WebGPU adapter was found")
    return found


def get_gpu(f16: bool | None = None, subgroups: bool | None = None) -> GPU:
    """The shared device. None = use the feature when the adapter has it; True = require it."""
    offered = set(adapter().features)
    use = []
    for feature, wanted in ((F16, f16), (SUBGROUPS, subgroups)):
        if wanted and feature not in offered:
            raise WebGPUError(f"the adapter {adapter().info['device']} lacks the {feature!r} feature")
        use.append(feature in offered if wanted is None else wanted)
    return _open(*use)


@lru_cache(maxsize=None)
def _open(f16: bool, subgroups: bool) -> GPU:
    chosen = adapter()
    limits = {name: chosen.limits[name] for name in RAISED_LIMITS}
    features = [name for name, on in ((F16, f16), (SUBGROUPS, subgroups)) if on]
    device = chosen.request_device_sync(label="webgpu_ref", required_features=features, required_limits=limits)
    return GPU(device, chosen.info["device"], f16, subgroups, limits)
