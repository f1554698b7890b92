"""The rule for every file a command writes: nothing the user owns is replaced without force,
the file a session has loaded never is (not even with force), and a directory is refused.

`check_output` is the early, one-line-error check; the writers themselves use
`atomic_path(..., replace=force)`, so a file that appears in between is not clobbered either.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


class OutputError(ValueError):
    """An output path that must not be written."""


def check_output(path: str | os.PathLike, force: bool = False,
                 loaded: Iterable[str | os.PathLike | None] = (), force_hint: str = "--force") -> Path:
    """`path` if a command may write it; OutputError (one line) otherwise.

    loaded: files this session has read (the model) -- never replaced, even with force.
    force_hint: how the user asks to replace an existing file (`--force`, `/save!`).
    """
    path = Path(path)
    if str(path) in ("", "."):
        raise OutputError("no output file name given")
    if path.is_dir():
        raise OutputError(f"{path} is a directory: give a file name")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: the directory {path.parent} does not exist")
    if path.exists():
        for other in loaded:
            if other is not None and Path(other).exists() and os.path.samefile(path, other):
                raise OutputError(f"{path} is the file this session loaded: refusing to overwrite it")
        if not force:
            raise OutputError(f"{path} exists: not replaced (use {force_hint} to replace it)")
    return path
