"""Benchmark records in the shared format of DESIGN.md, merged into `<dir>/<device>-<date>.json`.

Records from several runs on the same device and day are merged into one file; a record with
the same key (engine, shape, precision, mode, strategy, batch, tokens, context) replaces the
older one. A file at that path that is not such a results file is never replaced without force.
`bench/results_io.py` is the same API with the repository's bench/results as the directory.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint.files import atomic_output
from .output_files import OutputError

KEY_FIELDS = ("engine", "shape", "precision", "mode", "strategy", "batch", "tokens", "context", "layer_kernel")
# DESIGN.md's names: where the host waits, per engine ("hybrid": WebGPU + the MLX Q4_K mat-vec)
MLX_STRATEGIES = ("compiled", "whole-pass", "per-layer", "per-op")
WEBGPU_STRATEGIES = ("webgpu-one-submit", "webgpu-per-op")
STRATEGIES = MLX_STRATEGIES + WEBGPU_STRATEGIES + ("hybrid",)
ENGINES = ("mlx", "webgpu", "hybrid")
PRECISIONS = ("f16", "bf16", "f32", "q4k")


def engine_of(strategy: str) -> str:
    """The engine a strategy runs on ("mlx", "webgpu" or "hybrid")."""
    return "mlx" if strategy in MLX_STRATEGIES else "webgpu" if strategy in WEBGPU_STRATEGIES else "hybrid"
BANDWIDTH_BYTES = 256 << 20  # the copy that measures device bandwidth (H100 L2: 50 MB)


def strategy_label(r: dict[str, Any]) -> str:
    """A record's strategy, saying so when MLX decoded each layer in one launch (`layer_kernel`:
    its threadgroups; records without the field ran five launches per layer)."""
    return r["strategy"] + (" + layer kernel" if r.get("layer_kernel") else "")


def device_name() -> str:
    """The GPU's marketing name when one is visible, else the CPU's."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + " (CPU)"
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of Python and of every backend present (absent ones are not listed)."""
    found = {"python": platform.python_version()}
    for mod in ("mlx", "wgpu", "torch", "rwkv", "numpy"):
        try:
            module = __import__(mod + ".core" if mod == "mlx" else mod, fromlist=["x"])
            found[mod] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional backend is simply not listed
            continue
    return found


def measure_bandwidth_gb_s(nbytes: int = BANDWIDTH_BYTES) -> float | None:
    """Device copy bandwidth through MLX: (read + write bytes) / time of `b = a + 1` over a
    float32 array of `nbytes`, best of 5; None without MLX."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    n = nbytes // 4
    a = mx.random.uniform(shape=(n,))
    mx.eval(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b = a + 1.0
        mx.eval(b)
        best = min(best, time.perf_counter() - t)
    return round(2 * n * 4 / best / 1e9, 1)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_path(results_dir: str | os.PathLike, device: str | None = None, date: str | None = None) -> Path:
    """Where records of `device` (this one) on `date` (today) go."""
    return Path(results_dir) / f"{slug(device or device_name())}-{date or _dt.date.today().isoformat()}.json"


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results file; OutputError if `path` holds something else (so it is never merged into)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"{path} is not a benchmark results file ({type(e).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise OutputError(f"{path} is not a benchmark results file (no records list)")
    return doc


def write_results(records: list[dict[str, Any]], command: str | None = None, *,
                  results_dir: str | os.PathLike, bandwidth_gb_s: float | None = None,
                  force: bool = False) -> Path:
    """Merge `records` into today's results file for this device (atomic write); return its path.

    bandwidth_gb_s: measured in the same run (else the file keeps its figure, or one is
    measured now). A file there that is not a results file is replaced only with `force`.
    """
    device = device_name()
    path = results_path(results_dir, device)
    doc: dict[str, Any] = {"device": device, "date": path.stem[-10:], "records": []}
    if path.exists():
        try:
            doc = read_results(path)
        except OutputError as e:
            if not force:
                raise OutputError(f"{e}: not replaced (use --force to replace it)") from None
    doc["command"] = command or " ".join([Path(sys.executable).name] + sys.argv)
    doc["versions"] = versions()
    if bandwidth_gb_s is not None:
        doc["bandwidth_gb_s"] = bandwidth_gb_s
    elif doc.get("bandwidth_gb_s") is None:
        doc["bandwidth_gb_s"] = measure_bandwidth_gb_s()
    key = lambda r: tuple(r.get(f) for f in KEY_FIELDS)  # noqa: E731
    fresh = {key(r): r for r in records}  # within the batch too, the later record of a key wins
    doc["records"] = [r for r in doc["records"] if key(r) not in fresh] + list(fresh.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as f:
        f.write(json.dumps(doc, indent=1).encode())
    return path


def record(engine: str, shape: str, precision: str, mode: str, strategy: str, *, batch: int = 1,
           tokens: int, rates: list[float], kernels_per_token: int | None = None,
           syncs_per_token: float | None = None, peak_memory_mb: float | None = None,
           roofline_fraction: float | None = None, rate_key: str = "tok_s",
           **extra: Any) -> dict[str, Any]:
    """One record: the median of `rates` plus its [min, max] spread. `extra` fields (e.g.
    context, weights) follow the format's fields."""
    ordered = sorted(rates)
    return {
        "engine": engine, "shape": shape, "precision": precision, "mode": mode, "strategy": strategy,
        "batch": batch, "tokens": tokens, rate_key: round(ordered[len(ordered) // 2], 2),
        rate_key + "_spread": [round(ordered[0], 2), round(ordered[-1], 2)],
        "kernels_per_token": kernels_per_token, "syncs_per_token": syncs_per_token,
        "peak_memory_mb": peak_memory_mb, "roofline_fraction": roofline_fraction, **extra,
    }
