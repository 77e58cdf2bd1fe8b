"""Dataset builders: COCO / Karpathy / LAVIS annotations, JSONL/CSV, WebDataset tars, TFDS."""
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from blip2_jax.data import build, records, tfds_builder
from tests.helpers import image_bytes


@pytest.fixture()
def image_dir(tmp_path):
    d = tmp_path / "images"
    (d / "val2014").mkdir(parents=True)
    for i in range(5):
        (d / "val2014" / f"{i}.jpg").write_bytes(image_bytes(i, "JPEG"))
    (d / "val2014" / "p.png").write_bytes(image_bytes(9))
    (d / "val2014" / "corrupt.jpg").write_bytes(image_bytes(7, "JPEG")[:40])  # truncated JPEG
    return d


def _read_all(out_dir, prefix="train"):
    return [r for f in records.find_shards(str(out_dir), prefix) for r in records.read_shard(f)]


def _coco_annotations(path):
    data = {
        "images": [{"id": 10 + i, "file_name": f"val2014/{i}.jpg"} for i in range(5)]
        + [{"id": 20, "file_name": "val2014/missing.jpg"},
           {"id": 21, "file_name": "val2014/corrupt.jpg"},
           {"id": 22, "file_name": "val2014/p.png"}],
        "annotations": [{"image_id": 10 + i % 5, "id": i, "caption": f"Caption {i}."}
                        for i in range(10)] + [{"image_id": 22, "id": 99, "caption": "png"}],
    }
    path.write_text(json.dumps(data))
    return data


def test_coco_build_groups_captions_skips_bad_images_and_is_deterministic(tmp_path, image_dir):
    ann = tmp_path / "captions.json"
    _coco_annotations(ann)
    s1 = build.build_coco(str(ann), str(image_dir), str(tmp_path / "a"), num_shards=3, workers=1)
    s2 = build.build_coco(str(ann), str(image_dir), str(tmp_path / "b"), num_shards=3, workers=2)
    recs = _read_all(tmp_path / "a")
    assert [r.image_id for r in recs] == ["10", "11", "12", "13", "14", "22"]
    assert recs[0].captions == ("Caption 0.", "Caption 5.")
    assert recs[5].captions == ("png",) and recs[5].image_format == "PNG"
    for i in range(5):  # Bytes are stored exactly as on disk.
        assert recs[i].image == (image_dir / "val2014" / f"{i}.jpg").read_bytes()
    assert s1["num_written"] == 6 and s1["num_skipped"] == 2
    skipped = {os.path.basename(s["path"]): s["reason"] for s in s1["skipped"]}
    assert "cannot read" in skipped["missing.jpg"]
    assert "not a decodable image" in skipped["corrupt.jpg"]
    summary = json.loads((tmp_path / "a" / "train-summary.json").read_text())
    assert summary["num_skipped"] == 2 and len(summary["shards"]) == 3
    # Same input, in-process or with 2 worker processes: byte-identical shards.
    for name in sorted(os.listdir(tmp_path / "a")):
        a = (tmp_path / "a" / name).read_bytes()
        b = (tmp_path / "b" / name).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), name
    assert s2["num_written"] == 6


def test_karpathy_split_and_lavis_list(tmp_path, image_dir):
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": f"{i}.jpg", "cocoid": 100 + i,
         "split": ["train", "test", "restval", "val", "test"][i],
         "sentences": [{"raw": f"S{i}a", "tokens": []}, {"raw": f"S{i}b", "tokens": []}]}
        for i in range(5)]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    entries = build.read_coco_annotations(str(tmp_path / "k.json"), str(image_dir), "test")
    assert [(e.image_id, e.captions) for e in entries] == [("101", ("S1a", "S1b")),
                                                           ("104", ("S4a", "S4b"))]
    train = build.read_coco_annotations(str(tmp_path / "k.json"), str(image_dir), "train,restval")
    assert [e.image_id for e in train] == ["100", "102"]
    lavis = [{"image": "val2014/0.jpg", "caption": "x", "image_id": "a"},
             {"image": "val2014/1.jpg", "caption": ["y1", "y2"]},
             {"image": "val2014/0.jpg", "caption": "z", "image_id": "a"}]
    (tmp_path / "l.json").write_text(json.dumps(lavis))
    entries = build.read_coco_annotations(str(tmp_path / "l.json"), str(image_dir))
    assert [(e.image_id, e.captions) for e in entries] == [("a", ("x", "z")),
                                                           ("val2014/1.jpg", ("y1", "y2"))]


def test_malformed_annotations_name_file_and_entry(tmp_path, image_dir):
    bad = {"images": [{"id": 1, "file_name": "val2014/0.jpg"}],
           "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 1, "text": "oops"}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(build.AnnotationError, match=r"bad\.json: annotations\[1\].*oops"):
        build.read_coco_annotations(str(tmp_path / "bad.json"), str(image_dir))
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{"image": 3}\n')
    with pytest.raises(build.AnnotationError, match=r"bad\.jsonl: line 2"):
        build.read_table(str(tmp_path / "bad.jsonl"), str(image_dir))
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(build.AnnotationError, match=r"t\.json: not valid JSON"):
        build.read_coco_annotations(str(tmp_path / "t.json"), str(image_dir))


def test_table_csv_and_jsonl_via_cli(tmp_path, image_dir):
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "image"])
        w.writerows([["one, with comma", "val2014/0.jpg"], ["two", "val2014/1.jpg"],
                     ["one again", "val2014/0.jpg"], ["gone", "val2014/nope.jpg"]])
    summary = build.main(["table", "--input", str(tmp_path / "pairs.csv"), "--images",
                          str(image_dir), "--out", str(tmp_path / "out"), "--workers", "1"])
    recs = _read_all(tmp_path / "out")
    assert [(r.image_id, r.captions) for r in recs] == [
        ("val2014/0.jpg", ("one, with comma", "one again")), ("val2014/1.jpg", ("two",))]
    assert summary["num_skipped"] == 1 and summary["skipped"][0]["path"].endswith("nope.jpg")
    assert recs[0].source == "pairs"


def test_cli_errors_are_one_line_and_help_shows_examples_and_defaults(tmp_path, image_dir, capsys):
    (tmp_path / "pairs.jsonl").write_text('{"caption": "no image key"}\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "blip2_jax.data.build", "table", "--input",
                          str(tmp_path / "pairs.jsonl"), "--images", str(image_dir), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                         cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert run.returncode == 1 and run.stderr.splitlines() == [
        f"error: {tmp_path / 'pairs.jsonl'}: line 1: needs a string 'image': {{\"caption\": \"no image key\"}}"]
    for argv, want in [(["table", "--input", str(tmp_path / "nope.jsonl")], "No such file or directory"),
                       (["webdataset", "--input", str(tmp_path / "*.tar")], "no WebDataset tar files given")]:
        more = ["--images", str(image_dir)] if argv[0] == "table" else []
        assert build.cli(argv + more + ["--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], err

    with pytest.raises(SystemExit):
        build.main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    i = lines.index("    python -m blip2_jax.data.build coco --annotations captions_train2017.json \\")
    assert lines[i + 1].startswith("        --images /data/coco/train2017")  # one example, two lines
    with pytest.raises(SystemExit):
        build.main(["table", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--workers WORKERS processes converting shards in parallel (default: {os.cpu_count()}" in help_text


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
    for t in range(2):
        with tarfile.open(tmp_path / f"{t:05d}.tar", "w") as tar:
            _add(tar, f"{t}0001.jpg", image_bytes(t, "JPEG"))
            _add(tar, f"{t}0001.txt", f"caption {t} one".encode())
            _add(tar, f"{t}0001.json", json.dumps({"key": f"{t}0001", "caption": "ignored"}).encode())
            _add(tar, f"{t}0002.png", image_bytes(10 + t))
            _add(tar, f"{t}0002.json", json.dumps({"caption": f"json caption {t}"}).encode())
            _add(tar, f"{t}0003.txt", b"no image here")
            _add(tar, f"{t}0004.jpg", b"\xff\xd8 broken")
            _add(tar, f"{t}0004.txt", b"broken image")
    summary = build.main(["webdataset", "--input", str(tmp_path / "{00000..00001}.tar"),
                          "--out", str(tmp_path / "out"), "--workers", "1"])
    recs = _read_all(tmp_path / "out")
    assert [(r.image_id, r.captions) for r in recs] == [
        ("00001", ("caption 0 one",)), ("00002", ("json caption 0",)),
        ("10001", ("caption 1 one",)), ("10002", ("json caption 1",))]
    assert recs[1].image == image_bytes(10)
    assert summary["num_skipped"] == 4
    reasons = sorted(s["reason"].split(":")[0] for s in summary["skipped"])
    assert reasons == ["no image member"] * 2 + ["not a decodable image"] * 2
    assert len(summary["shards"]) == 2


def test_tfds_builder_serves_the_same_records(tmp_path, image_dir):
    import tensorflow_datasets as tfds

    ann = tmp_path / "captions.json"
    _coco_annotations(ann)
    build.build_coco(str(ann), str(image_dir), str(tmp_path / "rec"), num_shards=2, workers=1)
    tfds_builder.prepare_tfds({"test": f"{tmp_path / 'rec'}:train"}, str(tmp_path / "tfds"),
                              name="tiny_coco")
    src = tfds.data_source("tiny_coco", split="test", data_dir=str(tmp_path / "tfds"))
    ours = {r.image_id: r for r in _read_all(tmp_path / "rec")}
    assert len(src) == len(ours) == 6
    for i in range(len(src)):
        ex = src[i]
        rec = ours[ex["image_id"].decode()]
        assert ex["image"] == rec.image
        assert tuple(c.decode() for c in ex["captions"]) == rec.captions
