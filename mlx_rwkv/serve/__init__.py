"""`mlx-rwkv serve`: an OpenAI-compatible server with a prefix-state cache and continuous batching.

Modules: `command` (CLI arguments, entry point), `app` (Starlette routes), `protocol` (request
validation, response shapes), `engine` (the batching scheduler), `cache` (radix-tree prefix
states), `row_sampler` (per-row sampling), `chat_format` (the RWKV World chat format).
"""
from .command import add_serve_arguments, run_serve

__all__ = ["add_serve_arguments", "run_serve"]
