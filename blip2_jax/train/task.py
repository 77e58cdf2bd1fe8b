"""What a training stage gives the train loop: the `Task` and the data iterator protocol.

A stage (stage 1, stage 2, a fine-tune) is a config plus a `Task`; `blip2_jax.train.loop.train`
does everything else (mesh, sharded creation, optimizer, jitted step, checkpoints, metrics).

Parameter trees. The loop keeps two trees apart:
- the *trainable* tree: in the train state, checkpointed, gets gradients and AdamW state;
- the *frozen* tree (e.g. the ViT, the LLM): created or loaded once per run, passed to `loss_fn`
  as a separate argument, never differentiated (`jax.value_and_grad` is taken over the trainable
  tree only), never in the optimizer state or the checkpoint. It may be bfloat16.

Both init functions are pure functions of an RNG key returning a tree whose leaves may be boxed in
flax `LogicallyPartitioned` (what `model.init` returns when parameters are declared with
`nn.with_logical_partitioning`, as `blip2_jax/models/layers.py` does). The loop runs them under
`jax.eval_shape` to get shapes and logical axes, turns those into NamedShardings with the config's
axis rules, then runs them under `jax.jit(..., out_shardings=...)` so every leaf is born on its
shards. Boxes are removed before the trees reach any other hook.

The data iterator. `make_data()` (a zero-argument factory) returns an iterator that yields, per
process, a dict of numpy arrays with this process's rows of the global batch (global
`train.batch_size` / process count rows; dim 0 is the batch). It has `get_state()` (JSON-able
Python data or bytes, e.g. a grain iterator's) and `set_state(state)`. The loop turns each dict into
global `jax.Array`s sharded over ("data", "fsdp"); string/object fields stay on the host and are not
passed to `loss_fn`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import jax

Params = Any           # a pytree of arrays
Batch = Mapping[str, jax.Array]
Metrics = Mapping[str, Any]


class DataIterator(Protocol):
    """An iterator of per-process numpy batch dicts whose position can be saved and restored."""

    def __next__(self) -> Mapping[str, Any]: ...

    def __iter__(self) -> Iterator[Mapping[str, Any]]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class Task:
    """The hooks one training stage provides to `loop.train`.

    Attributes:
      init_trainable: `rng -> params`. Pure; fresh trainable parameters (may be boxed with logical
        axis names). Run under `eval_shape` and `jit(out_shardings=...)`.
      loss_fn: `(trainable, frozen, batch, rng, train) -> (loss, metrics)`. Pure and jittable.
        `loss` is a float32 scalar: the MEAN over the examples of `batch` (gradient accumulation
        averages micro-batch losses, which equals the full-batch loss only for a mean). `metrics`
        is a flat dict of scalars (loss parts, temperature, accuracies); they are averaged over
        micro-batches and logged as given. `batch` holds the global arrays of one micro-batch;
        `rng` is `fold_in(fold_in(seed_key, step), micro_batch_index)`, so it does not depend on
        the mesh or on where the run was resumed. The loop calls it with `train=True`.
      init_frozen: `rng -> frozen params`, pure, or None when the stage has no frozen tree (the loop
        then passes `{}`). Also defines the frozen tree's structure, dtypes and logical axes.
      load_frozen: `abstract -> frozen params or None`. `abstract` is `init_frozen`'s output as
        ShapeDtypeStructs, each carrying its target `.sharding`; return the pretrained frozen tree
        placed on those shardings (e.g. read shard by shard), or None to use `init_frozen`'s random
        weights. Called on every start, including resumes (frozen weights are not checkpointed).
      load_trainable: `fresh params -> params`, or None. Called only on a fresh start (a resume
        restores the checkpoint instead) with the freshly initialised, sharded, unboxed trainable
        tree; return the same structure with pretrained leaves put in (keep shardings: e.g.
        `jax.device_put(value, fresh_leaf.sharding)`). Leaves it does not touch stay fresh; say in
        the log which ones.
      evaluate: `(trainable, frozen, step) -> {name: float}` or None. Host-side; called every
        `train.eval_every` steps and after the last step (jit inside as needed). Its metrics are
        logged under `eval/` and returned by `train` under their own names.
      on_finish: `(trainable, workdir) -> None` or None. Called on every process after the last step
        (not when a signal stopped the run), with the final trainable tree; e.g. the text LM writes
        its Hugging Face directory.
      flops_per_example: training FLOPs for one example (forward + backward of the trainable part
        plus the forward of the frozen part), or None. Used only for the MFU estimate.
      name: a short name for logs.
    """

    init_trainable: Callable[[jax.Array], Params]
    loss_fn: Callable[[Params, Params, Batch, jax.Array, bool], tuple[jax.Array, Metrics]]
    init_frozen: Optional[Callable[[jax.Array], Params]] = None
    load_frozen: Optional[Callable[[Params], Optional[Params]]] = None
    load_trainable: Optional[Callable[[Params], Params]] = None
    evaluate: Optional[Callable[[Params, Params, int], Mapping[str, float]]] = None
    on_finish: Optional[Callable[[Params, str], None]] = None
    flops_per_example: Optional[float] = None
    name: str = "task"
