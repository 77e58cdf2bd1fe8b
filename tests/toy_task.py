"""A tiny Task for the train-loop tests: a frozen bf16 embedding table and a trainable MLP head.

The loss has a per-example cross-entropy part and an in-batch contrastive part (so it depends on the
whole global batch, like ITC), dropout (so it uses the step RNG), and a learnable temperature.
The data iterator is deterministic: batch i is a function of (seed, i); its state is `{"index": i}`.
"""
from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import pytest
import jax.numpy as jnp
import ml_collections
import numpy as np

from blip2_jax.models.layers import Dense, LayerNorm
from blip2_jax import config_sections
from blip2_jax.train.task import Task

@contextlib.contextmanager
def persistent_compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache in this pytest session's directory, on while in the block.

    Every `loop.train` call builds and jits a new step function; with identical HLO the cache turns
    a several-second CPU compile into a lookup (e.g. the resume tests re-run the same program).
    """
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    cc.reset_cache()
    # one directory per pytest session: test modules share compiled programs
    cache_dir = tmp_path_factory.getbasetemp() / "xla_cache"
    cache_dir.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()


@pytest.fixture(scope="module", autouse=False)
def compile_cache(tmp_path_factory):
    """`persistent_compile_cache` for one test module."""
    with persistent_compile_cache(tmp_path_factory):
        yield


VOCAB, EMBED, MLP, SEQ = 37, 16, 32, 4  # vocab 37: not divisible by tensor=2 (replication fallback)


class Head(nn.Module):
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        h = jax.nn.gelu(Dense(MLP, axes=("embed", "mlp"))(x))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = LayerNorm(axis_name="mlp")(h)
        pooled = nn.with_logical_constraint(h.mean(1), ("batch", "mlp"))
        logits = Dense(VOCAB, axes=("mlp", "vocab"))(pooled)
        proj = Dense(EMBED, axes=("mlp", "embed"))(pooled)
        log_temp = self.param("log_temp", nn.initializers.constant(np.log(0.07)), ())
        return logits, proj, log_temp


def init_frozen(rng):
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
    return {"embedding": init(rng, (VOCAB, EMBED), jnp.bfloat16)}


def make_task(dropout=0.1, contrastive=True, evaluate=True) -> Task:
    head = Head(dropout)

    def init_trainable(rng):
        x = jnp.zeros((2, SEQ, EMBED), jnp.float32)
        return head.init(rng, x, False)["params"]

    def loss_fn(params, frozen, batch, rng, train):
        table = frozen["embedding"].astype(jnp.float32)
        x = table[batch["ids"]] * batch["scale"][:, None, None]
        logits, proj, log_temp = head.apply({"params": params}, x, train, rngs={"dropout": rng} if train else {})
        ce = jnp.mean(jax.nn.logsumexp(logits, -1)
                      - jnp.take_along_axis(logits, batch["target"][:, None], -1)[:, 0])
        # in-batch negatives over the global batch (always reported, in the loss if `contrastive`)
        a = proj / jnp.linalg.norm(proj, axis=-1, keepdims=True)
        b = table[batch["target"]]
        b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
        sims = a @ b.T / jnp.exp(log_temp)
        con = jnp.mean(jax.nn.logsumexp(sims, -1) - jnp.diagonal(sims))
        loss = ce + con if contrastive else ce
        return loss, {"ce": ce, "contrastive": con, "temp": jnp.exp(log_temp)}

    jitted_loss = jax.jit(loss_fn, static_argnums=(4,))

    def evaluate_fn(params, frozen, step):
        batch = ToyData(batch_size=8, seed=123)._batch(0)
        batch.pop("caption")
        loss, _ = jitted_loss(params, frozen, batch, jax.random.PRNGKey(0), False)
        return {"eval_loss": float(loss),
                "frozen_checksum": float(jnp.sum(frozen["embedding"].astype(jnp.float32)))}

    return Task(init_trainable=init_trainable, loss_fn=loss_fn, init_frozen=init_frozen,
                evaluate=evaluate_fn if evaluate else None, flops_per_example=1e6, name="toy")


class ToyData:
    """Deterministic per-process batches; `nan_at` puts a NaN in the batch with that index."""

    def __init__(self, batch_size=16, seed=0, nan_at=None):
        self.batch_size, self.seed, self.nan_at, self.index = batch_size, seed, nan_at, 0

    def _batch(self, i):
        rng = np.random.default_rng([self.seed, i])
        ids = rng.integers(0, VOCAB, (self.batch_size, SEQ)).astype(np.int32)
        scale = np.ones((self.batch_size,), np.float32)
        if self.nan_at == i:
            scale[0] = np.nan
        return {"ids": ids, "target": (ids.sum(1) % VOCAB).astype(np.int32), "scale": scale,
                "caption": np.array(["host-only string"] * self.batch_size)}

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._batch(self.index)
        self.index += 1
        return batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def config(**train) -> ml_collections.ConfigDict:
    c = config_sections.loop_config()
    c.task = "toy"
    c.train.update(dict(total_steps=6, batch_size=16, log_every=1, checkpoint_every=2,
                        keep_checkpoints=10, peak_flops_per_device=1e9))
    c.train.update(train)
    c.optimizer.update(dict(warmup_steps=2, peak_lr=1e-2, warmup_lr=1e-3, min_lr=1e-3))
    return c


def mesh_config(c, data, fsdp, tensor):
    c = ml_collections.ConfigDict(c.to_dict())
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    return c


def losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record of a step wins, as after a re-run)."""
    import json
    import os
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


@functools.lru_cache(maxsize=None)
def data_factory(batch_size=16, seed=0, nan_at=None):
    return lambda: ToyData(batch_size, seed, nan_at)
