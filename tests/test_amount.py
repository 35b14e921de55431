"""Tests for jprune/_amount.py: torch's amount validation and count rule, on the host and traced.

torch's own helpers (``_validate_pruning_amount_init``, ``_compute_nparams_toprune``,
``_validate_pruning_amount``) and real pruning calls are the reference, computed in the test.
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune
from conftest import JITS, pruned_count, tie_free, torch_module

import jprune as jp
from jprune import _amount


def torch_count(amount, n):
    """torch's k, or the exception it raises (type, message), validating exactly as prune does."""
    try:
        tprune._validate_pruning_amount_init(amount)
        k = tprune._compute_nparams_toprune(amount, n)
        tprune._validate_pruning_amount(k, n)
        return int(k)
    except (TypeError, ValueError) as e:
        return type(e), str(e)


def jprune_count(amount, n):
    try:
        _amount.validate(amount)
        return _amount.count(amount, n)
    except (TypeError, ValueError) as e:
        return type(e), str(e)


# §2.2 rounding table, plus the §11 peer cases (test_compute_nparams_to_prune) and float artefacts.
ROUNDING = [
    (0.5, 5),
    (0.25, 2),
    (0.05, 10),
    (0.45, 10),
    (0.1, 25),
    (0.625, 4),
    (0.5, 1),
    (0.1, 15),
    (0.07, 150),
    (0.35, 90),
    (0.5, 3),
    (1.5 / 7, 7),
    (0.3, 5),
    (0.7, 5),
    (0, 15),
    (10, 15),
    (1, 15),
    (1.0, 15),
    (0.4, 17),
    (0.0, 0),
    (1.0, 0),
    (0.5, 0),
    (19 / 20, 20),
    (0.3333, 3),
    (2.5 / 13, 13),
    (0.999, 1000),
    (0.0005, 1000),
    (0.0015, 1000),
    (1, 1),
    (0, 0),
    (-0.0, 10),
    (1.0, 1),
    (0.999999, 7),
]


@pytest.mark.parametrize("amount,n", ROUNDING)
def test_count_matches_torch(amount, n):
    assert jprune_count(amount, n) == torch_count(amount, n)


def test_rounding_table_values():
    """The documented values themselves, so a torch change would show up here too."""
    assert _amount.count(0.1, 15) == 2  # 1.5000000000000002
    assert _amount.count(0.07, 150) == 11  # 10.500000000000002
    assert _amount.count(0.35, 90) == 31  # 31.499999999999996
    assert [_amount.count(0.5, n) for n in (1, 3, 5, 7, 9)] == [0, 2, 2, 4, 4]  # 0.5 1.5 2.5 3.5 4.5
    assert [_amount.count(x, 1) for x in (0.5, 0.49, 0.51)] == [0, 0, 1]


@pytest.mark.parametrize(
    "amount,n",
    [(20, 19), (1500, 1000), (16, 15), (1, 0), (np.int64(5), 4), (np.int32(3), 3), (2, 2)],
)
def test_k_larger_than_n_matches_torch(amount, n):
    assert jprune_count(amount, n) == torch_count(amount, n)


@pytest.mark.parametrize(
    "amount",
    [1.1, 20.0, -10, -1, -0.1, math.inf, -math.inf, np.float64(1.5), np.int64(-3), 1.0000001],
)
def test_out_of_range_matches_torch(amount):
    got, want = jprune_count(amount, 10), torch_count(amount, 10)
    assert got == want
    assert want[0] is ValueError


@pytest.mark.parametrize("amount", ["0.5", None, 1j, [0.5], torch.tensor(0.5), np.array([0.5])])
def test_invalid_type_matches_torch(amount):
    with pytest.raises(TypeError, match="Invalid type for amount") as want:
        tprune._validate_pruning_amount_init(amount)
    with pytest.raises(TypeError, match="Invalid type for amount") as got:
        _amount.validate(amount)
    assert str(got.value) == str(want.value)


def test_bool_amount_is_rejected():
    """Documented deviation: torch accepts bool at construction, then fails (True) or prunes 0."""
    tprune._validate_pruning_amount_init(True)  # torch: accepted here...
    with pytest.raises(TypeError):
        tprune.l1_unstructured(torch_module({"w": np.ones(4, np.float32)}), "w", True)  # ...fails
    for b in (True, False):
        with pytest.raises(TypeError, match="Invalid type for amount"):
            jp.l1_unstructured(jnp.ones(4), b)


@pytest.mark.parametrize(
    "amount",
    [0.34, 1500, 0, 0.0, 1, 1.0, -0.0, np.int64(3), np.float64(0.5), np.float32(0.25), Fraction(1, 4), 0.5],
)
def test_accepted_amounts(amount):
    """§11 test_validate_pruning_amount_init: what torch accepts, jprune accepts."""
    tprune._validate_pruning_amount_init(amount)
    _amount.validate(amount)


def test_nan_amount():
    """NaN passes validation (both comparisons are False) and fails converting to a count."""
    _amount.validate(math.nan)
    tprune._validate_pruning_amount_init(math.nan)
    assert torch_count(math.nan, 10) == jprune_count(math.nan, 10)
    with pytest.raises(ValueError, match="cannot convert float NaN to integer"):
        jp.l1_unstructured(jnp.arange(1.0, 5.0), math.nan)
    with pytest.raises(ValueError, match="cannot convert float NaN to integer"):
        jp.ln_structured(jnp.ones((2, 3)), math.nan, 2, 0)


def test_int_versus_float_by_type():
    w = jnp.arange(1.0, 11.0)
    assert pruned_count(jp.l1_unstructured(w, 1)) == 1
    assert pruned_count(jp.l1_unstructured(w, 1.0)) == 10


@pytest.mark.parametrize(
    "amount,n",
    [
        (0.07, 150),
        (0.35, 90),
        (0.1, 15),
        (0.5, 5),
        (0.45, 10),
        (0.625, 4),
        (0.5, 1),
        (1500, 1499),
        (7, 7),
        (0.0, 3),
    ],
)
def test_rounding_end_to_end_vs_torch(amount, n):
    """The count of a real prune, torch vs jprune (per leaf, global, and structured)."""
    rng = np.random.default_rng(n)
    a = tie_free(rng, (n,))
    mod = torch_module({"w": a})
    try:
        tprune.l1_unstructured(mod, "w", amount)
    except ValueError as e:
        with pytest.raises(ValueError, match="should be smaller than the number of parameters"):
            jp.l1_unstructured(jnp.asarray(a), amount)
        assert "should be smaller" in str(e)
        return
    want = int((mod.w_mask == 0).sum())
    assert pruned_count(jp.l1_unstructured(jnp.asarray(a), amount)) == want
    assert pruned_count(jp.global_unstructured({"w": jnp.asarray(a)}, amount, select="w")["w"]) == want
    # structured: a fraction of n channels of an (n, 2) array prunes the same number of rows
    b = np.stack([a, a[::-1]], axis=1) if n > 1 else np.stack([a, a], axis=1)
    mod2 = torch_module({"w": b})
    tprune.ln_structured(mod2, "w", amount, n=1, dim=0)
    rows = int((mod2.w_mask.sum(1) == 0).sum())
    m = np.asarray(jp.ln_structured(jnp.asarray(b), amount, 1, 0))
    assert int((m.sum(1) == 0).sum()) == rows


# --- numpy / Fraction amounts: torch rounds the product in the amount's own arithmetic ----------


def test_numpy_float32_amount_matches_torch():
    """Was a bug (fixed in 9dd8c2b): torch rounds the float32 product np.float32(0.7) * 5 == 3.5."""
    assert jprune_count(np.float32(0.7), 5) == torch_count(np.float32(0.7), 5) == 4


def test_fraction_amount_matches_torch():
    """Was a bug (fixed in 9dd8c2b): torch rounds the exact product Fraction(7, 20) * 90 == 63/2."""
    assert jprune_count(Fraction(7, 20), 90) == torch_count(Fraction(7, 20), 90) == 32


@pytest.mark.parametrize(
    "amount,n",
    [
        (np.float64(0.35), 90),
        (np.float64(0.07), 150),
        (np.int64(4), 9),
        (Fraction(1, 2), 5),
        (Fraction(1, 3), 9),
    ],
)
def test_numpy_and_fraction_amounts_that_agree(amount, n):
    assert jprune_count(amount, n) == torch_count(amount, n)


# --- count_traced: exact round-half-even of (float32 amount) * n, under jit ----------------------


def exact_count(a32, n):
    """Python's ``round(a * n)`` (double product, half to even) for the float32 value ``a``,
    clipped to [0, 1] and [0, n]: what ``count_traced`` emulates for a floating traced amount."""
    if math.isnan(float(a32)):
        return 0
    a = min(max(float(a32), 0.0), 1.0)
    return min(max(round(a * n), 0), n)


def test_count_traced_exact_random():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 400).astype(np.float32)
    # halves and values near them, tiny/subnormal amounts, exact 0 and 1
    a = np.concatenate(
        [
            a,
            np.float32(
                [0.5, 0.25, 0.125, 0.375, 1.0, 0.0, 1e-30, 1e-45, 0.7, 0.35, 0.07, 0.1, 0.9999999, 5e-8]
            ),
        ]
    )
    n = rng.integers(0, 2**31 - 1, a.size).astype(np.int32)
    n[:40] = rng.integers(0, 20, 40)
    n[-14:] = [5, 4, 8, 8, 2**31 - 1, 2**31 - 1, 2**31 - 1, 2**31 - 1, 5, 90, 150, 15, 3, 2**30]
    got = np.asarray(jax.jit(jax.vmap(_amount.count_traced))(jnp.asarray(a), jnp.asarray(n)))
    want = np.array([exact_count(x, int(m)) for x, m in zip(a, n)])
    np.testing.assert_array_equal(got, want)


def test_count_traced_ties_to_even():
    a = jnp.float32([0.5, 0.5, 0.5, 0.5, 0.25, 0.75, 0.125])
    n = jnp.int32([1, 3, 5, 7, 2, 2, 4])
    got = jax.vmap(_amount.count_traced)(a, n)
    assert got.tolist() == [round(float(x) * int(m)) for x, m in zip(a, n)] == [0, 2, 2, 4, 0, 2, 0]


def test_count_traced_clips_and_nan():
    f = jax.jit(_amount.count_traced)
    assert int(f(jnp.float32(1.5), 10)) == 10
    assert int(f(jnp.float32(-0.5), 10)) == 0
    assert int(f(jnp.float32(math.nan), 10)) == 0
    assert int(f(jnp.int32(12), 10)) == 10
    assert int(f(jnp.int32(-3), 10)) == 0
    assert int(f(jnp.int32(4), 10)) == 4


def test_traced_amount_must_be_scalar():
    with pytest.raises(TypeError, match="scalar"):
        jp.l1_unstructured(jnp.ones(4), jnp.array([0.5, 0.5]))


@pytest.mark.parametrize("wrap", JITS)
@pytest.mark.parametrize("amount", [0.07, 0.35, 0.1, 0.5, 0.45, 3, 0, 1.0])
def test_jax_scalar_amount_equals_python_amount(wrap, amount):
    """A jax float32/int32 amount (traced under jit) gives the host count of that float32 value,
    which is the Python float's count except where float32 rounding moves the product."""
    rng = np.random.default_rng(1)
    for n in (15, 90, 150, 10):
        w = jnp.asarray(tie_free(rng, (n,)))
        if isinstance(amount, int) and amount > n:
            continue
        if not isinstance(amount, int) and exact_count(np.float32(amount), n) != round(amount * n):
            # e.g. 0.45 * 150: 67.5 -> 68 in double, 67.49999... -> 67 in float32
            want = exact_count(np.float32(amount), n)
            got = wrap(lambda w, a: jp.l1_unstructured(w, a))(w, jnp.float32(amount))
            assert pruned_count(got) == want
            continue
        ref = jp.l1_unstructured(w, amount)
        a = jnp.int32(amount) if isinstance(amount, int) else jnp.float32(amount)
        got = wrap(lambda w, a: jp.l1_unstructured(w, a))(w, a)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize(
    "amount,n",
    ROUNDING
    + [(0.45, 150), (0.7, 5), (0.9999999, 2**31 - 1), (1e-300, 2**31 - 1), (5e-324, 7), (0.3, 2**31 - 1)],
)
def test_device_amount_words_match_host_count(amount, n):
    """``as_device_amount`` keeps the double exactly: the device count equals ``count``."""
    if isinstance(amount, int) and amount > n:
        return
    f = jax.jit(_amount.count_traced)
    assert int(f(_amount.as_device_amount(amount), n)) == _amount.count(amount, n)
