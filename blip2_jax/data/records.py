"""The image-text record format and its sharded ArrayRecord files.

One record is one image with all of its captions:

    b"B2IT" | version (1 byte) | header length (uint32, little endian) | header JSON | image bytes

The header is UTF-8 JSON with sorted keys: `captions` (list of str), `image_id` (str, the id in the
source dataset: a COCO id, a file path, a WebDataset key), `source` (str, where it came from) and
`image_format` (the PIL format name of the encoded bytes, e.g. "JPEG"); an instruction record (VQA
data for instruction tuning) also has `questions`, one per caption: caption i answers question i (the
key is absent from caption records, whose bytes stay as before). The image is kept exactly as
it was encoded on disk, so a build never re-encodes and is byte-for-byte reproducible.

Shards are named `{prefix}-{i:05d}-of-{n:05d}.array_record`; a build also writes
`{prefix}-summary.json` (see `blip2_jax.data.build`).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
from collections.abc import Iterable, Sequence

from array_record.python import array_record_module

MAGIC = b"B2IT"
VERSION = 1
_PREFIX_LEN = len(MAGIC) + 1 + 4
# group_size:1 keeps every record independently readable (cheap random access for global shuffle).
WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class ImageText:
    """One image (encoded bytes) with all of its captions."""

    image: bytes
    captions: tuple[str, ...]
    image_id: str
    source: str
    image_format: str = ""
    questions: tuple[str, ...] = ()  # instruction records: the question each caption (answer) answers


def encode_record(rec: ImageText) -> bytes:
    """Serialises a record; deterministic (sorted keys, fixed separators)."""
    fields = {"captions": list(rec.captions), "image_id": rec.image_id, "source": rec.source,
              "image_format": rec.image_format}
    if rec.questions:
        if len(rec.questions) != len(rec.captions):
            raise ValueError(f"record {rec.image_id}: {len(rec.questions)} questions for {len(rec.captions)} answers")
        fields["questions"] = list(rec.questions)
    header = json.dumps(
        fields,
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + rec.image


def decode_record(data: bytes) -> ImageText:
    """Parses bytes written by `encode_record`; raises ValueError on anything else."""
    if len(data) < _PREFIX_LEN or data[:4] != MAGIC:
        raise ValueError("not a blip2_jax image-text record (bad magic)")
    if data[4] != VERSION:
        raise ValueError(f"unsupported record version {data[4]} (expected {VERSION})")
    (n,) = struct.unpack("<I", data[5:_PREFIX_LEN])
    header = json.loads(data[_PREFIX_LEN : _PREFIX_LEN + n].decode("utf-8"))
    return ImageText(
        image=bytes(data[_PREFIX_LEN + n :]),
        captions=tuple(header["captions"]),
        image_id=header["image_id"],
        source=header["source"],
        image_format=header.get("image_format", ""),
        questions=tuple(header.get("questions", ())),
    )


def decode_header(data: bytes) -> dict:
    """Only the JSON header of a record (captions, ids), without copying the image."""
    (n,) = struct.unpack("<I", data[5:_PREFIX_LEN])
    return json.loads(data[_PREFIX_LEN : _PREFIX_LEN + n].decode("utf-8"))


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def write_shard(path: str, records: Iterable[ImageText]) -> int:
    """Writes records to one ArrayRecord file; returns how many were written."""
    writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
    n = 0
    try:
        for rec in records:
            writer.write(encode_record(rec))
            n += 1
    finally:
        writer.close()
    return n


def read_shard(path: str) -> list[ImageText]:
    """Reads every record of one shard (for tests and small tools; the pipeline uses grain)."""
    reader = array_record_module.ArrayRecordReader(path)
    try:
        return [decode_record(r) for r in reader.read_all()]
    finally:
        reader.close()


def find_shards(path_or_pattern: str | Sequence[str], prefix: str | None = None) -> list[str]:
    """Resolves a directory (optionally with a shard prefix), a glob, or a list of files to shards.

    The result is sorted, so the record order (and hence dense image ids) is stable.
    """
    if not isinstance(path_or_pattern, str):
        files = [f for p in path_or_pattern for f in find_shards(p, prefix)]
        return files
    if os.path.isdir(path_or_pattern):
        pattern = os.path.join(path_or_pattern, f"{prefix or '*'}-*-of-*.array_record")
    else:
        pattern = path_or_pattern
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no ArrayRecord shards match {pattern!r}")
    return files
