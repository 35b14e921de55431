"""How prune_to_sparsity splits a sparsity across layers: ERK, uniform, a per-layer dict, and
global ranking under a per-leaf cap (max_sparsity), against NumPy references written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import JITS, tie_free
from hypothesis import given, settings
from hypothesis import strategies as st

import jprune as jp

SHAPES = [(3, 3, 1, 8), (3, 3, 8, 16), (400, 64), (64, 32), (32, 10)]  # a small conv net


def _params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    arrays = tie_free(rng, shapes)
    return {f"l{i}": {"kernel": jnp.asarray(a)} for i, a in enumerate(arrays)}


def _pruned(masks):
    return [int((~np.asarray(masks[k]["kernel"])).sum()) for k in sorted(masks, key=lambda k: int(k[1:]))]


def erk_reference(shapes, sparsity):
    """RigL's ERK (Evci et al. 2020, sparse_utils.get_sparsities with erk_power_scale=1), in float64:
    density_i = eps * sum(shape_i) / prod(shape_i); while the densest would exceed 1, make it dense
    and solve for eps again."""
    dense = set()
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for i, s in enumerate(shapes):
            n = np.prod(s)
            if i in dense:
                rhs -= n * sparsity
            else:
                rhs += n * (1 - sparsity)
                raw[i] = np.sum(s) / np.prod(s)
                divisor += raw[i] * n
        if not raw:
            break
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps > 1:
            dense |= {i for i, r in raw.items() if r == top}
        else:
            break
    return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


@pytest.mark.parametrize("wrap", JITS)
def test_erk_matches_rigl(wrap):
    params = _params(SHAPES)
    fn = wrap(lambda p, s: jp.prune_to_sparsity(p, s, scope="erk"))
    for sparsity in [0.5, 0.8, 0.95] if wrap is jax.jit else [0.8]:  # traced: one compile
        masks = fn(params, jnp.float32(sparsity))
        got = _pruned(masks)
        dens = erk_reference(SHAPES, float(np.float32(sparsity)))
        for n_pruned, d, s in zip(got, dens, SHAPES):
            assert abs(n_pruned - (1 - d) * math.prod(s)) < 1.01  # the count rounds the formula's share
            if d == 1.0:
                assert n_pruned == 0
        total = sum(math.prod(s) for s in SHAPES)
        assert sum(got) == round(float(np.float32(sparsity)) * total)  # the total exactly
    # within a leaf, the smallest |w| go: the leaf's own L1 at its count
    for (k, p), n in zip(sorted(params.items(), key=lambda kv: int(kv[0][1:])), got):
        want = jp.l1_unstructured(p["kernel"], n)
        np.testing.assert_array_equal(np.asarray(masks[k]["kernel"]), np.asarray(want))


def test_erk_keeps_layers_dense_that_would_exceed_density_one():
    shapes = [(2, 3), (64, 64), (64, 8)]
    dens = erk_reference(shapes, 0.5)
    assert dens[0] == 1.0 and dens[1] < 1.0  # the premise: the tiny layer goes dense
    got = _pruned(jp.prune_to_sparsity(_params(shapes), 0.5, scope="erk"))
    assert got[0] == 0 and sum(got) == round(0.5 * sum(math.prod(s) for s in shapes))
    for n_pruned, d, s in zip(got[1:], dens[1:], shapes[1:]):
        assert abs(n_pruned - (1 - d) * math.prod(s)) < 1.01


@settings(max_examples=6, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=6),
    sparsity=st.floats(0.0, 1.0),
)
def test_erk_property(dims, sparsity):
    params = _params(dims, seed=len(dims))
    got = _pruned(jp.prune_to_sparsity(params, sparsity, scope="erk"))
    dens = erk_reference(dims, float(np.float32(sparsity)))
    total = sum(math.prod(s) for s in dims)
    assert sum(got) == round(sparsity * total)
    for n_pruned, d, s in zip(got, dens, dims):
        assert 0 <= n_pruned <= math.prod(s)
        assert abs(n_pruned - (1 - d) * math.prod(s)) < 1.01


def test_layer_and_dict_scopes():
    params = _params(SHAPES)
    sizes = [math.prod(s) for s in SHAPES]
    got = _pruned(jp.prune_to_sparsity(params, 0.6, scope="layer"))
    assert got == [round(0.6 * n) for n in sizes]
    table = {"l0/kernel": 0.2, "l1/*": 0.5, "l[234]/kernel": 1.0}
    got = _pruned(jp.prune_to_sparsity(params, 0.9, scope=table))
    factors = [0.2, 0.5, 1.0, 1.0, 1.0]
    assert got == [round(0.9 * f * n) for f, n in zip(factors, sizes)]
    traced = jax.jit(lambda p, s: jp.prune_to_sparsity(p, s, scope=table))(params, jnp.float32(0.9))
    assert _pruned(traced) == got


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"l0/kernel": 0.5}, "l1/kernel: no key of scope matches it"),
        ({"*": 0.5, "l0/*": 0.2}, r"l0/kernel: several keys of scope \(\['\*', 'l0/\*'\]\)"),
        ({"*": 0.5, "conv/*": 0.2}, "scope key 'conv/\\*' matches no selected leaf"),
        ({"*": 1.5}, r"scope\['\*'\] must be a fraction"),
    ],
)
def test_dict_scope_refusals(table, match):
    with pytest.raises(ValueError, match=match):
        jp.prune_to_sparsity(_params(SHAPES[:2]), 0.5, scope=table)


def test_scope_and_cap_refusals():
    params = _params(SHAPES[:2])
    with pytest.raises(ValueError, match='scope must be "global", "layer", "erk" or a dict'):
        jp.prune_to_sparsity(params, 0.5, scope="uniform")
    with pytest.raises(ValueError, match='max_sparsity applies to scope="global"'):
        jp.prune_to_sparsity(params, 0.5, scope="layer", max_sparsity=0.5)
    with pytest.raises(ValueError, match="cannot be reached with max_sparsity=0.5"):
        jp.prune_to_sparsity(params, 0.7, max_sparsity=0.5)
    with pytest.raises(ValueError, match="max_sparsity must be a fraction"):
        jp.prune_to_sparsity(params, 0.5, max_sparsity=2.0)


def capped_reference(arrays, k, caps):
    """The k smallest |w| over all leaves (ties: flat index through the leaves in order), skipping a
    leaf once it has caps[i] pruned: a greedy scan of the sorted entries."""
    flat = np.concatenate([np.abs(a).ravel() for a in arrays])
    owner = np.concatenate([np.full(a.size, i) for i, a in enumerate(arrays)])
    order = np.lexsort((np.arange(flat.size), flat))
    keep = np.ones(flat.size, bool)
    taken = [0] * len(arrays)
    for j in order:
        if k == 0:
            break
        if taken[owner[j]] < caps[owner[j]]:
            keep[j] = False
            taken[owner[j]] += 1
            k -= 1
    offsets = np.cumsum([0] + [a.size for a in arrays])
    return [keep[a:b].reshape(x.shape) for a, b, x in zip(offsets[:-1], offsets[1:], arrays)]


_CAPPED_SHAPES = [(6, 5), (4, 8), (10, 3), (2, 2)]
_capped = jax.jit(
    lambda p, s, cap: jp.prune_to_sparsity(p, s, max_sparsity=cap), static_argnames="cap"
)  # one compile per cap


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    sparsity=st.floats(0.0, 0.6),
    cap=st.just(0.65),  # one compile (max_sparsity is static); the scales make the caps bind or not
    scales=st.lists(st.floats(0.01, 100.0), min_size=4, max_size=4),
)
def test_global_with_max_sparsity_matches_greedy_reference(seed, sparsity, cap, scales):
    rng = np.random.default_rng(seed)
    arrays = [a * s for a, s in zip(tie_free(rng, _CAPPED_SHAPES), scales)]  # uneven layers
    params = {f"l{i}": {"kernel": jnp.asarray(a)} for i, a in enumerate(arrays)}
    masks = _capped(params, jnp.float32(sparsity), cap=cap)
    k = round(float(np.float32(sparsity)) * sum(a.size for a in arrays))
    want = capped_reference(arrays, k, [round(cap * a.size) for a in arrays])
    for i, w in enumerate(want):
        np.testing.assert_array_equal(np.asarray(masks[f"l{i}"]["kernel"]), w)


@pytest.mark.parametrize("wrap", JITS)
def test_max_sparsity_is_a_floor_per_leaf_and_traces(wrap):
    """A small layer among large ones: plain global pruning empties it, the cap keeps 30 % of it."""
    rng = np.random.default_rng(0)
    arrays = tie_free(rng, [(20, 20), (20, 20), (4, 4)])
    arrays[2] = arrays[2] * 1e-3  # the smallest weights of all
    params = {f"l{i}": {"kernel": jnp.asarray(a)} for i, a in enumerate(arrays)}
    plain = jp.prune_to_sparsity(params, 0.5)
    assert _pruned(plain)[2] == 16
    fn = wrap(lambda p, s: jp.prune_to_sparsity(p, s, max_sparsity=0.7))
    capped = fn(params, jnp.float32(0.5))
    got = _pruned(capped)
    assert got[2] == round(0.7 * 16) and sum(got) == round(0.5 * 816)
    # again from these masks: nothing comes back, the cap still holds
    more = jp.prune_to_sparsity(params, 0.6, masks=capped, max_sparsity=0.7)
    assert _pruned(more)[2] == round(0.7 * 16) and sum(_pruned(more)) == round(0.6 * 816)


def test_update_masks_with_erk_compiles_once():
    params = _params(SHAPES[2:])
    schedule = jp.polynomial_sparsity(0.9, 0, 8)
    traces = []

    @jax.jit
    def step(p, m, t):
        traces.append(None)
        return jp.update_masks(p, m, t, schedule, frequency=4, scope="erk")

    masks = jp.identity(params)
    for t in range(9):
        params, masks = step(params, masks, jnp.int32(t))
    assert len(traces) == 1
    assert jp.sparsity(masks).fraction == pytest.approx(0.9, abs=1e-4)


def test_sparsity_report_bars():
    masks = {"a": jnp.array([True, False, False, False]), "b": jnp.ones(4, bool)}
    text = str(jp.sparsity(masks))
    lines = text.splitlines()
    assert "###############....." in lines[1]  # 75 % of a 20-wide bar
    assert "...................." in lines[2]
