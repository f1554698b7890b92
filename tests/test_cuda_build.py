"""The CUDA instantiation of the kernel bodies builds with nvcc (sm_90, as mx.fast.cuda_kernel
compiles them on the GPU host), without local memory (a stack frame or spills would mean an
array the compiler could not keep in registers: the hot loops' speed). Skipped without nvcc;
bench/kernel_resources.py renders the translation units."""
from __future__ import annotations

import shutil

import pytest

from mlx_rwkv import layer_kernel
from bench.kernel_resources import layer_source, matvec_source, resources, scan_source, wkv7_source

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs the CUDA toolkit's nvcc")


@pytest.mark.parametrize("first", [1, 0])
def test_wkv7_scan_builds_in_registers(first):
    used = resources(scan_source("half", 2, first), NVCC)
    assert used["stack"] == 0 and used["spill"] == 0, used


@pytest.mark.parametrize("has_q4k", [1, 0])
def test_matvec_builds_in_registers(has_q4k):
    used = resources(matvec_source("half", 1, 2, 1, has_q4k), NVCC)
    assert used["stack"] == 0 and used["spill"] == 0, used


def test_matvec_norm_builds_in_registers():
    used = resources(matvec_source("half", 1, 2, 1, 1, norm=True), NVCC)
    assert used["stack"] == 0 and used["spill"] == 0, used


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("first", [1, 0])
def test_wkv7_builds_in_registers(lora, first):
    used = resources(wkv7_source("half", 32, first, lora), NVCC)
    assert used["stack"] == 0 and used["spill"] == 0, used


@pytest.mark.parametrize("q4k", [1, 0])
@pytest.mark.parametrize("first", [1, 0])
def test_layer_kernel_builds_in_registers(first, q4k):
    """The persistent layer kernel: no local memory, and at most 255 registers a thread, so one
    block of layer_kernel.THREADS fits an SM's 65,536 registers whatever else it needs (the grid
    barrier needs every block resident: one block per SM)."""
    used = resources(layer_source("half", first, q4k), NVCC)
    assert used["stack"] == 0 and used["spill"] == 0, used
    assert used["registers"] * layer_kernel.THREADS <= 65536, used
