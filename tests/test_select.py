"""Tests for jprune/_select.py: exact k-smallest selection (histogram and sort paths), key order.

The reference is a stable sort (ties by lowest flat index, the documented rule) and, for tie-free
inputs, ``torch.topk`` itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jprune import _select

METHODS = ["hist", "sort"]


def reference(keys_list, k):
    """The k smallest keys across the list, ties by flat index (a stable argsort)."""
    flat = np.concatenate([np.asarray(x).ravel() for x in keys_list])
    sel = np.zeros(flat.size, bool)
    sel[np.argsort(flat, kind="stable")[:k]] = True
    out, off = [], 0
    for x in keys_list:
        out.append(sel[off : off + x.size].reshape(x.shape))
        off += x.size
    return out


def selected(keys_list, k, method, jit=True):
    """The entries ``prune_smallest`` chooses: candidates (key < SENTINEL) that it does not keep."""
    sources = lambda ks: [(_select.given, (x,)) for x in ks]  # noqa: E731

    def f(ks, k):
        keeps = _select.prune_smallest(sources(ks), k, method=method)
        return [(x != jnp.uint32(_select.SENTINEL)) & ~keep for x, keep in zip(ks, keeps)]

    return f(keys_list, k) if not jit else _JITTED[method](keys_list, k)


_JITTED = {m: jax.jit(lambda ks, k, m=m: selected(ks, k, m, jit=False)) for m in METHODS}


def run(keys_list, k, method, jit=True):
    got = selected([jnp.asarray(x, jnp.uint32) for x in keys_list], jnp.int32(k), method, jit)
    return [np.asarray(m) for m in got]


def padded(values, size):
    """``values`` followed by SENTINEL keys up to ``size``: one shape, one compilation."""
    out = np.full(size, _select.SENTINEL, np.uint32)
    out[: len(values)] = values
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [0, 1, 2, 7, 50, 99, 100])
def test_smallest_with_heavy_ties(method, k):
    rng = np.random.default_rng(k)
    keys = [rng.integers(0, 4, (10, 5)).astype(np.uint32), rng.integers(0, 4, (50,)).astype(np.uint32)]
    got = run(keys, k, method)
    for g, w in zip(got, reference(keys, k)):
        np.testing.assert_array_equal(g, w)
    assert sum(int(g.sum()) for g in got) == k


@pytest.mark.parametrize("method", METHODS)
def test_smallest_keys_sharing_the_high_digit(method):
    """Keys that differ only in their low 16 bits (one histogram bucket), and across buckets."""
    rng = np.random.default_rng(3)
    base = np.uint32(0x3F80_0000)
    keys = [
        (base + rng.permutation(300)).astype(np.uint32).reshape(20, 15),
        (base + 0x10000 + rng.integers(0, 3, 40)).astype(np.uint32),
    ]
    for k in (0, 1, 150, 299, 300, 301, 340):
        for g, w in zip(run(keys, k, method), reference(keys, k)):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("method", METHODS)
def test_sentinel_keys_are_never_chosen_up_to_the_candidate_count(method):
    keys = np.array([5, _select.SENTINEL, 3, _select.SENTINEL, 9], np.uint32)
    for k, want in [(0, []), (1, [2]), (2, [0, 2]), (3, [0, 2, 4])]:
        (got,) = run([keys], k, method)
        assert np.flatnonzero(got).tolist() == want


def test_hist_and_sort_agree_on_a_large_input():
    """Above the auto threshold (2**16 entries) on CPU the histogram path is used."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 300)).astype(np.float32)
    x[::7, ::3] = 0.5  # plenty of ties
    keys = _select.abs_keys(jnp.asarray(x))
    assert _select.use_histogram(x.size) == (jax.default_backend() == "cpu")
    for k in (1, 12345, 45000, 89999):
        a = run([keys], k, "hist")[0]
        b = run([keys], k, "sort")[0]
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, reference([np.asarray(keys)], k)[0])


def test_abs_keys_order_like_torch():
    """|x| order: +0 == -0 < subnormals < normals < inf < NaN (torch.topk ranks NaN above inf)."""
    x = np.array([np.nan, np.inf, -np.inf, 1.0, -1e-45, 0.0, -0.0, 3.0, -2.5, 1e-38], np.float32)
    keys = np.asarray(_select.abs_keys(jnp.asarray(x)))
    assert keys[5] == keys[6]  # +0 and -0
    assert keys[1] == keys[2]  # +inf and -inf
    order = np.argsort(keys, kind="stable")
    assert order.tolist()[:2] == [5, 6]
    assert order.tolist()[-1] == 0  # NaN last
    # tie-free part agrees with torch.topk(largest=False) order
    t = torch.tensor(x[[0, 1, 3, 4, 5, 7, 8, 9]]).abs()
    want = torch.topk(t, t.numel(), largest=False).indices.tolist()
    got = np.argsort(np.asarray(_select.abs_keys(jnp.asarray(t.numpy()))), kind="stable").tolist()
    assert got == want


def test_abs_keys_bf16_and_f16_ties():
    """Low precision creates ties fp32 would not have (§3.1): bf16 [1, 1.001, 1.002, 1.003] tie."""
    x = jnp.asarray([1.0, 1.001, 1.002, 1.003], jnp.bfloat16)
    assert len(set(np.asarray(_select.abs_keys(x)).tolist())) == 1
    y = jnp.asarray([1.0, 1.001, 1.002, 1.003], jnp.float16)
    assert len(set(np.asarray(_select.abs_keys(y)).tolist())) == 4


def test_too_many_entries_error_is_static():
    big = jax.ShapeDtypeStruct((_select.SENTINEL,), jnp.uint32)
    with pytest.raises(ValueError, match="at most"):
        _select.prune_smallest([(_select.given, (big,))], 1)


@pytest.mark.parametrize("method", METHODS)
def test_eager_and_jit_agree(method):
    """Called eagerly the passes are separate dispatches (and a concrete cond is a plain if)."""
    rng = np.random.default_rng(9)
    keys = [rng.integers(0, 5, (7, 3)).astype(np.uint32), rng.integers(0, 5, (9,)).astype(np.uint32)]
    for k in (0, 4, 17, 30):
        eager = run(keys, k, method, jit=False)
        for e, j, w in zip(eager, run(keys, k, method), reference(keys, k)):
            np.testing.assert_array_equal(e, w)
            np.testing.assert_array_equal(j, w)


def test_bad_method():
    with pytest.raises(ValueError, match="method must be"):
        _select.use_histogram(10, "radix")


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.integers(0, 2**32 - 2), min_size=1, max_size=200),
    split=st.integers(0, 200),
    kfrac=st.floats(0, 1),
    method=st.sampled_from(METHODS),
)
def test_smallest_property(data, split, kfrac, method):
    keys = np.array(data, np.uint32)
    split = min(split, keys.size)
    parts = [padded(keys[:split], 200), padded(keys[split:], 200)]
    k = round(kfrac * keys.size)  # never beyond the real keys: the padding is not selected
    for g, w in zip(run(parts, k, method), reference(parts, k)):
        np.testing.assert_array_equal(g, w)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 300), kfrac=st.floats(0, 1))
def test_tie_free_selection_equals_torch_topk(seed, n, kfrac):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    if len(set(np.abs(x).tolist())) < n:
        return
    k = round(kfrac * n)
    want = np.zeros(300, bool)
    want[torch.topk(torch.tensor(x).abs(), k, largest=False).indices.numpy()] = True
    keys = padded(np.asarray(_select.abs_keys(jnp.asarray(x))), 300)
    (got,) = run([keys], k, "sort")
    np.testing.assert_array_equal(got, want)
