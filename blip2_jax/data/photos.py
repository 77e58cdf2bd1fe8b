"""A tiny offline dataset of real photographs (from scikit-image) with hand-written captions.

    python -m blip2_jax.data.photos --out /tmp/photos

writes `photos-00000-of-00001.array_record` (JPEG quality 95, the same record format as
`blip2_jax.data.build`) for smoke tests and notebooks. Needs scikit-image, imported only here.
"""
from __future__ import annotations

import argparse
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from blip2_jax.data import records

# skimage.data function name -> captions written by looking at the pictures.
CAPTIONS = {
    "astronaut": ("a smiling astronaut in an orange spacesuit in front of an american flag",
                  "portrait of a woman astronaut holding a helmet next to a model space shuttle"),
    "coffee": ("a red cup of coffee on a saucer with a spoon on a wooden table",),
    "chelsea": ("a close up of a tabby cat with green eyes",
                "the face of a brown striped cat"),
    "rocket": ("a rocket on a launch pad at dusk between tall towers",),
    "stereo_motorcycle": ("a red motorcycle parked in a garage",),
    "hubble_deep_field": ("a deep field image of many galaxies in black space",),
}


def _image(name: str) -> np.ndarray:
    import skimage.data  # Test/notebook dependency; kept out of the rest of the package.

    im = getattr(skimage.data, name)()
    return im[0] if isinstance(im, tuple) else im  # stereo_motorcycle: (left, right, disparity)


def photo_records() -> list[records.ImageText]:
    out = []
    for name, caps in CAPTIONS.items():
        buf = io.BytesIO()
        Image.fromarray(_image(name)[..., :3]).convert("RGB").save(buf, format="JPEG", quality=95)
        out.append(records.ImageText(buf.getvalue(), caps, name, "skimage", "JPEG"))
    return out


def generate(out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, records.shard_name("photos", 0, 1))
    records.write_shard(path, photo_records())
    return path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m blip2_jax.data.photos", description=__doc__)
    p.add_argument("--out", required=True)
    print(generate(p.parse_args(argv).out))


if __name__ == "__main__":
    main()
