"""The frozen image encoders of BLIP-2: EVA ViT-g/14 and CLIP ViT-L/14, one module.

Both are pre-LN ViTs that return the *penultimate* layer of the original network (LAVIS builds 39 of
EVA-CLIP-g's 40 blocks and 23 of CLIP-L's 24) with no final norm; `ln_vision` (the LayerNorm the
Q-Former reads through) lives in the composition (`blip2.py`) because it trains in stage 1.

The two differ only in configuration:
- EVA (`style="eva"`): patch conv with bias; q and v biases, none on k; exact GELU; eps 1e-6.
- CLIP (`style="clip"`): patch conv without bias; `pre_layernorm` before the blocks; q, k and v
  biases; quick-GELU; eps 1e-5.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.models import layers
from blip2_jax.models.layers import Dense, LayerNorm, TowerConfig
from blip2_jax.models.stacking import LayerStack


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
    """An EVA or CLIP ViT's sizes (see the module docstring), plus the precision knobs (`TowerConfig`)."""

    style: str = "eva"  # "eva" or "clip"
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_layers: int = 39  # blocks built (the penultimate layer's output)
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    attention_dropout: float = 0.0
    # Init spread of the class and position embeddings (HF: initializer_range 0.02). Only a randomly
    # initialised frozen ViT cares: at 0.02 its position signal is drowned by the patch content.
    position_init_std: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        if self.style not in ("eva", "clip"):
            raise ValueError(f"VisionConfig.style must be 'eva' or 'clip', got {self.style!r}")
        self._check_heads(self.hidden_size, self.num_heads)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def num_tokens(self) -> int:
        """The tokens it returns (patches + class token): what the Q-Former cross-attends to."""
        return self.num_positions

    @property
    def forward_flops(self) -> float:
        """Forward FLOPs of one image: 2 per multiply-add of the blocks' weight matmuls (the train
        loop's MFU count; attention scores and the patch embedding are left out)."""
        d = self.hidden_size
        return float(2 * self.num_tokens * self.num_layers * (4 * d * d + 2 * d * self.intermediate_size))


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (torch's a = -0.75)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, align_corners: bool = False) -> np.ndarray:
    """`[out_size, in_size]` matrix equal to torch's 1-D bicubic interpolation (border-clamped)."""
    out = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = out * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:
        src = (out + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
    return matrix


def interpolate_position_embedding(pos: jax.Array, grid: tuple[int, int], align_corners: bool = False) -> jax.Array:
    """Resize `[1, 1 + g*g, D]` position embeddings to `grid` (bicubic, as HF `interpolate_pos_encoding`)."""
    num_old = pos.shape[1] - 1
    old = int(round(num_old ** 0.5))
    if old * old != num_old:
        raise ValueError(f"position embedding has {num_old} patch positions, not a square grid")
    if (old, old) == tuple(grid):
        return pos
    cls, patches = pos[:, :1], pos[:, 1:].reshape(old, old, -1).astype(jnp.float32)
    mh = jnp.asarray(bicubic_matrix(old, grid[0], align_corners), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(old, grid[1], align_corners), jnp.float32)
    resized = jnp.einsum("hi,ijd,wj->hwd", mh, patches, mw, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([cls, resized.reshape(1, grid[0] * grid[1], -1).astype(pos.dtype)], axis=1)


class Embeddings(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        d = cfg.hidden_size
        kernel = self.param(
            "patch_kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            (cfg.patch_size, cfg.patch_size, 3, d), cfg.param_dtype)
        x = jax.lax.conv_general_dilated(
            pixel_values.astype(cfg.dtype), kernel.astype(cfg.dtype),
            window_strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if cfg.style == "eva":
            bias = self.param("patch_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                              (d,), cfg.param_dtype)
            x = x + bias.astype(cfg.dtype)
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, d)
        init = nn.initializers.normal(cfg.position_init_std)
        cls = self.param("class_embedding", nn.with_logical_partitioning(init, ("embed",)), (d,), cfg.param_dtype)
        pos = self.param("position_embedding", nn.with_logical_partitioning(init, (None, None, "embed")),
                         (1, cfg.num_positions, d), cfg.param_dtype)
        pos = interpolate_position_embedding(pos, (gh, gw))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(cfg.dtype), (b, 1, d)), x], axis=1)
        return x + pos.astype(cfg.dtype)


class Attention(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        dense = lambda name, bias: Dense(cfg.hidden_size, ("embed", "heads"), use_bias=bias, dtype=cfg.dtype,  # noqa: E731
                                         param_dtype=cfg.param_dtype, name=name)
        # EVA has no k bias (LAVIS concatenates zeros); a k bias cannot change attention anyway.
        q = layers.split_heads(dense("query", True)(x), cfg.num_heads)
        k = layers.split_heads(dense("key", cfg.style == "clip")(x), cfg.num_heads)
        v = layers.split_heads(dense("value", True)(x), cfg.num_heads)
        rng = None if deterministic or cfg.attention_dropout == 0 else self.make_rng("dropout")
        out = layers.dot_product_attention(q, k, v, dropout_rate=cfg.attention_dropout, deterministic=deterministic,
                                           dropout_rng=rng, dtype=cfg.dtype, impl=cfg.attention_impl)
        return Dense(cfg.hidden_size, ("heads", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     name="out")(layers.merge_heads(out))


class Block(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)  # noqa: E731
        x = x + Attention(cfg, name="attention")(norm("norm1")(x), deterministic)
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name="fc1")(norm("norm2")(x))
        h = layers.activation(cfg.hidden_act)(h)
        h = Dense(cfg.hidden_size, ("mlp", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="fc2")(h)
        return layers.logically_constrain(x + h, ("batch", "length", "embed")), None  # (carry, nothing per layer)


def layer_stacks(config: VisionConfig, at: tuple[str, ...] = ()) -> list[LayerStack]:
    """The ViT's blocks: `layers_{i}` unrolled, `layers` scanned."""
    return [LayerStack(at, "layers_", config.num_layers, config.scan_layers)]


class VisionTransformer(nn.Module):
    """`pixel_values [B, H, W, 3]` (CLIP-normalised) -> `[B, 1 + (H/p)*(W/p), D]` hidden states."""

    config: VisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        x = Embeddings(cfg, name="embeddings")(pixel_values)
        if cfg.style == "clip":
            x = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="pre_layernorm")(x)
        if cfg.scan_layers:
            blocks = layers.scan_blocks(Block, cfg, cfg.num_layers, in_axes=(nn.broadcast,), static_argnums=(2,))
            x, _ = blocks(cfg, name="layers")(x, deterministic)
            return x
        block = layers.remat_block(Block, cfg, static_argnums=(2,))
        for i in range(cfg.num_layers):
            x, _ = block(cfg, name=f"layers_{i}")(x, deterministic)
        return x
