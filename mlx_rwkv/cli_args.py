"""Argument types for the CLI: every option is checked while argparse parses it, so a bad value
ends the command with one line (`mlx-rwkv generate: error: argument --seed: ...`), not a traceback.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from .sampling import SEED_LIMIT


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**64)."""
    value = int_at_least(0)(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be < 2**64, got {value}")
    return value


def multiple_of(step: int) -> Callable[[str], int]:
    """A positive integer that is a multiple of `step` (the model width: heads of 64)."""
    def parse(text: str) -> int:
        value = int_at_least(step)(text)
        if value % step:
            raise argparse.ArgumentTypeError(f"must be a multiple of {step}, got {value}")
        return value
    return parse


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval from `low` to `high` (open ends where asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value
    return parse


def finite_number(text: str) -> float:
    """Any finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescaped(text: str) -> str:
    """`--stop` text with `\\n`, `\\t` and `\\\\` turned into newline, tab and backslash (shells
    pass `"\\n\\n"` as backslash-n); any other backslash is kept as it is."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPES:
            out.append(ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    if not out:
        raise argparse.ArgumentTypeError("a stop string cannot be empty")
    return "".join(out)


def existing_file(text: str) -> Path:
    """A path that names an existing regular file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a model file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def output_file(*suffixes: str) -> Callable[[str], Path]:
    """A path to write whose name ends in one of `suffixes` (the suffix decides the format)."""
    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"{text}: the name must end in {' or '.join(suffixes)} (the suffix decides the format)")
        return path
    return parse


def directory_path(text: str) -> Path:
    """A directory to write into: existing, or to be created (not an existing file)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
    return path
