"""Orbax checkpoints of the train state and the data iterator's position.

A checkpoint at step `s` (directory `<workdir>/checkpoints/<s>/`) holds two items:
- `state`: the train state `{"step", "params", "opt_state", "rng"}` (trainable params only; frozen
  towers are re-read from their source on every start), saved with `StandardSave`;
- `data`: the data iterator's position, written by grain's Orbax handler: one JSON file per process,
  `data/process_<i>-of-<n>.json`, holding that process's `get_state()` (JSON-serialisable). A run with
  another process count reads process 0's file when its state has a `"global_position"` (the
  pipeline's and the caption iterator's do): the position in the global stream, from which every
  process of any layout derives its own (`blip2_jax.data.pipeline.TrainIterator`).

Restoring with `StandardRestore(abstract state whose leaves carry NamedShardings)` gives back the
optax state types and places every array directly on the *current* mesh, which may differ from the
one that saved it (resharding happens on read).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


# -- a workdir: `checkpoints/<step>/{state,data}` and the run's config -----------------------------
CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"
# Config fields that name files read when a model is rebuilt from a workdir (relative paths are
# resolved against the directory the run was started from, when they do not exist from here).
_PATH_FIELDS = (("init", "vision_checkpoint"), ("init", "llm_checkpoint"), ("init", "stage1_checkpoint"),
                ("init", "stage2_checkpoint"), ("init", "qformer_checkpoint"), ("data", "tokenizer_path"))


def is_workdir(path: str) -> bool:
    """Whether `path` is a training workdir of this project (it has `checkpoints/`)."""
    return os.path.isdir(os.path.join(path, CHECKPOINTS))


def latest_params(workdir: str) -> tuple[int, dict]:
    """`(step, params)` of the newest checkpoint in a workdir of this project, as numpy arrays."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist (init.stage1_checkpoint must be a stage-1 workdir "
                                "or a Hugging Face BLIP-2 directory)")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()
                   and os.path.isdir(os.path.join(directory, d, "state")))
    if not steps:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint")
    path = os.path.join(directory, str(steps[-1]), "state")
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    handler = ocp.PyTreeCheckpointHandler()
    with ocp.Checkpointer(handler) as ckptr:
        # The item's tree metadata from its handler: `ckptr.metadata(path)` would also look for a
        # step-level `_CHECKPOINT_METADATA` in `path`, which the CheckpointManager writes one level up
        # (`checkpoints/<step>/`), and log "Metadata file does not exist" on every load.
        tree = handler.metadata(epath.Path(path))
        if "params" not in tree:
            raise ValueError(f"{path} holds no 'params' (not a train state of this project)")
        # Only the params subtree is read (partial restore), onto the host CPU.
        item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
                                       tree["params"])}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=host), item)
        state = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                 partial_restore=True))
    state = jax.tree.map(np.asarray, state)
    return steps[-1], state["params"]


def save_run_config(workdir: str, config) -> str:
    """Write `<workdir>/run_config.json`: the run's config and the directory it was started from, so
    that `blip2_jax.from_pretrained(workdir)` can rebuild the model and re-read its frozen towers."""
    path = os.path.join(workdir, RUN_CONFIG)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        record = {"config": json.loads(config.to_json_best_effort()), "cwd": os.getcwd()}
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
    return path


def load_run_config(workdir: str):
    """The `ml_collections.ConfigDict` a workdir's run recorded (`save_run_config`), with its relative
    file paths resolved; raises FileNotFoundError naming the file when the workdir has none."""
    import ml_collections

    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the workdir was written before runs recorded their "
                                "config; rebuild the model with the config that trained it "
                                "(blip2_jax.evaluate.load.load_model(workdir, train_config=...))")
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    config = ml_collections.ConfigDict(record["config"])
    for section, field in _PATH_FIELDS:
        if section in config and field in config[section]:
            config[section][field] = _resolve(config[section][field], record.get("cwd", ""))
    return config


def _resolve(path: str, started_in: str) -> str:
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(started_in, path)
    return candidate if os.path.exists(candidate) else path


def _data_file(process_index: int, process_count: int) -> str:
    """The name grain's Orbax handler gives a process's data state."""
    return f"process_{process_index}-of-{process_count}.json"


def _writer_count(saved: list[str]) -> Optional[int]:
    """How many processes wrote the data states named `saved` (`process_<i>-of-<n>.json`)."""
    counts = {name.rsplit("-of-", 1)[-1].removesuffix(".json") for name in saved}
    return int(counts.pop()) if len(counts) == 1 and all(c.isdigit() for c in counts) else None


class _IteratorState:
    """A data iterator's state in the form grain's Orbax handler (`grain.checkpoint.CheckpointSave`)
    saves and restores: JSON bytes from `get_state()`, one file per process
    (`data/process_<i>-of-<n>.json`). Saving takes a snapshot (the loop's iterator moves on while an
    asynchronous save is still being written); restoring fills `restored`."""

    def __init__(self, state: Any = None):
        if state is not None:
            try:
                self._bytes = json.dumps(state).encode("utf-8")
            except TypeError as e:
                raise TypeError(f"the data iterator's get_state() must be JSON-serialisable: {e}") from None
        self.restored = None

    def get_state(self) -> bytes:
        return self._bytes

    def set_state(self, state: bytes) -> None:
        self.restored = json.loads(state)

    def start_prefetch(self) -> None:  # part of grain's iterator protocol; nothing to start here
        pass


def remove_unfinished_saves(directory: str) -> list[str]:
    """Deletes the saves a killed run left unfinished in `directory` (process 0; returns their names).

    Orbax writes a checkpoint into a temporary directory (`<step>.orbax-checkpoint-tmp...` on a local
    or POSIX file system) and renames it when complete, so `latest_step` never picks one up; but a run
    killed mid-save (`kill -9`, a lost host) leaves it behind, one more copy of the state each time.
    """
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return []
    leftovers = sorted((p.get() for p in ocp.path.step.all_temporary_paths(directory)), key=str)
    for path in leftovers:
        path.rmtree()
    if leftovers:
        print(f"removed {len(leftovers)} unfinished checkpoint save(s) left by an interrupted run in "
              f"{directory}: {', '.join(p.name for p in leftovers)}", file=sys.stderr, flush=True)
    return [p.name for p in leftovers]


class Checkpointer:
    """Asynchronous Orbax checkpoints under `directory`, keeping the latest `keep`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        remove_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any) -> None:
        """Starts saving `state` and the data iterator state at `step` (returns before writing ends).

        Device arrays are copied to host memory before this returns, so `state` may be donated to
        the next train step right away.
        """
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorState(data_state))),
            force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """`(state, data_state)` at `step`; arrays land on `abstract_state`'s shardings.

        `data_state` is this process's saved state when the checkpoint was written by as many processes
        as this run has; otherwise process 0's, provided it re-shards (a dict with a
        `"global_position"`, from which each process derives its own position), else ValueError.
        """
        data_dir = os.path.join(self.directory, str(step), "data")
        saved = sorted(f for f in os.listdir(data_dir) if f.startswith("process_")) if os.path.isdir(data_dir) else []
        mine = _data_file(jax.process_index(), jax.process_count())
        if not saved and os.path.exists(os.path.join(data_dir, "metadata")):
            return self._restore_legacy(step, abstract_state, os.path.join(data_dir, "metadata"))
        if mine not in saved:
            return self._restore_resharded(step, abstract_state, data_dir, saved)
        data = _IteratorState()
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data)))
        return restored["state"], data.restored

    def _restore_resharded(self, step: int, abstract_state: Any, data_dir: str, saved: list[str]):
        """A checkpoint written by another number of processes: the state re-shards on read (Orbax),
        the data position through process 0's data state, which every process reads."""
        first = _data_file(0, _writer_count(saved)) if saved else None
        data = None
        if first in saved:
            with open(os.path.join(data_dir, first), encoding="utf-8") as f:
                data = json.load(f)
        if not isinstance(data, dict) or "global_position" not in data:
            raise ValueError(
                f"checkpoint {self.directory}/{step} holds the data-iterator states {saved}, but this run is "
                f"process {jax.process_index()} of {jax.process_count()}, and its data state has no global "
                "position to re-shard from; the data position cannot be restored (start a new workdir, or "
                "restore with the same process count)")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"], data

    def _restore_legacy(self, step: int, abstract_state: Any, data_file: str) -> tuple[Any, Any]:
        """A checkpoint written before the data states moved to grain's handler: one JSON item
        `{"<process index>": {"json": state}}` (written by every process's all-gather)."""
        with open(data_file, encoding="utf-8") as f:
            data = json.load(f)
        key = str(jax.process_index())
        if len(data) != jax.process_count() or key not in data or "json" not in data[key]:
            raise ValueError(f"checkpoint {self.directory}/{step} holds data-iterator states for {len(data)} "
                             f"processes, but this run has {jax.process_count()}; the data position cannot be "
                             "restored (start a new workdir, or restore with the same process count)")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"], data[key]["json"]

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
