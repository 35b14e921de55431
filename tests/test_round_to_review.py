"""Review of ``group_structured(..., round_to=r)`` and of the Linen width-check retrace's thread-local
shape-check switch: every selection is compared with a NumPy re-implementation written from the
docstring (not from the code), and the shrunk model with the masked one."""

from __future__ import annotations

import concurrent.futures as cf
import math
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.errors import ScopeParamShapeError
from group_models import TiedLM, Transformer, _init, assert_same_function, build, model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jprune as jp
import jprune.nnx as jpnnx
from jprune import _groups

# --------------------------------------------------------------------------------------------------
# NumPy reference, from the docstring


def _flat(groups, tree):
    return dict(zip(groups.paths, jax.tree.leaves(tree, is_leaf=lambda a: a is None)))


def _rows(a, m, width):
    """The member's slices as rows: ``(width, -1)``."""
    rows = np.moveaxis(np.asarray(a), m.axis, 0)
    rows = rows if m.index is None else rows[m.index]
    return rows.reshape(width, -1)


def _smallest(keys, cand, k):
    """The k smallest candidates, ties lowest index first."""
    order = sorted((keys[i], i) for i in range(len(keys)) if cand[i])
    out = np.zeros(len(keys), bool)
    for _, i in order[:k]:
        out[i] = True
    return out


def reference(groups, v, amount, *, scope, r=1, n=2, masks=None, scores=None, select=None):
    """Per selected group, the channels pruned afterwards (before and now), with Python ints for
    the counts (so any ``r`` is exact); the channels already pruned (every consumer slice masked);
    in global scope also the un-rounded choice and the spared channels."""
    pv, ps = _flat(groups, v), None if scores is None else _flat(groups, scores)
    pm = _flat(groups, masks) if masks is not None else dict.fromkeys(groups.paths)
    p = float(n)
    todo = [g for g in groups.prunable if select is None or g.id in select]
    imps, deads = [], []
    for g in todo:
        total, dead = np.zeros(g.width), np.ones(g.width, bool)
        for m in g.members:
            mk = pm[m.path]
            if m.role == "in":  # dead: every consumer slice masked
                dead &= np.zeros(g.width, bool) if mk is None else ~_rows(mk, m, g.width).any(axis=1)
            if ps is not None:
                if ps[m.path] is None:
                    continue
                src = np.asarray(ps[m.path], np.float64)
            elif m.path.endswith(("/mean", "/var")):
                continue
            else:
                src = np.asarray(pv[m.path], np.float64) * (1 if mk is None else np.asarray(mk))
            a = np.abs(_rows(src, m, g.width))
            if p == math.inf:
                total = np.maximum(total, a.max(axis=1))
            elif p == 0:
                total += (a != 0).sum(axis=1)
            else:
                total += (a**p).sum(axis=1)
        imps.append(total if p in (0, 1, math.inf) else total ** (1 / p))
        deads.append(dead)

    def count(live):
        return int(amount) if isinstance(amount, (int, np.integer)) else int(round(amount * live))

    def fewer(k, live):  # prune fewer, so that a multiple of r remain (rounded up), or all
        kept = live - k
        return live - min(live, -(-kept // r) * r)

    if scope == "layer":
        out = []
        for x, d in zip(imps, deads):
            live = int((~d).sum())
            out.append(d | _smallest(x, ~d, fewer(count(live), live)))
        return todo, out, deads, None, None
    ys, cands, spared = [], [], []
    for x, d in zip(imps, deads):
        mean = x[~d].mean() if (~d).any() else 0.0
        y = x / mean if mean > 0 else x
        best = int(np.argmax(np.where(d, -np.inf, y)))
        ys.append(y)
        cands.append(~d & (np.arange(len(y)) != best))
        spared.append(best)
    k = count(sum(int((~d).sum()) for d in deads))
    ranked = sorted((y[i], gi, i) for gi, (y, c) in enumerate(zip(ys, cands)) for i in np.flatnonzero(c))
    plain = [d.copy() for d in deads]
    for _, gi, i in ranked[:k]:
        plain[gi][i] = True
    out = []
    for y, c, d, pl in zip(ys, cands, deads, plain):
        live = int((~d).sum())
        out.append(d | _smallest(y, c, fewer(int((pl & ~d).sum()), live)))
    return todo, out, deads, plain, spared


def pruned(groups, masks, todo):
    """Channels of each group whose every member slice is masked."""
    pm = _flat(groups, masks)
    out = []
    for g in todo:
        dead = np.ones(g.width, bool)
        for m in g.members:
            mk = pm[m.path]
            dead &= np.zeros(g.width, bool) if mk is None else ~_rows(mk, m, g.width).any(axis=1)
        out.append(dead)
    return out


def check(groups, v, amount, *, scope, r, **kw):
    """group_structured against the reference; the kept counts are multiples of r or all that
    remained; returns the masks."""
    masks = jp.group_structured(
        v,
        amount,
        groups,
        scope=scope,
        round_to=r,
        n=kw.get("n", 2),
        masks=kw.get("masks"),
        importance_scores=kw.get("scores"),
        select=kw.get("select"),
    )
    todo, want, dead, plain, spared = reference(groups, v, amount, scope=scope, r=int(r or 1), **kw)
    for i, (g, got, w) in enumerate(zip(todo, pruned(groups, masks, todo), want)):
        np.testing.assert_array_equal(got, w, err_msg=f"{g.name} scope={scope} r={r}")
        live = g.width - int(dead[i].sum())
        kept = g.width - int(got.sum())
        assert kept % int(r or 1) == 0 or kept == live, (g.name, kept, live, r)
        if plain is not None:  # global: a subset of the un-rounded choice, the best channel spared
            assert (got <= plain[i]).all() and not got[spared[i]]
    return masks


# --------------------------------------------------------------------------------------------------
# round_to


@pytest.mark.parametrize("r", [2**31 - 1, 2**31, np.int64(2**40), 10**30])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_huge_round_to_keeps_every_remaining_channel(scope, r):
    """A multiple of r above every group's width: each group keeps all its remaining channels.
    Was: 2**31 - 1 wrapped int32 and kept 2 of 8 (neither a multiple of r nor all); 2**31 and
    above raised an OverflowError about a jitted computation's argument."""
    module, v, x, rebuild, groups = model("mlp")
    check(groups, v, 0.75, scope=scope, r=r)
    first = jp.group_structured(v, 0.5, groups, scope="layer")
    masks = check(groups, v, 0.75, scope=scope, r=r, masks=first)  # re-pruning: nothing more goes
    for a, b in zip(pruned(groups, masks, groups.prunable), pruned(groups, first, groups.prunable)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", ["lenet", "rescnn", "depthwise", "concat"])
def test_round_to_matches_reference(name, scope):
    """Strided flatten rows (lenet), residual + BN (rescnn), depthwise, concat offsets; every norm;
    integer amounts; r of 1 (= None) and a numpy integer; the shrunk
    model equals the masked one."""
    module, v, x, rebuild, groups = model(name)
    cases = [(2, 0.6, 2), (4, 0.5, 0), (3, 2, 2)]  # n=0: all tie, lowest index first
    if name == "lenet":
        cases += [(1, 0.6, 2), (3, 0.3, 1), (np.int64(4), 0.5, math.inf)]
    for r, amount, n in cases:
        masks = check(groups, v, amount, scope=scope, r=r, n=n)
        if r == 1:
            plain = jp.group_structured(v, amount, groups, scope=scope, n=n)
            jax.tree.map(np.testing.assert_array_equal, masks, plain)
    if scope == "global":
        assert_same_function(module, v, masks, x, rebuild, groups)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_to_repruning_select_and_scores(scope):
    """Re-pruning: channels already pruned, groups partly dead (random element masks), remaining
    counts that are not multiples of r; a select subset; integer importance scores (many ties)."""
    module, v, x, rebuild, groups = model("rescnn")
    rng = np.random.default_rng(1)
    first = jp.group_structured(v, 0.3, groups, scope="layer")
    again = check(groups, v, 0.4, scope=scope, r=4, masks=first)
    assert_same_function(module, v, again, x, rebuild, groups)
    holes = jax.tree.map(lambda a: jnp.asarray(rng.random(a.shape) > 0.4), v)
    check(groups, v, 0.5, scope=scope, r=3, masks=holes)
    ids = [groups.prunable[0].id, groups.prunable[2].id]
    check(groups, v, 0.5, scope=scope, r=3, select=ids)
    scores = jax.tree.map(lambda a: jnp.asarray(rng.integers(0, 3, a.shape), jnp.float32), v)
    check(groups, v, 0.5, scope=scope, r=3, scores=scores)
    check(groups, v, 0.5, scope=scope, r=2, scores=scores, n=1, masks=first)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["mlp", "concat"]),
    scope=st.sampled_from(["layer", "global"]),
    r=st.integers(1, 9),
    amount=st.one_of(st.floats(0.0, 0.7), st.integers(0, 2)),
    seed=st.integers(0, 2**16),
    holes=st.booleans(),
    scores=st.booleans(),
)
def test_round_to_property(name, scope, r, amount, seed, holes, scores):
    """Random element masks (some channels dead by their consumers alone, others partly masked),
    integer scores full of ties, any r: the selection is the reference's."""
    module, v, x, rebuild, groups = model(name)
    rng = np.random.default_rng(seed)
    kw = {}
    if holes:
        kw["masks"] = jax.tree.map(lambda a: jnp.asarray(rng.random(a.shape) > 0.5), v)
    if scores:
        kw["scores"] = jax.tree.map(lambda a: jnp.asarray(rng.integers(0, 3, a.shape), jnp.float32), v)
    try:
        check(groups, v, amount, scope=scope, r=r, **kw)
    except ValueError as e:  # an integer count above a group's remaining channels
        assert "remove" in str(e) or "should be smaller" in str(e)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_to_traced_amount_and_masks_under_jit(scope):
    module, v, x, rebuild, groups = model("rescnn")
    first = jp.group_structured(v, 0.3, groups, scope="layer")
    for r, amount in [(3, 0.4), (2, 2)]:
        eager = jp.group_structured(v, amount, groups, scope=scope, round_to=r, masks=first)
        jitted = jax.jit(
            lambda v, a, m, r=r: jp.group_structured(v, a, groups, scope=scope, round_to=r, masks=m)
        )(v, amount, first)
        jax.tree.map(np.testing.assert_array_equal, eager, jitted)


def test_round_to_bf16():
    module, v, x, rebuild, groups = model("lenet")
    vb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), v)
    for scope in ("layer", "global"):
        masks = check(groups, vb, 0.5, scope=scope, r=3)
    assert_same_function(module, v, masks, x, rebuild, groups)


def test_float64_after_float32_in_one_process():
    """Groups with index members (flatten -> Dense, concat) pruned once with x32 and then with
    ``jax.enable_x64``: the second call raised ``TypeError: lax.add requires arguments to have the
    same dtypes, got int32, int64`` (JAX reuses a jitted function's numpy int64 index constants
    across the switch); it now gives the float64 answer."""
    for name in ("lenet", "concat"):
        module, v, x, rebuild, groups = model(name)
        assert any(m.index is not None for g in groups.prunable for m in g.members)
        jp.group_structured(v, 0.5, groups, scope="layer", round_to=2)
        with jax.enable_x64(True):
            v64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), v)
            masks = check(groups, v64, 0.5, scope="global", r=2)
            if name == "lenet":
                check(groups, v64, 0.5, scope="layer", r=2)
                jitted = jax.jit(lambda v, a, g=groups: jp.group_structured(v, a, g, round_to=2))(v64, 0.5)
                jax.tree.map(np.testing.assert_array_equal, masks, jitted)


def test_round_to_attention_heads_and_tied_embedding():
    """Heads are the channels of a heads group: a multiple of r heads stay; the shrunk Transformer
    and the tied-embedding LM equal the masked ones."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    module = Transformer(heads=8, head_dim=2, hidden=16)
    v = _init(module, x)
    groups = jp.channel_groups(module.apply, v, x)
    att = "params/MultiHeadDotProductAttention_0/"
    ids = [
        g.id
        for g in groups.prunable
        if any(str(m) in (f"{att}query/kernel[1]", "params/Dense_1/kernel[1]") for m in g.members)
    ]
    assert len(ids) == 2
    check(groups, v, 0.6, scope="layer", r=3, select=ids)
    masks = check(groups, v, 0.6, scope="global", r=3, select=ids)
    small, widths = jp.shrink(v, masks, groups)
    heads, head_dim = widths[f"{att}query"]
    assert heads in (3, 6) and head_dim == 2
    want = module.apply(jp.apply_masks(v, masks), x)
    got = Transformer(heads, head_dim, widths["params/Dense_1"]).apply(small, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    ids_x = jnp.array([[1, 2, 3, 9], [4, 0, 7, 7]])
    lm = TiedLM(d=10, hidden=9)
    v = _init(lm, ids_x)
    groups = jp.channel_groups(lm.apply, v, ids_x)
    masks = check(groups, v, 0.5, scope="global", r=4)
    small, widths = jp.shrink(v, masks, groups)
    want = lm.apply(jp.apply_masks(v, masks), ids_x)
    got = TiedLM(widths["params/Embed_0"], widths["params/up"]).apply(small, ids_x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(5, 10, rngs=rngs)
        self.b = nnx.Linear(10, 7, rngs=rngs)
        self.c = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        return self.c(nnx.relu(self.b(nnx.tanh(self.a(x)))))


def test_round_to_nnx():
    model = _NNXNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 5))
    groups = jpnnx.channel_groups(model, x)
    graphdef, state = nnx.split(model)
    check(groups, state, 0.6, scope="layer", r=4)
    masks = check(groups, state, 0.6, scope="global", r=4)
    small = jpnnx.shrink(model, masks, groups)
    assert small.a.out_features in (4, 8) and small.b.out_features in (4, 7)
    want = nnx.merge(graphdef, jp.apply_masks(state, masks))(x)
    np.testing.assert_allclose(small(x), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


# --------------------------------------------------------------------------------------------------
# The Linen width-check retrace: shape checks off in its own thread only


def _signature(groups):
    return [(g.id, g.width, g.reason, tuple(map(str, g.members))) for g in groups]


def test_channel_groups_from_threads_at_once():
    """Linen models grouped from four threads at once give the groups read one at a time."""
    names = ["mlp", "lenet", "rescnn", "depthwise", "concat"]
    alone = {n: _signature(model(n)[4]) for n in names}

    def read(n):
        module, v, x, _ = build(n)
        return n, _signature(jp.channel_groups(module.apply, v, x))

    with cf.ThreadPoolExecutor(4) as pool:
        for n, sig in pool.map(read, names * 2):
            assert sig == alone[n], n


def test_other_thread_checks_shapes_during_a_real_retrace():
    """While channel_groups retraces a Linen model unchecked in one thread (held there by an
    event), Linen code in another thread still refuses a kernel of the wrong shape."""
    entered, go = threading.Event(), threading.Event()

    class Held(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(4)(x))
            if getattr(_groups._UNCHECKED_HERE, "on", False) and not entered.is_set():
                entered.set()
                go.wait(60)
            return nn.Dense(2)(h)

    held, x = Held(), jnp.ones((1, 3))
    hv = held.init(jax.random.key(0), x)
    wrong = {"params": {"kernel": jnp.ones((3, 6)), "bias": jnp.ones(6)}}
    with cf.ThreadPoolExecutor(1) as pool:
        job = pool.submit(jp.channel_groups, held.apply, hv, x)
        try:
            assert entered.wait(60), "the retrace never ran unchecked"
            with pytest.raises(ScopeParamShapeError):
                nn.Dense(4).apply(wrong, x)
        finally:
            go.set()
        groups = job.result()
    assert [g.width for g in groups.prunable] == [4]


def test_unchecked_switch_nests_and_survives_errors():
    from jprune._groups import _linen_shapes_unchecked

    x = jnp.ones((1, 3))
    wrong = {"params": {"kernel": jnp.ones((3, 6)), "bias": jnp.ones(6)}}
    with pytest.raises(KeyError):
        with _linen_shapes_unchecked():
            with _linen_shapes_unchecked():
                raise KeyError("inside")
    with pytest.raises(ScopeParamShapeError):
        nn.Dense(4).apply(wrong, x)
    with _linen_shapes_unchecked():
        with _linen_shapes_unchecked():
            pass
        assert nn.Dense(4).apply(wrong, x).shape == (1, 6)  # the outer context still holds
    with pytest.raises(ScopeParamShapeError):
        nn.Dense(4).apply(wrong, x)


def test_channel_groups_refuses_params_that_do_not_fit_the_module():
    """Outside the retrace, a Linen model given parameters of the wrong shapes raises Flax's error
    (the first trace is checked), before and after a retrace ran."""
    mlp = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    x = jnp.ones((1, 3))
    v = mlp.init(jax.random.key(0), x)
    bad = {
        "params": {
            "layers_0": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones(5)},
            "layers_2": {"kernel": jnp.ones((5, 2)), "bias": jnp.ones(2)},
        }
    }
    with pytest.raises(ScopeParamShapeError):
        jp.channel_groups(mlp.apply, bad, x)
    assert [g.width for g in jp.channel_groups(mlp.apply, v, x).prunable] == [4]
    with pytest.raises(ScopeParamShapeError):
        jp.channel_groups(mlp.apply, bad, x)
