"""Count the kernel-launching nodes of an MLX graph (views such as reshape/slice are free).

The implementation is `mlx_rwkv.sync_strategies.count_kernel_nodes` (`mlx-rwkv bench` uses it too).
"""
from __future__ import annotations

from mlx_rwkv.sync_strategies import VIEW_OPS, count_kernel_nodes

__all__ = ["VIEW_OPS", "count_kernel_nodes"]
