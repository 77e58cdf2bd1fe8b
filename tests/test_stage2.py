"""Stage 2: loss parity with HF Blip2ForConditionalGeneration (OPT and T5), initialisation from the
pretrained directories, frozen towers untouched by the train loop, and the text-only LM task."""
import dataclasses
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from flax.traverse_util import flatten_dict as flatten
from flax.traverse_util import unflatten_dict

from blip2_jax import checkpoint as checkpoint_lib
from blip2_jax import sharding as sharding_lib
from blip2_jax.spec import model as spec
from blip2_jax.spec import weights
from blip2_jax.train import loop, stage2
from tests import tiny_configs
from tests.toy_task import compile_cache  # noqa: F401  (fixture)
from tests.hf_tiny import torch_pixels

pytestmark = pytest.mark.usefixtures("compile_cache")
B, T = 4, 7  # batch, text length


@pytest.fixture(scope="module", params=["opt", "t5"])
def hf_setup(request, hf_blip2):
    return (request.param,) + hf_blip2(request.param)


def _config(kind, blip2_dir, llm_dir, batch_size=B):
    """The tiny stage-2 config (the sizes of hf_tiny's default BLIP-2, the model in `blip2_dir`), initialised
    from its directories."""
    c = tiny_configs.stage2(kind, batch_size=batch_size)
    c.init.update(vision_checkpoint=blip2_dir, stage1_checkpoint=blip2_dir, llm_checkpoint=llm_dir)
    c.data.text_mode = "opt" if kind == "opt" else "t5_prefix"  # as `_batch` writes them
    c.data.max_text_len = T
    return c


def _batch(kind, hf, rng, batch=B):
    """A batch as the data pipeline writes it (see its module docstring)."""
    size = hf.config.vision_config.image_size
    vocab = hf.config.text_config.vocab_size
    out = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
           "image_id": np.arange(batch, dtype=np.int32)}
    lengths = rng.integers(3, T + 1, size=batch)
    lengths[0] = T
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(4, vocab - 1, size=(batch, T)).astype(np.int32)
    if kind == "opt":
        ids[:, 0] = 2  # BOS
        ids = np.where(mask == 1, ids, 1)  # pad id 1
        labels = np.where(mask == 1, ids, -100)
        labels[:, :2] = -100  # BOS + a one-token prompt
        out.update(input_ids=ids, attention_mask=mask, labels=labels.astype(np.int32))
    else:
        enc_len = rng.integers(2, T + 1, size=batch)
        enc_mask = (np.arange(T)[None] < enc_len[:, None]).astype(np.int32)
        enc = np.where(enc_mask == 1, rng.integers(2, vocab - 1, size=(batch, T)), 0).astype(np.int32)
        target = np.where(mask == 1, ids, 0)
        labels = np.where(mask == 1, ids, -100).astype(np.int32)
        dec_in = np.concatenate([np.zeros((batch, 1), np.int32), target[:, :-1]], 1).astype(np.int32)
        out.update(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec_in,
                   decoder_attention_mask=mask, labels=labels)
    return out


def _hf_loss(kind, hf, batch):
    nq, idx = hf.config.num_query_tokens, hf.config.image_token_index
    ids = torch.from_numpy(batch["input_ids"]).long()
    mask = torch.from_numpy(batch["attention_mask"]).long()
    ids = torch.cat([torch.full((ids.shape[0], nq), idx), ids], 1)  # 5.x: placeholders first
    mask = torch.cat([torch.ones((ids.shape[0], nq), dtype=torch.long), mask], 1)
    labels = torch.from_numpy(batch["labels"]).long()
    kw = {}
    if kind == "opt":  # over the whole input, -100 at the placeholders (text-length labels make
        # transformers 5.24 slice the logits non-contiguously and fail in its loss's .view)
        labels = torch.cat([torch.full((labels.shape[0], nq), -100), labels], 1)
    if kind == "t5":
        kw = dict(decoder_input_ids=torch.from_numpy(batch["decoder_input_ids"]).long(),
                  decoder_attention_mask=torch.from_numpy(batch["decoder_attention_mask"]).long())
    with torch.no_grad():
        return float(hf(pixel_values=torch_pixels(batch["image"]), input_ids=ids, attention_mask=mask,
                        labels=labels, **kw).loss)


def _init_params(task, config, mesh):
    """Frozen and trainable trees as the loop builds them (load_frozen / load_trainable)."""
    rules = sharding_lib.axis_rules(tuple(config.mesh.axis_rules))
    key = jax.random.PRNGKey(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(task.init_frozen, key)
        abstract = sharding_lib.abstract_with_shardings(boxed, sharding_lib.logical_shardings(boxed, mesh, rules))
        frozen = task.load_frozen(abstract)
        fresh, _ = sharding_lib.create_sharded(task.init_trainable, key, mesh, rules)
        trainable = task.load_trainable(fresh)
    return trainable, frozen, fresh


def _hf_projection(hf):
    w = hf.language_projection.weight.detach().numpy()
    return {"kernel": w.T.copy(), "bias": hf.language_projection.bias.detach().numpy()}


def test_loss_parity_with_hf(hf_setup):
    kind, hf, blip2_dir, llm_dir = hf_setup
    config = _config(kind, blip2_dir, llm_dir)
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
    task = stage2.make_task(config, mesh)
    trainable, frozen, fresh = _init_params(task, config, mesh)
    # The projection starts fresh (only the query path comes from the checkpoint)...
    np.testing.assert_array_equal(np.asarray(trainable["language_projection"]["kernel"]),
                                  np.asarray(fresh["language_projection"]["kernel"]))
    # ... so give it HF's to compare losses.
    trainable = {**trainable, "language_projection": _hf_projection(hf)}
    batch = _batch(kind, hf, np.random.default_rng(0))
    loss_fn = jax.jit(task.loss_fn, static_argnums=4)
    with jax.set_mesh(mesh):
        ours, metrics = loss_fn(trainable, frozen, batch, jax.random.PRNGKey(0), False)
    ref = _hf_loss(kind, hf, batch)
    assert abs(float(ours) - ref) <= 1e-5, (float(ours), ref)
    print(f"{kind}: ours {float(ours):.7f} HF {ref:.7f} |diff| {abs(float(ours) - ref):.2e}")
    assert 0.0 <= float(metrics["token_accuracy"]) <= 1.0


class _Batches:
    """In-memory data iterator (batch i is a function of i) with the loop's get/set_state protocol."""

    def __init__(self, kind, hf, batch_size):
        self.kind, self.hf, self.batch_size, self.index = kind, hf, batch_size, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.index += 1
        return _batch(self.kind, self.hf, np.random.default_rng(self.index), self.batch_size)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def test_training_keeps_frozen_towers_and_optimizer_state_trainable_only(hf_setup, tmp_path):
    kind, hf, blip2_dir, llm_dir = hf_setup
    config = _config(kind, blip2_dir, llm_dir, batch_size=8)
    config.train.update(total_steps=3, log_every=1, checkpoint_every=0, async_checkpointing=False)
    config.optimizer.update(peak_lr=1e-3, warmup_steps=1, warmup_lr=1e-3, min_lr=1e-3)
    config.mesh.update(data=1, fsdp=2)  # parameters sharded: the frozen trees must survive that too
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:2])
    task = stage2.make_task(config, mesh)
    before_trainable, before_frozen, _ = _init_params(task, config, mesh)
    before_frozen = jax.tree.map(np.asarray, before_frozen)
    before_trainable = jax.tree.map(np.asarray, before_trainable)
    seen = {}

    def record(trainable, frozen, step):
        seen["frozen"] = jax.tree.map(np.asarray, frozen)
        seen["trainable"] = jax.tree.map(np.asarray, trainable)
        return {}

    out = loop.train(config, dataclasses.replace(task, evaluate=record), lambda: _Batches(kind, hf, 8),
                     str(tmp_path), mesh=mesh)
    assert out["step"] == 3 and np.isfinite(out["loss"])
    # The frozen towers are bit-identical to what was loaded (and bf16-free here: float32 config).
    assert sorted(seen["frozen"]) == ["language_model", "vision"]
    for path, value in flatten(before_frozen).items():
        np.testing.assert_array_equal(flatten(seen["frozen"])[path], value, err_msg=".".join(path))
    # Every trainable part moved: gradients flow through the frozen LLM into the projection and the
    # Q-Former (its first layer included), and into the queries and ln_vision.
    after = flatten(seen["trainable"])
    for prefix in [("language_projection",), ("qformer", "layer_0"), ("query_tokens",), ("ln_vision",)]:
        moved = [not np.array_equal(after[p], v) for p, v in flatten(before_trainable).items()
                 if p[:len(prefix)] == prefix]
        assert moved and all(moved), prefix
    # The checkpoint's optimizer state mirrors the trainable tree only.
    _, params = checkpoint_lib.latest_params(str(tmp_path))
    state = _checkpoint_state(tmp_path)
    opt_paths = [p for p in _key_paths(state["opt_state"])]
    assert opt_paths and not any(k in ("vision", "language_model") for p in opt_paths for k in p)
    assert set(flatten(params)) == set(flatten(before_trainable))
    n_trainable = len(flatten(before_trainable))
    assert sum(1 for p in opt_paths if "mu" in p) == n_trainable


def _checkpoint_state(workdir):
    import orbax.checkpoint as ocp
    directory = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
    path = os.path.join(directory, str(step), "state")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        return ckptr.metadata(path).item_metadata


def _key_paths(tree):
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append(tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path))
    return out


# -- the demo path: text-only LM -> HF dir -> stage 2 from a stage-1 workdir ----------------------
def test_text_lm_lowers_the_caption_loss_and_exports_an_hf_model(text_lm_run):
    from transformers import AutoTokenizer, OPTForCausalLM
    from blip2_jax.convert import opt as opt_conv
    _, out, workdir = text_lm_run
    tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "hf"))
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    # A fresh LM is near uniform (log V); 30 steps must take most of that away, on held-out text too.
    uniform = np.log(len(tok))
    assert losses[0] > 0.7 * uniform and losses[-1] < 0.45 * uniform, (losses, uniform)
    assert out["heldout_lm_loss"] < 0.45 * uniform
    # The export: transformers loads it and computes our logits; "\n" is one token and the EOS.
    hf = OPTForCausalLM.from_pretrained(os.path.join(workdir, "hf")).eval()
    ids = tok("a photo of a small red circle left of a large blue square\n", return_tensors="np").input_ids
    assert hf.config.eos_token_id == ids[0, -1] == tok.convert_tokens_to_ids("Ċ")
    model, params = opt_conv.load(os.path.join(workdir, "hf"))
    ours = np.asarray(model.apply({"params": params}, input_ids=ids)[0])
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_stage2_demo_config_from_stage1_workdir_and_text_lm(text_lm_run, tmp_path):
    """configs/stage2.py:demo_opt with the text-LM export and a stage-1 workdir checkpoint: the
    query path comes from the workdir (text parts dropped), the projection is fresh, the pipeline's
    batches run through the loss."""
    lm_config, _, workdir = text_lm_run
    c = tiny_configs.load("stage2", "demo_opt")
    c.init.llm_checkpoint = c.data.tokenizer_path = os.path.join(workdir, "hf")
    c.init.stage1_checkpoint = str(tmp_path / "stage1")
    c.data.train_sources.shapes.path = lm_config.data.train_sources.shapes.path
    c.train.batch_size = c.data.global_batch_size = 4
    mesh = sharding_lib.make_mesh(c.mesh, jax.devices()[:1])
    task = stage2.make_task(c, mesh)
    # A stage-1 train state as the loop writes it: the query path plus stage-1-only parts.
    rules = sharding_lib.axis_rules(())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fresh, _ = sharding_lib.create_sharded(task.init_trainable, jax.random.PRNGKey(5), mesh, rules)
    flat_stage1 = {}
    rng = np.random.default_rng(0)
    for path, leaf in flatten(fresh).items():
        if path[0] != "language_projection":
            flat_stage1[path] = rng.normal(size=leaf.shape).astype(np.float32)
    extras = {("qformer", "word_embeddings", "embedding"): (30, 128), ("temp",): (),
              ("qformer", "layer_0", "text_ffn", "intermediate", "kernel"): (128, 256)}
    for path, shape in extras.items():
        flat_stage1[path] = rng.normal(size=shape).astype(np.float32)
    stage1_params = unflatten_dict(flat_stage1)
    state = {"step": np.int32(7), "params": stage1_params, "rng": np.zeros(2, np.uint32),
             "opt_state": {"mu": stage1_params}}
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "stage1" / "checkpoints"), async_save=False)
    ckpt.save(7, state, {"index": 0})
    ckpt.close()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        loaded = task.load_trainable(fresh)
    got, want = flatten(loaded), flatten(stage1_params)
    assert set(got) == set(flatten(fresh))  # the stage-1-only leaves are dropped
    for path in got:
        expected = want[path] if path[0] != "language_projection" else np.asarray(flatten(fresh)[path])
        np.testing.assert_array_equal(np.asarray(got[path]), expected, err_msg=".".join(path))
    # The frozen LLM is the text-LM export; the ViT is random (the stage-1 demo's, same seed).
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(task.init_frozen, jax.random.PRNGKey(0))
        frozen = task.load_frozen(sharding_lib.abstract_with_shardings(
            boxed, sharding_lib.logical_shardings(boxed, mesh, rules)))
        batch = next(stage2.make_data(c)())
        assert batch["labels"].shape == (4, c.data.max_text_len)
        batch = {k: v for k, v in batch.items() if v.dtype != object}
        loss, metrics = jax.jit(task.loss_fn, static_argnums=4)(loaded, frozen, batch, jax.random.PRNGKey(0), True)
    assert np.isfinite(float(loss)) and float(loss) > 0


def test_train_vision_fine_tunes_the_vit_from_its_checkpoint(hf_setup, tmp_path):
    """LAVIS caption fine-tuning (`freeze_vit: False`): the ViT is trainable (float32, in the optimizer
    and the checkpoint), starts from init.vision_checkpoint, and gets gradients; the LLM stays frozen."""
    kind, hf, blip2_dir, llm_dir = hf_setup
    config = _config(kind, blip2_dir, llm_dir, batch_size=8)
    config.model.train_vision = True
    config.train.update(total_steps=2, log_every=1, checkpoint_every=0, async_checkpointing=False)
    config.optimizer.update(peak_lr=1e-3, warmup_steps=1, warmup_lr=1e-3, min_lr=1e-3)
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
    task = stage2.make_task(config, mesh)
    trainable, frozen, _ = _init_params(task, config, mesh)
    assert sorted(frozen) == ["language_model"] and "vision" in trainable
    want = flatten(weights.load_vision(blip2_dir, spec.stage2_config(config)))
    got = flatten(jax.tree.map(np.asarray, trainable["vision"]))
    assert set(got) == {p[1:] for p in want}
    for p, value in want.items():
        np.testing.assert_array_equal(got[p[1:]], value, err_msg=".".join(p))
        assert got[p[1:]].dtype == np.float32
    seen = {}
    loop.train(config, dataclasses.replace(task, evaluate=lambda tr, fr, s: seen.update(tr=tr, fr=fr) or {}),
               lambda: _Batches(kind, hf, 8), str(tmp_path), mesh=mesh)
    after = flatten(jax.tree.map(np.asarray, seen["tr"]["vision"]))
    assert all(not np.array_equal(after[p], v) for p, v in got.items())
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, seen["fr"]),  # the LLM did not move
                 jax.tree.map(np.asarray, frozen))
    _, params = checkpoint_lib.latest_params(str(tmp_path))
    assert "vision" in params


def test_stage2_checkpoint_fine_tunes_a_stage2_model_projection_included(hf_setup):
    """`init.stage2_checkpoint` (LAVIS caption fine-tuning from a pretrained BLIP-2): the query path and
    `language_projection` come from the HF Blip2ForConditionalGeneration directory."""
    kind, hf, blip2_dir, llm_dir = hf_setup
    config = _config(kind, blip2_dir, llm_dir)
    config.init.stage1_checkpoint, config.init.stage2_checkpoint = "", blip2_dir
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
    trainable, _, fresh = _init_params(stage2.make_task(config, mesh), config, mesh)
    want = _hf_projection(hf)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(trainable["language_projection"][name]), want[name])
        assert not np.array_equal(np.asarray(fresh["language_projection"][name]), want[name])
    np.testing.assert_array_equal(np.asarray(trainable["query_tokens"]),
                                  hf.query_tokens.detach().numpy())
    config.init.stage1_checkpoint = blip2_dir  # both: ambiguous
    with pytest.raises(ValueError, match="set one"):
        stage2.make_task(config, mesh)
