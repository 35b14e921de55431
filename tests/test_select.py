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


def reference(keys_list, k, cands=None):
    """The k smallest candidate keys across the list, ties by flat index (a stable sort)."""
    flat = np.concatenate([np.asarray(x).ravel() for x in keys_list])
    cand = np.ones(flat.size, bool) if cands is None else np.concatenate([c.ravel() for c in cands])
    sel = np.zeros(flat.size, bool)
    sel[np.lexsort((flat, ~cand))[:k]] = True  # candidates first, by key, then by index
    out, off = [], 0
    for x in keys_list:
        out.append(sel[off : off + x.size].reshape(x.shape))
        off += x.size
    return out


def selected(keys_list, cands, k, method, jit=True):
    """The entries ``prune_smallest`` chooses: candidates that it does not keep."""

    def f(ks, cs, k):
        bits = 8 * ks[0].dtype.itemsize
        keeps = _select.prune_smallest(
            [(_select.given, kc) for kc in zip(ks, cs)], k, bits=bits, method=method
        )
        return [~keep if c is None else c & ~keep for c, keep in zip(cs, keeps)]

    return f(keys_list, cands, k) if not jit else _JITTED[method](keys_list, cands, k)


_JITTED = {m: jax.jit(lambda ks, cs, k, m=m: selected(ks, cs, k, m, jit=False)) for m in METHODS}


def run(keys_list, k, method, jit=True, cands=None, dtype=jnp.uint32):
    cands = cands or [None] * len(keys_list)
    keys = [jnp.asarray(x, dtype) for x in keys_list]
    got = selected(keys, [None if c is None else jnp.asarray(c) for c in cands], jnp.int32(k), method, jit)
    return [np.asarray(m) for m in got]


PAD = np.uint32(0xFFFFFFFF)


def padded(values, size):
    """``values`` followed by non-candidates up to ``size`` (one shape, one compilation): the
    keys, with the padding's keys at the maximum."""
    out = np.full(size, PAD, np.uint32)
    out[: len(values)] = values
    return out


def candidates(values, size):
    return np.arange(size) < len(values)


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
def test_non_candidates_are_never_chosen_up_to_the_candidate_count(method):
    keys = np.array([5, 0, 3, 2**32 - 1, 9], np.uint32)
    cand = np.array([True, False, True, False, True])
    for k, want in [(0, []), (1, [2]), (2, [0, 2]), (3, [0, 2, 4])]:
        (got,) = run([keys], k, method, cands=[cand])
        assert np.flatnonzero(got).tolist() == want


@pytest.mark.parametrize("method", METHODS)
def test_every_uint32_key_is_a_real_key(method):
    """The largest uint32 is an ordinary key (candidates are a separate mask, no sentinel key)."""
    keys = np.array([2**32 - 1, 5, 2**32 - 2, 7, 2**31], np.uint32)
    for k in range(6):
        (got,) = run([keys], k, method)
        np.testing.assert_array_equal(got, reference([keys], k)[0])


@pytest.mark.parametrize("method", METHODS)
def test_uint64_keys_rank_by_all_64_bits(method):
    """Keys differing only below bit 32, or only above it, and the largest uint64: four 16-bit
    histogram levels (or a uint64 sort) find the exact k-th key."""
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        hi = rng.integers(0, 2**32, 40, dtype=np.uint64) << np.uint64(32)
        keys = np.concatenate(
            [hi[:20] | np.uint64(7), np.uint64(3 << 32) | rng.integers(0, 8, 30, dtype=np.uint64)]
        )
        keys = np.concatenate([keys, np.array([2**64 - 1, 0], np.uint64)])
        parts = [keys[:25], keys[25:].reshape(9, 3)]
        for k in (0, 1, 5, 20, 31, 52):
            got = run(parts, k, method, dtype=jnp.uint64)
            for g, w in zip(got, reference(parts, k)):
                np.testing.assert_array_equal(g, w)


def test_hist_and_sort_agree_on_a_large_input():
    """Above the auto threshold (2**16 entries) on CPU the histogram path is used."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 300)).astype(np.float32)
    x[::7, ::3] = 0.5  # plenty of ties
    keys = _select.magnitude_keys(jnp.asarray(x))
    assert _select.use_histogram(x.size) == (jax.default_backend() == "cpu")
    for k in (1, 12345, 45000, 89999):
        a = run([keys], k, "hist")[0]
        b = run([keys], k, "sort")[0]
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, reference([np.asarray(keys)], k)[0])


def test_magnitude_keys_order_like_torch():
    """|x| order: +0 == -0 < subnormals < normals < inf < NaN (torch.topk ranks NaN above inf)."""
    x = np.array([np.nan, np.inf, -np.inf, 1.0, -1e-45, 0.0, -0.0, 3.0, -2.5, 1e-38], np.float32)
    keys = np.asarray(_select.magnitude_keys(jnp.asarray(x)))
    assert keys[5] == keys[6]  # +0 and -0
    assert keys[1] == keys[2]  # +inf and -inf
    order = np.argsort(keys, kind="stable")
    assert order.tolist()[:2] == [5, 6]
    assert order.tolist()[-1] == 0  # NaN last
    # tie-free part agrees with torch.topk(largest=False) order
    t = torch.tensor(x[[0, 1, 3, 4, 5, 7, 8, 9]]).abs()
    want = torch.topk(t, t.numel(), largest=False).indices.tolist()
    got = np.argsort(np.asarray(_select.magnitude_keys(jnp.asarray(t.numpy()))), kind="stable").tolist()
    assert got == want


def test_magnitude_keys_bf16_and_f16_ties():
    """Low precision creates ties fp32 would not have (§3.1): bf16 [1, 1.001, 1.002, 1.003] tie."""
    x = jnp.asarray([1.0, 1.001, 1.002, 1.003], jnp.bfloat16)
    assert len(set(np.asarray(_select.magnitude_keys(x)).tolist())) == 1
    y = jnp.asarray([1.0, 1.001, 1.002, 1.003], jnp.float16)
    assert len(set(np.asarray(_select.magnitude_keys(y)).tolist())) == 4


def test_too_many_entries_error_is_static():
    """Counts are int32: a group of 2**31 entries (or a bigger one) is refused before any pass."""
    for n in (2**31, 2**32 - 1, 2**32 + 5):
        big = jax.ShapeDtypeStruct((n,), jnp.uint32)
        with pytest.raises(ValueError, match="at most 2147483647"):
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
    data=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=200),
    split=st.integers(0, 200),
    kfrac=st.floats(0, 1),
    method=st.sampled_from(METHODS),
)
def test_smallest_property(data, split, kfrac, method):
    keys = np.array(data, np.uint32)
    split = min(split, keys.size)
    parts = [padded(keys[:split], 200), padded(keys[split:], 200)]
    cands = [candidates(keys[:split], 200), candidates(keys[split:], 200)]
    k = round(kfrac * keys.size)  # never beyond the real keys: the padding is not selected
    want = reference(parts, k, cands)
    for g, w in zip(run(parts, k, method, cands=cands), want):
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
    real = np.asarray(_select.magnitude_keys(jnp.asarray(x)))
    (got,) = run([padded(real, 300)], k, "sort", cands=[candidates(real, 300)])
    np.testing.assert_array_equal(got, want)
