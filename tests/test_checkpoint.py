"""Checkpoint readers and writers: round trips with torch and safetensors, rwkv.cpp, clear errors."""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from mlx_rwkv.checkpoint import CheckpointError, detect_format, load_checkpoint, read_tensors, save_checkpoint
from mlx_rwkv.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "data" / "tiny-rwkv7"
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
CFG = ModelConfig(n_layer=2, n_embd=128, head_size=64, vocab_size=50,  # 2 heads
                  d_decay=8, d_aaa=8, d_mv=4, d_gate=16, d_ffn=256)


def random_weights(cfg: ModelConfig = CFG, dtype: np.dtype = DTYPES[0], seed: int = 0) -> dict[str, np.ndarray]:
    """Correctly shaped random weights, with layer 0's unused v0/v1/v2 as official files have."""
    rng = np.random.default_rng(seed)
    shapes = cfg.expected_shapes()
    shapes.update({"blocks.0.att.v0": (1, 1, cfg.n_embd), "blocks.0.att.v1": (cfg.n_embd, cfg.d_mv),
                   "blocks.0.att.v2": (cfg.d_mv, cfg.n_embd)})
    return {k: rng.standard_normal(s, dtype=np.float32).astype(dtype) for k, s in shapes.items()}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k].astype(np.float32), v.astype(np.float32), err_msg=k)


def to_numpy(t: "torch.Tensor") -> np.ndarray:  # noqa: F821 - torch is imported lazily in tests
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


# ---- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip(tmp_path: Path, dtype: np.dtype, suffix: str) -> None:
    weights = random_weights(dtype=dtype)
    path = save_checkpoint(weights, tmp_path / f"m{suffix}")
    ck = load_checkpoint(path)
    assert ck.config == CFG and ck.format == suffix[1:] and ck.path == path
    assert all(is_mapped(a) for a in ck.weights.values())
    if suffix == ".pth":
        assert_same(ck.weights, weights)
        assert all(a.ctypes.data % 64 == 0 for a in ck.weights.values())  # storages aligned as torch does
    else:  # the safetensors writer orders by dtype width, then as given
        assert_same({k: ck.weights[k] for k in weights}, weights)


def is_mapped(arr: np.ndarray) -> bool:
    """Whether the array is a view of a memory-mapped file (not a copy in RAM)."""
    while isinstance(arr, np.ndarray):
        arr = arr.base
    return isinstance(arr, memoryview) and isinstance(arr.obj, mmap.mmap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_our_pth_loads_in_torch(tmp_path: Path, dtype: np.dtype) -> None:
    import torch
    weights = random_weights(dtype=dtype)
    path = save_checkpoint(weights, tmp_path / "m.pth")
    for state in (torch.load(path, map_location="cpu", mmap=True), torch.load(path)):  # weights_only default
        assert_same({k: to_numpy(t) for k, t in state.items()}, weights)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_save_reads(tmp_path: Path, dtype: np.dtype) -> None:
    import torch
    tdtype = {DTYPES[0]: torch.float32, DTYPES[1]: torch.float16, BF16: torch.bfloat16}[dtype]
    state = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in random_weights().items())
    state = collections.OrderedDict((k, v.to(tdtype)) for k, v in state.items())
    base = torch.arange(24, dtype=torch.float32).to(tdtype)
    state["blocks.0.att.w1"] = torch.nn.Parameter(state["blocks.0.att.w1"])  # a Parameter
    state["extra.offset"] = base[4:16].view(3, 4)  # a view with a storage offset, sharing a storage
    state["extra.transposed"] = base.view(4, 6).t()  # non-contiguous
    torch.save(state, tmp_path / "t.pth")
    got = read_tensors(tmp_path / "t.pth")
    assert_same(got, {k: to_numpy(v.detach().contiguous()) for k, v in state.items()})


def test_safetensors_interop(tmp_path: Path) -> None:
    import safetensors.numpy
    import safetensors.torch
    weights = random_weights(dtype=DTYPES[1])
    safetensors.numpy.save_file(weights, tmp_path / "theirs.safetensors")
    assert_same({k: v for k, v in sorted(read_tensors(tmp_path / "theirs.safetensors").items())},
                dict(sorted(weights.items())))
    mixed = dict(weights)
    mixed.update({"extra.bf16": weights["emb.weight"].astype(BF16), "extra.f32": np.ones((3, 5), np.float32)})
    save_checkpoint(mixed, tmp_path / "ours.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert_same({k: to_numpy(theirs[k]) for k in mixed}, mixed)


def test_format_comes_from_bytes_not_name(tmp_path: Path) -> None:
    path = save_checkpoint(random_weights(), tmp_path / "model.pth", format="safetensors")
    assert detect_format(path) == "safetensors" and load_checkpoint(path).format == "safetensors"


# ---- rwkv.cpp ----------------------------------------------------------------------------------

def write_rwkvcpp(weights: dict[str, np.ndarray], path: Path) -> None:
    """An FP16 rwkv.cpp file as its converter writes one (x_rwkvag, transposed LoRA, f32 vectors)."""
    cfg = ModelConfig.from_shapes({k: v.shape for k, v in weights.items()})
    records = []
    for key, arr in weights.items():
        prefix, _, name = key.rpartition(".")
        if key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue  # absent from rwkv.cpp files
        if prefix.endswith(".att") and name in ("x_w", "x_k", "x_v", "x_a", "x_g"):
            continue  # written into x_rwkvag together with x_r
        if name == "x_r":
            key, arr = f"{prefix}.x_rwkvag", np.concatenate([weights[f"{prefix}.x_{c}"] for c in "rwkvag"])
        elif name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
            arr = arr.T
        small = key.rpartition(".")[2] in ("x_rwkvag", "k_k", "k_a", "r_k", "x_k", "w0", "a0", "v0") or arr.ndim == 1
        arr = np.ascontiguousarray(arr, np.float32 if small else np.float16)
        head = struct.pack("<3i", arr.ndim, len(key), int(arr.dtype == np.float16))
        records.append(head + struct.pack(f"<{arr.ndim}i", *arr.shape[::-1]) + key.encode() + arr.tobytes())
    header = struct.pack("<6i", 0x67676D66, 101, cfg.vocab_size, cfg.n_embd, cfg.n_layer, 1)
    path.write_bytes(header + b"".join(records))


def test_rwkvcpp_fp16_to_official_layout(tmp_path: Path) -> None:
    weights = random_weights()
    write_rwkvcpp(weights, tmp_path / "m.bin")
    ck = load_checkpoint(tmp_path / "m.bin")
    assert ck.config == CFG and ck.format == "rwkvcpp"
    assert "blocks.0.att.v1" not in ck.weights
    for k, v in ck.weights.items():
        want = weights[k].astype(v.dtype)
        np.testing.assert_array_equal(v, want, err_msg=k)
    assert ck.weights["blocks.1.att.key.weight"].dtype == np.float16
    assert ck.weights["blocks.1.att.x_g"].dtype == np.float32


@pytest.mark.skipif(not TINY.exists(), reason="../shared/data/tiny-rwkv7 is absent")
def test_tiny_rwkvcpp_model_runs_in_the_official_package(tmp_path: Path) -> None:
    ck = load_checkpoint(TINY / "tiny-rwkv-7v0-834K-FP32.bin")
    c = ck.config
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.d_ffn) == (12, 64, 1, 256, 256)
    # official layout for real: written as .pth, the official rwkv package reproduces rwkv.cpp's logits
    save_checkpoint(ck.weights, tmp_path / "tiny.pth")
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    from rwkv.model import RWKV
    logits, _ = RWKV(model=str(tmp_path / "tiny"), strategy="cpu fp32").forward([34, 105, 110], None)
    want = np.fromfile(TINY / "expected-logits-7v0-834K.bin", dtype=np.float32)
    np.testing.assert_allclose(logits.numpy(), want, atol=1e-5)


# ---- errors ------------------------------------------------------------------------------------

def zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("content", [b"", b"hello, this is a text file\n" * 10, bytes(range(256)) * 4],
                         ids=["empty", "text", "random"])
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match="not an RWKV checkpoint"):
        load_checkpoint(tmp_path / "x.pth")


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = zip_with(tmp_path / "x.pth", {"archive/readme.txt": b"hi"})
    with pytest.raises(CheckpointError, match="not an RWKV checkpoint.*data.pkl"):
        load_checkpoint(path)


def make_file(tmp_path: Path, fmt: str) -> Path:
    weights = random_weights()
    if fmt == "rwkvcpp":
        write_rwkvcpp(weights, tmp_path / "m.bin")
        return tmp_path / "m.bin"
    return save_checkpoint(weights, tmp_path / f"m.{fmt}")


def header_size(path: Path, fmt: str) -> int:
    data = path.read_bytes()
    if fmt == "safetensors":
        return 8 + struct.unpack_from("<Q", data)[0]
    if fmt == "rwkvcpp":
        return 24 + 12
    return 30 + len("archive/data.pkl") + zipfile.ZipFile(path).getinfo("archive/data.pkl").file_size


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "rwkvcpp"])
@pytest.mark.parametrize("where", ["header", "data"])
def test_truncated(tmp_path: Path, fmt: str, where: str) -> None:
    path = make_file(tmp_path, fmt)
    data = path.read_bytes()
    head = header_size(path, fmt)
    cut = head // 2 if where == "header" else (head + len(data)) // 2
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_missing_tensors_all_named(tmp_path: Path) -> None:
    weights = random_weights()
    gone = ["blocks.1.att.k_k", "blocks.0.ffn.value.weight", "ln_out.bias"]
    path = save_checkpoint({k: v for k, v in weights.items() if k not in gone}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert all(f"missing {k}" in str(err.value) for k in gone)


def test_misshaped_tensor(tmp_path: Path) -> None:
    weights = random_weights()
    weights["blocks.1.att.a2"] = weights["blocks.1.att.a2"][:, :100]
    path = save_checkpoint(weights, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks.1.att.a2 has shape \[8, 100\], expected \[8, 128\]"):
        load_checkpoint(path)


def test_rwkv6_checkpoint_is_named(tmp_path: Path) -> None:
    keys = ["emb.weight", "blocks.0.att.time_maa_x", "blocks.0.att.time_maa_w1", "blocks.0.att.time_faaaa"]
    path = save_checkpoint({k: np.zeros((2, 4), np.float16) for k in keys}, tmp_path / "v6.pth")
    with pytest.raises(CheckpointError, match="x060"):
        load_checkpoint(path)


def call_pickle(func: str, arg: object, stack_global: bool) -> bytes:
    """A data.pkl {"emb.weight": func(arg)} built from GLOBAL (or STACK_GLOBAL) and REDUCE."""
    module, name = func.rsplit(".", 1)
    if stack_global:
        target = b"".join(pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode() for s in (module, name))
        target += pickle.STACK_GLOBAL
    else:
        target = pickle.GLOBAL + f"{module}\n{name}\n".encode()
    args = pickle.dumps((arg,), protocol=2)[2:-1]  # the tuple's opcodes without PROTO and STOP
    key = pickle.dumps("emb.weight", protocol=2)[2:-1]
    call = target + args + pickle.REDUCE
    return pickle.PROTO + b"\x04" + pickle.EMPTY_DICT + key + call + pickle.SETITEM + pickle.STOP


@pytest.mark.parametrize("stack_global", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, stack_global: bool, attack: str) -> None:
    marker = tmp_path / "pwned"
    arg = {"os.system": f"touch {marker}", "builtins.eval": f"open({str(marker)!r}, 'w')",
           "subprocess.Popen": ["touch", str(marker)]}[attack]
    payload = call_pickle(attack, arg, stack_global)
    path = zip_with(tmp_path / "evil.pth", {"archive/data.pkl": payload, "archive/version": b"3\n"})
    with pytest.raises(CheckpointError, match=f"refusing to load: the pickle asks for {attack}"):
        load_checkpoint(path)  # refused at the global's lookup, before any call could happen
    assert not marker.exists()


def test_unsupported_contents(tmp_path: Path) -> None:
    import torch
    torch.save({"emb.weight": torch.zeros(2, 2, dtype=torch.float64)}, tmp_path / "f64.pth")
    with pytest.raises(CheckpointError, match="unsupported tensor type torch.DoubleStorage"):
        load_checkpoint(tmp_path / "f64.pth")
    torch.save({"state_dict": {"emb.weight": torch.zeros(2)}}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="'state_dict' is a dict, not a tensor"):
        load_checkpoint(tmp_path / "nested.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        load_checkpoint(tmp_path / "list.pth")
    import safetensors.numpy
    safetensors.numpy.save_file({"emb.weight": np.zeros(3, np.int64)}, tmp_path / "i64.safetensors")
    with pytest.raises(CheckpointError, match="dtype I64"):
        load_checkpoint(tmp_path / "i64.safetensors")


def test_damaged_pickle(tmp_path: Path) -> None:
    path = zip_with(tmp_path / "bad.pth", {"archive/data.pkl": b"\x80\x02}(X\x05\x00\x00\x00"})
    with pytest.raises(CheckpointError, match="damaged data.pkl"):
        load_checkpoint(path)


# ---- writer behaviour ------------------------------------------------------------------------

def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx_rwkv.checkpoint as ckpt

    def broken(weights: dict, f: io.BufferedWriter) -> None:
        f.write(b"partial")
        raise RuntimeError("disk full")

    path = tmp_path / "m.pth"
    path.write_bytes(b"the user's file")
    monkeypatch.setitem(ckpt.WRITERS, ".pth", ("pth", broken))
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(random_weights(), path)
    assert path.read_bytes() == b"the user's file" and os.listdir(tmp_path) == ["m.pth"]


def test_save_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot choose a format"):
        save_checkpoint(random_weights(), tmp_path / "m.bin")
    with pytest.raises(ValueError, match="int64"):
        save_checkpoint({"emb.weight": np.zeros(3, np.int64)}, tmp_path / "m.pth")
    assert os.listdir(tmp_path) == []


def test_loading_pth_does_not_import_torch(tmp_path: Path) -> None:
    path = save_checkpoint(random_weights(dtype=BF16), tmp_path / "m.pth")
    code = ("import sys; from mlx_rwkv.checkpoint import load_checkpoint; "
            f"ck = load_checkpoint({str(path)!r}); ck.weights['emb.weight'].sum(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
