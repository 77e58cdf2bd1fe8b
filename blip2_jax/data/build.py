r"""Dataset builders: image-text datasets on disk -> sharded ArrayRecord files + a JSON summary.

    python -m blip2_jax.data.build coco --annotations captions_train2017.json \
        --images /data/coco/train2017 --out /data/records/coco --prefix train
    python -m blip2_jax.data.build coco --annotations dataset_coco.json --karpathy_split test \
        --images /data/coco --out /data/records/coco_karpathy --prefix test
    python -m blip2_jax.data.build table --input pairs.jsonl --images /data/imgs --out OUT
    python -m blip2_jax.data.build webdataset --input '/data/laion/{00000..00099}.tar' --out OUT

`coco` reads the COCO captions format (also NoCaps), the Karpathy split JSON (`dataset_coco.json`,
`dataset_flickr30k.json`: `images[*].sentences`, filtered by `--karpathy_split`) and LAVIS's
annotation lists (`[{"image": ..., "caption": str | [str]}]`). `table` reads JSONL or CSV rows of
image path and caption; with `--question_key` (e.g. `question`), rows of image, question and answer (the
`--caption_key` field): instruction records for VQA instruction tuning (`records.ImageText.questions`). `webdataset` reads tar shards as img2dataset writes them
(`KEY.jpg` + `KEY.txt` and/or `KEY.json`), one output shard per tar.

Records are grouped per image (all captions of an image in one record). A missing or unreadable image
is skipped and listed, with its path and the reason, in `{prefix}-summary.json`; a malformed
annotation file raises `AnnotationError` naming the file and the entry. Work is spread over
`--workers` processes, one output shard per task; the output depends only on the input (sorted,
order-preserving, no timestamps), so rebuilding gives byte-identical shards. On the command line, a
malformed annotation file or a missing input is one `error: ...` line on stderr (exit status 1).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import sys
import tarfile
from collections.abc import Callable, Sequence

from PIL import Image

from blip2_jax.data import records

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image to convert: where its bytes are and what its captions say."""

    path: str
    captions: tuple[str, ...]
    image_id: str
    questions: tuple[str, ...] = ()  # instruction data: the question each caption answers


# ----------------------------------------------------------------------------- annotation readers


def _fail(file: str, where: str, entry, why: str):
    text = json.dumps(entry, ensure_ascii=False, default=str) if entry is not None else ""
    raise AnnotationError(f"{file}: {where}: {why}: {text[:300]}")


def _group(items: Sequence[tuple]) -> list[Entry]:
    """Groups (path, image_id, caption[, question]) rows per image, in order of first appearance."""
    order: dict[str, tuple[str, list[str], list[str]]] = {}
    for path, image_id, caption, *question in items:
        if path not in order:
            order[path] = (image_id, [], [])
        if caption is not None:
            order[path][1].append(caption)
            order[path][2].extend(question)
    return [Entry(p, tuple(caps), iid, tuple(qs)) for p, (iid, caps, qs) in order.items()]


def read_coco_annotations(file: str, image_root: str, karpathy_split: str = "") -> list[Entry]:
    """Reads COCO-captions, Karpathy-split or LAVIS-list annotations into per-image entries."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{file}: not valid JSON: {e}") from e
    if isinstance(data, list):
        return _read_lavis_list(file, data, image_root)
    if not isinstance(data, dict) or "images" not in data:
        _fail(file, "top level", None, "expected a list or an object with 'images'")
    images = data["images"]
    if not isinstance(images, list):
        _fail(file, "'images'", None, "expected a list")
    if images and isinstance(images[0], dict) and "sentences" in images[0]:
        return _read_karpathy(file, images, image_root, karpathy_split)
    if karpathy_split:
        _fail(file, "top level", None, "--karpathy_split given but this is not a Karpathy-split file")
    return _read_coco(file, data, image_root)


def _read_coco(file: str, data: dict, image_root: str) -> list[Entry]:
    id_to_path: dict = {}
    order = []
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            _fail(file, f"images[{i}]", im, "needs 'id' and a string 'file_name'")
        if im["id"] in id_to_path:
            _fail(file, f"images[{i}]", im, "duplicate image id")
        id_to_path[im["id"]] = os.path.join(image_root, im["file_name"])
        order.append(im["id"])
    captions: dict = {k: [] for k in order}
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            _fail(file, f"annotations[{i}]", ann, "needs a string 'caption'")
        if ann.get("image_id") not in captions:
            _fail(file, f"annotations[{i}]", ann, "image_id not in 'images'")
        captions[ann["image_id"]].append(ann["caption"])
    return [Entry(id_to_path[k], tuple(captions[k]), str(k)) for k in order]


def _read_karpathy(file: str, images: list, image_root: str, split: str) -> list[Entry]:
    wanted = {s for s in split.split(",") if s}
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str):
            _fail(file, f"images[{i}]", im, "needs a string 'filename'")
        if not isinstance(im.get("sentences"), list):
            _fail(file, f"images[{i}]", im, "needs a list 'sentences'")
        if wanted and im.get("split") not in wanted:
            continue
        caps = []
        for j, s in enumerate(im["sentences"]):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                _fail(file, f"images[{i}].sentences[{j}]", s, "needs a string 'raw'")
            caps.append(s["raw"])
        rel = os.path.join(im.get("filepath", ""), im["filename"])
        image_id = im.get("cocoid", im.get("imgid", im["filename"]))
        out.append(Entry(os.path.join(image_root, rel), tuple(caps), str(image_id)))
    return out


def _read_lavis_list(file: str, data: list, image_root: str) -> list[Entry]:
    rows = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            _fail(file, f"entry {i}", item, "needs a string 'image'")
        cap = item.get("caption", [])
        caps = [cap] if isinstance(cap, str) else cap
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            _fail(file, f"entry {i}", item, "'caption' must be a string or a list of strings")
        path = os.path.join(image_root, item["image"])
        image_id = str(item.get("image_id", item["image"]))
        rows.extend((path, image_id, c) for c in caps)
        if not caps:
            rows.append((path, image_id, None))
    return _group(rows)


def read_table(file: str, image_root: str, image_key: str = "image",
               caption_key: str = "caption", question_key: str = "") -> list[Entry]:
    """Reads a JSONL (one object per line) or CSV (with a header) of image path and caption; with
    `question_key`, of image path, question and answer (`caption_key`; JSONL: one answer per row)."""
    rows = []
    if file.endswith(".csv"):
        with open(file, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for key in (image_key, caption_key) + ((question_key,) if question_key else ()):
                if key not in (reader.fieldnames or []):
                    _fail(file, "header", reader.fieldnames, f"missing column {key!r}")
            for line, row in enumerate(reader, start=2):
                if not row.get(image_key) or row.get(caption_key) is None:
                    _fail(file, f"line {line}", row, f"empty {image_key!r} or {caption_key!r}")
                if question_key and not row.get(question_key):
                    _fail(file, f"line {line}", row, f"empty {question_key!r}")
                rows.append((row[image_key], row[caption_key]) + ((row[question_key],) if question_key else ()))
    else:
        with open(file, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    _fail(file, f"line {line}", text.strip(), f"not valid JSON ({e})")
                if not isinstance(row, dict) or not isinstance(row.get(image_key), str):
                    _fail(file, f"line {line}", row, f"needs a string {image_key!r}")
                caps = row.get(caption_key)
                if question_key:
                    if not isinstance(row.get(question_key), str) or not isinstance(caps, str):
                        _fail(file, f"line {line}", row, f"needs a string {question_key!r} and a string answer "
                                                         f"{caption_key!r}")
                    rows.append((row[image_key], caps, row[question_key]))
                    continue
                caps = [caps] if isinstance(caps, str) else caps
                if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                    _fail(file, f"line {line}", row, f"{caption_key!r} must be a string or list")
                rows.extend((row[image_key], c) for c in caps)
    return _group([(os.path.join(image_root, p), p, *rest) for p, *rest in rows])


# ----------------------------------------------------------------------------- image checks


def check_image(data: bytes, verify: bool = True) -> str:
    """Returns the PIL format name of encoded image bytes; raises if they do not decode."""
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or ""
        if verify:
            im.load()  # A full decode: truncated or corrupt files fail here, not at training time.
    return fmt


def _entry_record(entry: Entry, source: str, verify: bool):
    """Returns (ImageText, None) or (None, skip-report dict)."""
    try:
        with open(entry.path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, {"path": entry.path, "image_id": entry.image_id,
                      "reason": f"cannot read: {type(e).__name__}: {e.strerror or e}"}
    try:
        fmt = check_image(data, verify)
    except Exception as e:  # PIL raises many types for corrupt data.
        return None, {"path": entry.path, "image_id": entry.image_id,
                      "reason": f"not a decodable image: {type(e).__name__}: {e}"}
    return records.ImageText(data, entry.captions, entry.image_id, source, fmt, entry.questions), None


# ----------------------------------------------------------------------------- tasks (one per shard)


def _build_entries_shard(args) -> dict:
    """Task: writes one shard from a list of entries."""
    out_path, entries, source, verify = args
    recs, skipped = [], []
    for e in entries:
        rec, skip = _entry_record(e, source, verify)
        if rec is None:
            skipped.append(skip)
        else:
            recs.append(rec)
    n = records.write_shard(out_path, recs)
    return {"file": os.path.basename(out_path), "num_records": n, "skipped": skipped}


def _tar_samples(tar_path: str):
    """Yields (key, {ext: bytes}) per sample, in tar order (WebDataset grouping by basename)."""
    with tarfile.open(tar_path) as tar:
        current, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = os.path.split(member.name)
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            key = os.path.join(dirname, stem)
            if key != current and current is not None:
                yield current, parts
                parts = {}
            current = key
            parts[ext.lower()] = tar.extractfile(member).read()
        if current is not None:
            yield current, parts


def _build_tar_shard(args) -> dict:
    """Task: converts one WebDataset tar into one shard."""
    out_path, tar_path, source, verify = args
    recs, skipped = [], []
    try:
        samples = list(_tar_samples(tar_path))
    except (OSError, tarfile.TarError) as e:
        samples = []
        skipped.append({"path": tar_path, "image_id": "", "reason": f"unreadable tar: {e}"})
    for key, parts in samples:
        where = f"{tar_path}:{key}"
        ext = next((x for x in IMAGE_EXTENSIONS if x in parts), None)
        if ext is None:
            skipped.append({"path": where, "image_id": key, "reason": "no image member"})
            continue
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except json.JSONDecodeError:
                meta = {}
        if "txt" in parts:
            captions = (parts["txt"].decode("utf-8"),)
        elif isinstance(meta.get("caption"), str):
            captions = (meta["caption"],)
        else:
            skipped.append({"path": where, "image_id": key, "reason": "no caption (.txt/.json)"})
            continue
        try:
            fmt = check_image(parts[ext], verify)
        except Exception as e:
            skipped.append({"path": f"{where}.{ext}", "image_id": key,
                            "reason": f"not a decodable image: {type(e).__name__}: {e}"})
            continue
        image_id = str(meta.get("key", os.path.basename(key)))
        recs.append(records.ImageText(parts[ext], captions, image_id, source, fmt))
    n = records.write_shard(out_path, recs)
    return {"file": os.path.basename(out_path), "num_records": n, "skipped": skipped}


def _run_tasks(fn: Callable, tasks: list, workers: int) -> list[dict]:
    """Runs tasks in order (results keep task order regardless of scheduling)."""
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    ctx = multiprocessing.get_context("spawn")  # Safe even when the caller imported jax.
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as pool:
        return list(pool.map(fn, tasks))


def _write_summary(out_dir: str, prefix: str, source: str, inputs, results) -> dict:
    skipped = [s for r in results for s in r["skipped"]]
    summary = {
        "prefix": prefix,
        "source": source,
        "inputs": list(inputs),
        "num_written": sum(r["num_records"] for r in results),
        "num_skipped": len(skipped),
        "shards": [{"file": r["file"], "num_records": r["num_records"]} for r in results],
        "skipped": skipped,
    }
    with open(os.path.join(out_dir, f"{prefix}-summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return summary


def build_from_entries(entries: Sequence[Entry], out_dir: str, *, prefix: str = "train",
                       source: str = "", num_shards: int = 0, records_per_shard: int = 1000,
                       workers: int = 1, verify: bool = True, inputs: Sequence[str] = ()) -> dict:
    """Writes entries as `num_shards` contiguous shards (default: ceil(n / records_per_shard))."""
    os.makedirs(out_dir, exist_ok=True)
    n = num_shards or max(1, math.ceil(len(entries) / records_per_shard))
    bounds = [round(i * len(entries) / n) for i in range(n + 1)]
    tasks = [(os.path.join(out_dir, records.shard_name(prefix, i, n)),
              list(entries[bounds[i]:bounds[i + 1]]), source, verify) for i in range(n)]
    results = _run_tasks(_build_entries_shard, tasks, workers)
    return _write_summary(out_dir, prefix, source, inputs, results)


def build_coco(annotations: str, images: str, out_dir: str, *, karpathy_split: str = "",
               source: str = "", **kw) -> dict:
    entries = read_coco_annotations(annotations, images, karpathy_split)
    source = source or os.path.splitext(os.path.basename(annotations))[0]
    return build_from_entries(entries, out_dir, source=source, inputs=[annotations], **kw)


def build_table(input_file: str, images: str, out_dir: str, *, image_key: str = "image",
                caption_key: str = "caption", question_key: str = "", source: str = "", **kw) -> dict:
    entries = read_table(input_file, images, image_key, caption_key, question_key)
    source = source or os.path.splitext(os.path.basename(input_file))[0]
    return build_from_entries(entries, out_dir, source=source, inputs=[input_file], **kw)


def build_webdataset(tars: Sequence[str], out_dir: str, *, prefix: str = "train", source: str = "",
                     workers: int = 1, verify: bool = True) -> dict:
    """One output shard per input tar (sorted), converted in parallel."""
    tars = sorted(tars)
    if not tars:
        raise FileNotFoundError("no WebDataset tar files given")
    os.makedirs(out_dir, exist_ok=True)
    n = len(tars)
    source = source or "webdataset"
    tasks = [(os.path.join(out_dir, records.shard_name(prefix, i, n)), t, source, verify)
             for i, t in enumerate(tars)]
    results = _run_tasks(_build_tar_shard, tasks, workers)
    return _write_summary(out_dir, prefix, source, tars, results)


def _expand_braces(pattern: str) -> list[str]:
    """Expands one WebDataset-style range `{000..099}` (keeping zero padding), then globs."""
    import glob
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [f for i in range(lo, hi + 1)
                for f in _expand_braces(pattern[:m.start()] + f"{i:0{width}d}" + pattern[m.end():])]
    return sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m blip2_jax.data.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    kinds = {"coco": "COCO captions / NoCaps, Karpathy-split or LAVIS annotation JSON",
             "table": "JSONL or CSV rows of image path and caption",
             "webdataset": "img2dataset tar shards (KEY.jpg + KEY.txt/.json)"}
    for kind, what in kinds.items():
        s = sub.add_parser(kind, help=what, description=what)
        s.add_argument("--out", required=True, help="output directory")
        s.add_argument("--prefix", default="train", help="shard name prefix, usually the split")
        s.add_argument("--source", default="", help="source name stored in every record")
        s.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="processes converting shards in parallel (default: %(default)s, the CPU count)")
        s.add_argument("--no_verify", action="store_true", help="skip the full test decode")
        if kind == "webdataset":
            s.add_argument("--input", nargs="+", required=True, help="tar files, globs, {a..b}")
            continue
        s.add_argument("--images", required=True, help="folder the image paths are relative to")
        s.add_argument("--num_shards", type=int, default=0,
                       help="output shards (default: 0, i.e. ceil(images / --records_per_shard))")
        s.add_argument("--records_per_shard", type=int, default=1000, help="(default: %(default)s)")
        if kind == "coco":
            s.add_argument("--annotations", required=True, help="the annotation JSON file")
            s.add_argument("--karpathy_split", default="", help="e.g. test, val, or train,restval")
        else:
            s.add_argument("--input", required=True, help=".jsonl or .csv")
            s.add_argument("--image_key", default="image", help="image path field (default: %(default)s)")
            s.add_argument("--caption_key", default="caption",
                           help="caption field, a string or a list of strings (default: %(default)s); with "
                                "--question_key, the answer")
            s.add_argument("--question_key", default="",
                           help="question field: instruction (VQA) records of image, question and answer")
    a = p.parse_args(argv)
    common = dict(prefix=a.prefix, source=a.source, workers=a.workers, verify=not a.no_verify)
    if a.kind == "webdataset":
        tars = [f for pat in a.input for f in _expand_braces(pat)]
        summary = build_webdataset(tars, a.out, **common)
    else:
        common.update(num_shards=a.num_shards, records_per_shard=a.records_per_shard)
        if a.kind == "coco":
            summary = build_coco(a.annotations, a.images, a.out,
                                 karpathy_split=a.karpathy_split, **common)
        else:
            summary = build_table(a.input, a.images, a.out, image_key=a.image_key,
                                  caption_key=a.caption_key, question_key=a.question_key, **common)
    print(f"wrote {summary['num_written']} records in {len(summary['shards'])} shards to {a.out}; "
          f"skipped {summary['num_skipped']} (see {a.prefix}-summary.json)", file=sys.stderr)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` for the command line: an expected failure (a malformed annotation file, a missing or
    unreadable input) is one `error: ...` line on stderr and exit status 1, not a traceback."""
    try:
        main(argv)
    except (AnnotationError, OSError, csv.Error) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
