"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere; the data, tokenizers, tiny
models and runs several test modules share, each built once per session (tests/helpers.py has the shared
helper functions, tests/tiny_configs.py the tiny config of each stage)."""
import atexit
import os
import shutil
import tempfile

from tests.helpers import FAST_COMPILE

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite's time is mostly XLA:CPU compiling tiny programs; LLVM's optimisation passes take half of it.
# Without them the programs compute the same thing (XLA keeps its HLO passes, and never lets LLVM reorder
# floating point), slower, which tiny shapes do not notice (README, "Test suite").
if FAST_COMPILE not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The CLIs' persistent XLA cache (blip2_jax/compilation_cache.py) in a directory of this session, not ~/.cache;
# made by the first process (pytest-xdist's workers inherit it) and removed when that process ends.
if "BLIP2_JAX_COMPILATION_CACHE" not in os.environ:
    os.environ["BLIP2_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="blip2_jax_xla_")
    atexit.register(shutil.rmtree, os.environ["BLIP2_JAX_COMPILATION_CACHE"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


# -- tiny Hugging Face models and data, built once per session (read-only for the tests that share them) ----
def _built_once(build):
    """A session fixture's value: `get(key)` builds `build(key)` on first use and returns it afterwards."""
    built = {}

    def get(key):
        if key not in built:
            built[key] = build(key)
        return built[key]
    return get


@pytest.fixture(scope="session")
def bert_tokenizer():
    """The stage-1 BERT tokenizer (`[DEC]` added) of the BERT uncased vocabulary the tests ship with."""
    from blip2_jax.data import testing, text
    return text.load_bert_tokenizer(testing.bert_vocab_dir())


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """`tokenizer_dir(llm)` -> a directory with `blip2_jax.data.testing`'s tiny OPT ("opt") or T5 ("t5") tokenizer."""
    from blip2_jax.data import testing

    def build(llm):
        path = str(tmp_path_factory.mktemp(f"tokenizer_{llm}"))
        (testing.make_tiny_opt_tokenizer if llm == "opt" else testing.make_tiny_t5_tokenizer)(path)
        return path
    return _built_once(build)


@pytest.fixture(scope="session")
def hf_retrieval(tmp_path_factory):
    """`hf_retrieval(name)` -> `(hf, directory)`: a tiny random HF `Blip2ForImageTextRetrieval` of
    `hf_tiny.RETRIEVAL_SIZES[name]`, saved with `save_pretrained` next to a BERT `vocab.txt` of
    `hf_tiny.WORDS`. Tests that change `hf` work on a copy."""
    import torch
    from transformers import Blip2ForImageTextRetrieval

    from tests import hf_tiny

    def build(name):
        cfg = hf_tiny.blip2_retrieval_config(**hf_tiny.RETRIEVAL_SIZES[name])
        torch.manual_seed(0)
        hf = hf_tiny.redraw_(Blip2ForImageTextRetrieval(cfg), seed=1)
        path = tmp_path_factory.mktemp(f"hf_retrieval_{name}")
        hf.save_pretrained(str(path))
        (path / "vocab.txt").write_text("\n".join(hf_tiny.BERT_SPECIALS + hf_tiny.WORDS) + "\n")
        return hf, str(path)
    return _built_once(build)


@pytest.fixture(scope="session")
def hf_blip2(tmp_path_factory):
    """`hf_blip2(llm)` -> `(hf, blip2_dir, llm_dir)`: hf_tiny's default BLIP-2 OPT or T5 with re-drawn weights,
    saved whole and its language model alone (a standalone OPT / T5 directory)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from tests import hf_tiny

    def build(llm):
        cfg = hf_tiny.blip2_opt_config() if llm == "opt" else hf_tiny.blip2_t5_config()
        torch.manual_seed(0)
        hf = hf_tiny.redraw_(Blip2ForConditionalGeneration(cfg), seed=3)
        root = tmp_path_factory.mktemp(f"hf_blip2_{llm}")
        hf.save_pretrained(str(root / "blip2"))
        hf.language_model.save_pretrained(str(root / "llm"))
        return hf, str(root / "blip2"), str(root / "llm")
    return _built_once(build)


@pytest.fixture(scope="session")
def hf_captioner(tmp_path_factory):
    """`hf_captioner(llm)` -> `(hf, tokenizer, directory)`: a tiny random BLIP-2 OPT ("\\n" as EOS, as BLIP-2
    OPT) or FlanT5 directory with its own tokenizer (`blip2_jax.data.testing`), as `load_processor` reads it."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from blip2_jax.data.testing import make_tiny_opt_tokenizer, make_tiny_t5_tokenizer
    from tests import hf_tiny

    def build(llm):
        path = tmp_path_factory.mktemp(f"hf_captioner_{llm}")
        if llm == "opt":
            tok = make_tiny_opt_tokenizer(str(path))
            (newline,) = tok("\n", add_special_tokens=False)["input_ids"]
            cfg = hf_tiny.blip2_opt_config(vocab=len(tok) + 1)  # one more id: the image placeholder
            cfg.text_config.eos_token_id = newline
        else:
            tok = make_tiny_t5_tokenizer(str(path))
            cfg = hf_tiny.blip2_t5_config(vocab=len(tok) + 1)
        torch.manual_seed(0)
        hf = hf_tiny.redraw_(Blip2ForConditionalGeneration(cfg), seed=7)
        hf.save_pretrained(str(path))
        return hf, tok, str(path)
    return _built_once(build)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """The shapes data (300 train and 12 held-out 64-px scenes, one train shard) with the stage-1 BERT
    vocabulary of its captions in `tokenizer/` (as `tests/tiny_configs.stage1` expects it)."""
    from blip2_jax.data import shapes
    out = str(tmp_path_factory.mktemp("shapes"))
    shapes.generate(out, num_train=300, num_heldout=12, size=64, train_shards=1)
    shapes.write_bert_vocab(os.path.join(out, "tokenizer"))
    return out


@pytest.fixture(scope="session")
def text_lm_run(shapes_dir, tmp_path_factory):
    """The suite's one text-LM run: `tiny_configs.text_lm` on `shapes_dir` through `main.run`, as the demo chain
    runs it. `(config, final metrics, workdir)`; the OPT and its tokenizer are exported to `workdir/hf`."""
    from blip2_jax import main
    from tests import tiny_configs
    root = tmp_path_factory.mktemp("text_lm")
    c = tiny_configs.text_lm(shapes_dir, str(root / "tokenizer_opt"))
    workdir = str(root / "workdir")
    return c, main.run(c, workdir), workdir


@pytest.fixture(scope="session")
def toy_reference(tmp_path_factory):
    """The toy task's uninterrupted 6-step run on one device (tests/toy_task.py: checkpoints every 2 steps,
    `evaluate` at the end), which tests/test_loop.py and tests/test_checkpoint.py compare against:
    `(workdir, final metrics)`. Compiled into the session's compile cache, as those modules' runs are."""
    import jax

    from blip2_jax.train import loop
    from tests import toy_task as toy
    workdir = tmp_path_factory.mktemp("toy_reference")
    with toy.persistent_compile_cache(tmp_path_factory):
        out = loop.train(toy.config(), toy.make_task(), toy.data_factory(), str(workdir), devices=jax.devices()[:1])
    return workdir, out
