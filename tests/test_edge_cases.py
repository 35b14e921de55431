"""Edge cases of the core that the parity suites do not reach: empty leaves, mixed dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jprune as jp

JITS = [pytest.param(jax.jit, id="jit"), pytest.param(lambda f: f, id="eager")]


@pytest.mark.parametrize("wrap", JITS)
def test_zero_size_leaf_is_pruned_to_an_empty_mask(wrap):
    p = {"a": jnp.zeros((0, 3)), "c": jnp.arange(12.0).reshape(3, 4)}
    for fn in (
        lambda p: jp.l1_unstructured(p, 0.5, select="*"),
        lambda p: jp.global_unstructured(p, 0.5, select="*"),
        lambda p: jp.ln_structured(p, 0.5, 2, 0, select="*"),
        lambda p: jp.random_unstructured(p, 0.5, key=jax.random.key(0), select="*"),
    ):
        m = wrap(fn)(p)
        assert m["a"].shape == (0, 3) and m["a"].dtype == jnp.bool_
        assert int((~m["c"]).sum()) in (6, 4 * 2)  # half the entries, or 2 of 3 rows (round(1.5))


def test_global_mixes_dtypes_and_breaks_ties_by_tree_order():
    # bf16 ones tie with c's 1.0: the bf16 leaf comes first in the tree, so its ties go first.
    p = {"b": jnp.ones((2, 3), jnp.bfloat16), "c": jnp.arange(12.0).reshape(3, 4)}
    m = jp.global_unstructured(p, 5, select="*")  # c's 0.0, then 4 of the 7 entries tied at 1.0
    np.testing.assert_array_equal(np.asarray(m["b"]).ravel(), [False] * 4 + [True] * 2)
    np.testing.assert_array_equal(np.asarray(m["c"]).ravel(), np.arange(12) > 0)
