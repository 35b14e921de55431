"""jp.group_structured and jp.shrink: coupled masks, and a shrunk model equal to the masked one."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from group_models import MODELS, TiedLM, Transformer, _init, assert_same_function, model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jprune as jp


def width_pruned(groups, masks, v):
    """Channels of each prunable group whose every member slice is masked (NumPy, from the masks)."""
    flat = dict(zip(groups.paths, jax.tree.leaves(masks, is_leaf=lambda m: m is None)))
    out = []
    for g in groups.prunable:
        pruned = np.ones(g.width, bool)
        for m in g.members:
            mask = flat[m.path]
            mask = (
                np.ones(groups.shapes[groups.paths.index(m.path)], bool) if mask is None else np.asarray(mask)
            )
            rows = np.moveaxis(mask, m.axis, 0)
            rows = rows if m.index is None else rows[m.index]
            pruned &= ~rows.reshape(g.width, -1).any(axis=1)
        out.append(pruned)
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_shrunk_equals_masked(name, scope):
    module, v, x, rebuild, groups = model(name)
    masks = jp.group_structured(v, 0.5, groups, scope=scope)
    small, widths = assert_same_function(module, v, masks, x, rebuild, groups)
    pruned = width_pruned(groups, masks, v)
    assert sum(p.sum() for p in pruned) > 0
    # every pruned channel is gone: the parameter count drops by exactly the pruned slices
    before = sum(np.size(a) for a in jax.tree.leaves(v))
    after = sum(np.size(a) for a in jax.tree.leaves(small))
    assert after < before
    if scope == "layer":  # torch's count per group: round(0.5 * width), at least one kept
        for g, p in zip(groups.prunable, pruned):
            assert p.sum() == min(round(0.5 * g.width), g.width - 1)


def reference_masks(groups, v, amount, scope, p=2.0):
    """Which channels to prune, from the docstring's rule, in NumPy (float64 norms)."""
    flat = dict(zip(groups.paths, jax.tree.leaves(v)))
    imps = []
    for g in groups.prunable:
        total = np.zeros(g.width)
        for m in g.members:
            if m.path.endswith(("/mean", "/var")):
                continue
            rows = np.moveaxis(np.asarray(flat[m.path], np.float64), m.axis, 0)
            rows = rows if m.index is None else rows[m.index]
            total += (np.abs(rows.reshape(g.width, -1)) ** p).sum(axis=1)
        imps.append(total ** (1 / p))
    if scope == "layer":
        return [
            np.isin(np.arange(len(i)), np.argsort(i, kind="stable")[: round(amount * len(i))]) for i in imps
        ]
    normed = [i / i.mean() for i in imps]
    spared = [np.argmax(i) for i in normed]
    cand = [(gi, c, y) for gi, i in enumerate(normed) for c, y in enumerate(i) if c != spared[gi]]
    k = round(amount * sum(len(i) for i in imps))
    chosen = sorted(cand, key=lambda t: t[2])[:k]
    out = [np.zeros(len(i), bool) for i in imps]
    for gi, c, _ in chosen:
        out[gi][c] = True
    return out


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("name", ["lenet", "rescnn"])
def test_selection_matches_numpy_reference(name, scope):
    module, v, x, rebuild, groups = model(name)
    masks = jp.group_structured(v, 0.4, groups, scope=scope)
    for got, want in zip(width_pruned(groups, masks, v), reference_masks(groups, v, 0.4, scope)):
        np.testing.assert_array_equal(got, want)


def test_global_normalizes_per_group():
    """Scaling every member of one group by 1000 changes nothing: a channel's importance is divided
    by its group's mean (raw norms would prune only the other group)."""
    module, v, x, rebuild, groups = model("concat")
    a = {m.path for m in groups.prunable[0].members}
    assert a == {"params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_2/kernel"}
    big = jax.tree.map(lambda w: w, v)
    for leaf in ("kernel", "bias"):
        big["params"]["Dense_0"][leaf] = v["params"]["Dense_0"][leaf] * 1000
    big["params"]["Dense_2"]["kernel"] = v["params"]["Dense_2"]["kernel"].at[:4].multiply(1000)
    base, scaled = jp.group_structured(v, 0.5, groups), jp.group_structured(big, 0.5, groups)
    for p, q in zip(width_pruned(groups, base, v), width_pruned(groups, scaled, v)):
        np.testing.assert_array_equal(p, q)
    assert width_pruned(groups, base, v)[0].any()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_repruning_counts_pruned_channels(scope):
    module, v, x, rebuild, groups = model("lenet")
    m1 = jp.group_structured(v, 0.5, groups, scope=scope)
    m2 = jp.group_structured(v, 0.5, groups, scope=scope, masks=m1)
    p1, p2 = width_pruned(groups, m1, v), width_pruned(groups, m2, v)
    for a, b in zip(p1, p2):
        assert (a <= b).all()  # never unpruned
    if scope == "layer":
        for g, a, b in zip(groups.prunable, p1, p2):
            live = g.width - a.sum()
            assert b.sum() - a.sum() == min(round(0.5 * live), live - 1)
    else:
        live = sum(g.width for g in groups.prunable) - sum(a.sum() for a in p1)
        assert sum(b.sum() for b in p2) - sum(a.sum() for a in p1) == round(0.5 * live)
    assert_same_function(module, v, m2, x, rebuild, groups)


def test_jit_matches_eager():
    module, v, x, rebuild, groups = model("rescnn")
    eager = jp.group_structured(v, 0.3, groups)
    jitted = jax.jit(lambda v, a: jp.group_structured(v, a, groups))(v, 0.3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), eager, jitted)
    layer = jax.jit(lambda v: jp.group_structured(v, 2, groups, scope="layer"))(v)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, b),
        layer,
        jp.group_structured(v, 2, groups, scope="layer"),
    )
    # the shrunk model runs under jit
    masks = jp.group_structured(v, 0.5, groups)
    small, widths = jp.shrink(v, masks, groups)
    np.testing.assert_allclose(
        jax.jit(rebuild(widths).apply)(small, x), rebuild(widths).apply(small, x), rtol=1e-5, atol=1e-6
    )


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["lenet", "rescnn", "depthwise", "concat", "mlp"]),
    amount=st.floats(0.0, 0.7),
    seed=st.integers(0, 2**16),
    scope=st.sampled_from(["global", "layer"]),
    n=st.sampled_from([1, 2, math.inf]),
)
def test_property_shrunk_equals_masked(name, amount, seed, scope, n):
    module, _, x, rebuild, groups = model(name)
    v = _init(module, x, seed)
    masks = jp.group_structured(v, amount, groups, n=n, scope=scope)
    assert_same_function(module, v, masks, x, rebuild, groups)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["lenet", "rescnn", "concat"]),
    amount=st.floats(0.0, 0.6),
    r=st.integers(1, 9),
    scope=st.sampled_from(["global", "layer"]),
)
def test_round_to_keeps_a_multiple_of_the_most_important(name, amount, r, scope):
    """Each group keeps a multiple of ``round_to`` channels (or all), at most ``r - 1`` more than
    without rounding, and those are its most important ones: the channels a per-group prune of
    that many would keep."""
    module, v, x, rebuild, groups = model(name)
    rounded = jp.group_structured(v, amount, groups, scope=scope, round_to=r)
    plain = width_pruned(groups, jp.group_structured(v, amount, groups, scope=scope), v)
    for i, (g, p, q) in enumerate(zip(groups.prunable, plain, width_pruned(groups, rounded, v))):
        kept, kept_plain = g.width - q.sum(), g.width - p.sum()
        assert kept % r == 0 or kept == g.width, (g.name, kept, r)
        assert kept_plain <= kept < kept_plain + r
        alone = jp.group_structured(v, int(q.sum()), groups, scope="layer", select=[g.id])
        np.testing.assert_array_equal(q, width_pruned(groups, alone, v)[i])
    assert_same_function(module, v, rounded, x, rebuild, groups)


def test_round_to_under_jit_and_refusals():
    module, v, x, rebuild, groups = model("lenet")
    for scope in ("global", "layer"):
        eager = jp.group_structured(v, 0.6, groups, scope=scope, round_to=4)
        jitted = jax.jit(lambda v, a, s=scope: jp.group_structured(v, a, groups, scope=s, round_to=4))(v, 0.6)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), eager, jitted)
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(ValueError, match="round_to must be"):
            jp.group_structured(v, 0.5, groups, round_to=bad)


def test_consumer_only_mask_removes_channel_exactly():
    """Masking only the next kernel's input rows (not the producer): the channel reaches nothing,
    so shrink removes it and the function is unchanged."""
    module, v, x, rebuild, groups = model("mlp")
    rows = jp.ln_structured(v["params"]["Dense_1"]["kernel"], 3, n=2, axis=0)
    masks = jax.tree.map(lambda _: None, v)
    masks["params"]["Dense_1"]["kernel"] = rows
    small, widths = assert_same_function(module, v, masks, x, rebuild, groups)
    assert widths["params/Dense_0"] == 8 - 3


def producer_only(v, groups, amount=0.5):
    """ln_structured on every kernel output axis only: biases, norms and the next layer's input
    rows are left unmasked, so a pruned channel still carries act(bias) into the next layer."""
    flat = dict(zip(groups.paths, jax.tree.leaves(v)))
    out = {}
    for g in groups.prunable:
        for m in g.members:
            if m.role == "out":
                k = jp.ln_structured(flat[m.path], amount, n=2, axis=m.axis)
                out[m.path] = k if m.path not in out else out[m.path] & k
    return jax.tree_util.tree_unflatten(jax.tree.structure(v), [out.get(p) for p in groups.paths])


@pytest.mark.parametrize("name", ["mlp", "lenet", "concat"])
def test_constant_channels_fold_into_next_bias(name):
    """Dense consumers, VALID convs and flatten -> Dense: the constant (relu/tanh of the bias) times
    the removed input rows goes into the consumer's bias; the model shrinks and stays the same."""
    module, v, x, rebuild, groups = model(name)
    masks = producer_only(v, groups)
    small, widths = assert_same_function(module, v, masks, x, rebuild, groups)
    before = sum(np.size(a) for a in jax.tree.leaves(v))
    assert sum(np.size(a) for a in jax.tree.leaves(small)) < before
    full = jp.shrink(v, jp.group_structured(v, 0.5, groups, scope="layer"), groups)[1]
    assert widths == full  # ln_structured at 0.5 per layer: the same widths


def test_fold_refusals():
    module, v, x, rebuild, groups = model("rescnn")  # 3x3 SAME convs: the constant meets zero padding
    with pytest.raises(
        ValueError, match=r"group \d+ \(params/Conv_1/kernel\[3\]\).*pads its input.*group_structured"
    ):
        jp.shrink(v, producer_only(v, groups), groups)
    module, v, x, rebuild, groups = model("depthwise")  # a padded depthwise conv: not constant,
    assert "padded depthwise" in groups.prunable[0].varies  # so the channels are kept, not folded
    assert_same_function(module, v, producer_only(v, groups), x, rebuild, groups)
    net = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2, use_bias=False)])
    x = jnp.ones((1, 3))
    v = _init(net, x)
    groups = jp.channel_groups(net.apply, v, x)
    with pytest.raises(ValueError, match="no bias"):
        jp.shrink(v, producer_only(v, groups), groups)


def test_attention_heads_with_masked_kernels_are_kept():
    """q/k/v kernels of a head masked, biases live: the head's output still depends on the input
    (softmax weights times v's bias), so it is kept, not folded; the model is unchanged."""
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))
    module = Transformer()
    v = _init(module, x)
    groups = jp.channel_groups(module.apply, v, x)
    heads = next(g for g in groups.prunable if any(m.path.endswith("query/kernel") for m in g.members))
    assert heads.varies is not None and "dot_general" in heads.varies
    masks = producer_only(v, groups)
    small, widths = jp.shrink(v, masks, groups)
    assert widths["params/MultiHeadDotProductAttention_0/query"] == (4, 3)
    want = module.apply(jp.apply_masks(v, masks), x)
    got = Transformer(hidden=widths["params/Dense_1"]).apply(small, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_bf16_and_importance_scores():
    module, v, x, rebuild, groups = model("mlp")
    vb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), v)
    masks = jp.group_structured(vb, 0.5, groups)
    small, widths = jp.shrink(vb, masks, groups)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(small))
    # scores decide: prune the channels whose scores are smallest, whatever the weights
    scores = jax.tree.map(jnp.ones_like, v)
    scores["params"]["Dense_0"]["kernel"] = scores["params"]["Dense_0"]["kernel"] * jnp.arange(8.0)
    masks = jp.group_structured(v, 3, groups, scope="layer", importance_scores=scores)
    keep = np.asarray(masks["params"]["Dense_0"]["kernel"]).all(axis=0)
    np.testing.assert_array_equal(keep, np.arange(8) >= 3)


def test_refusals():
    module, v, x, rebuild, groups = model("mlp")
    with pytest.raises(ValueError, match="scope"):
        jp.group_structured(v, 0.5, groups, scope="net")
    with pytest.raises(ValueError, match="n must be"):
        jp.group_structured(v, 0.5, groups, n="nuc")
    with pytest.raises(ValueError, match="amount"):
        jp.group_structured(v, 1.5, groups)
    with pytest.raises(ValueError, match="at most"):
        jp.group_structured(v, 1.0, groups)
    other = {"params": {k: w for k, w in v["params"].items() if k != "Dense_2"}}
    with pytest.raises(ValueError, match="channel_groups"):
        jp.group_structured(other, 0.5, groups)
    resized = jax.tree.map(lambda a: a, v)
    resized["params"]["Dense_0"]["bias"] = jnp.zeros(9)
    with pytest.raises(ValueError, match="Dense_0/bias"):
        jp.shrink(resized, None, groups)
    masks = jp.group_structured(v, 0.5, groups)
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda m: jp.shrink(v, m, groups))(masks)
    everything = jax.tree.map(lambda _: None, v)
    everything["params"]["Dense_1"]["kernel"] = jnp.zeros((8, 6), bool)
    with pytest.raises(ValueError, match="every channel"):
        jp.shrink(v, everything, groups)


def test_untouched_and_nothing_prunable():
    net = nn.Sequential([nn.Dense(3), nn.LayerNorm()])
    x = jnp.ones((1, 2))
    v = net.init(jax.random.key(0), x)
    groups = jp.channel_groups(net.apply, v, x)
    assert not groups.prunable
    assert all(
        m is None for m in jax.tree.leaves(jp.group_structured(v, 0.5, groups), is_leaf=lambda m: m is None)
    )
    small, widths = jp.shrink(v, None, groups)
    assert widths == {} and jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, v)


def test_transformer_heads_shrink():
    """Prune whole heads (q/k/v/out together) and MLP hidden units, rebuild with fewer heads."""
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))
    module = Transformer()
    v = _init(module, x)
    groups = jp.channel_groups(module.apply, v, x)
    att = "params/MultiHeadDotProductAttention_0/"
    names = (f"{att}query/kernel[1]", "params/Dense_1/kernel[1]")  # the heads; the MLP hidden units

    def wanted(g):
        return any(str(m) in names for m in g.members)

    assert len([g for g in groups.prunable if wanted(g)]) == 2
    masks = jp.group_structured(v, 0.5, groups, select=wanted)
    small, widths = jp.shrink(v, masks, groups)
    heads, head_dim = widths[f"{att}query"]
    assert (heads, head_dim) == (2, 3) and widths["params/Dense_1"] == 8
    rebuilt = Transformer(heads, head_dim, widths["params/Dense_1"])
    want = module.apply(jp.apply_masks(v, masks), x)
    np.testing.assert_allclose(
        rebuilt.apply(small, x), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want)))
    )


def test_tied_embedding_shrink():
    ids = jnp.array([[1, 2, 3, 9], [4, 0, 7, 7]])
    module = TiedLM()
    v = _init(module, ids)
    groups = jp.channel_groups(module.apply, v, ids)
    masks = jp.group_structured(v, 0.5, groups, scope="layer")
    small, widths = jp.shrink(v, masks, groups)
    assert small["params"]["Embed_0"]["embedding"].shape == (11, 3)
    rebuilt = TiedLM(widths["params/Embed_0"], widths["params/up"])
    want = module.apply(jp.apply_masks(v, masks), ids)
    np.testing.assert_allclose(
        rebuilt.apply(small, ids), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want)))
    )


def test_select_refusals():
    module, v, x, rebuild, groups = model("mlp")
    bad = next(g for g in groups if not g.prunable)
    with pytest.raises(ValueError, match="not prunable"):
        jp.group_structured(v, 0.5, groups, select=[bad.id])
    with pytest.raises(ValueError, match="not a group id"):
        jp.group_structured(v, 0.5, groups, select=[len(groups)])
    only = jp.group_structured(v, 0.5, groups, select=[groups.prunable[1].id])
    assert only["params"]["Dense_0"]["kernel"] is None and only["params"]["Dense_2"]["kernel"] is not None


def test_readme_section_runs(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Structured pruning that shrinks the model") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(
        compile(code + "\nwant = Net().apply(jp.apply_masks(variables, masks), x)\n", "README.md", "exec"),
        scope,
    )
    assert "prunable of" in capsys.readouterr().out
    np.testing.assert_allclose(scope["y"], scope["want"], rtol=1e-5, atol=1e-5)
    assert scope["widths"]["params/Conv_0"] < 16 and scope["widths"]["params/Dense_0"] < 32


def test_float64_and_static_kwargs():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool):
            x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(6, param_dtype=jnp.float64)(x)))
            return nn.Dense(2, param_dtype=jnp.float64)(x)

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
        v = _init(Net(), x, train=False)
        groups = jp.channel_groups(Net().apply, v, x, train=False)  # a Python bool stays static
        assert len(groups.prunable) == 1
        masks = jp.group_structured(v, 0.5, groups)
        small, widths = jp.shrink(v, masks, groups)
        assert small["params"]["Dense_0"]["kernel"].dtype == jnp.float64 and widths["params/Dense_0"] == 3


def test_depthwise_multiplier_shrinks_in_blocks():
    """feature_group_count=c with 2 outputs per input channel: pruning input channel i removes
    depthwise outputs 2i and 2i+1 together."""

    class M(nn.Module):
        c: int = 4

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(self.c, (1, 1))(x))
            x = nn.relu(nn.Conv(2 * self.c, (3, 3), feature_group_count=self.c)(x))
            return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))

    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    v = _init(M(), x)
    groups = jp.channel_groups(M().apply, v, x)
    masks = jp.group_structured(v, 0.5, groups, scope="layer")
    small, widths = jp.shrink(v, masks, groups)
    assert widths["params/Conv_0"] == 2 and widths["params/Conv_1"] == 4
    want = M().apply(jp.apply_masks(v, masks), x)
    np.testing.assert_allclose(M(2).apply(small, x), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
