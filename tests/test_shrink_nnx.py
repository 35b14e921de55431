"""shrink_model: a smaller NNX model computing the masked model's function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jprune as jp
import jprune.nnx as jpnnx


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
        self.dw = nnx.Conv(6, 6, (3, 3), feature_group_count=6, rngs=rngs)
        self.pw = nnx.Conv(6, 6, (1, 1), rngs=rngs)
        self.head = nnx.Linear(6 * 16, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        x = x + self.pw(nnx.relu(self.dw(x)))  # residual: stem and pw share channels
        return self.head(x.reshape(x.shape[0], -1))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.att = nnx.MultiHeadAttention(4, 8, qkv_features=12, decode=False, rngs=rngs)
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        x = x + self.att(self.norm(x))
        return x + self.down(nnx.gelu(self.up(x)))


def randomize(make, seed=0):
    """``make()``'s model with random values everywhere (running variances positive), built
    abstractly (no initializer is compiled)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        if "var" in jax.tree_util.keystr(path):
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
        return jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def check(model, x, **kw):
    groups = jpnnx.channel_groups(model, x)
    graphdef, state = nnx.split(model)
    masks = jp.group_structured(state, 0.5, groups, **kw)
    small = jpnnx.shrink(model, masks, groups)
    want = nnx.merge(graphdef, jp.apply_masks(state, masks))(x)
    got = small(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    assert sum(a.size for a in jax.tree.leaves(nnx.state(small))) < sum(
        a.size for a in jax.tree.leaves(state)
    )
    return small, groups


def test_cnn_bn_depthwise_residual():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    model = randomize(lambda: CNN(nnx.Rngs(0)))
    before = jax.tree.map(jnp.shape, nnx.state(model))
    small, groups = check(model, x)
    assert jax.tree.map(jnp.shape, nnx.state(model)) == before  # the model itself is unchanged
    assert small.dw.feature_group_count == small.dw.out_features == small.stem.out_features == 3
    assert small.bn.num_features == 3 and small.head.in_features == 3 * 16
    assert jax.jit(lambda m, x: m(x))(small, x).shape == (2, 3)


def test_attention_heads_and_mlp():
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    model = randomize(lambda: Block(nnx.Rngs(0)))
    groups = jpnnx.channel_groups(model, x)
    names = ("att/query/kernel[1]", "up/kernel[1]")

    def heads_and_mlp(g):
        return any(str(m) in names for m in g.members)

    small, _ = check(model, x, select=heads_and_mlp)
    assert (small.att.num_heads, small.att.head_dim, small.att.qkv_features) == (2, 3, 6)
    assert small.up.out_features == 8
    # the value dims cannot shrink alone (nnx.MultiHeadAttention has one head_dim for q, k and v):
    # the width check refuses that group, so pruning every prunable group is safe
    (values,) = [g for g in groups if any(str(m) == "att/value/kernel[2]" for m in g.members)]
    assert not values.prunable and "smaller width" in values.reason
    check(model, x)


def test_unknown_layer_refused():
    class Scale(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 3)))

        def __call__(self, x):
            return x @ self.w

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(2, 4, rngs=rngs)
            self.s = Scale()

        def __call__(self, x):
            return self.s(nnx.relu(self.a(x)))

    model = Net(nnx.Rngs(0))
    x = jnp.ones((1, 2))
    groups = jpnnx.channel_groups(model, x)
    masks = jp.group_structured(nnx.split(model)[1], 0.5, groups)
    with pytest.raises(ValueError, match="Scale"):
        jpnnx.shrink(model, masks, groups)
