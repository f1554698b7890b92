"""bench.llama_peer without llama.cpp: a stand-in `llama-bench` (a script) checks that it is handed a
GGUF that the `gguf` package reads as llama.cpp's rwkv7 of the asked width and storage, with the
options of a text-generation run on the GPU, and answers in llama-bench's JSON; the records that
come of it, and the options' one-line errors."""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from bench import llama_peer  # noqa: E402

STAND_IN = f"""#!{sys.executable}
import json, sys
import gguf
args = sys.argv[1:]
opt = dict(zip(args[::2], args[1::2]))
assert opt["-p"] == "0" and opt["-ngl"] == "99" and opt["-o"] == "json", args
reader = gguf.GGUFReader(opt["-m"])
arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
assert arch == "rwkv7", arch
width = int(reader.fields["rwkv7.embedding_length"].parts[-1][0])
types = {{t.tensor_type.name for t in reader.tensors if t.name.endswith("channel_mix_key.weight")}}
n, r = int(opt["-n"]), int(opt["-r"])
print(json.dumps([{{"build_commit": "stand-in", "backends": "CUDA", "gpu_info": "Stand-in GPU", "n_prompt": 0,
                   "n_gen": n, "avg_ts": 100.0, "samples_ts": [100.0 + width + i for i in range(r)],
                   "types": sorted(types)}}]))
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    path = tmp_path / "llama-bench"
    path.write_text(STAND_IN)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_records_of_each_precision(tmp_path, stand_in, capsys):
    out = tmp_path / "results"
    out.mkdir()
    llama_peer.main(["--llama-bench", str(stand_in), "--shape", "0.1B", "--layers", "1", "--embd", "256",
                     "--tokens", "16", "--repeats", "3", "--write", "--results-dir", str(out)])
    [results] = out.glob("*.json")
    records = {r["precision"]: r for r in json.loads(results.read_text())["records"]}
    assert sorted(records) == ["f16", "q4k"]
    for r in records.values():
        assert (r["engine"], r["mode"], r["strategy"], r["batch"], r["tokens"]) == (
            "llama.cpp", "decode", "llama-bench", 1, 16)
        assert r["shape"] == "0.1B-L1-C256-V65536" and r["build_commit"] == "stand-in"
        assert r["tok_s"] == 357.0 and r["tok_s_spread"] == [356.0, 358.0]  # median of 100 + C + i
    assert "llama.cpp 0.1B-L1-C256-V65536 q4k: 357.0 tok/s" in capsys.readouterr().out


def test_gguf_storage_per_precision(tmp_path, stand_in):
    """The stand-in reports the storage of the FFN key (channel_mix_key): Q4_K for q4k, F16 for f16."""
    checkpoint = tmp_path / "m.safetensors"
    llama_peer.write_synthetic(checkpoint, shape="0.1B", n_layer=1, n_embd=256)
    for precision, want in (("q4k", ["Q4_K"]), ("f16", ["F16"])):
        model = llama_peer.convert(checkpoint, tmp_path / f"{precision}.gguf", llama_peer.GGUF_TYPES[precision])
        assert llama_peer.run_llama_bench(stand_in, model, tokens=4, repeats=1)["types"] == want


def test_a_run_without_a_gpu_is_refused(tmp_path, stand_in):
    """A CUDA build that finds no GPU falls back to the CPU (empty gpu_info): not a GPU peer figure."""
    cpu = tmp_path / "cpu-llama-bench"
    cpu.write_text(stand_in.read_text().replace('"Stand-in GPU"', '""'))
    cpu.chmod(0o755)
    llama_peer.write_synthetic(tmp_path / "m.safetensors", shape="0.1B", n_layer=1, n_embd=256)
    model = llama_peer.convert(tmp_path / "m.safetensors", tmp_path / "m.gguf", "q4_k")
    with pytest.raises(RuntimeError, match="ran on the CPU"):
        llama_peer.run_llama_bench(cpu, model, tokens=4, repeats=1)


def test_failure_is_reported(tmp_path):
    failing = tmp_path / "llama-bench"
    failing.write_text("#!/bin/sh\necho 'no CUDA device' >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match="llama-bench failed \\(3\\): no CUDA device"):
        llama_peer.run_llama_bench(failing, tmp_path / "m.gguf", tokens=4, repeats=1)


@pytest.mark.parametrize("argv", [[], ["--llama-bench", "/no/such/file"], ["--llama-bench", __file__, "--embd", "100"],
                                  ["--llama-bench", __file__, "--precisions", "q8"]])
def test_bad_options_fail_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        llama_peer.main(argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1]) > 0
