"""WebGPU reference engine for RWKV-7 (x070): WGSL kernels driven from wgpu-py.

    m = WebGPUModel.load(path, dtype="float16", quant=None | "q4k")
    logits, state = m.forward(tokens, state=None, all_logits=False)
"""
from .device import NoAdapterError, WebGPUError, get_gpu
from .model import WebGPUModel
from .state import WebGPUState

__all__ = ["NoAdapterError", "WebGPUError", "WebGPUModel", "WebGPUState", "get_gpu"]
