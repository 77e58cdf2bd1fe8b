"""LAVIS BLIP-2 `.pth` checkpoints -> Hugging Face-layout safetensors directories.

    python -m blip2_jax.convert.lavis --checkpoint blip2_pretrained.pth --out DIR [--kind stage1|opt|t5]
        [--vision BLIP2_HF_DIR] [--language-model HF_LLM_DIR] [--vision-heads N] [--qformer-heads N]
        [--dtype float32|bfloat16|float16]

Output format (the design decision): `DIR` is a Hugging Face BLIP-2 directory, `config.json` +
`model.safetensors`, exactly what `blip2_jax.from_pretrained` and transformers 5.x load:
- `stage1` -> `Blip2ForImageTextRetrieval` (ViT, `ln_vision` as `vision_model.post_layernorm`,
  query tokens, the Q-Former with its text embeddings and text FFNs, ITC projections, ITM head);
  plus `DIR/lavis_extra.safetensors` with what HF's layout lacks, under LAVIS's own key names:
  `temp` and the ITG head `Qformer.cls.predictions.{transform.dense, transform.LayerNorm, bias}`.
  `load_stage1(DIR)` returns our full stage-1 model and tree (heads, temperature and LAVIS's
  `ln_vision` eps of 1e-5 included); `from_pretrained(DIR)` gives the HF semantics (no ITG head,
  fresh temperature, `ln_vision` eps = the vision config's 1e-6).
- `opt` / `t5` -> `Blip2ForConditionalGeneration`; load it with `from_pretrained(DIR)`.

Key map (LAVIS -> ours; the same as transformers' `convert_blip_2_original_to_pytorch.py`):
`visual_encoder.{cls_token, pos_embed, patch_embed.proj}`, `visual_encoder.blocks.{i}.{norm1, norm2,
attn.qkv.weight (fused q|k|v), attn.q_bias, attn.v_bias (no k bias), attn.proj, mlp.fc1, mlp.fc2}`;
`ln_vision`; `query_tokens`; `Qformer.bert.embeddings.{LayerNorm, word_embeddings, position_embeddings}`;
`Qformer.bert.encoder.layer.{i}.{attention, crossattention}.{self.{query,key,value}, output.{dense,
LayerNorm}}` (HF renames `self` to `attention`), `.intermediate(_query).dense`, `.output(_query).{dense,
LayerNorm}`; `Qformer.cls.predictions.*` (ITG head, decoder tied to the word embeddings); `temp`,
`vision_proj`, `text_proj`, `itm_head`; `opt_proj` / `t5_proj`; `opt_model.*` / `t5_model.*` (the HF
LLM's own keys). Ignored: `Qformer.bert.embeddings.position_ids` and the tied
`Qformer.cls.predictions.decoder.{weight,bias}` (checked equal to what they are tied to).

What a `.pth` lacks comes from Hugging Face directories: LAVIS saves only trainable parameters, so
its released files may hold no frozen ViT (`visual_encoder.*`) and no LLM (`opt_model.*`,
`t5_model.*`). `--vision DIR` takes the EVA tower (`vision_model.*` minus `post_layernorm`) from
any HF BLIP-2 directory (all BLIP-2 models share the frozen EVA-CLIP-g); `--language-model DIR` (an
`OPTForCausalLM` / `T5ForConditionalGeneration` directory) gives the LLM config (required for
opt/t5: a `.pth` has no config) and its weights when the `.pth` has none. For T5, LAVIS (and the HF
converter) set `dense_act_fn="gelu"`; so does this converter. `load_vision_from_blip2(dir)` alone
gives that frozen EVA tower (the stage-1 vision initialisation) without reading the rest.

Sizes are inferred from tensor shapes; head counts cannot be, so they come from the usual widths
(EVA 1408 -> 16 heads, Q-Former 768 -> 12) or `--vision-heads` / `--qformer-heads`. Only the EVA
tower is handled (LAVIS's CLIP ViT-L variant `pretrain_vitL` is refused with a message).

torch is needed only here, imported inside `read_state_dict` (`torch.load(weights_only=True)`, which
executes no pickled code); it is a test-only dependency of the project.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Callable, Mapping, Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from blip2_jax.convert import blip2 as hf_blip2
from blip2_jax.convert.hf_io import CheckpointError, CheckpointReader, SafetensorsFile, write_safetensors
from blip2_jax.convert.merge import merge_params
from blip2_jax.convert.rules import (CONV, IDENTITY, LINEAR, Rule, check_keys, layer_norm, linear, load_rules,
                                     prefixed, reshape, save_rules, stack_rules)
from blip2_jax.models import vit as vit_model
from blip2_jax.models.blip2 import Blip2Config, Blip2Stage1, abstract_params
from blip2_jax.models.qformer import QFormerConfig
from blip2_jax.models.vit import VisionConfig

EXTRA_FILE = "lavis_extra.safetensors"
LAVIS_LN_VISION_EPS = 1e-5  # LAVIS's ln_vision: torch's default eps (HF configs say 1e-6)
KNOWN_HEADS = {"vision": {1408: 16, 1024: 16}, "qformer": {768: 12}}
IGNORED = (r"Qformer\.bert\.embeddings\.position_ids", r"Qformer\.cls\.predictions\.decoder\.(weight|bias)")
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_LLM_PREFIX = {"opt": "opt_model.", "t5": "t5_model."}


# -- reading --------------------------------------------------------------------------------------
def read_state_dict(path: str) -> dict:
    """The state dict of a LAVIS `.pth` (its `"model"` entry when there is one), torch tensors."""
    import torch  # test-only dependency: needed by this converter alone

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (or a dict with 'model'), got {type(obj).__name__}")
    return dict(obj)


def _numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    import torch

    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()


def _getter(state: Mapping) -> Callable[[str], np.ndarray]:
    return lambda key: _numpy(state[key])


# -- configs from shapes --------------------------------------------------------------------------
def detect_kind(keys) -> str:
    keys = set(keys)
    if "opt_proj.weight" in keys:
        return "opt"
    if "t5_proj.weight" in keys:
        return "t5"
    return "stage1"


def _heads(kind: str, width: int, given: Optional[int]) -> int:
    heads = given or KNOWN_HEADS[kind].get(width)
    if heads is None:
        raise CheckpointError(f"cannot infer the {kind} head count for width {width}: pass --{kind}-heads")
    return heads


def vision_config_from_state(shape: Callable[[str], tuple], num_blocks: int, heads: Optional[int]) -> VisionConfig:
    """The EVA tower a LAVIS state dict holds (`shape(key)` gives tensor shapes)."""
    d = shape("visual_encoder.cls_token")[-1]
    patch = shape("visual_encoder.patch_embed.proj.weight")[-1]
    grid = int(round((shape("visual_encoder.pos_embed")[1] - 1) ** 0.5))
    mlp = shape("visual_encoder.blocks.0.mlp.fc1.weight")[0]
    return VisionConfig(style="eva", hidden_size=d, intermediate_size=mlp,
                        num_layers=num_blocks, num_heads=_heads("vision", d, heads), image_size=grid * patch,
                        patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")


def qformer_config_from_state(keys: set, shape: Callable[[str], tuple], heads: Optional[int]) -> QFormerConfig:
    b = "Qformer.bert."
    layers = _count(keys, rf"{re.escape(b)}encoder\.layer\.(\d+)\.")
    cross = [i for i in range(layers) if f"{b}encoder.layer.{i}.crossattention.self.key.weight" in keys]
    freq = cross[1] - cross[0] if len(cross) > 1 else max(layers, 1)
    if not cross or cross[0] != 0 or cross != list(range(0, layers, freq)):
        raise CheckpointError(f"Q-Former cross-attention in layers {cross}: not every k-th layer from 0")
    d = shape(f"{b}embeddings.LayerNorm.weight")[0]
    text = f"{b}embeddings.word_embeddings.weight" in keys
    extra = {}
    if text:
        extra = dict(vocab_size=shape(f"{b}embeddings.word_embeddings.weight")[0],
                     max_position_embeddings=shape(f"{b}embeddings.position_embeddings.weight")[0])
    return QFormerConfig(hidden_size=d, num_layers=layers, num_heads=_heads("qformer", d, heads),
                         intermediate_size=shape(f"{b}encoder.layer.0.intermediate_query.dense.weight")[0],
                         cross_attention_frequency=freq,
                         encoder_hidden_size=shape(f"{b}encoder.layer.0.crossattention.self.key.weight")[1],
                         num_query_tokens=shape("query_tokens")[1], use_text_input=text, **extra)


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    if found != set(range(len(found))):
        raise CheckpointError(f"layer indices {sorted(found)} are not 0..n-1 ({pattern})")
    return len(found)


# -- key maps -------------------------------------------------------------------------------------
def vision_rules(c: VisionConfig) -> list[Rule]:
    """LAVIS `visual_encoder.*` (EVA ViT) <-> our `vision/...`."""
    d = c.hidden_size
    rs = [Rule("cls_token", ("embeddings", "class_embedding"), reshape((d,), (1, 1, d))),
          Rule("pos_embed", ("embeddings", "position_embedding")),
          Rule("patch_embed.proj.weight", ("embeddings", "patch_kernel"), CONV),
          Rule("patch_embed.proj.bias", ("embeddings", "patch_bias"))]
    for i in range(c.num_layers):
        hf, ours = f"blocks.{i}.", (f"layers_{i}",)
        attn = ours + ("attention",)
        for j, name in enumerate(("query", "key", "value")):
            rs.append(Rule(hf + "attn.qkv.weight", attn + (name, "kernel"), LINEAR, (j, 3)))
        rs.append(Rule(hf + "attn.q_bias", attn + ("query", "bias"), IDENTITY))
        rs.append(Rule(hf + "attn.v_bias", attn + ("value", "bias"), IDENTITY))
        rs += linear(hf + "attn.proj", attn + ("out",))
        rs += layer_norm(hf + "norm1", ours + ("norm1",))
        rs += layer_norm(hf + "norm2", ours + ("norm2",))
        rs += linear(hf + "mlp.fc1", ours + ("fc1",))
        rs += linear(hf + "mlp.fc2", ours + ("fc2",))
    return prefixed(stack_rules(rs, vit_model.layer_stacks(c)), "visual_encoder.", ("vision",))


def qformer_rules(c: QFormerConfig) -> list[Rule]:
    """LAVIS `Qformer.bert.*` <-> our `qformer/...`: the HF map (convert/blip2.py) under LAVIS's names,
    i.e. the inverse of the renames HF's converter applies."""
    return [r.renamed(_lavis_qformer_key) for r in hf_blip2.qformer_rules(c)]


def _lavis_qformer_key(hf_key: str) -> str:
    if hf_key.startswith("qformer.layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + hf_key[len("qformer.layernorm."):]
    if hf_key.startswith("embeddings."):
        return "Qformer.bert." + hf_key
    key = "Qformer.bert." + hf_key[len("qformer."):]
    return key.replace(".attention.attention.", ".attention.self.").replace(
        ".crossattention.attention.", ".crossattention.self.")


def extra_rules(with_lm_head: bool = True) -> list[Rule]:
    """What HF's retrieval layout lacks, under LAVIS names: the temperature and the ITG head."""
    # LAVIS's temp is 0-d; safetensors writers store it as [1] (numpy's contiguous copy is at least 1-d).
    rs = [Rule("temp", ("temp",), reshape((), (1,)))]
    if with_lm_head:
        p = "Qformer.cls.predictions."
        rs += linear(p + "transform.dense", ("lm_transform",))
        rs += layer_norm(p + "transform.LayerNorm", ("lm_transform_ln",))
        rs.append(Rule(p + "bias", ("lm_bias",)))
    return rs


def llm_rules(text_config, prefix: str) -> list[Rule]:
    return prefixed(hf_blip2.text_converter(text_config).rules(text_config, hf_prefix=prefix), "", ("language_model",))


def rules(config: Blip2Config, kind: str, *, vision: bool = True, llm: bool = True) -> list[Rule]:
    """Every LAVIS key of a `kind` checkpoint with its place in our tree (`vision` / `llm`: whether the
    file holds those towers)."""
    rs = vision_rules(config.vision) if vision else []
    rs += layer_norm("ln_vision", ("ln_vision",)) + [Rule("query_tokens", ("query_tokens",))]
    rs += qformer_rules(config.qformer)
    if kind == "stage1":
        rs += linear("vision_proj", ("vision_proj",)) + linear("text_proj", ("text_proj",))
        rs += linear("itm_head", ("itm_head",))
        rs += extra_rules(config.with_lm_head)
    else:
        rs += linear(f"{kind}_proj", ("language_projection",))
        if llm:
            rs += llm_rules(config.text, _LLM_PREFIX[kind])
    return rs


# -- conversion -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Converted:
    config: Blip2Config
    params: dict  # our tree, numpy
    kind: str


def convert_state_dict(state: Mapping, *, kind: Optional[str] = None, vision_dir: Optional[str] = None,
                       language_model_dir: Optional[str] = None, vision_heads: Optional[int] = None,
                       qformer_heads: Optional[int] = None, dtype=np.float32, source: str = "checkpoint") -> Converted:
    """A LAVIS state dict (name -> torch tensor or numpy array) -> our config and parameter tree."""
    keys = set(state)
    kind = kind or detect_kind(keys)
    if kind not in ("stage1", "opt", "t5"):
        raise ValueError(f"kind must be stage1, opt or t5, got {kind!r}")
    if any(k.startswith(("visual_encoder.conv1", "visual_encoder.transformer.")) for k in keys):
        raise CheckpointError(f"{source}: a CLIP ViT-L visual encoder (LAVIS pretrain_vitL); this converter handles "
                              "the EVA ViT-g checkpoints only")
    shape = lambda k: tuple(state[k].shape)  # noqa: E731
    get = _getter(state)
    dtype = np.dtype(dtype)
    has_vision = "visual_encoder.cls_token" in keys
    if has_vision:
        blocks = _count(keys, r"visual_encoder\.blocks\.(\d+)\.")
        vision = vision_config_from_state(shape, blocks, vision_heads)
    elif vision_dir:
        vision, vision_params = load_vision_from_blip2(vision_dir, dtype=dtype)
    else:
        raise CheckpointError(f"{source}: no visual_encoder.* tensors (LAVIS saves only trainable weights); pass "
                              "--vision with a Hugging Face BLIP-2 directory to take the frozen EVA ViT from")
    qformer = qformer_config_from_state(keys, shape, qformer_heads)
    text, llm_in_file, llm_reader = None, False, None
    if kind != "stage1":
        if not language_model_dir:
            raise CheckpointError(f"{source}: a {kind} checkpoint needs --language-model (an HF {kind.upper()} "
                                  "directory: its config.json, and its weights if the .pth has none)")
        llm_reader = CheckpointReader(language_model_dir)
        text_dict = dict(llm_reader.config)
        if kind == "t5":
            text_dict["dense_act_fn"] = "gelu"  # as LAVIS's blip2_t5 and the HF converter set it
        prefix = _LLM_PREFIX[kind]
        llm_in_file = any(k.startswith(prefix) for k in keys)
        if llm_in_file:
            keys = _drop_tied_head(keys, get, prefix, kind)
            text_keys = [k for k in keys if k.startswith(prefix)]
        else:
            prefix, text_keys = "", llm_reader.keys()
        text = hf_blip2.text_converter(text_dict).config_for_checkpoint(text_dict, text_keys, hf_prefix=prefix)
    with_head = kind == "stage1" and "Qformer.cls.predictions.bias" in keys
    config = Blip2Config(vision=vision, qformer=qformer, text=text, num_query_tokens=qformer.num_query_tokens,
                         image_text_hidden_size=shape("vision_proj.weight")[0] if kind == "stage1" else 256,
                         ln_vision_eps=LAVIS_LN_VISION_EPS, with_lm_head=with_head)
    rs = rules(config, kind, vision=has_vision, llm=llm_in_file)
    ignore = IGNORED + (() if kind == "stage1" else
                        tuple(hf_blip2.text_converter(text).ignore_patterns(_LLM_PREFIX[kind])))
    check_keys(rs, keys, ignore=ignore, source=source)
    if with_head:
        _check_tied(get, "Qformer.cls.predictions.decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight",
                    keys, source)
        _check_tied(get, "Qformer.cls.predictions.decoder.bias", "Qformer.cls.predictions.bias", keys, source)
    params = load_rules(get, rs, dtype=dtype, source=source)
    if not has_vision:
        params["vision"] = vision_params
    if llm_reader is not None:
        with llm_reader:
            if not llm_in_file:
                lr = llm_rules(text, "")
                check_keys(lr, llm_reader.keys(), ignore=hf_blip2.text_converter(text).ignore_patterns(""),
                           source=language_model_dir)
                params = _union(params, load_rules(llm_reader.get, lr, dtype=dtype, source=language_model_dir))
    return Converted(config, params, kind)


def load_vision_from_blip2(path: str, dtype=np.float32) -> tuple[VisionConfig, dict]:
    """The frozen EVA ViT-g of any Hugging Face BLIP-2 directory: `(VisionConfig, params)` for
    `VisionTransformer` (`vision_model.*` without `post_layernorm`, which is the trainable `ln_vision`).
    Only the vision tensors are read, so an OPT-6.7B or FlanT5-XXL directory costs no more than the ViT."""
    with CheckpointReader(path) as reader:
        if "vision_config" not in reader.config:
            raise CheckpointError(f"{path}: config.json has no vision_config (not a BLIP-2 directory)")
        config = hf_blip2.vision_config_from_hf(reader.config["vision_config"])
        params = load_rules(reader.get, hf_blip2.vision_rules(config, ln_vision=False), dtype=np.dtype(dtype),
                            source=path)
    return config, params["vision"]


def _drop_tied_head(keys: set, get, prefix: str, kind: str) -> set:
    """A torch state dict lists a tied `lm_head.weight` too: leave it out when it equals its embedding."""
    tied_to = {"opt": "model.decoder.embed_tokens.weight", "t5": "shared.weight"}[kind]
    head, emb = prefix + "lm_head.weight", prefix + tied_to
    if head in keys and emb in keys and np.array_equal(get(head), get(emb)):
        return keys - {head}
    return keys


def _check_tied(get, key: str, tied_to: str, keys: set, source: str) -> None:
    if key in keys and not np.array_equal(get(key), get(tied_to)):
        raise CheckpointError(f"{source}: {key} differs from {tied_to}, to which the ITG head is tied")


def _union(tree: dict, more: dict) -> dict:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(tree), **traverse_util.flatten_dict(more)})


# -- writing and loading --------------------------------------------------------------------------
def write(converted: Converted, out: str, *, dtype=np.float32) -> None:
    """`out/config.json` + `out/model.safetensors` (HF layout), and for stage 1 `out/lavis_extra.safetensors`."""
    config, params = converted.config, converted.params
    if converted.kind == "stage1" and not config.qformer.use_text_input:
        raise CheckpointError("a stage-1 checkpoint without Qformer.bert.embeddings.word_embeddings (no text path) "
                              "has no Hugging Face retrieval layout")
    os.makedirs(out, exist_ok=True)
    extras = extra_rules(config.with_lm_head) if converted.kind == "stage1" else []
    extra_paths = {r.path[0] for r in extras}
    hf_params = {k: v for k, v in params.items() if k not in extra_paths}
    tensors = save_rules(hf_params, hf_blip2.rules(dataclasses.replace(config, with_lm_head=False)), dtype=dtype)
    hf_config = hf_blip2.config_to_hf(config)
    hf_config["torch_dtype"] = np.dtype(dtype).name
    hf_config["blip2_jax_source"] = "LAVIS"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    write_safetensors(os.path.join(out, "model.safetensors"), tensors)
    if extras:
        extra = save_rules({k: v for k, v in params.items() if k in extra_paths}, extras, dtype=np.float32)
        write_safetensors(os.path.join(out, EXTRA_FILE), extra,
                          metadata={"format": "pt", "source": "LAVIS", "ln_vision_eps": str(LAVIS_LN_VISION_EPS)})


def convert_file(checkpoint: str, out: str, *, dtype: str = "float32", **kwargs) -> Converted:
    """Read a LAVIS `.pth` and write `out` (see the module docstring). Returns what was written."""
    state = read_state_dict(checkpoint)
    converted = convert_state_dict(state, source=checkpoint, dtype=_DTYPES[dtype], **kwargs)
    write(converted, out, dtype=_DTYPES[dtype])
    return converted


def load_stage1(path: str, *, dtype=jnp.float32, frozen_dtype=None, ln_vision_eps: float = LAVIS_LN_VISION_EPS):
    """`(Blip2Stage1, params)` for a directory `convert_file` wrote from a stage-1 checkpoint: the HF
    layout plus `lavis_extra.safetensors` (temperature, ITG head). Without that file (a plain HF
    retrieval directory) the temperature starts at its init and the model has no ITG head.
    `ln_vision_eps` defaults to LAVIS's 1e-5."""
    extra_file = os.path.join(path, EXTRA_FILE)
    extra = SafetensorsFile(extra_file) if os.path.exists(extra_file) else None
    try:
        with CheckpointReader(path) as reader:
            config = hf_blip2.config_from_hf(reader.config, reader.keys(), dtype=dtype, frozen_dtype=frozen_dtype)
            if config.text is not None:
                raise CheckpointError(f"{path}: a generation (stage-2) checkpoint; use blip2_jax.from_pretrained")
            with_head = extra is not None and "Qformer.cls.predictions.bias" in extra.keys()
            config = dataclasses.replace(config, ln_vision_eps=ln_vision_eps, with_lm_head=with_head)
            rs = hf_blip2.rules(config)
            check_keys(rs, reader.keys(), ignore=hf_blip2.IGNORED_HF_KEYS, source=path)
            tree = load_rules(reader.get, rs, source=path)
        if extra is not None:
            ers = extra_rules(with_head)
            check_keys(ers, extra.keys(), source=extra_file)
            tree = _union(tree, load_rules(extra.get, ers, source=extra_file))
        else:
            tree["temp"] = np.float32(config.temperature_init)
    finally:
        if extra is not None:
            extra.close()
    model = Blip2Stage1(config)
    return model, merge_params(abstract_params(model), tree, source=path)


# -- command line ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m blip2_jax.convert.lavis",
        description="Convert a LAVIS BLIP-2 .pth checkpoint to a Hugging Face-layout safetensors directory that "
                    "blip2_jax.from_pretrained (and, for stage 1, blip2_jax.convert.lavis.load_stage1) reads. "
                    "Reads the .pth with torch.load(weights_only=True): this command needs torch, which is "
                    "otherwise only a test dependency of blip2_jax (pip install -r requirements-test.txt).")
    p.add_argument("--checkpoint", required=True, help="LAVIS .pth file (a state dict, or a dict with 'model')")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--kind", choices=("stage1", "opt", "t5"), default=None,
                   help="checkpoint kind (default: opt/t5 when opt_proj/t5_proj is present, else stage1)")
    p.add_argument("--vision", default=None, help="HF BLIP-2 directory to take the frozen EVA ViT from when the "
                                                  ".pth has no visual_encoder.*")
    p.add_argument("--language-model", default=None, help="HF OPTForCausalLM / T5ForConditionalGeneration "
                                                          "directory (config, and weights if the .pth has none)")
    p.add_argument("--vision-heads", type=int, default=None, help="ViT attention heads (default: 16 for width 1408)")
    p.add_argument("--qformer-heads", type=int, default=None, help="Q-Former heads (default: 12 for width 768)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="storage dtype of the output")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    converted = convert_file(args.checkpoint, args.out, dtype=args.dtype, kind=args.kind, vision_dir=args.vision,
                             language_model_dir=args.language_model, vision_heads=args.vision_heads,
                             qformer_heads=args.qformer_heads)
    print(f"{args.checkpoint} ({converted.kind}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
