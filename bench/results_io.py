"""Write benchmark records in the shared format of DESIGN.md to bench/results/<device>-<date>.json.

The implementation is `mlx_rwkv.bench_records` (so `mlx-rwkv bench` writes the same files);
here the directory is this repository's bench/results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_rwkv import bench_records
from mlx_rwkv.bench_records import KEY_FIELDS, device_name, measure_bandwidth_gb_s, record, slug, versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["KEY_FIELDS", "RESULTS_DIR", "device_name", "measure_bandwidth_gb_s", "record", "slug", "versions",
           "write_results"]


def write_results(records: list[dict[str, Any]], command: str | None = None) -> Path:
    """Merge `records` into today's results file for this device under bench/results."""
    return bench_records.write_results(records, command, results_dir=RESULTS_DIR)
