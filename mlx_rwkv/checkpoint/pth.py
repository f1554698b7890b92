"""PyTorch .pth (torch.save zip format) read and written without importing torch.

A .pth is a zip of stored (uncompressed) members: `<name>/data.pkl` (a pickle of the state
dict whose tensors point at storages through persistent ids), `<name>/data/<key>` (each
storage's raw bytes), `<name>/byteorder`, `<name>/version`. We unpickle data.pkl with an
allow-list of the few globals that rebuilding tensors needs, and map every storage straight
from the file, so loading neither runs code from the checkpoint nor copies the weights.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from mlx_rwkv.checkpoint.files import BF16, F16, F32, map_file, raw_bytes, tensor_at
from mlx_rwkv.config import CheckpointError

STORAGE_DTYPES = {"FloatStorage": F32, "HalfStorage": F16, "BFloat16Storage": BF16}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
ARCHIVE = "archive"  # the record prefix torch's own writer used before naming it after the file
ALIGNMENT = 64  # torch aligns each storage's data to 64 bytes in the file


# ---- reading ---------------------------------------------------------------------------------

class _StorageType:
    """Stands in for torch.FloatStorage & co. inside the pickle: just the element dtype."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object, *_: object) -> np.ndarray:
    """Replacement for torch._utils._rebuild_tensor_v2: a view (or copy) of a storage array."""
    if not (isinstance(storage, np.ndarray) and _ints(size) and _ints(stride)
            and isinstance(offset, int) and len(size) == len(stride)):
        raise CheckpointError("damaged data.pkl: a tensor with a malformed storage, size or stride")
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise CheckpointError(f"damaged data.pkl: a tensor {list(size)} reaches past its storage of {storage.size}")
    dense = [math.prod(size[i + 1:]) for i in range(len(size))]
    if all(n == 1 or s == d for n, s, d in zip(size, stride, dense)):
        return storage[offset:offset + math.prod(size)].reshape(size)
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, [s * storage.itemsize for s in stride], writeable=False)
    return np.ascontiguousarray(view)  # non-contiguous (e.g. a saved transpose): one copy


def _rebuild_parameter(data: object, *_: object) -> object:
    """Replacement for torch._utils._rebuild_parameter: a Parameter is just its tensor."""
    return data


def _ints(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) for v in value)


_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals and maps storages from the file."""

    def __init__(self, data: bytes, load_storage: Callable[[str, np.dtype, int], np.ndarray]) -> None:
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"unsupported tensor type torch.{name}: mlx-rwkv reads float32, float16, bfloat16")
        raise CheckpointError(
            f"refusing to load: the pickle asks for {module}.{name}, which rebuilding tensors does not "
            "need (mlx-rwkv never runs code from a checkpoint; a .pth must be a dict of tensors)")

    def persistent_load(self, pid: object) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise CheckpointError(f"damaged data.pkl: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(str(key), storage_type.dtype, numel)


def read_pth(path: Path) -> dict[str, np.ndarray]:
    """The state dict of a torch.save zip, each tensor memory-mapped from the file."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"truncated or damaged .pth (zip) file {path}: {e}") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"not an RWKV checkpoint: {path} is a zip archive without one <name>/data.pkl "
                                  "(not a torch.save file)")
        prefix = pkl[0][: -len("/data.pkl")]
        if prefix + "/byteorder" in zf.namelist() and zf.read(prefix + "/byteorder").strip() != b"little":
            raise CheckpointError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
        buf = map_file(path)
        cache: dict[tuple[str, np.dtype], np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if (key, dtype) not in cache:
                cache[key, dtype] = _storage(zf, buf, f"{prefix}/data/{key}", dtype, numel)
            return cache[key, dtype]

        try:
            state = _TensorUnpickler(zf.read(pkl[0]), load_storage).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged pickle can fail in many ways; name it once
            raise CheckpointError(f"damaged data.pkl in {path}: {type(e).__name__}: {e}") from None
    return _check_state_dict(state, path)


def _storage(zf: zipfile.ZipFile, buf: bytes, member: str, dtype: np.dtype, numel: int) -> np.ndarray:
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise CheckpointError(f"damaged .pth: data.pkl refers to {member}, which the archive lacks") from None
    if info.file_size < numel * dtype.itemsize:
        raise CheckpointError(f"damaged .pth: {member} holds {info.file_size} bytes, a storage of "
                              f"{numel} x {dtype} needs {numel * dtype.itemsize}")
    if info.compress_type != zipfile.ZIP_STORED:  # re-zipped by hand: cannot map, read a copy
        return np.frombuffer(zf.read(member), dtype, numel)
    return tensor_at(buf, dtype, (numel,), _data_offset(buf, info), member)


def _data_offset(buf: bytes, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, file name and extra field."""
    start = info.header_offset
    if buf[start:start + 4] != b"PK\x03\x04":
        raise CheckpointError(f"damaged .pth: no local zip header for {info.filename} at byte {start}")
    name_len, extra_len = struct.unpack_from("<HH", buf, start + 26)
    return start + 30 + name_len + extra_len


def _check_state_dict(state: object, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a pickled {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                  "the .pth must be a flat dict of tensors (official RWKV files are)")
    return dict(state)


# ---- writing ---------------------------------------------------------------------------------

def write_pth(weights: dict[str, np.ndarray], f: BinaryIO) -> None:
    """Write contiguous float tensors as a torch.save zip that torch.load (weights_only) accepts."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{ARCHIVE}/data.pkl", _pickle_state_dict(weights))
        zf.writestr(f"{ARCHIVE}/.format_version", b"1")
        zf.writestr(f"{ARCHIVE}/.storage_alignment", str(ALIGNMENT).encode())
        zf.writestr(f"{ARCHIVE}/byteorder", b"little")
        for i, arr in enumerate(weights.values()):
            _write_aligned(zf, f, f"{ARCHIVE}/data/{i}", raw_bytes(arr))
        zf.writestr(f"{ARCHIVE}/version", b"3\n")


def _write_aligned(zf: zipfile.ZipFile, f: BinaryIO, name: str, data: memoryview) -> None:
    """A stored member whose data starts on an ALIGNMENT boundary (padding in the extra field)."""
    info = zipfile.ZipInfo(name)
    info.file_size = len(data)
    # local header = 30 bytes + name + our extra field (4-byte header + pad) + 20-byte zip64 extra
    header = 30 + len(name.encode()) + 4 + 20
    pad = -(f.tell() + header) % ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + bytes(pad)  # id "FB", as torch's writer uses
    with zf.open(info, "w", force_zip64=True) as dst:  # force_zip64 keeps the header size fixed
        dst.write(data)


def _pickle_state_dict(weights: dict[str, np.ndarray]) -> bytes:
    """The data.pkl that torch.save writes for a dict of tensors, opcode by opcode (protocol 2)."""
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.MARK]
    for i, (key, arr) in enumerate(weights.items()):
        strides = tuple(s // arr.itemsize for s in arr.strides)
        out += [
            _str(key), _global("torch._utils", "_rebuild_tensor_v2"), pickle.MARK,
            # persistent id ('storage', storage type, key, location, numel)
            pickle.MARK, _str("storage"), _global("torch", STORAGE_NAMES[arr.dtype]), _str(str(i)),
            _str("cpu"), _int(arr.size), pickle.TUPLE, pickle.BINPERSID,
            _int(0), _tuple(arr.shape), _tuple(strides), pickle.NEWFALSE,  # offset, size, stride, grad
            _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,  # backward hooks
            pickle.TUPLE, pickle.REDUCE,
        ]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(n: int) -> bytes:
    if 0 <= n < 2**31:
        return pickle.BININT + struct.pack("<i", n)
    data = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def _tuple(values: tuple[int, ...]) -> bytes:
    return pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE
