"""A TensorFlow Datasets builder over our ArrayRecord shards (works without TensorFlow).

    python -m blip2_jax.data.tfds_builder --name coco_karpathy --data_dir ~/tensorflow_datasets \
        --split train=/data/records/coco:train --split test=/data/records/coco_karpathy:test

prepares a TFDS dataset (`file_format="array_record"`) with the features
`image` (encoded bytes), `captions` (list of text), `image_id` (text), `source` (text), after which

    tfds.data_source("coco_karpathy", data_dir=..., split="test")

serves the same records (text fields come back as bytes; the grain pipeline accepts both). The
builder class is not added to TFDS's global registry (no import side effects): `tfds.data_source`
finds the prepared dataset from the files in `data_dir`.
"""
from __future__ import annotations

import argparse
import types
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from blip2_jax.data import records


class ImageTextRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Reads the shards of each split given at construction (`records={split: dir_or_glob}`)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, records_by_split: Mapping[str, str | Sequence[str]], **kwargs):
        self._records_by_split = dict(records_by_split)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-text records converted by blip2_jax.data.build.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "image_id": tfds.features.Text(),
                "source": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        return {split: self._generate_examples(spec)
                for split, spec in self._records_by_split.items()}

    def _generate_examples(self, spec):
        prefix = None
        if isinstance(spec, str) and ":" in spec and not spec.startswith(("gs:", "s3:")):
            spec, prefix = spec.rsplit(":", 1)
        for s, path in enumerate(records.find_shards(spec, prefix)):
            for r, rec in enumerate(records.read_shard(path)):
                # Keys fix the order TFDS shuffles examples into; they only need to be unique.
                yield f"{s:05d}-{r:08d}", {
                    "image": rec.image,
                    "captions": list(rec.captions),
                    "image_id": rec.image_id,
                    "source": rec.source,
                }


def prepare_tfds(records_by_split: Mapping[str, str], data_dir: str,
                 name: str = "blip2_image_text") -> tfds.core.DatasetBuilder:
    """Prepares `name` in `data_dir` from our shards; `split -> "DIR[:prefix]"` or a glob."""
    cls = types.new_class(
        "".join(w.title() for w in name.split("_")), (ImageTextRecords,),
        {"skip_registration": True}, lambda ns: ns.update(name=name))
    builder = cls(records_by_split=records_by_split, data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m blip2_jax.data.tfds_builder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="blip2_image_text")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--split", action="append", required=True,
                   help="SPLIT=DIR[:prefix] or SPLIT=GLOB; repeat for several splits")
    a = p.parse_args(argv)
    splits = dict(s.split("=", 1) for s in a.split)
    prepare_tfds(splits, a.data_dir, a.name)


if __name__ == "__main__":
    main()
