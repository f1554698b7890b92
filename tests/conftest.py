"""Shared fixtures: the real tiny model, small synthetic configs, checkpoint writers, device skips.

Fixtures
  tiny_model_dir          Path of ../shared/data/tiny-rwkv7 (skips when absent)
  tiny_model_path         its rwkv.cpp .bin file
  tiny_reference_logits   float32 [256]: logits after bytes `"in` (ids 34, 105, 110) from a zero state
  tiny_weights            (ModelConfig, canonical weight dict) of the tiny model (load_checkpoint)
  small_configs           list of SMALL_CONFIGS; `small_config` is parametrized over them
  synthetic_checkpoint    factory: (config, fmt="pth"|"safetensors", seed=0, dtype="float32")
                          -> SyntheticCheckpoint(path, config, weights), written under tmp_path
                          with mlx_rwkv.checkpoint.save_checkpoint
  official_rwkv           the official `rwkv` package's RWKV class (x070, CPU), or skip
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest

from mlx_rwkv.checkpoint import load_checkpoint, save_checkpoint
from mlx_rwkv.config import ModelConfig
from mlx_rwkv.synth import resolve_dtype, synthesize

# The official package reads these when rwkv.model is first imported; x070 needs RWKV_V7_ON.
os.environ["RWKV_V7_ON"] = "1"
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

TINY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny-rwkv7"
TINY_MODEL = "tiny-rwkv-7v0-834K-FP32.bin"
TINY_LOGITS = "expected-logits-7v0-834K.bin"


def _config(n_layer: int, n_embd: int, vocab_size: int, d_decay: int, d_aaa: int, d_mv: int, d_gate: int) -> ModelConfig:
    return ModelConfig(
        n_layer=n_layer, n_embd=n_embd, head_size=64, vocab_size=vocab_size,
        d_decay=d_decay, d_aaa=d_aaa, d_mv=d_mv, d_gate=d_gate, d_ffn=4 * n_embd,
    )


# Small but odd shapes: 2 and 5 heads, one layer (no value-residual LoRA: d_mv 0, as
# ModelConfig.from_shapes infers it), a vocab smaller than C.
SMALL_CONFIGS: dict[str, ModelConfig] = {
    "c128-h2": _config(n_layer=2, n_embd=128, vocab_size=512, d_decay=32, d_aaa=32, d_mv=16, d_gate=64),
    "c320-h5": _config(n_layer=2, n_embd=320, vocab_size=1000, d_decay=32, d_aaa=32, d_mv=32, d_gate=64),
    "l1-c64": _config(n_layer=1, n_embd=64, vocab_size=256, d_decay=16, d_aaa=16, d_mv=0, d_gate=32),
    "v37-c192-h3": _config(n_layer=2, n_embd=192, vocab_size=37, d_decay=32, d_aaa=16, d_mv=16, d_gate=32),
}


class SyntheticCheckpoint(NamedTuple):
    path: Path
    config: ModelConfig
    weights: dict[str, np.ndarray]


# ---- device skips -----------------------------------------------------------------------------

def _mlx_devices() -> tuple[bool, bool]:
    """(MLX runs on a GPU by default, Metal is available)."""
    try:
        import mlx.core as mx
    except ImportError:
        return False, False
    on_gpu = mx.default_device() == mx.gpu and mx.is_available(mx.gpu)
    metal = platform.system() == "Darwin" and mx.metal.is_available()
    return on_gpu, metal


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    on_gpu, metal = _mlx_devices()
    skip_gpu = pytest.mark.skip(reason="needs MLX on a GPU (CUDA or Metal); the default device is the CPU")
    skip_metal = pytest.mark.skip(reason="needs Apple Metal (macOS with mx.metal available)")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)
        if "metal" in item.keywords and not metal:
            item.add_marker(skip_metal)


# ---- the real tiny model ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    if not (TINY_DIR / TINY_MODEL).is_file():
        pytest.skip(f"the tiny real model is not at {TINY_DIR}")
    return TINY_DIR


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / TINY_MODEL


@pytest.fixture(scope="session")
def tiny_reference_logits(tiny_model_dir: Path) -> np.ndarray:
    logits = np.fromfile(tiny_model_dir / TINY_LOGITS, dtype="<f4")
    assert logits.shape == (256,), f"{TINY_LOGITS} should hold 256 float32"
    return logits


@pytest.fixture(scope="session")
def tiny_weights(tiny_model_path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    checkpoint = load_checkpoint(tiny_model_path)
    return checkpoint.config, checkpoint.weights


# ---- synthetic checkpoints --------------------------------------------------------------------

@pytest.fixture(scope="session")
def small_configs() -> list[ModelConfig]:
    return list(SMALL_CONFIGS.values())


@pytest.fixture(params=list(SMALL_CONFIGS), scope="session")
def small_config(request: pytest.FixtureRequest) -> ModelConfig:
    return SMALL_CONFIGS[request.param]


@pytest.fixture
def synthetic_checkpoint(tmp_path: Path) -> Callable[..., SyntheticCheckpoint]:
    def write(config: ModelConfig, fmt: str = "pth", seed: int = 0, dtype: str = "float32") -> SyntheticCheckpoint:
        weights = synthesize(config, seed=seed, dtype=dtype)
        path = tmp_path / f"synth-{config.fingerprint()}-{seed}-{resolve_dtype(dtype).name}.{fmt}"
        save_checkpoint(weights, path, format=fmt)
        return SyntheticCheckpoint(path, config, weights)

    return write


# ---- the official package ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def official_rwkv():
    """The official package's x070 model class (RWKV_V7_ON set above, before the import)."""
    pytest.importorskip("torch")
    model = pytest.importorskip("rwkv.model")
    if not hasattr(model, "RWKV_x070"):
        pytest.skip("rwkv.model was imported before RWKV_V7_ON=1 was set")
    return model.RWKV_x070
