"""N:M sparsity (jp.n_m_unstructured) against a NumPy reference, jitted and eager."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import JITS
from hypothesis import given, settings
from hypothesis import strategies as st

import jprune as jp


def reference(w, n, m, axis, mask=None):
    """Per group of m along axis: prune the smallest |w| among the unpruned, ties by index, until
    the group has n pruned (a stable sort per group)."""
    w = np.moveaxis(np.abs(np.asarray(w, np.float64)), axis, -1)
    live = np.ones(w.shape, bool) if mask is None else np.moveaxis(np.asarray(mask), axis, -1).copy()
    flat_w, flat_live = w.reshape(-1, m), live.reshape(-1, m)
    for g in range(flat_w.shape[0]):
        need = n - int((~flat_live[g]).sum())
        cands = [j for j in np.lexsort((np.arange(m), flat_w[g])) if flat_live[g][j]]
        for j in cands[: max(need, 0)]:
            flat_live[g][j] = False
    return np.moveaxis(flat_live.reshape(w.shape), -1, axis)


@pytest.mark.parametrize("wrap", JITS)
@pytest.mark.parametrize("n,m,axis", [(2, 4, -2), (1, 4, 0), (3, 8, -1), (0, 4, -2), (4, 4, -2)])
def test_matches_reference_with_ties(wrap, n, m, axis):
    rng = np.random.default_rng(n + m)
    w = (rng.integers(0, 3, (8, 16)) * rng.choice([-1.0, 1.0], (8, 16))).astype(np.float32)  # ties
    got = wrap(lambda w: jp.n_m_unstructured(w, n, m, axis=axis))(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(got), reference(w, n, m, axis))
    groups = np.moveaxis(np.asarray(got), axis, -1).reshape(-1, m)
    assert (groups.sum(-1) == m - n).all()  # exactly n pruned in every group


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 4), frac=st.floats(0, 1))
def test_re_pruning_keeps_the_pattern(seed, n, frac):
    """Existing masks count towards a group's n: a group already at n or more stays as it is."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((12, 8)).astype(np.float32)
    mask = rng.uniform(size=w.shape) >= frac * 0.5
    got = jp.n_m_unstructured(jnp.asarray(w), n, 4, masks=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got), reference(w, n, 4, -2, mask))
    assert not (np.asarray(got) & ~mask).any()  # pruned entries never come back


def test_on_a_params_tree_with_scores_and_refusals():
    rng = np.random.default_rng(0)
    params = {
        "d": {"kernel": jnp.asarray(rng.standard_normal((8, 6)).astype(np.float32)), "bias": jnp.zeros(6)}
    }
    scores = jax.tree.map(lambda x: -x[::-1] if x.ndim > 1 else None, params)
    got = jp.n_m_unstructured(params, 2, 4, importance_scores=scores)
    assert got["d"]["bias"] is None
    np.testing.assert_array_equal(np.asarray(got["d"]["kernel"]), reference(scores["d"]["kernel"], 2, 4, -2))
    with pytest.raises(ValueError, match=r"d/kernel: length 6 along axis -1 is not a multiple of m=4"):
        jp.n_m_unstructured(params, 2, 4, axis=-1)
    with pytest.raises(ValueError, match="0 <= n <= m"):
        jp.n_m_unstructured(params, 5, 4)
    with pytest.raises(TypeError, match="n must be an int"):
        jp.n_m_unstructured(params, 2.0, 4)
