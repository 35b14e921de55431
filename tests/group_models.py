"""Small Linen models whose widths are constructor arguments, for channel groups and shrink tests.

Each entry of ``MODELS`` builds ``(module, input)`` from widths and rebuilds the module from the
``widths`` dict ``jp.shrink`` returns, so a test can compare the shrunk model with the masked one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class MLP(nn.Module):
    hidden: tuple = (8, 6)
    out: int = 3

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.out)(x)


class LeNet(nn.Module):
    c1: int = 6
    c2: int = 8
    f1: int = 12
    f2: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.c1, (3, 3), padding="VALID")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(self.c2, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)  # flatten -> Dense: a channel is strided rows
        x = nn.relu(nn.Dense(self.f1)(x))
        x = nn.relu(nn.Dense(self.f2)(x))
        return nn.Dense(4)(x)


class ResCNN(nn.Module):
    """conv-BN-relu stem, two residual blocks (the skip ties the stem's channels to each block's
    output), global average pool, Dense head."""

    c: int = 8
    mid: tuple = (6, 5)

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.c, (3, 3))(x)))
        for m in self.mid:
            y = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(m, (3, 3))(x)))
            y = nn.BatchNorm(use_running_average=True)(nn.Conv(self.c, (3, 3))(y))
            x = nn.relu(x + y)
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class DepthwiseCNN(nn.Module):
    c: int = 6
    d: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.c, (3, 3))(x))
        x = nn.relu(nn.Conv(self.c, (3, 3), feature_group_count=self.c)(x))  # depthwise
        x = nn.relu(nn.Conv(self.d, (1, 1))(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


class ConcatNet(nn.Module):
    a: int = 4
    b: int = 3

    @nn.compact
    def __call__(self, x):
        x = jnp.concatenate([nn.relu(nn.Dense(self.a)(x)), jnp.tanh(nn.Dense(self.b)(x))], axis=-1)
        return nn.Dense(2)(x)


class Transformer(nn.Module):
    """Pre-LN Transformer block: attention heads and the MLP hidden layer are prunable groups."""

    heads: int = 4
    head_dim: int = 3
    hidden: int = 16

    @nn.compact
    def __call__(self, x):
        att = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.heads * self.head_dim)
        x = x + att(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.hidden)(nn.LayerNorm()(x))))


class TiedLM(nn.Module):
    """Token embedding tied to the output head (``embed.attend``): the features axis is prunable."""

    d: int = 6
    hidden: int = 7

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, self.d)
        h = nn.relu(nn.Dense(self.hidden, name="up")(embed(ids)))
        return embed.attend(nn.Dense(self.d, name="down")(h))


def _init(module, x, seed=0, **kwargs):
    """Random variables of the module's shapes (numpy: no compile), running variances positive."""
    shapes = jax.eval_shape(lambda key, x: module.init(key, x, **kwargs), jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        return jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# name: (build, rebuild from shrink's widths, input shape)
MODELS = {
    "mlp": (MLP, lambda w: MLP((w["params/Dense_0"], w["params/Dense_1"])), (3, 5)),
    "lenet": (
        LeNet,
        lambda w: LeNet(w["params/Conv_0"], w["params/Conv_1"], w["params/Dense_0"], w["params/Dense_1"]),
        (2, 14, 14, 1),
    ),
    "rescnn": (
        ResCNN,
        lambda w: ResCNN(w["params/Conv_0"], (w["params/Conv_1"], w["params/Conv_3"])),
        (2, 6, 6, 3),
    ),
    "depthwise": (DepthwiseCNN, lambda w: DepthwiseCNN(w["params/Conv_0"], w["params/Conv_2"]), (2, 5, 5, 2)),
    "concat": (ConcatNet, lambda w: ConcatNet(w["params/Dense_0"], w["params/Dense_1"]), (3, 5)),
}


def build(name):
    """``(module, variables, x, rebuild)`` for a model of ``MODELS``."""
    cls, rebuild, shape = MODELS[name]
    module = cls()
    x = jax.random.normal(jax.random.key(2), shape)
    return module, _init(module, x), x, rebuild


def assert_same_function(module, v, masks, x, rebuild, groups):
    """The shrunk model, rebuilt from ``widths``, computes the masked model's output (to 1e-5 of its
    largest entry); returns ``(small, widths)``."""
    import jprune as jp

    small, widths = jp.shrink(v, masks, groups)
    want = module.apply(jp.apply_masks(v, masks), x)
    got = rebuild(widths).apply(small, x)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * max(scale, 1e-30))
    return small, widths


_GROUPS = {}


def model(name):
    """``(module, variables, x, rebuild, groups)`` for a model of ``MODELS``, the groups read once
    per process (shared by the test files)."""
    import jprune as jp

    if name not in _GROUPS:
        module, v, x, rebuild = build(name)
        _GROUPS[name] = (module, v, x, rebuild, jp.channel_groups(module.apply, v, x))
    return _GROUPS[name]
