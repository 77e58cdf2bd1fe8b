"""Mesh, logical axis rules, sharded parameter creation and global batches.

The one place where logical axis names (carried by every parameter, see
`blip2_jax/models/layers.py`) meet the physical mesh:

- `make_mesh(mesh_config)`: a `("data", "fsdp", "tensor")` mesh from a config with one size per
  axis; `-1` fills the rest of the devices. Axis types are Auto (classic jit-with-shardings code).
- `axis_rules(overrides)`: the default logical -> mesh axis rules, with per-config overrides.
- `logical_shardings(abstract_tree, mesh, rules)`: NamedShardings for a tree whose leaves carry
  flax `LogicallyPartitioned` metadata. A dimension whose size is not divisible by the mesh axes it
  maps to (e.g. vocab 30523 on tensor=2) is replicated instead of failing.
- `create_sharded(init_fn, rng, mesh, rules)`: `eval_shape` -> shardings -> `jit(init,
  out_shardings=...)`, so parameters are born on their shards and never gathered on one host.
- `make_global_batch(local_batch, mesh)`: per-process numpy slices -> global `jax.Array`s whose
  batch dimension is sharded over `("data", "fsdp")`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes a batch dimension is split over (data parallelism in the wide sense: FSDP shards
# parameters over "fsdp" but every fsdp shard still sees its own slice of the batch).
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). Order matters for
# flax: for each array dimension the first rule whose mesh axes are still unused wins, so "batch"
# takes ("data", "fsdp") and an "embed" dimension of the same activation then stays replicated.
# Logical names without a rule are replicated.
DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vit_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("kv", None),
    ("queries", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves the `-1` entry of `{data, fsdp, tensor}` against `num_devices`.

    Raises ValueError naming the field when sizes are invalid or do not multiply to `num_devices`.
    """
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{axis}={size}: a mesh axis size must be positive or -1")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by "
                f"the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
            f"{num_devices} are available; mesh.data * mesh.fsdp * mesh.tensor must equal it")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int],
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
    """A `("data", "fsdp", "tensor")` mesh with Auto axis types over `devices` (default: all).

    `mesh_config` maps each axis to a size (ml_collections ConfigDict or dict); extra keys such as
    `axis_rules` are ignored here.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def axis_rules(overrides: Rules = ()) -> tuple[tuple[str, Any], ...]:
    """The default rules with `overrides` applied.

    An override `(name, mesh_axes)` replaces every default rule for `name` (and is appended when
    the name is new). `mesh_axes` may be a mesh axis name, a tuple/list of them, or None.
    """
    def norm(axes):
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            for a in axes:
                _check_mesh_axis(a)
            return axes
        if axes is not None:
            _check_mesh_axis(axes)
        return axes

    overrides = tuple((str(name), norm(axes)) for name, axes in overrides)
    overridden = {name for name, _ in overrides}
    kept = tuple(rule for rule in DEFAULT_AXIS_RULES if rule[0] not in overridden)
    # Overrides first so that they win the "first free rule" race in flax's resolution.
    return overrides + kept


def _check_mesh_axis(axis):
    if axis not in MESH_AXES:
        raise ValueError(f"axis rule names mesh axis {axis!r}; mesh axes are {MESH_AXES}")


def unbox(tree: Any) -> Any:
    """Removes flax `Partitioned` boxes, keeping the raw values.

    Unlike `nn.unbox` this adds no sharding constraint (which fails on ShapeDtypeStructs under
    `jax.set_mesh`); placement is decided by the shardings computed here instead.
    """
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def _divisible_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
    """`spec` with every dimension whose size is not divisible by its mesh axes set to None."""
    out = []
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        n = math.prod(mesh.shape[a] for a in names)
        out.append(axes if shape[dim] % n == 0 else None)
    return P(*out)


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh,
                      rules: Optional[Rules] = None) -> Any:
    """NamedShardings for `abstract_tree`, a tree of (possibly boxed) arrays or ShapeDtypeStructs.

    Leaves boxed in `nn.LogicallyPartitioned` are mapped through `rules` (default `axis_rules()`);
    plain leaves are replicated. The result has the structure of `nn.unbox(abstract_tree)`.
    """
    rules = axis_rules() if rules is None else tuple(rules)
    specs = nn.get_partition_spec(abstract_tree)  # logical PartitionSpecs, boxes removed
    shapes = unbox(abstract_tree)

    def one(logical: P, leaf) -> NamedSharding:
        mesh_spec = nn.logical_to_mesh_axes(tuple(logical), rules) if len(logical) else P()
        return NamedSharding(mesh, _divisible_spec(mesh_spec, np.shape(leaf), mesh))

    return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """Unboxed ShapeDtypeStructs carrying `shardings` (targets for Orbax restore and AOT lowering)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        unbox(abstract_tree), shardings)


def create_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                   mesh: jax.sharding.Mesh, rules: Optional[Rules] = None) -> tuple[Any, Any]:
    """Runs `init_fn(rng)` so that each leaf is created directly on its shards.

    Returns `(params, shardings)`; `params` is unboxed (plain arrays).
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = logical_shardings(abstract, mesh, rules)
    init = jax.jit(lambda r: unbox(init_fn(r)), out_shardings=shardings)
    return init(rng), shardings


def create_or_load(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: jax.sharding.Mesh,
                   rules: Optional[Rules] = None,
                   load: Optional[Callable[[Any], Optional[Any]]] = None) -> Any:
    """A tree with `init_fn`'s structure and shardings: `load(abstract tree carrying the shardings)`
    when it gives one (pretrained weights placed shard by shard), else `init_fn(rng)` created on its
    shards. Unboxed."""
    abstract = jax.eval_shape(init_fn, rng)
    shardings = logical_shardings(abstract, mesh, rules)
    tree = load(abstract_with_shardings(abstract, shardings)) if load is not None else None
    if tree is None:
        tree = jax.jit(lambda r: unbox(init_fn(r)), out_shardings=shardings)(rng)
    return tree


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Dimension 0 split over `("data", "fsdp")`, every other dimension replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """How many ways a batch is split: `mesh.data * mesh.fsdp`."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def make_global_batch(local_batch: Mapping[str, np.ndarray],
                      mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Per-process numpy arrays -> global `jax.Array`s sharded over `("data", "fsdp")` on dim 0.

    Each process passes its own slice (`global_batch / process_count` rows, in process order). Fields
    holding strings or Python objects stay on the host and are NOT returned (the jitted step only
    sees numeric arrays).
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "OUSV":
            continue
        if value.ndim == 0:
            raise ValueError(f"batch field {key!r} is a scalar; every field needs a batch dimension")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


# -- evaluation on every process ----------------------------------------------------------------
# An eval batch is this process's rows (`data.pipeline.make_eval_dataset` gives every process the same
# number of batches). With one process it stays a numpy array (jit replicates it, as before); with
# several, the processes' rows form one global array split over the batch axes, padded with invalid
# rows to a multiple of this process's share of those axes, and every output is gathered back to every
# process (`host_value`), so that all processes finish with the single-process result.


def _local_batch_share(mesh: jax.sharding.Mesh) -> int:
    """How many batch shards this process's devices hold."""
    return max(1, data_parallel_size(mesh) // jax.process_count())


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = -len(x) % multiple
    return x if not extra else np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)])


def eval_inputs(local: np.ndarray, mesh: Optional[jax.sharding.Mesh]):
    """This process's eval rows as a jit input: itself with one process, else one global array of every
    process's rows (zero rows padded, see `eval_rows`)."""
    if jax.process_count() == 1 or mesh is None:
        return local
    padded = _pad_rows(np.asarray(local), _local_batch_share(mesh))
    return jax.make_array_from_process_local_data(batch_sharding(mesh), padded)


def eval_rows(local: np.ndarray, mesh: Optional[jax.sharding.Mesh]) -> np.ndarray:
    """A host field of this process's eval rows (`valid`, `image_id`) as every process sees the global
    batch of `eval_inputs`: all processes' rows in process order, padded alike (zeros: `valid` False)."""
    if jax.process_count() == 1 or mesh is None:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    padded = _pad_rows(np.asarray(local), _local_batch_share(mesh))
    return np.asarray(multihost_utils.process_allgather(padded, tiled=True))


def host_value(x) -> np.ndarray:
    """The whole value of `x` as numpy, on every process (an all-gather when other processes hold parts)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
