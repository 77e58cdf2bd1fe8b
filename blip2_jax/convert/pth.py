"""Reads a PyTorch `.pth` state dict into numpy arrays without torch (torch is a test-only dependency
of this project; the tests compare this reader with `torch.load(weights_only=True)`).

Both of torch's on-disk formats are read:
- the zip format (torch >= 1.6): `<root>/data.pkl` plus one raw little-endian file per storage,
  `<root>/data/<key>`;
- the legacy format (what `torch.save(..., _use_new_zipfile_serialization=False)` and older torch
  wrote, e.g. the EfficientNet-Lite0 weights): a magic number, a protocol version and the system info
  as three pickles, the object pickle, the list of storage keys, then each storage as an int64 element
  count followed by its bytes.

Like torch's `weights_only` loader, the unpickler resolves only an allow-list of globals (ordered
dicts, the typed storages, the tensor and parameter rebuild functions) and refuses anything else with
an error naming the file and the global: loading never executes pickled code.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
    """A storage named in the pickle; its numpy data is attached once read."""

    def __init__(self, dtype, numel: int):
        self.dtype, self.numel, self.data = np.dtype(dtype), int(numel), None


class _LazyTensor:
    """What `_rebuild_tensor_v2` returned: a strided view of a storage, made an array once read."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise ValueError("a tensor's storage was never read")
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, [s * item for s in self.stride])
        return np.array(view)  # a copy: the arrays do not alias the file buffer


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, source: str, storage_for: Callable[[tuple], _Storage]):
        super().__init__(file)
        self._source, self._storage_for = source, storage_for

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{self._source}: refusing to load the global {module}.{name} "
                                     "(only state dicts of tensors are read)")

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {saved_id!r}")
        return self._storage_for(saved_id[1:])


def _materialise(obj):
    if isinstance(obj, _LazyTensor):
        return obj.array()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _storages() -> tuple[dict, Callable[[tuple], _Storage]]:
    """A key -> storage table and the persistent-id hook that fills it (`(dtype, key, location, numel,
    ...)`: the same storage may be named by several tensors)."""
    table: dict[str, _Storage] = {}

    def storage_for(data: tuple) -> _Storage:
        dtype, key, _location, numel = data[:4]
        if key not in table:
            table[key] = _Storage(dtype, numel)
        return table[key]

    return table, storage_for


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a torch zip checkpoint has one <root>/data.pkl, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        table, storage_for = _storages()
        obj = _Unpickler(io.BytesIO(zf.read(pickles[0])), path, storage_for).load()
        for key, storage in table.items():
            raw = zf.read(f"{root}data/{key}")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"), count=storage.numel)
    return obj


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch checkpoint (neither a zip file nor the legacy magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info (endianness, type sizes); torch writes little-endian on x86/arm
        table, storage_for = _storages()
        obj = _Unpickler(f, path, storage_for).load()
        for key in pickle.load(f):
            storage = table[key]
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            raw = f.read(numel * storage.dtype.itemsize)
            if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated or its size disagrees with the pickle")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return obj


def load(path: str) -> Any:
    """The object a `.pth` file holds (a state dict: names -> numpy arrays), read without torch."""
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    return _materialise(obj)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """`load(path)` checked to be a flat name -> array mapping (a `state_dict`), `"state_dict"` or
    `"model"` wrappers unwrapped."""
    obj = load(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return dict(obj)
