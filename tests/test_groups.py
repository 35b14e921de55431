"""jp.channel_groups: coupled axes read from the program, checked against hand-built expectations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from group_models import _init, build

import jprune as jp


def prunable(groups):
    """The prunable groups as sets of member strings."""
    return sorted(sorted(str(m) for m in g.members) for g in groups.prunable)


def find(groups, member):
    """The group holding ``member`` ("path[axis]")."""
    (g,) = [g for g in groups if any(str(m) == member for m in g.members)]
    return g


def test_mlp_two_layers():
    module, v, x, _ = build("mlp")
    groups = jp.channel_groups(module.apply, v, x)
    p = "params/"
    assert prunable(groups) == [
        [f"{p}Dense_0/bias[0]", f"{p}Dense_0/kernel[1]", f"{p}Dense_1/kernel[0]"],
        [f"{p}Dense_1/bias[0]", f"{p}Dense_1/kernel[1]", f"{p}Dense_2/kernel[0]"],
    ]
    assert "input" in find(groups, f"{p}Dense_0/kernel[0]").reason
    assert "output" in find(groups, f"{p}Dense_2/kernel[1]").reason
    assert "output" in find(groups, f"{p}Dense_2/bias[0]").reason
    g = find(groups, f"{p}Dense_0/kernel[1]")
    assert g.width == 8 and g.prunable
    roles = {str(m): m.role for m in g.members}
    assert roles == {f"{p}Dense_0/bias[0]": "", f"{p}Dense_0/kernel[1]": "out", f"{p}Dense_1/kernel[0]": "in"}


def test_conv_bn_conv():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
            return nn.Conv(2, (1, 1))(x)

    x = jnp.ones((1, 5, 5, 3))
    v = _init(M(), x)
    groups = jp.channel_groups(M().apply, v, x)
    assert prunable(groups) == [
        sorted(
            [
                "batch_stats/BatchNorm_0/mean[0]",
                "batch_stats/BatchNorm_0/var[0]",
                "params/BatchNorm_0/bias[0]",
                "params/BatchNorm_0/scale[0]",
                "params/Conv_0/bias[0]",
                "params/Conv_0/kernel[3]",
                "params/Conv_1/kernel[2]",
            ]
        )
    ]
    assert "window" in find(groups, "params/Conv_0/kernel[0]").reason
    assert "input" in find(groups, "params/Conv_0/kernel[2]").reason


def test_residual_block_ties_stem_and_blocks():
    module, v, x, _ = build("rescnn")
    groups = jp.channel_groups(module.apply, v, x)
    g = find(groups, "params/Conv_0/kernel[3]")
    names = {str(m) for m in g.members}
    # the skip additions tie the stem to both blocks' second convs, their BNs, and every consumer
    for member in ("Conv_2/kernel[3]", "Conv_4/kernel[3]", "BatchNorm_2/scale[0]", "BatchNorm_4/bias[0]"):
        assert f"params/{member}" in names
    for consumer in ("Conv_1/kernel[2]", "Conv_3/kernel[2]", "Dense_0/kernel[0]"):
        assert f"params/{consumer}" in names
    assert "batch_stats/BatchNorm_4/var[0]" in names
    assert g.prunable and g.width == 8
    mids = [find(groups, f"params/Conv_{i}/kernel[3]") for i in (1, 3)]
    assert [m.width for m in mids] == [6, 5] and all(m.prunable for m in mids)
    assert len(groups.prunable) == 3


def test_concat_offsets():
    module, v, x, _ = build("concat")
    groups = jp.channel_groups(module.apply, v, x)
    a, b = find(groups, "params/Dense_0/kernel[1]"), find(groups, "params/Dense_1/kernel[1]")
    assert a.prunable and b.prunable
    (ra,) = [m for m in a.members if m.path == "params/Dense_2/kernel"]
    (rb,) = [m for m in b.members if m.path == "params/Dense_2/kernel"]
    np.testing.assert_array_equal(ra.index[:, 0], np.arange(4))
    np.testing.assert_array_equal(rb.index[:, 0], 4 + np.arange(3))  # after the first operand's 4


def test_flatten_into_dense_strided_rows():
    module, v, x, _ = build("lenet")
    groups = jp.channel_groups(module.apply, v, x)
    g = find(groups, "params/Conv_1/kernel[3]")
    (rows,) = [m for m in g.members if m.path == "params/Dense_0/kernel"]
    # after conv(3x3 VALID) / pool / conv / pool, 14x14 -> 2x2 positions of 8 channels, NHWC flattened
    assert rows.index.shape == (8, 4)
    np.testing.assert_array_equal(rows.index, np.arange(32).reshape(4, 8).T)
    assert rows.role == "in"


def test_depthwise_passes_channels_through():
    module, v, x, _ = build("depthwise")
    groups = jp.channel_groups(module.apply, v, x)
    g = find(groups, "params/Conv_0/kernel[3]")
    names = {str(m) for m in g.members}
    assert {"params/Conv_1/kernel[3]", "params/Conv_1/bias[0]", "params/Conv_2/kernel[2]"} <= names
    assert g.prunable


def test_depthwise_multiplier_and_grouped_conv():
    class M(nn.Module):
        groups: int

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (1, 1))(x)
            x = nn.Conv(8, (3, 3), feature_group_count=self.groups)(x)
            return nn.Conv(2, (1, 1))(x)

    x = jnp.ones((1, 4, 4, 3))
    mult = jp.channel_groups(M(4).apply, _init(M(4), x), x)
    g = find(mult, "params/Conv_0/kernel[3]")
    (dw,) = [m for m in g.members if m.path == "params/Conv_1/kernel"]
    np.testing.assert_array_equal(dw.index, np.arange(8).reshape(4, 2))  # channel c -> outputs 2c, 2c+1
    assert g.prunable
    grouped = jp.channel_groups(M(2).apply, _init(M(2), x), x)
    assert "grouped conv" in find(grouped, "params/Conv_0/kernel[3]").reason


def test_attention_heads():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
            x = nn.LayerNorm()(x)
            return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(x)))

    x = jnp.ones((2, 5, 8))
    v = _init(Block(), x)
    groups = jp.channel_groups(Block().apply, v, x)
    att = "params/MultiHeadDotProductAttention_0/"
    heads = find(groups, f"{att}query/kernel[1]")
    assert heads.prunable and heads.width == 2
    assert {str(m) for m in heads.members} == {
        f"{att}{p}/{leaf}" for p in ("query", "key", "value") for leaf in ("kernel[1]", "bias[0]")
    } | {f"{att}out/kernel[0]"}
    # q.k contracts the head dim between two computed tensors (its scale may depend on the width)
    assert "computed tensors" in find(groups, f"{att}query/kernel[2]").reason
    assert find(groups, f"{att}value/kernel[2]").prunable  # value dims: only the out projection reads them
    assert "input" in find(groups, "params/LayerNorm_0/scale[0]").reason  # residual stream
    assert find(groups, "params/Dense_1/kernel[1]").prunable  # the MLP hidden layer


def test_tied_embedding():
    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(11, 6)
            h = nn.Dense(6)(nn.relu(nn.Dense(7)(embed(ids))))
            return embed.attend(h)

    ids = jnp.array([[1, 2, 3]])
    v = _init(LM(), ids)
    groups = jp.channel_groups(LM().apply, v, ids)
    feat = find(groups, "params/Embed_0/embedding[1]")
    assert feat.prunable
    assert {"params/Dense_1/kernel[0]", "params/Dense_0/kernel[1]"} <= {str(m) for m in feat.members}
    assert not find(groups, "params/Embed_0/embedding[0]").prunable


@pytest.mark.parametrize(
    "op, name",
    [(lambda h: jnp.cumsum(h, axis=-1), "cumsum"), (lambda h: jnp.sort(h, axis=-1), "sort")],
)
def test_unknown_op_refuses_its_group_only(op, name):
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(6)(x))
            h = nn.relu(nn.Dense(5)(op(h)))
            return nn.Dense(2)(h)

    x = jnp.ones((2, 3))
    v = _init(M(), x)
    groups = jp.channel_groups(M().apply, v, x)
    bad = find(groups, "params/Dense_0/kernel[1]")
    assert not bad.prunable and name in bad.reason
    assert find(groups, "params/Dense_1/kernel[1]").prunable
    with pytest.raises(ValueError, match="Dense_1/kernel.1.*remove them all"):
        jp.group_structured(v, 1.0, groups, scope="layer")
    masks = jp.group_structured(v, 0.5, groups, scope="layer")
    assert masks["params"]["Dense_0"]["kernel"] is None  # an unprunable group is never touched


def test_reduction_over_channels_and_softmax_are_unprunable():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(6)(x)
            h = h - jnp.mean(h, axis=-1, keepdims=True)
            g = jax.nn.softmax(nn.Dense(4)(x), axis=-1)
            return nn.Dense(2)(h) + nn.Dense(2)(g)

    x = jnp.ones((2, 3))
    v = _init(M(), x)
    groups = jp.channel_groups(M().apply, v, x)
    assert "reduce_sum" in find(groups, "params/Dense_0/kernel[1]").reason
    assert "reduce_max" in find(groups, "params/Dense_1/kernel[1]").reason
    assert not groups.prunable


def test_print_table_and_nnx():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 5, rngs=rngs)
            self.b = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    groups = jp.channel_groups(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.ones((1, 3)))
    assert prunable(groups) == [["a/bias[0]", "a/kernel[1]", "b/kernel[0]"]]
    table = str(groups)
    assert "1 prunable of" in table and "a/kernel[1]" in table and "model's output" in table


def test_refuses_non_array_leaf():
    with pytest.raises(TypeError, match="'w'"):
        jp.channel_groups(lambda t, x: x, {"w": "text"}, jnp.ones(2))


def test_fused_qkv_split_into_heads():
    """One Dense makes q, k and v; jnp.split and a reshape into heads: each head's columns of the
    fused kernel (three blocks) form one group with the out projection's rows."""

    class Fused(nn.Module):
        @nn.compact
        def __call__(self, x):
            b, t, d = x.shape
            q, k, v = jnp.split(nn.Dense(3 * 6, name="qkv")(x), 3, axis=-1)
            q, k, v = (a.reshape(b, t, 2, 3) for a in (q, k, v))
            w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, 6)
            return x + nn.Dense(d, name="out")(o)

    x = jnp.ones((1, 4, 5))
    v = _init(Fused(), x)
    groups = jp.channel_groups(Fused().apply, v, x)
    (heads,) = [g for g in groups.prunable if g.width == 2]
    cols = sorted(m.index.ravel().tolist() for m in heads.members if m.path == "params/qkv/kernel")
    assert cols == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]  # q, k, v blocks
    rows = [m for m in heads.members if m.path == "params/out/kernel"]
    assert len(rows) == 1 and rows[0].index.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_width_used_as_a_number_is_unprunable():
    """A width Python reads as a number is invisible in one trace; a second trace with one channel
    fewer shows the literal change (plain functions and NNX; Linen modules check their shapes)."""
    from flax import nnx

    def apply(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        g = jax.nn.relu(x @ p["w3"])
        return (h * (1.0 / h.shape[-1])) @ p["w2"] + g @ p["w4"]

    rng = np.random.default_rng(0)
    shapes = {"w1": (3, 6), "b1": (6,), "w2": (6, 2), "w3": (3, 5), "w4": (5, 2)}
    p = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    groups = jp.channel_groups(apply, p, jnp.ones((4, 3)))
    bad = find(groups, "w1[1]")
    assert "width is used as a number" in bad.reason and "0.16666" in bad.reason
    assert find(groups, "w3[1]").prunable  # the other hidden layer is untouched

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(3, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.a(x))
            return self.b(h / jnp.sqrt(h.shape[-1]))

    import jprune.nnx as jpnnx

    groups = jpnnx.channel_groups(Net(nnx.Rngs(0)), jnp.ones((2, 3)))
    assert "sqrt" in find(groups, "a/kernel[1]").reason


def test_sub_programs_custom_vjp_checkpoint_jit():
    """A plain function whose hidden layer goes through custom_vjp, jax.checkpoint and jax.jit:
    one prunable group, and the shrunk params run in the same function (no rebuild needed)."""

    @jax.custom_vjp
    def act(x):
        return jnp.tanh(x)

    act.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g,))

    def apply(p, x):
        h = act(x @ p["w1"] + p["b1"])
        h = jax.checkpoint(jax.nn.gelu)(h)
        return jax.jit(lambda h: h * 2.0)(h) @ p["w2"]

    rng = np.random.default_rng(0)
    p = {
        k: jnp.asarray(rng.normal(size=s), jnp.float32)
        for k, s in {"w1": (3, 6), "b1": (6,), "w2": (6, 2)}.items()
    }
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    groups = jp.channel_groups(apply, p, x)
    assert prunable(groups) == [["b1[0]", "w1[1]", "w2[0]"]]
    masks = jp.group_structured(p, 0.5, groups)
    small, widths = jp.shrink(p, masks, groups)
    assert small["w1"].shape == (3, 3) and widths == {"": 3}
    np.testing.assert_allclose(apply(small, x), apply(jp.apply_masks(p, masks), x), rtol=1e-6, atol=1e-6)
