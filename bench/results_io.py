"""Write benchmark records in the shared format of DESIGN.md to bench/results/<device>-<date>.json.

Records from several scripts run on the same device and day are merged into one file; a record
with the same (engine, shape, precision, mode, strategy, batch, tokens) replaces the older one.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KEY_FIELDS = ("engine", "shape", "precision", "mode", "strategy", "batch", "tokens")


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
    found = {"python": platform.python_version()}
    for mod in ("mlx", "wgpu", "torch", "rwkv", "numpy"):
        try:
            module = __import__(mod + ".core" if mod == "mlx" else mod, fromlist=["x"])
            found[mod] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional backend is simply not listed
            continue
    return found


def measure_bandwidth_gb_s() -> float | None:
    """Device copy bandwidth through MLX (read + write bytes / time); None without MLX."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    n = 256 * 1024 * 1024 // 4
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


def write_results(records: list[dict[str, Any]], command: str | None = None) -> Path:
    """Merge `records` into today's results file for this device (atomic write); return its path."""
    device = device_name()
    date = _dt.date.today().isoformat()
    path = RESULTS_DIR / f"{slug(device)}-{date}.json"
    doc: dict[str, Any] = {"device": device, "date": date, "records": []}
    if path.exists():
        doc = json.loads(path.read_text())
    doc["command"] = command or " ".join([Path(sys.executable).name] + sys.argv)
    doc["versions"] = versions()
    if doc.get("bandwidth_gb_s") is None:
        doc["bandwidth_gb_s"] = measure_bandwidth_gb_s()
    key = lambda r: tuple(r.get(f) for f in KEY_FIELDS)  # noqa: E731
    fresh = {key(r): r for r in records}  # within the batch too, the later record of a key wins
    doc["records"] = [r for r in doc["records"] if key(r) not in fresh] + list(fresh.values())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=RESULTS_DIR, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


def record(engine: str, shape: str, precision: str, mode: str, strategy: str, *, batch: int = 1,
           tokens: int, rates: list[float], kernels_per_token: int | None = None,
           syncs_per_token: float | None = None, peak_memory_mb: float | None = None,
           roofline_fraction: float | None = None, rate_key: str = "tok_s") -> dict[str, Any]:
    """One record: the median of `rates` plus its [min, max] spread."""
    ordered = sorted(rates)
    return {
        "engine": engine, "shape": shape, "precision": precision, "mode": mode, "strategy": strategy,
        "batch": batch, "tokens": tokens, rate_key: round(ordered[len(ordered) // 2], 2),
        rate_key + "_spread": [round(ordered[0], 2), round(ordered[-1], 2)],
        "kernels_per_token": kernels_per_token, "syncs_per_token": syncs_per_token,
        "peak_memory_mb": peak_memory_mb, "roofline_fraction": roofline_fraction,
    }
