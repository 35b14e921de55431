"""Models a user would write that once made shrink silently wrong: each is now refused for the
affected group (with the reason) or shrunk exactly, checked on inputs other than the traced ones."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jprune as jp
import jprune.nnx as jpnnx


def _linear(i, o):
    return nnx.Linear(i, o, rngs=nnx.Rngs(7 * i + o))


class Shuffle(nnx.Module):
    """Channel shuffle written with the group count as a number: ``reshape(b, groups, -1)``."""

    def __init__(self, groups=2, width=12):
        self.a, self.c, self.groups = _linear(4, width), _linear(width, 3), groups

    def __call__(self, x):
        h = nnx.relu(self.a(x))
        h = h.reshape(h.shape[0], self.groups, -1).swapaxes(1, 2).reshape(h.shape[0], -1)
        return self.c(h)


class Attention(nnx.Module):
    """Hand-written multi-head attention that splits heads with ``reshape(b, t, heads, -1)``."""

    def __init__(self, heads=2, head_dim=4, d=6):
        self.q, self.k, self.v = (_linear(d, heads * head_dim) for _ in range(3))
        self.o, self.heads, self.head_dim = _linear(heads * head_dim, d), heads, head_dim

    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).reshape(b, t, self.heads, -1) for m in (self.q, self.k, self.v))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim), -1)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, -1))


class FirstThree(nnx.Module):
    """Only the first three channels are read, by a slice with a fixed bound."""

    def __init__(self):
        self.a, self.f = _linear(4, 6), _linear(3, 3)

    def __call__(self, x):
        return self.f(nnx.relu(self.a(x))[..., :3])


class Split(nnx.Module):
    """Two consumers of one layer's channels, split by a fixed index or into equal halves."""

    def __init__(self, at):
        self.a, self.f, self.g, self.at = (
            _linear(4, 8),
            _linear(2 if at else 4, 3),
            _linear(6 if at else 4, 3),
            at,
        )

    def __call__(self, x):
        p, q = jnp.split(nnx.relu(self.a(x)), [self.at] if self.at else 2, -1)
        return self.f(p) + self.g(q)


def _random(model, seed=0):
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    return nnx.merge(
        graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype), state)
    )


def _same(got, want):
    scale = max(float(jnp.max(jnp.abs(want))), 1e-30)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale)


def _shrunk_equals_masked(model, x, others):
    groups = jpnnx.channel_groups(model, x)
    graphdef, state = nnx.split(model)
    masks = jp.group_structured(state, 0.5, groups, scope="layer")
    masked = nnx.merge(graphdef, jp.apply_masks(state, masks))
    small = jpnnx.shrink(model, masks, groups)
    for y in others:
        _same(small(y), masked(y))
    return groups


def _group(groups, member):
    (g,) = [g for g in groups if any(str(m) == member for m in g.members)]
    return g


@pytest.mark.parametrize(
    "make, shape, member, why",
    [
        (Shuffle, (2, 4), "a/kernel[1]x6", "lays the channels out differently"),
        (Attention, (2, 3, 6), "q/kernel[1]x4", "lays the channels out differently"),
        (FirstThree, (2, 4), "f/kernel[0]", "fails at a smaller width"),
        (lambda: Split(2), (2, 4), "f/kernel[0]", "smaller width"),
        (lambda: Split(None), (2, 4), "f/kernel[0]", "smaller width"),  # halves: alike
    ],
)
def test_width_as_a_number_is_refused(make, shape, member, why):
    x = jax.random.normal(jax.random.key(0), shape)
    others = [jax.random.normal(jax.random.key(1), (5, *shape[1:]))]
    groups = _shrunk_equals_masked(_random(make()), x, others)
    g = _group(groups, member)
    assert not g.prunable and why in g.reason


def test_split_at_a_fixed_index_keeps_the_rest_prunable():
    groups = jpnnx.channel_groups(_random(Split(2)), jnp.ones((2, 4)))
    assert _group(groups, "g/kernel[0]").prunable and not _group(groups, "f/kernel[0]").prunable


def test_shuffle_minor_channels_still_shrink():
    """Within each shuffle group the channels can go (the -1 follows); only the group count is fixed."""
    model = _random(Shuffle())
    groups = jpnnx.channel_groups(model, jnp.ones((2, 4)))
    assert not _group(groups, "a/kernel[1]x6").prunable  # the 2 shuffle groups
    assert _group(groups, "a/kernel[1]x2").prunable  # the 6 channels in each


class LinenShuffle(nn.Module):
    """The Linen shuffle: its widths are constructor arguments (rebuilt from ``shrink``'s widths)."""

    width: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width)(x))
        h = h.reshape(h.shape[0], 4, -1).swapaxes(1, 2).reshape(h.shape[0], -1)
        return nn.Dense(3)(h)


def test_linen_shuffle_with_a_fixed_group_count():
    """Linen checks parameter shapes against the constructor; the width check reads them anyway."""
    module = LinenShuffle()
    x = jax.random.normal(jax.random.key(0), (2, 4))
    v = module.init(jax.random.key(1), x)
    groups = jp.channel_groups(module.apply, v, x)
    assert [str(m) for g in groups.prunable for m in g.members] == [
        "params/Dense_0/bias[0]x4",
        "params/Dense_0/kernel[1]x4",
        "params/Dense_1/kernel[0]x4",
    ]
    assert groups.prunable[0].members[1].index[1, 0] == 1  # the channels inside a shuffle group
    masks = jp.group_structured(v, 0.5, groups, scope="layer")
    small, widths = jp.shrink(v, masks, groups)
    y = jax.random.normal(jax.random.key(2), (5, 4))
    _same(LinenShuffle(widths["params/Dense_0"]).apply(small, y), module.apply(jp.apply_masks(v, masks), y))


class Bordered(nnx.Module):
    """A constant channel (its producer's column masked, its bias left) through an op that pads:
    its value changes at the borders, which a 1x1 example input does not show."""

    def __init__(self, op):
        rngs = nnx.Rngs(0)
        self.a = nnx.Conv(3, 6, (1, 1), padding="VALID", rngs=rngs)
        self.dw = nnx.Conv(6, 6, (3, 3), feature_group_count=6, rngs=rngs)  # SAME padding
        self.b = nnx.Conv(6, 4, (1, 1), padding="VALID", rngs=rngs)
        self.head, self.op = nnx.Linear(4, 2, rngs=rngs), op

    def __call__(self, x):
        h = nnx.relu(self.a(x))
        h = nnx.avg_pool(h, (3, 3), padding="SAME") if self.op == "avg_pool" else nnx.relu(self.dw(h))
        return self.head(nnx.relu(self.b(h)).mean((1, 2)))


@pytest.mark.parametrize("op", ["avg_pool", "depthwise"])
def test_constant_channel_through_padding_is_not_folded(op):
    model = _random(Bordered(op))
    groups = jpnnx.channel_groups(model, jnp.ones((1, 1, 1, 3)))
    graphdef, state = nnx.split(model)
    masks = jax.tree.map(lambda a: None, state)
    masks["a"]["kernel"] = jnp.ones((1, 1, 3, 6), bool).at[..., 1::2].set(False)  # producers only
    small = jpnnx.shrink(model, masks, groups)
    y = jax.random.normal(jax.random.key(3), (2, 5, 5, 3))
    _same(small(y), nnx.merge(graphdef, jp.apply_masks(state, masks))(y))
    assert "padd" in _group(groups, "a/kernel[3]").varies


def test_linen_retrace_leaves_other_threads_shape_checks_on():
    """The width check retraces a Linen module with its parameter shape checks off: in that thread
    only, and only inside the retrace; Linen code in another thread meanwhile still refuses a
    kernel of the wrong shape."""
    import threading

    from flax.errors import ScopeParamShapeError

    from jprune._groups import _linen_shapes_unchecked

    dense = nn.Dense(4)
    x = jnp.ones((1, 3))
    wrong = {"params": {"kernel": jnp.ones((3, 6)), "bias": jnp.ones(6)}}  # 6 features, not 4
    seen = []

    def other_thread():
        try:
            dense.apply(wrong, x)
            seen.append("no error")
        except ScopeParamShapeError:
            seen.append("refused")

    with _linen_shapes_unchecked():
        assert dense.apply(wrong, x).shape == (1, 6)  # this thread: read as given
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert seen == ["refused"]
    with pytest.raises(ScopeParamShapeError):
        dense.apply(wrong, x)  # and here again, after the retrace
