"""One JAX process of a multi-process stage-1 run for tests/test_multiprocess.py (not a test module).

    python -m tests.multiprocess_worker --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I \
        --shapes_dir=DIR --workdir=DIR [--sigterm_at=STEP] [--evaluate=0] [--caption_with_tokenizer=DIR]

Joins the run through `blip2_jax.distributed.initialize` (as `python -m blip2_jax.main --distributed`
does), trains `config(shapes_dir)` on a mesh over every process's devices, and records the `image_id`s
of every batch this process's data iterator yields in `<workdir>/yielded_<process>.jsonl` (one line per
batch). With `--sigterm_at=S` the process sends itself SIGTERM after dispatching step S. With
`--caption_with_tokenizer=DIR` it trains nothing and prints `caption_metrics` instead.
"""
from __future__ import annotations

import argparse
import json
import os
import signal


def config(shapes_dir: str, evaluate: bool = True, **train):
    """The runs' config: `tiny_configs.stage1` (16 rows, 6 steps) on a mesh of every device, with the
    retrieval evaluation of the 12 held-out scenes at the end (4 rows a batch, ITM re-ranking of the top
    3) if `evaluate`."""
    from tests import tiny_configs

    c = tiny_configs.stage1(shapes_dir, **{"total_steps": 6, **train})
    if evaluate:
        c.eval.source.path, c.eval.batch_size, c.eval.k_test = shapes_dir, 4, 3
    return c


class Recording:
    """A data iterator that appends the `image_id`s of every batch it yields to `path` (JSON lines)."""

    def __init__(self, iterator, path: str):
        self._it, self._path = iterator, path

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        with open(self._path, "a", encoding="utf-8") as f:
            f.write(json.dumps([int(i) for i in batch["image_id"]]) + "\n")
        return batch

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def recorded(workdir: str, name: str) -> list[list[int]]:
    """The image ids `Recording` wrote to `<workdir>/yielded_<name>.jsonl`, one list per batch."""
    with open(os.path.join(workdir, f"yielded_{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train(cfg, workdir: str, record_as: str, devices=None, step_hook=None) -> dict:
    """`loop.train` of stage 1 with this process's yielded batches recorded as `record_as`."""
    from blip2_jax import sharding
    from blip2_jax.train import loop, stage1

    mesh = sharding.make_mesh(cfg.mesh, devices)
    factory = stage1.make_data(cfg)
    path = os.path.join(workdir, f"yielded_{record_as}.jsonl")
    os.makedirs(workdir, exist_ok=True)
    return loop.train(cfg, stage1.make_task(cfg, mesh), lambda: Recording(factory(), path), workdir, mesh=mesh,
                      step_hook=step_hook)


def caption_metrics(shapes_dir: str, tokenizer_path: str) -> dict:
    """Stage 2's captioning evaluation (`caption_eval.evaluator`, as a stage-2 run calls it) of the 12
    held-out scenes (4 rows a batch: 2 batches on each of 2 processes, 2 padding rows each) by a random
    tiny OPT BLIP-2 on a mesh of every device; the same weights in any layout (drawn on the mesh)."""
    import flax.linen as nn
    import jax
    import ml_collections

    from blip2_jax import sharding
    from blip2_jax.train import loop, stage2
    from tests import tiny_configs

    c = tiny_configs.stage2("opt")
    c.model.text = ml_collections.ConfigDict(dict(
        model_type="opt", vocab_size=640, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        do_layer_norm_before=True, activation_function="relu"))
    c.data.tokenizer_path = tokenizer_path
    c.eval.source.path, c.eval.batch_size, c.eval.max_new_tokens = shapes_dir, 4, 4
    mesh = sharding.make_mesh(c.mesh)
    task = stage2.make_task(c, mesh)
    rules = sharding.axis_rules(tuple(c.mesh.axis_rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        trainable, _ = sharding.create_sharded(task.init_trainable, jax.random.PRNGKey(1), mesh, rules)
        frozen = loop.make_frozen(task, jax.random.PRNGKey(2), mesh, rules)
        return {k: float(v) for k, v in task.evaluate(trainable, frozen, 0).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--shapes_dir", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sigterm_at", type=int, default=0)
    parser.add_argument("--evaluate", type=int, default=1)
    parser.add_argument("--caption_with_tokenizer", default="", help="only `caption_metrics` with this tokenizer")
    args = parser.parse_args()

    from blip2_jax import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

    if args.caption_with_tokenizer:
        print(json.dumps(caption_metrics(args.shapes_dir, args.caption_with_tokenizer)), flush=True)
        return

    def hook(step):
        if step == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    out = train(config(args.shapes_dir, bool(args.evaluate)), args.workdir, str(args.process_id), step_hook=hook)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
