"""Property tests (hypothesis): random tie-free shapes, amounts and sequences give torch's masks.

Shapes come from a small fixed set so that compilations are reused across examples (the file stays
fast); seeds, amounts, norms, axes and step sequences are free. Structured steps whose boundary norms
are within float32 summation error of each other are discarded (``NearTie``), as are amounts that
exceed what remains (both libraries raise; that is tested in test_parity_torch).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.utils.prune as tprune
from conftest import NearTie, assert_same_masks, pruned_count, run_both, tie_free, torch_mask, torch_module
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import jprune as jp

SHAPES = [(12,), (4, 6), (3, 4, 5), (2, 3, 2, 4)]
ND = [s for s in SHAPES if len(s) >= 2]
NORMS = [1, 2, 3, 0.5, math.inf, "fro"]
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)


def amounts(max_int):
    return st.one_of(st.integers(0, max_int), st.floats(0.0, 1.0))


def run_or_discard(arrays, steps, **kw):
    try:
        return run_both(arrays, steps, **kw)
    except NearTie:
        assume(False)
    except ValueError as e:  # an int amount above what remains: both raise (checked elsewhere)
        assume("should be smaller" not in str(e))
        raise


@SETTINGS
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_l1_matches_torch(shape, seed, data):
    n = math.prod(shape)
    amount = data.draw(amounts(n))
    w = tie_free(np.random.default_rng(seed), shape)
    t, j = run_both({"w": w}, [("l1", amount)])
    assert_same_masks(t, j)


@SETTINGS
@given(shape=st.sampled_from(ND), seed=st.integers(0, 2**32 - 1), n=st.sampled_from(NORMS), data=st.data())
def test_ln_matches_torch(shape, seed, n, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    assume(not (n == "fro" and len(shape) > 3))
    amount = data.draw(amounts(shape[dim]))
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    t, j = run_or_discard({"w": w}, [("ln", amount, n, dim)])
    assert_same_masks(t, j)


@SETTINGS
@given(
    shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_global_matches_torch(shapes, seed, data):
    total = sum(math.prod(s) for s in shapes)
    amount = data.draw(amounts(total))
    arrays = {f"p{i}": a for i, a in enumerate(tie_free(np.random.default_rng(seed), shapes))}
    t, j = run_both(arrays, [("global", amount)])
    assert_same_masks(t, j)


def steps_for(shape):
    ndim = len(shape)
    l1 = st.tuples(st.just("l1"), st.one_of(st.integers(0, 4), st.floats(0, 1)))
    glob = st.tuples(st.just("global"), st.one_of(st.integers(0, 6), st.floats(0, 1)))
    if ndim < 2:
        return st.one_of(l1, glob)
    ln = st.tuples(
        st.just("ln"),
        st.one_of(st.integers(0, 2), st.floats(0, 1)),
        st.sampled_from(NORMS if ndim <= 3 else NORMS[:-1]),
        st.integers(-ndim, ndim - 1),
    )
    return st.one_of(l1, glob, ln)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(shape=st.sampled_from([(4, 6), (3, 4, 5)]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_sequences_match_torch(shape, seed, data):
    """Unstructured, structured (any dim, several norms) and global steps, interleaved, on two leaves."""
    steps = data.draw(st.lists(steps_for(shape), min_size=1, max_size=4))
    arrays = dict(zip(["a", "b"], tie_free(np.random.default_rng(seed), [shape, shape])))
    arrays["b"] = arrays["b"][..., ::-1].copy()  # other layout of magnitudes
    t, j = run_or_discard(arrays, steps)
    assert_same_masks(t, j)


# --- tie-invariant properties, ties allowed ------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1), frac=st.floats(0, 1), frac2=st.floats(0, 1)
)
def test_l1_tie_invariants(shape, seed, frac, frac2):
    """Small integers (many ties): exact counts, pruned |x| <= kept |x|, pruned stays pruned."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.integers(-3, 4, shape).astype(np.float32))
    m1 = np.asarray(jp.l1_unstructured(w, frac))
    n = math.prod(shape)
    assert pruned_count(m1) == round(frac * n)
    a = np.abs(np.asarray(w))
    if 0 < pruned_count(m1) < n:
        assert a[~m1].max() <= a[m1].min()
    m2 = np.asarray(jp.l1_unstructured(w, frac2, masks=jnp.asarray(m1)))
    assert not np.any(m2 & ~m1)
    remaining = int(m1.sum())
    assert pruned_count(m2) - pruned_count(m1) == round(frac2 * remaining)
    if m2.any() and (m1 & ~m2).any():
        assert a[m1 & ~m2].max() <= a[m2].min()


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from(ND), seed=st.integers(0, 2**32 - 1), frac=st.floats(0, 1), data=st.data())
def test_structured_tie_invariants(shape, seed, frac, data):
    """Ln and random structured prune whole channels, exactly round(frac * remaining) of them."""
    ndim = len(shape)
    axis = data.draw(st.integers(0, ndim - 1))
    other = data.draw(st.integers(0, ndim - 1))
    others = tuple(d for d in range(ndim) if d != axis)
    w = jnp.asarray(np.random.default_rng(seed).integers(-2, 3, shape).astype(np.float32))
    first = jp.ln_structured(w, 0.5, 1, other)  # prune along another axis first
    live = np.asarray(first).any(axis=others)
    for m in (
        jp.ln_structured(w, frac, 2, axis, masks=first),
        jp.random_structured(w, frac, axis, masks=first, key=jax.random.key(seed % 1000)),
    ):
        m = np.asarray(m)
        assert not np.any(m & ~np.asarray(first))
        new_dead = live & ~m.any(axis=others)
        assert int(new_dead.sum()) == round(frac * int(live.sum()))
        # whole channels: every newly dead channel is dead everywhere, others keep their first mask
        keep = ~new_dead.reshape([-1 if d == axis else 1 for d in range(ndim)])
        np.testing.assert_array_equal(m, np.asarray(first) & keep)


@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1), frac=st.floats(0, 1))
def test_random_unstructured_counts(shape, seed, frac):
    w = jnp.ones(shape)
    key = jax.random.key(seed % 2**31)
    m1 = jp.random_unstructured(w, 0.5, key=key)
    m2 = np.asarray(jp.random_unstructured(w, frac, key=jax.random.fold_in(key, 1), masks=m1))
    assert not np.any(m2 & ~np.asarray(m1))
    assert pruned_count(m2) - pruned_count(m1) == round(frac * int(np.asarray(m1).sum()))


# Counts: the same k eagerly, under jit with traced masks (counted on the device), and in torch,
# for every amount type torch accepts (Python float/int, numpy float64/float32/float16).
AMOUNT_TYPES = [float, np.float64, np.float32, np.float16, int]
_traced_l1 = jax.jit(lambda w, m, a: jp.l1_unstructured(w, a, masks=m), static_argnums=2)


@SETTINGS
@given(
    n=st.integers(1, 300),
    pruned=st.integers(0, 300),
    frac=st.floats(0.0, 1.0),
    kind=st.sampled_from(AMOUNT_TYPES),
    seed=st.integers(0, 2**31),
)
@example(n=90, pruned=210, frac=0.35, kind=np.float32, seed=0)  # 31.5 in float32, 31.49999 as a double
@example(n=15, pruned=285, frac=0.1, kind=np.float16, seed=0)  # 1.5 in float16: 2 (a double: 1)
def test_counts_agree_eager_traced_and_torch(n, pruned, frac, kind, seed):

    rng = np.random.default_rng(seed)
    w = tie_free(rng, (300,))
    m = np.ones(300, bool)
    m[rng.permutation(300)[: min(pruned, 300 - n)]] = False  # n or more remain
    left = int(m.sum())
    amount = kind(round(frac * left)) if kind is int else kind(frac)
    mod = torch_module({"w": w})
    tprune.custom_from_mask(mod, "w", torch.tensor(m))
    tprune.l1_unstructured(mod, "w", amount)
    want = pruned_count(torch_mask(mod, "w"))
    eager = jp.l1_unstructured(jnp.asarray(w), amount, masks=jnp.asarray(m))
    traced = _traced_l1(jnp.asarray(w), jnp.asarray(m), amount)
    assert pruned_count(eager) == pruned_count(traced) == want
