"""Count the kernel-launching nodes of an MLX graph (views such as reshape/slice are free)."""
from __future__ import annotations

import os
import re
import tempfile

import mlx.core as mx

# Primitives that only change metadata (no kernel launch) in MLX.
VIEW_OPS = {"Broadcast", "Reshape", "Slice", "ExpandDims", "Squeeze", "Transpose", "AsStrided",
            "StopGradient", "Split", "Flatten", "Unflatten", "BroadcastAxes", "Depends"}


def count_kernel_nodes(*outputs) -> dict[str, int]:
    """Per-primitive counts of the nodes MLX would launch to compute `outputs` (not evaluated)."""
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *outputs)
        text = open(path).read()
    finally:
        os.unlink(path)
    counts: dict[str, int] = {}
    for label in re.findall(r'label ="([^"]+)", shape=rectangle', text):
        name = label.split(" ")[0]
        if name not in VIEW_OPS:
            counts[name] = counts.get(name, 0) + 1
    return counts
