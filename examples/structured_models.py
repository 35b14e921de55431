"""Models whose widths are constructor arguments, for structured pruning (``jp.shrink``).

``jp.shrink`` returns the smaller variables and ``widths``: each layer's new feature count, keyed by
the layer's path in the variables (``"params/layer2_0/conv1"``; a tuple for a multi-axis kernel
such as an attention projection's ``(heads, head_dim)``). A Linen model is rebuilt by reading every
layer's width from that mapping, with the dense width as the default: ``ResNet18(widths=widths)``.

- ``ResNet18``: torchvision's ResNet-18 layout (BasicBlocks 2-2-2-2, BatchNorm, 1x1 projection
  shortcuts), in Linen; ``small_input=True`` swaps the 7x7/2 stem and max-pool for a 3x3/1 stem
  (CIFAR-style) for small images.
- ``ViT``: a small Vision Transformer (patch embedding, pre-norm blocks with multi-head attention
  and a GELU MLP, mean pooling); heads and MLP widths per block come from ``widths``.
- ``torch_resnet18``: the same ResNet-18 in plain ``torch.nn`` (torchvision's layout, without
  importing torchvision), the Torch-Pruning anchor in ``bench/bench_structured.py``.
- ``NO_YNNPACK``: ``compiler_options`` for ``jax.jit`` on CPU, under which the shrunk ResNet-18
  of ``bench/bench_structured.py`` is 3.1-3.3x faster than the dense one (2.0-2.2x without).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from flax import linen as nn

STAGES = (64, 128, 256, 512)

# ``jax.jit(fn, compiler_options=NO_YNNPACK)``: XLA:CPU (jax 0.10) without its YNNPACK fusions, which
# by default take convolutions and dots with their elementwise neighbours; convolutions then run on
# XLA's own (Eigen) emitter. Measured on ResNet-18 (bench/bench_structured.py --convs): the dense
# model is faster, and a shrunk one keeps that speed at narrow widths, where YNNPACK runs 32- and
# 64-channel convolutions at about half its 128-channel throughput. CPU compilations only.
NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _width(widths: Mapping | None, path: str, default):
    """The width ``jp.shrink`` gives the module at ``path`` of the params, or ``default``."""
    return (widths or {}).get(f"params/{path}", default)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (1x1 conv + BN when projecting)."""

    conv1: int
    conv2: int
    stride: int = 1
    project: bool = False  # explicit: after a shrink, equal widths must not drop the projection

    @nn.compact
    def __call__(self, x, train: bool = False):
        # momentum 0.9: torch's BatchNorm2d default (momentum=0.1 there); Flax's 0.99 leaves the running
        # statistics stale after a short fine-tune.
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
        y = nn.Conv(self.conv1, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = nn.Conv(self.conv2, (3, 3), padding=1, use_bias=False, name="conv2")(y)
        y = norm("bn2")(y)
        if self.project:
            x = nn.Conv(self.conv2, (1, 1), self.stride, use_bias=False, name="down_conv")(x)
            x = norm("down_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18; every conv's width is read from ``widths`` (default: the dense width)."""

    num_classes: int = 1000
    base: int = 64
    small_input: bool = False
    widths: Mapping[str, int] | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        w = lambda path, default: _width(self.widths, path, default)  # noqa: E731
        stages = [self.base * s // 64 for s in STAGES]
        if self.small_input:
            x = nn.Conv(w("stem_conv", stages[0]), (3, 3), padding=1, use_bias=False, name="stem_conv")(x)
        else:
            x = nn.Conv(w("stem_conv", stages[0]), (7, 7), 2, padding=3, use_bias=False, name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
        if not self.small_input:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, width in enumerate(stages):
            for j in range(2):
                name = f"layer{i + 1}_{j}"
                stride = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(
                    conv1=w(f"{name}/conv1", width),
                    conv2=w(f"{name}/conv2", width),
                    stride=stride,
                    project=i > 0 and j == 0,
                    name=name,
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


class Block(nn.Module):
    """Pre-norm Transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    heads: int
    head_dim: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=self.heads * self.head_dim,
            out_features=x.shape[-1],
            name="attn",
        )(y, y)
        x = x + y
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.gelu(nn.Dense(self.mlp, name="fc1")(y))
        return x + nn.Dense(x.shape[-1], name="fc2")(y)


class ViT(nn.Module):
    """A small ViT: patch embedding, ``depth`` blocks, mean pooling, linear head.

    Per block ``i``, the heads are read from the query projection's width ``(heads, head_dim)``
    (the head size stays), the MLP width from ``fc1``'s.
    """

    num_classes: int = 10
    patch: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp: int = 256
    widths: Mapping[str, int] | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, name="patch")(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        pos = self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        x = x + pos
        for i in range(self.depth):
            x = Block(
                heads=_width(self.widths, f"block{i}/attn/query", (self.heads,))[0],
                head_dim=self.dim // self.heads,
                mlp=_width(self.widths, f"block{i}/fc1", self.mlp),
                name=f"block{i}",
            )(x)
        x = nn.LayerNorm(name="ln")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


def torch_resnet18(num_classes: int = 1000):
    """torchvision's ResNet-18 layout in plain ``torch.nn`` (torch imported lazily)."""
    import torch
    from torch import nn as tnn

    class TorchBlock(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = tnn.Sequential(
                    tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class TorchResNet18(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = tnn.BatchNorm2d(64)
            self.maxpool = tnn.MaxPool2d(3, 2, 1)
            layers, cin = [], 64
            for i, cout in enumerate(STAGES):
                layers.append(
                    tnn.Sequential(TorchBlock(cin, cout, 1 if i == 0 else 2), TorchBlock(cout, cout, 1))
                )
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.fc = tnn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(x.mean((2, 3)), 1))

    return TorchResNet18()
