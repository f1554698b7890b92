"""Checkpoint load time and peak memory: our load_checkpoint against torch.load, same run.

Writes a synthetic fp16 checkpoint of a real shape (0.1B: 12 layers, C=768, V=65536, ~380 MB)
to a temporary folder, then loads it in fresh subprocesses, alternating the loaders, so each
peak RSS (ru_maxrss) is the loader's own. The timed part is the load plus reading every byte
(a float32 view of each tensor summed), which is fair to memory-mapped arrays. The file is in
the page cache after writing: these are warm-cache loads. Touched pages of a memory-mapped file
count in RSS but are the kernel's to drop; "anon" is the private memory a loader really holds.

    python bench/bench_load.py [--shape 0.1B] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LOADERS = ("ours", "torch", "torch-mmap")


def touch(arr: np.ndarray) -> float:
    """Read every byte of a contiguous array: sum it viewed as float32 (the tail bytes aside)."""
    raw = arr.reshape(-1).view(np.uint8)
    return float(np.frombuffer(raw[: raw.size // 4 * 4], np.float32).sum(dtype=np.float64))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def anon_rss_mb() -> float:
    """Resident private memory now (Linux RssAnon): RSS minus file pages the kernel can drop."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("RssAnon:")), float("nan"))


def child(loader: str, path: str) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    if loader == "ours":
        sys.path.insert(0, str(REPO))
        from mlx_rwkv.checkpoint import load_checkpoint
    else:
        import torch
    before = peak_rss_mb()
    start = time.perf_counter()
    if loader == "ours":
        arrays = list(load_checkpoint(path).weights.values())
    else:
        state = torch.load(path, map_location="cpu", mmap=loader == "torch-mmap")
        arrays = [t.numpy() for t in state.values()]
    total = sum(touch(a) for a in arrays)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "rss_peak_mb": peak_rss_mb(),
                      "anon_mb": anon_rss_mb(), "sum": total}))


def write_checkpoint(shape: str, path: str) -> None:
    """A random fp16 checkpoint of a named shape; prints the seconds save_checkpoint took."""
    sys.path.insert(0, str(REPO))
    from mlx_rwkv.checkpoint import save_checkpoint
    from mlx_rwkv.config import config_for_shape

    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s, dtype=np.float32).astype(np.float16)
               for k, s in config_for_shape(shape).expected_shapes().items()}
    start = time.perf_counter()
    save_checkpoint(weights, path)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def in_child(*args: str) -> dict[str, float]:
    """Run this script with `args` in a fresh process; its last output line, parsed.

    A child starts with the RSS its parent had when forking (Linux keeps ru_maxrss across
    exec), so the parent stays small: even the checkpoint is written by a child."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.1B")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.write:
        return write_checkpoint(args.shape, args.write)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        write_s = in_child("--shape", args.shape, "--write", str(path))["seconds"]
        size_mb = path.stat().st_size / 2**20
        print(f"{args.shape} fp16 .pth: {size_mb:.0f} MiB, written by save_checkpoint in {write_s:.2f} s")
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in LOADERS}
        for _ in range(args.repeats):
            for name in LOADERS:
                runs[name].append(in_child("--child", name, str(path)))
    sums = {name: {r["sum"] for r in rs} for name, rs in runs.items()}
    assert len(set().union(*sums.values())) == 1, f"loaders read different bytes: {sums}"
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    print(f"median of {args.repeats} fresh processes each, load + read every byte (warm page cache):")
    print(f"{'loader':<12}{'seconds':>9}{'GB/s':>7}{'vs ours':>9}{'RSS before':>12}{'peak RSS':>10}{'added':>8}"
          f"{'anon at end':>13}")
    for name, rs in runs.items():
        before = statistics.median(r["rss_before_mb"] for r in rs)
        peak = statistics.median(r["rss_peak_mb"] for r in rs)
        anon = statistics.median(r["anon_mb"] for r in rs)
        print(f"{name:<12}{median[name]:>9.3f}{size_mb * 2**20 / median[name] / 1e9:>7.2f}"
              f"{median[name] / median['ours']:>8.2f}x{before:>10.0f}MB{peak:>8.0f}MB"
              f"{peak - before:>6.0f}MB{anon:>11.0f}MB")


if __name__ == "__main__":
    main()
