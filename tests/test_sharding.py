"""Mesh construction, logical -> mesh shardings (with the divisibility fallback), global batches."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from blip2_jax import sharding
from blip2_jax.models.layers import Dense, Embed, LayerNorm


class _Tiny(nn.Module):
    vocab: int = 37

    @nn.compact
    def __call__(self, ids):
        x = Embed(self.vocab, 16)(ids)                       # (vocab, embed)
        x = Dense(32, axes=("embed", "mlp"))(x)              # (embed, mlp) + bias (mlp,)
        x = LayerNorm(axis_name="mlp")(x)
        return Dense(self.vocab, axes=("mlp", "vocab"))(x)   # (mlp, vocab)


def _init(vocab):
    return lambda rng: _Tiny(vocab).init(rng, jnp.zeros((2, 3), jnp.int32))


def test_make_mesh_fills_minus_one_and_is_auto():
    mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    mesh1 = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    assert mesh1.devices.size == 1


@pytest.mark.parametrize("cfg, match", [
    (dict(data=3, fsdp=1, tensor=1), "must equal"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one"),
    (dict(data=0, fsdp=1, tensor=1), "mesh.data=0"),
    (dict(data=-1, fsdp=3, tensor=1), "not divisible"),
])
def test_make_mesh_rejects_bad_sizes(cfg, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(cfg)


def test_logical_shardings_follow_rules_and_fall_back_on_indivisible_dims():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    for vocab, vocab_axis in [(37, None), (38, "tensor")]:
        params, shardings = sharding.create_sharded(_init(vocab), jax.random.PRNGKey(0), mesh)
        specs = jax.tree.map(lambda s: s.spec, shardings)["params"]
        assert specs["Dense_0"]["kernel"] == P("fsdp", "tensor")
        assert specs["Dense_0"]["bias"] == P("tensor")
        assert specs["LayerNorm_0"]["scale"] == P("tensor")
        assert specs["Embed_0"]["embedding"] == P(vocab_axis, "fsdp")
        # a mesh axis is used once per array: mlp takes "tensor", so vocab stays replicated
        assert specs["Dense_1"]["kernel"] == P("tensor", None)
        # the created arrays really sit on those shardings, and equal an unsharded init
        got = jax.tree.map(lambda a: a.sharding.spec, params)["params"]
        assert got == specs
        # threefry_partitionable: the sharded init draws the same numbers as an unsharded jit
        ref = jax.jit(lambda r: nn.unbox(_init(vocab)(r)))(jax.random.PRNGKey(0))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     params, ref)


def test_axis_rule_overrides_replace_defaults():
    rules = sharding.axis_rules([("vocab", None), ("embed", ["data", "fsdp"])])
    assert ("vocab", None) in rules and ("vocab", "tensor") not in rules
    assert ("embed", ("data", "fsdp")) in rules and ("embed", "fsdp") not in rules
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    abstract = jax.eval_shape(_init(38), jax.random.PRNGKey(0))
    specs = jax.tree.map(lambda s: s.spec, sharding.logical_shardings(abstract, mesh, rules))
    assert specs["params"]["Embed_0"]["embedding"] == P(None, ("data", "fsdp"))
    with pytest.raises(ValueError, match="'model'"):
        sharding.axis_rules([("embed", "model")])


def test_make_global_batch_shards_rows_and_keeps_values():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
             "ids": np.arange(8, dtype=np.int32), "caption": np.array(["a"] * 8)}
    batch = sharding.make_global_batch(local, mesh)
    assert set(batch) == {"image", "ids"}  # strings stay on the host
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
    assert batch["image"].sharding.spec == P(("data", "fsdp"))
    # 4 batch shards of 2 rows each, replicated over "tensor"
    rows = sorted({tuple(s.index[0].indices(8)) for s in batch["image"].addressable_shards})
    assert rows == [(0, 2, 1), (2, 4, 1), (4, 6, 1), (6, 8, 1)]
    assert sharding.data_parallel_size(mesh) == 4


def test_vit_block_activation_constraints_apply_in_the_loops_mesh_context():
    """The loop traces under `jax.set_mesh` + `nn.logical_axis_rules`: there the ViT blocks' activation
    constraints are in the program (and shard the batch over data x fsdp); outside they are no-ops."""
    from blip2_jax.models.vit import VisionConfig, VisionTransformer

    cfg = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=16,
                       patch_size=8)
    vit = VisionTransformer(cfg)
    pixels = jnp.zeros((8, 16, 16, 3))
    params = sharding.unbox(vit.init(jax.random.PRNGKey(0), pixels, True))

    def apply(x):
        return vit.apply(params, x, True)

    def constraints():
        eqns = jax.make_jaxpr(apply)(pixels).jaxpr.eqns
        return [e for e in eqns if e.primitive.name == "sharding_constraint"]

    assert constraints() == []
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules(())):
        found = constraints()
        out = jax.jit(apply)(pixels)
    assert len(found) == cfg.num_layers
    assert out.sharding.spec[0] == ("data", "fsdp")  # the batch rows are split over data and fsdp
