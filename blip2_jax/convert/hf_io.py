"""Reading and writing Hugging Face checkpoint directories without torch.

- `CheckpointReader(path)` opens `config.json` plus `model.safetensors` or a sharded
  `model.safetensors.index.json`, and reads tensors one at a time (memory-mapped), bfloat16 included.
- `write_safetensors(path, tensors)` writes one safetensors file from numpy arrays.
- `strict_merge(...)` reports missing and unexpected keys together, minus documented ignore patterns.

Pickled weights (`pytorch_model.bin`, `*.pth`, `*.pt`) are refused: they can execute code on load.
`python -m blip2_jax.convert.lavis` turns LAVIS `.pth` files into safetensors first.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as asked; the message names it."""


class SafetensorsFile:
    """One memory-mapped safetensors file; `get(name)` returns a numpy array (a copy)."""

    def __init__(self, filename: str):
        self.filename = filename
        with open(filename, "rb") as f:
            try:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{filename}: not a safetensors file ({e})") from None
        self._data_start = 8 + header_len
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._file = open(filename, "rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(filename) else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.filename}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        buf = self._mm[self._data_start + begin:self._data_start + end]
        return np.frombuffer(buf, dtype=dtype).reshape(entry["shape"]).copy()

    def close(self):
        if self._mm is not None:
            self._mm.close()
        self._file.close()


class CheckpointReader:
    """A Hugging Face model directory: its config and its safetensors weights, read lazily."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            if path.endswith(_PICKLE_SUFFIXES):
                raise CheckpointError(_pickle_message(path))
            raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
        config_file = os.path.join(path, "config.json")
        if not os.path.exists(config_file):
            raise CheckpointError(f"{path}: no config.json")
        with open(config_file) as f:
            self.config = json.load(f)
        self._files: dict[str, SafetensorsFile] = {}
        self._key_to_file: dict[str, str] = {}
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for key, fname in weight_map.items():
                self._key_to_file[key] = os.path.join(path, fname)
        elif os.path.exists(single):
            sf = self._open(single)
            for key in sf.keys():
                self._key_to_file[key] = single
        else:
            pickled = [n for n in os.listdir(path) if n in _PICKLED or n.endswith(_PICKLE_SUFFIXES)]
            if pickled:
                raise CheckpointError(_pickle_message(os.path.join(path, pickled[0])))
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            if not os.path.exists(filename):
                raise CheckpointError(f"{filename}: listed in {INDEX_FILE} but missing")
            self._files[filename] = SafetensorsFile(filename)
        return self._files[filename]

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def get(self, key: str) -> np.ndarray:
        if key not in self._key_to_file:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return self._open(self._key_to_file[key]).get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._open(self._key_to_file[key]).shape(key)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pickle_message(path: str) -> str:
    return (f"{path}: pickled weights are refused (loading them can run arbitrary code). Convert a LAVIS "
            f".pth with `python -m blip2_jax.convert.lavis --checkpoint {path} --out DIR`, or save the "
            f"model with safetensors (`save_pretrained(..., safe_serialization=True)`).")


def write_safetensors(filename: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write numpy arrays (bfloat16 included) as one safetensors file, keys sorted, 8-byte aligned."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{filename}: tensor {name!r} has unsupported dtype {arr.dtype}")
        nbytes = arr.nbytes
        header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def write_hf_dir(path: str, config: Mapping, tensors: Mapping[str, np.ndarray]) -> None:
    """A Hugging Face model directory: `config.json` + one `model.safetensors`."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    write_safetensors(os.path.join(path, SINGLE_FILE), tensors)


def strict_merge(expected: Iterable[str], found: Iterable[str], *, ignore: Iterable[str] = (),
                 source: str = "checkpoint") -> None:
    """Fail with both lists when keys are missing or unexpected, unless an `ignore` regex covers them."""
    patterns = [re.compile(p) for p in ignore]
    covered = lambda k: any(p.fullmatch(k) for p in patterns)  # noqa: E731
    expected, found = set(expected), set(found)
    missing = sorted(k for k in expected - found if not covered(k))
    unexpected = sorted(k for k in found - expected if not covered(k))
    if missing or unexpected:
        lines = [f"{source}: keys do not match the model."]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:50]) + (" ..." if len(missing) > 50 else ""))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:50])
                         + (" ..." if len(unexpected) > 50 else ""))
        raise CheckpointError("\n".join(lines))
