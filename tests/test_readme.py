"""Every code block of the README runs, as a newcomer would paste it.

`model.pth` in the README stands for the user's checkpoint: the test writes a small synthetic
one under that name in a scratch directory, where every block runs (a block that talks to
the server at 127.0.0.1:8000 gets `mlx-rwkv serve --model model.pth` running). In bash blocks,
`pip install` commands are checked (the extras exist) but not run: CI has just run them;
the test command is checked to be the one `.ci/run` runs; `python -m bench...` commands and
`mlx-rwkv` lines that end in `# on the GPU host` (GPU jobs of minutes) have their full
argument lists parsed by their own parsers; every other command runs and must exit 0.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from mlx_rwkv.config import config_for_shape
from mlx_rwkv.synth import write_synthetic

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TEST_COMMAND = "python3 -m pytest -q"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch) -> Path:
    """A directory holding `model.pth` (World vocabulary, 1 layer, C=64), as the cwd."""
    config = config_for_shape("0.1B", n_layer=1, n_embd=64)
    write_synthetic(tmp_path / "model.pth", shape="0.1B", n_layer=config.n_layer, n_embd=config.n_embd)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_the_two_newcomer_commands():
    first = commands(code_blocks("bash")[0])
    assert len(first) == 2 and first[0].startswith("pip install") and "mlx-rwkv generate" in first[0]
    assert first[1].endswith(TEST_COMMAND)
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text().splitlines()[-1]


SERVER = "http://127.0.0.1:8000"


@contextlib.contextmanager
def server_for(source: str, cwd: Path) -> Iterator[None]:
    """`mlx-rwkv serve --model model.pth` on port 8000 while a block that talks to it runs."""
    if SERVER not in source:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-m", "mlx_rwkv", "serve", "--model", "model.pth", "--port", "8000"],
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{SERVER}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, f"the server did not start: {proc.stderr.read()[-2000:]}"
                assert time.monotonic() < deadline, "the server did not answer /health within 120 s"
                time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_block_runs(scratch: Path, index: int, capsys):
    source = code_blocks("python")[index]
    with server_for(source, scratch):
        exec(compile(source, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def check_pip(segment: str) -> None:
    """`pip install -e ".[a,b]"`: the extras must exist in pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for spec in re.findall(r"\.\[([^\]]*)\]", segment):
        unknown = set(spec.split(",")) - extras
        assert not unknown, f"{segment}: no such extra {unknown}"


class ArgsParsed(Exception):
    """Raised after a bench script's parser accepted its arguments, so nothing runs."""


def check_bench(segment: str, monkeypatch) -> None:
    argv = shlex.split(segment, comments=True)
    assert argv[:2] == ["python", "-m"] or argv[0] == "python3", segment
    module = argv[2] if argv[1] == "-m" else None
    assert module and module.startswith("bench."), segment
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise ArgsParsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        m.setattr(sys, "argv", [module, *argv[3:]])
        m.chdir(REPO)
        with pytest.raises(ArgsParsed):
            runpy.run_module(module, run_name="__main__")


GPU_HOST = "# on the GPU host"


def check_cli(segment: str) -> None:
    """An `mlx-rwkv` command meant for the GPU host: its arguments must parse."""
    from mlx_rwkv.cli import build_parser

    argv = shlex.split(segment, comments=True)
    assert argv[0] == "mlx-rwkv", segment
    build_parser().parse_args(argv[1:])


@pytest.mark.parametrize("index", range(len(code_blocks("bash"))))
def test_bash_block_runs(scratch: Path, index: int, monkeypatch):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for line in commands(code_blocks("bash")[index]):
        for segment in (s.strip() for s in line.split("&&")):
            if segment.startswith("pip install"):
                check_pip(segment)
            elif segment == TEST_COMMAND:
                continue  # this is the command running now
            elif re.match(r"python3? -m bench\.", segment):
                check_bench(segment, monkeypatch)
            elif segment.endswith(GPU_HOST):
                check_cli(segment)
            else:
                done = subprocess.run(["bash", "-c", f"set -o pipefail; {segment}"], cwd=scratch, env=env,
                                      capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, f"README command failed: {segment}\n{done.stderr[-3000:]}"
