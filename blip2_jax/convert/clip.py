"""CLIP ViT-L/14 (Hugging Face `CLIPVisionModel` / `CLIPModel` directories) as BLIP-2's frozen encoder.

LAVIS's `create_clip_vit_L` builds 23 of CLIP-L's 24 blocks (the penultimate layer's output) and no
final norm; in Hugging Face terms that is `CLIPVisionModel(..., output_hidden_states=True)
.hidden_states[-2]`. Our `VisionTransformer` with `VisionConfig(style="clip", num_layers=L - 1)` is
that computation.

HF keys (relative to a prefix: none in files transformers 5.x writes for `CLIPVisionModel`,
`vision_model.` in 4.x `CLIPVisionModel` files and in every `CLIPModel` file):
`embeddings.patch_embedding.weight` (no bias), `embeddings.class_embedding` [D],
`embeddings.position_embedding.weight` [N, D], `pre_layrnorm.*` (sic),
`encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.*`.

Present in the file but unused (documented ignore patterns, `ignore_patterns`): the last encoder
layer, `post_layernorm.*`, `position_ids`, and in a `CLIPModel` file the text tower and the two
projections (`text_model.*`, `text_projection.*`, `visual_projection.*`, `logit_scale`).

Position embeddings are resized for other image sizes by `VisionTransformer` as Hugging Face's
`interpolate_pos_encoding` does (bicubic, align_corners=False); LAVIS's CLIP path uses
align_corners=True, which differs slightly at 364 px.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from blip2_jax.convert import standalone
from blip2_jax.convert.hf_io import CheckpointError, CheckpointReader
from blip2_jax.convert.merge import merge_params
from blip2_jax.convert.rules import CONV, Rule, layer_norm, linear, prefixed, reshape, stack_rules
from blip2_jax.models.vit import VisionConfig, VisionTransformer, layer_stacks

_CLIP_MODEL_EXTRAS = (r"text_model\..*", r"text_projection\..*", r"visual_projection\..*", r"logit_scale")


def vision_config_from_hf(d: dict, **overrides) -> VisionConfig:
    """Our `VisionConfig` for a HF CLIP vision config dict (or a `CLIPModel` config with
    `vision_config`): `style="clip"`, `num_layers = num_hidden_layers - 1` (the penultimate layer)."""
    d = d.get("vision_config", d)
    layers = d.get("num_hidden_layers", 24)
    if layers < 2:
        raise CheckpointError(f"CLIP vision config: num_hidden_layers={layers}; BLIP-2 uses the penultimate "
                              "layer, so at least 2 are needed")
    kwargs = dict(style="clip", hidden_size=d.get("hidden_size", 1024),
                  intermediate_size=d.get("intermediate_size", 4096), num_layers=layers - 1,
                  num_heads=d.get("num_attention_heads", 16), image_size=d.get("image_size", 224),
                  patch_size=d.get("patch_size", 14), layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                  hidden_act=d.get("hidden_act", "quick_gelu"), attention_dropout=d.get("attention_dropout", 0.0))
    return VisionConfig(**{**kwargs, **overrides})


def rules(config: VisionConfig, hf_prefix: str = "") -> list[Rule]:
    """Every parameter of `VisionTransformer(config)` (clip style) with its HF key (`hf_prefix` + key)."""
    if config.style != "clip":
        raise ValueError(f"convert.clip.rules needs VisionConfig(style='clip'), got style={config.style!r}")
    d = config.hidden_size
    out = [
        Rule("embeddings.class_embedding", ("embeddings", "class_embedding")),
        Rule("embeddings.patch_embedding.weight", ("embeddings", "patch_kernel"), CONV),
        Rule("embeddings.position_embedding.weight", ("embeddings", "position_embedding"),
             reshape((1, config.num_positions, d), (config.num_positions, d))),
    ]
    out += layer_norm("pre_layrnorm", ("pre_layernorm",))
    for i in range(config.num_layers):
        hf, ours = f"encoder.layers.{i}.", (f"layers_{i}",)
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
            out += linear(f"{hf}self_attn.{proj}", ours + ("attention", name))
        out += layer_norm(hf + "layer_norm1", ours + ("norm1",))
        out += layer_norm(hf + "layer_norm2", ours + ("norm2",))
        out += linear(hf + "mlp.fc1", ours + ("fc1",))
        out += linear(hf + "mlp.fc2", ours + ("fc2",))
    return prefixed(stack_rules(out, layer_stacks(config)), hf_prefix)


def ignore_patterns(config: VisionConfig, hf_prefix: str = "") -> tuple[str, ...]:
    """Keys of a CLIP file that BLIP-2 does not use: the last layer, `post_layernorm`, buffers,
    and (in a `CLIPModel` file) the text tower and projections."""
    p = re.escape(hf_prefix)
    return (rf"{p}encoder\.layers\.{config.num_layers}\..*", rf"{p}post_layernorm\..*", r".*position_ids",
            *_CLIP_MODEL_EXTRAS)


def detect_prefix(keys) -> str:
    """`"vision_model."` or `""`, whichever the file's class embedding sits under."""
    return standalone.detect_prefix(keys, "embeddings.class_embedding", ("", "vision_model."), "CLIP vision tower")


def load(path: str, dtype=jnp.float32, **overrides) -> tuple[VisionTransformer, dict]:
    """A HF `CLIPVisionModel` or `CLIPModel` directory -> `(VisionTransformer, params)`.

    The model computes `hidden_states[-2]` of the HF model (LAVIS's frozen CLIP ViT-L). `dtype` is
    the storage and compute dtype; `overrides` go to `VisionConfig` (e.g. `remat=True`). Place the
    params under `params["vision"]` of a stage-1 tree built with the same `VisionConfig`.
    Missing or unexpected keys raise `CheckpointError` listing both.
    """
    with CheckpointReader(path) as reader:
        config = vision_config_from_hf(reader.config, dtype=dtype, param_dtype=dtype, **overrides)
        prefix = detect_prefix(reader.keys())
        params = standalone.read_params(reader, rules(config, prefix), ignore=ignore_patterns(config, prefix),
                                        dtype=dtype)
    return VisionTransformer(config), jax.tree.map(jnp.asarray, params)


def check_matches(config: VisionConfig, expected: VisionConfig) -> None:
    """Fail, naming the fields, when a loaded tower's architecture differs from the one a model expects."""
    fields = ("style", "hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size",
              "layer_norm_eps", "hidden_act")
    diff = [f"{f}: checkpoint {getattr(config, f)!r} != model {getattr(expected, f)!r}" for f in fields
            if getattr(config, f) != getattr(expected, f)]
    if diff:
        raise CheckpointError("CLIP vision tower does not match the model's VisionConfig: " + "; ".join(diff))


def with_vision(params: dict, vision_params: dict) -> dict:
    """A copy of a BLIP-2 tree with `vision` replaced (paths and shapes checked, dtypes kept)."""
    return {**params, "vision": merge_params(params["vision"], vision_params, source="CLIP vision tower")}


__all__ = ["vision_config_from_hf", "rules", "ignore_patterns", "detect_prefix", "load", "check_matches",
           "with_vision"]
