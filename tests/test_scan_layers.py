"""Scanned layer stacks (`scan_layers=True`) against the unrolled towers.

- every tower (ViT, Q-Former, OPT, T5): the same outputs and gradients in float32 (1e-5), remat
  policies included, and the module's own scanned parameters are the unrolled ones stacked;
- one seed draws the same weights in both layouts (random frozen towers included);
- the key Hugging Face parity, save and cached-decoding tests re-run with the loaders switched to the
  scanned layout (the same converter rules, stacked by `convert.rules.stack_rules`);
- `generate` stays token-identical to Hugging Face with scanned models;
- a 2-step stage-1 run with scanned layers resumes exactly, and its workdir loads unrolled.
"""
import dataclasses
import functools
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blip2_jax
from blip2_jax import pretrained, workdir
from blip2_jax.convert import opt as opt_convert
from blip2_jax.convert.hf_io import CheckpointReader
from blip2_jax.convert import t5 as t5_convert
from blip2_jax.models import opt as opt_model
from blip2_jax.models import qformer as qformer_model
from blip2_jax.models import t5 as t5_model
from blip2_jax.models import vit as vit_model
from blip2_jax.models.blip2 import (Blip2Config, Blip2OPT, dummy_inputs, init_params, layer_stacks,
                                    with_scan_layers)
from blip2_jax.models.layers import take_batch_rows
from blip2_jax.models.stacking import LayerStack, match_layout, stack_layers, unstack_layers
from blip2_jax.spec import model as spec
from blip2_jax.spec import weights
from blip2_jax.train import optimizer
from configs import stage1 as stage1_config
from configs import stage2 as stage2_config
from tests import test_blip2_generation as generation_tests
from tests import test_blip2_retrieval as retrieval_tests
from tests import test_generate as generate_tests
from tests import test_opt as opt_tests
from tests import test_stage1 as stage1_tests
from tests import test_t5 as t5_tests
from tests import tiny_configs
from tests.test_blip2_generation import opt_model as blip2_opt  # noqa: F401  (fixture)
from tests.test_blip2_retrieval import retrieval  # noqa: F401  (fixture)
from tests.test_opt import hf_opt  # noqa: F401  (fixture)
from tests.test_t5 import hf_t5  # noqa: F401  (fixture)
from tests.toy_task import compile_cache, losses  # noqa: F401  (fixture)

KEY = jax.random.PRNGKey(0)


def assert_close(got, want, tol=1e-5):
    """max |got - want| <= tol * max(1, max |want|) (float32 scanned against unrolled)."""
    retrieval_tests.assert_close(got, want, tol)


def assert_trees_close(got, want, tol=1e-5):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(functools.partial(assert_close, tol=tol), got, want)


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# -- the towers ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """A tower: its config (unrolled), module, layer stacks, and `run(module, params) -> one array`
    (which also initialises: `module.init(KEY, method=run)`)."""

    config: object
    module: type
    stacks: object
    run: object


def _vit(style):
    cfg = vit_model.VisionConfig(style=style, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
                                 image_size=16, patch_size=8, hidden_act="gelu" if style == "eva" else "quick_gelu")
    pixels = normal(0, (2, 16, 16, 3))
    return Case(cfg, vit_model.VisionTransformer, vit_model.layer_stacks, lambda m: m(pixels))


def _qformer(freq, num_layers):
    cfg = qformer_model.QFormerConfig(hidden_size=16, num_layers=num_layers, num_heads=2, intermediate_size=24,
                                      vocab_size=30, max_position_embeddings=16, cross_attention_frequency=freq,
                                      encoder_hidden_size=12, num_query_tokens=3, hidden_dropout=0.0,
                                      attention_dropout=0.0)
    queries, image = normal(1, (2, 3, 16)), normal(2, (2, 5, 12))
    ids = jnp.asarray(np.random.default_rng(3).integers(1, 30, size=(2, 4)))
    text_mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])

    def run(m):
        """The query pass, the text pass after its cached K/V (ITG) and the bidirectional pass (ITM)."""
        hq, kvs = m(query_embeds=queries, image_embeds=image)
        causal = qformer_model.attention_mask("causal", 3, text_mask)[:, 3:]
        ht, _ = m(input_ids=ids, self_mask=causal, past=kvs)
        both = qformer_model.attention_mask("bidirectional", 3, text_mask)
        hb, _ = m(query_embeds=queries, input_ids=ids, self_mask=both, image_embeds=image)
        return jnp.concatenate([hq, ht, hb], axis=1)

    return Case(cfg, qformer_model.QFormer, qformer_model.layer_stacks, run)


def _opt():
    cfg = opt_model.OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, ffn_dim=24, num_attention_heads=2,
                              max_position_embeddings=32, dropout=0.0, pad_token_id=1)
    ids = jnp.asarray(np.random.default_rng(4).integers(3, 40, size=(2, 6)))
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    return Case(cfg, opt_model.OPTForCausalLM, opt_model.layer_stacks,
                lambda m: m(input_ids=ids, attention_mask=mask)[0])


def _t5():
    cfg = t5_model.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                            dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    rng = np.random.default_rng(5)
    ids, dec = jnp.asarray(rng.integers(2, 40, size=(2, 7))), jnp.asarray(rng.integers(2, 40, size=(2, 5)))
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    return Case(cfg, t5_model.T5ForConditionalGeneration, t5_model.layer_stacks,
                lambda m: m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec))


def _llama():
    from transformers import LlamaConfig

    from blip2_jax.models import decoder as decoder_model
    hf = LlamaConfig(vocab_size=40, hidden_size=20, intermediate_size=24, num_hidden_layers=3, num_attention_heads=5,
                     num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    cfg = decoder_model.DecoderConfig.from_hf(hf.to_dict())
    ids = jnp.asarray(np.random.default_rng(6).integers(3, 40, size=(2, 6)))
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    return Case(cfg, decoder_model.DecoderForCausalLM, decoder_model.layer_stacks,
                lambda m: m(input_ids=ids, attention_mask=mask)[0])


CASES = {"vit_eva": lambda: _vit("eva"), "vit_clip": lambda: _vit("clip"), "qformer_freq2": lambda: _qformer(2, 4),
         "qformer_freq1": lambda: _qformer(1, 2), "opt": _opt, "t5": _t5, "llama": _llama}


@pytest.mark.parametrize("tower,remat", [("vit_eva", False), ("vit_clip", "full"), ("qformer_freq2", False),
                                         ("qformer_freq1", "save_dots"), ("opt", "save_dots"), ("t5", "full"),
                                         ("llama", "save_dots")])
def test_scanned_tower_gives_the_unrolled_outputs_and_gradients(tower, remat):
    case = CASES[tower]()
    plain = case.module(case.config)
    scanned_cfg = dataclasses.replace(case.config, scan_layers=True, remat=remat)
    scanned = case.module(scanned_cfg)
    params = nn.unbox(plain.init(KEY, method=case.run)["params"])
    stacked = stack_layers(params, case.stacks(scanned_cfg))
    # The scanned module creates exactly that layout itself (nn.scan over the same blocks).
    own = jax.eval_shape(lambda: nn.unbox(scanned.init(KEY, method=case.run)["params"]))
    assert jax.tree.map(lambda s: s.shape, own) == jax.tree.map(lambda x: x.shape, stacked)
    assert_trees_equal(unstack_layers(stacked, case.stacks(scanned_cfg)), params)

    def loss(model, p):
        out = model.apply({"params": p}, method=case.run)
        return jnp.sum(out * normal(9, out.shape)), out

    (_, want), g_plain = jax.jit(jax.value_and_grad(functools.partial(loss, plain), has_aux=True))(params)
    (_, got), g_scanned = jax.jit(jax.value_and_grad(functools.partial(loss, scanned), has_aux=True))(stacked)
    assert_close(got, want)
    assert_trees_close(g_scanned, stack_layers(g_plain, case.stacks(scanned_cfg)))


def test_scanned_t5_cache_decodes_like_the_unrolled_one():
    """Prefill, one-token steps and a beam reorder with the stacked cache ([L, B, ...], batch on axis 1)."""
    case = _t5()
    plain, scanned = case.module(case.config), case.module(dataclasses.replace(case.config, scan_layers=True))
    params = nn.unbox(plain.init(KEY, method=case.run)["params"])
    stacked = stack_layers(params, t5_model.layer_stacks(scanned.config))
    rng = np.random.default_rng(6)
    ids, dec = jnp.asarray(rng.integers(2, 40, size=(3, 6))), jnp.asarray(rng.integers(2, 40, size=(3, 4)))
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 6])

    def decode(model, p, order):
        v = {"params": p}
        enc = model.apply(v, model.apply(v, ids, method="embed"), mask, method="encode")
        cache = t5_model.init_cache(model.config, 3, 8, jnp.float32)
        first, cache = model.apply(v, dec[:, :2], enc, mask, cache=cache, method="decode")
        cache = take_batch_rows(cache, order)
        nxt, cache = model.apply(v, dec[order, 2:3], None, None, cache=cache, method="decode")
        return first, nxt, cache

    order = jnp.array([2, 0, 0])
    first, nxt, cache = jax.jit(functools.partial(decode, plain))(params, order)
    s_first, s_nxt, s_cache = jax.jit(functools.partial(decode, scanned))(stacked, order)
    assert s_cache["layers"]["k"].shape[:2] == (3, 3) and s_cache["cross"]["v"].shape[:2] == (3, 3)
    assert_close(s_first, first)
    assert_close(s_nxt, nxt)
    for entry in ("layers", "cross"):
        for part in ("k", "v"):
            assert_close(s_cache[entry][part], np.stack([layer[part] for layer in cache[entry]]))


def test_one_seed_draws_the_same_weights_in_both_layouts():
    vision = vit_model.VisionConfig(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, image_size=16,
                                    patch_size=8)
    qformer = qformer_model.QFormerConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                                          encoder_hidden_size=16, num_query_tokens=3, use_text_input=False)
    text = opt_model.OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, ffn_dim=24, num_attention_heads=2,
                               max_position_embeddings=32)
    config = Blip2Config(vision=vision, qformer=qformer, text=text, num_query_tokens=3, with_lm_head=False)
    plain, scanned = Blip2OPT(config), Blip2OPT(with_scan_layers(config, True))
    a = init_params(plain, KEY, dummy_inputs(plain))
    b = init_params(scanned, KEY, dummy_inputs(scanned))
    assert_trees_equal(nn.unbox(b), stack_layers(nn.unbox(a), layer_stacks(scanned.config)))
    # The stacked axis is the logical axis "layers" (replicated by sharding.DEFAULT_AXIS_RULES).
    specs = nn.get_partition_spec(b)
    assert tuple(specs["vision"]["layers"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(specs["qformer"]["layers"]["layer_0"]["crossattention"]["key"]["kernel"]) == ("layers", "embed",
                                                                                                 "heads")
    assert tuple(specs["language_model"]["layers"]["self_attn_layer_norm"]["scale"]) == ("layers", "embed")


def test_weight_decay_skips_stacked_biases_and_norm_scales():
    layer = {"fc": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}, "norm": {"scale": np.ones(3), "bias": np.zeros(3)}}
    mask = {"fc": {"kernel": True, "bias": False}, "norm": {"scale": False, "bias": False}}
    unrolled = {"layers_0": layer, "layers_1": layer}
    assert optimizer.decay_mask(unrolled) == {"layers_0": mask, "layers_1": mask}
    stacked = stack_layers(unrolled, [LayerStack((), "layers_", 2, True)])
    assert stacked["layers"]["norm"]["scale"].shape == (2, 3) and optimizer.decay_mask(stacked) == {"layers": mask}


# -- configs ---------------------------------------------------------------------------------------------
def test_paper_configs_scan_and_demos_unroll():
    for get, variant in ((stage1_config.get_config, "vit_g"), (stage1_config.get_config, "vit_l"),
                         (stage2_config.get_config, "opt2.7b"), (stage2_config.get_config, "flant5xl")):
        assert get(variant).model.scan_layers, variant
    for get, variant in ((stage1_config.get_config, "demo"), (stage2_config.get_config, "demo_opt"),
                         (stage2_config.get_config, "demo_t5")):
        assert not get(variant).model.scan_layers, variant
    c = stage1_config.get_config("vit_g_coco_ft")
    c.model.remat_policy = "save_dots"
    cfg = spec.stage1_config(c, vocab_size=100)
    assert cfg.vision.scan_layers and cfg.qformer.scan_layers
    assert cfg.vision.remat_policy == "save_dots" and cfg.qformer.remat_policy == "none"  # model.remat is off
    c.model.remat_policy = "sometimes"
    with pytest.raises(ValueError, match="config.model.remat_policy='sometimes'"):
        spec.stage1_config(c, vocab_size=100)
    with pytest.raises(ValueError, match="num_layers=3 is not a multiple"):
        qformer_model.QFormerConfig(num_layers=3, cross_attention_frequency=2, scan_layers=True)


# -- the Hugging Face parity tests, scanned -----------------------------------------------------------
@pytest.fixture
def scanned_loaders(monkeypatch):
    """`blip2_jax.from_pretrained`, `convert.opt.load` and `convert.t5.load` build scanned models."""
    monkeypatch.setattr(blip2_jax, "from_pretrained", functools.partial(pretrained.from_pretrained, scan_layers=True))
    monkeypatch.setattr(opt_convert, "load", functools.partial(opt_convert.load, scan_layers=True))
    monkeypatch.setattr(t5_convert, "load", functools.partial(t5_convert.load, scan_layers=True))


def test_retrieval_parity_and_save_scanned(retrieval, scanned_loaders, tmp_path):  # noqa: F811
    model, params = blip2_jax.from_pretrained(retrieval[1])
    assert model.config.vision.scan_layers and {"layers"} <= set(params["vision"]) and "layers" in params["qformer"]
    retrieval_tests.test_vision_and_qformer_outputs(retrieval)
    retrieval_tests.test_itm_and_itc(retrieval)
    retrieval_tests.test_save_pretrained_round_trip_runs_in_transformers(retrieval, tmp_path)


def test_blip2_opt_parity_and_save_scanned(blip2_opt, scanned_loaders, tmp_path):  # noqa: F811
    model, params = blip2_jax.from_pretrained(blip2_opt[1])
    assert model.config.text.scan_layers and "layers" in params["language_model"]
    generation_tests.test_opt_text_logits(blip2_opt)
    generation_tests.test_opt_save_pretrained_runs_in_transformers(blip2_opt, tmp_path)


def _saves_the_file_it_loaded(convert, path, out):
    """A tower loaded scanned and saved writes every tensor of the original file unchanged."""
    model, params = convert.load(path)
    assert model.config.scan_layers
    convert.save(params, model.config, out)
    with CheckpointReader(path) as original, CheckpointReader(out) as saved:
        for key in saved.keys():
            np.testing.assert_array_equal(saved.get(key), original.get(key), err_msg=key)


def test_opt_parity_cached_decoding_and_save_scanned(hf_opt, scanned_loaders, tmp_path):  # noqa: F811
    opt_tests.test_parity_float32_left_padding(hf_opt)  # also: the module's own layout is the rules' layout
    opt_tests.test_incremental_decoding_matches_full_forward(hf_opt)  # stacked cache, beam reorder
    _saves_the_file_it_loaded(opt_convert, hf_opt[1], str(tmp_path / "saved"))


def test_t5_parity_and_save_scanned(hf_t5, scanned_loaders, tmp_path):  # noqa: F811
    t5_tests.test_parity_float32(hf_t5)
    _saves_the_file_it_loaded(t5_convert, hf_t5[1], str(tmp_path / "saved"))


@pytest.fixture(scope="module", params=["opt", "t5"])
def scanned_setup(request, hf_blip2):
    """test_generate's tiny HF model and ours, ours moved to the scanned layout."""
    setup = generate_tests.Setup(request.param, hf_blip2)
    setup.model = type(setup.model)(with_scan_layers(setup.model.config, True))
    setup.params = match_layout(setup.params, layer_stacks(setup.model.config))
    assert "layers" in setup.params["language_model"] or "blocks" in setup.params["language_model"]["decoder"]
    return setup


def test_generate_scanned_matches_hf_token_for_token(scanned_setup):
    scanned_setup.check(True)  # greedy (asserts equality up to EOS inside)
    scanned_setup.check(False, num_beams=3, length_penalty=2.0)


# -- training and workdirs --------------------------------------------------------------------------------
@pytest.mark.usefixtures("compile_cache")
def test_scanned_stage1_resumes_exactly_and_its_workdir_loads_unrolled(shapes_dir, tmp_path):  # noqa: F811
    cfg = tiny_configs.stage1(shapes_dir, total_steps=2, checkpoint_every=1)
    cfg.model.scan_layers = True
    cfg.model.remat, cfg.model.remat_policy = True, "save_dots"
    one = jax.devices()[:1]
    stage1_tests.run(cfg, tmp_path / "straight", devices=one)
    want = losses(tmp_path / "straight")

    def sigterm_at_1(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    out = stage1_tests.run(cfg, tmp_path / "cut", devices=one, hook=sigterm_at_1)
    assert out["preempted"] and out["step"] == 1
    stage1_tests.run(cfg, tmp_path / "cut", devices=one)
    got = losses(tmp_path / "cut")
    assert sorted(got) == [1, 2] and all(got[s] == want[s] for s in (1, 2)), (got, want)

    path = str(tmp_path / "cut")
    scanned, plain = workdir.load(path), workdir.load(path, scan_layers=False)
    assert "layers" in scanned.params["qformer"] and "layer_1" in plain.params["qformer"]
    # A stage-2 run (or anyone) reading this stage-1 workdir gets its model's layout.
    assert "layer_0" in weights.read_query_path(path, plain.model.config)["qformer"]
    size = cfg.data.image_size
    pixels = normal(7, (2, size, size, 3))
    ids, mask = jnp.asarray([[2, 5, 6, 3], [2, 7, 3, 0]]), jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]])
    for method in ("itm", "itc"):  # the random frozen ViT is re-drawn alike in both layouts
        assert_close(scanned.model.apply({"params": scanned.params}, pixels, ids, mask, method=method),
                     plain.model.apply({"params": plain.params}, pixels, ids, mask, method=method))


def test_blip2_llama_scanned_parity_cached_greedy_and_save(tmp_path_factory, tmp_path):
    """BLIP-2 with a LLaMA LLM loaded scanned (`from_pretrained(..., scan_layers=True)`): logits and
    greedy `generate` (stacked KV cache) equal HF's; `save_pretrained` from the stacked layout runs in
    transformers with the original outputs. A decoder whose layers attend differently is refused."""
    from tests import test_blip2_llm as llm_tests

    setup = llm_tests.Setup("llama", tmp_path_factory)
    setup.model, setup.params = pretrained.from_pretrained(setup.path, scan_layers=True)
    assert setup.model.config.text.scan_layers and "layers" in setup.params["language_model"]
    llm_tests.test_text_logits_left_padded(setup)
    assert setup.check(True)
    blip2_jax.save_pretrained(setup.model, setup.params, str(tmp_path))
    again = llm_tests.Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert_close(setup.hf_logits(again), setup.hf_logits(), tol=1e-6)

    from blip2_jax.models import decoder as decoder_model
    mixed = dataclasses.replace(setup.model.config.text, scan_layers=True, sliding_window=4,
                                layer_types=("full_attention", "sliding_attention"))
    with pytest.raises(ValueError, match="scan_layers needs one attention window for every layer"):
        decoder_model.check_scannable(mixed)
