"""Never silently wrong (issue #8, core): every input gives torch's answer or a clear refusal.

Each test here failed before the fix it guards: per-leaf ranks compared across leaves for non-f32
dtypes, float64 norms rounded to float32 keys, uint32 values colliding with the kernel's sentinel,
numpy float32/float16 amounts rounded as doubles under jit, concrete jax amounts silently clipped,
non-binary custom masks accepted under jit, non-array leaves crashing, colliding paths, biases and
position tables in the default selection, schedules that stop short of their final sparsity.
"""

import math
import warnings
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.utils.prune as tprune
from conftest import JITS, pruned_count, tie_free, torch_mask, torch_module

import jprune as jp
from jprune import _amount

# --------------------------------------------------------------------------------------------------
# torch references


def torch_global(arrays: dict, amount, scores: dict | None = None) -> dict:
    """torch's global L1 masks for ``arrays`` (with optional importance scores of any dtype)."""
    mod = torch.nn.Module()
    for name, a in arrays.items():
        t = torch.tensor(np.asarray(a))
        setattr(mod, name, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))
    imp = None if scores is None else {(mod, k): as_torch(v) for k, v in scores.items()}
    tprune.global_unstructured(
        [(mod, k) for k in arrays], pruning_method=tprune.L1Unstructured, importance_scores=imp, amount=amount
    )
    return {k: torch_mask(mod, k) for k in arrays}


def as_torch(a) -> torch.Tensor:
    a = np.array(a)
    if a.dtype.name == "bfloat16":  # numpy has no bf16: through float32, exactly
        return torch.tensor(a.astype(np.float32)).to(torch.bfloat16)
    return torch.tensor(a)


def assert_masks(got: dict, want: dict):
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)


def nested(arrays: dict) -> dict:
    """``{name: array}`` as Flax-like params, ``{name: {"kernel": array}}``."""
    return {k: {"kernel": jnp.asarray(v)} for k, v in arrays.items()}


def flat(masks: dict) -> dict:
    return {k: v["kernel"] for k, v in masks.items()}


# --------------------------------------------------------------------------------------------------
# Global pruning ranks every dtype on one scale


@pytest.mark.parametrize("wrap", JITS)
def test_global_float64_ranks_all_leaves_on_one_scale(wrap):
    """float64 magnitudes that differ only past float32 precision, interleaved across two leaves."""
    rng = np.random.default_rng(0)
    base = 1.0 + rng.permutation(40) * 1e-12  # distinct in float64, all 1.0 in float32
    arrays = {"a": (base[:20] * rng.choice([-1, 1], 20)).reshape(4, 5), "b": base[20:].reshape(5, 4)}
    want = torch_global(arrays, 0.45)
    with jax.enable_x64(True):
        params = nested({k: np.asarray(v, np.float64) for k, v in arrays.items()})
        got = flat(wrap(lambda p: jp.global_unstructured(p, 0.45))(params))
    assert_masks(got, want)


@pytest.mark.parametrize(
    "dtypes",
    [
        ("int32", "float32"),
        ("int8", "int32"),
        ("uint8", "int16"),
        ("int64", "float16"),
        ("float32", "float64"),
        ("bfloat16", "float16"),
        ("int32", "bfloat16"),
    ],
)
def test_global_mixed_dtype_scores_rank_on_one_scale(dtypes):
    """torch concatenates the scores (type promotion) and ranks once: so does jprune. (Per-leaf
    ranks compared across leaves interleaved them before.)"""
    rng = np.random.default_rng(1)
    params = {
        "a": rng.standard_normal((4, 6)).astype(np.float32),
        "b": rng.standard_normal((3, 5)).astype(np.float32),
    }
    values = (rng.permutation(39) + 1) * rng.choice([-1, 1], 39)  # distinct magnitudes, exact in all
    raw = {"a": values[:24].reshape(4, 6), "b": values[24:].reshape(3, 5)}
    raw = {k: np.abs(v) if dt.startswith("u") else v for (k, v), dt in zip(raw.items(), dtypes)}
    with jax.enable_x64(any("64" in d for d in dtypes)):
        scores = {k: jnp.asarray(v, dt) for (k, v), dt in zip(raw.items(), dtypes)}
        got = flat(jp.global_unstructured(nested(params), 17, importance_scores=nested(scores)))
        tscores = {k: np.asarray(v) for k, v in scores.items()}
    assert_masks(got, torch_global(params, 17, tscores))


def test_global_int_scores_beside_float_round_like_torch():
    """int32 scores next to float32 ones are rounded to float32 (torch.cat): 2**24 + 1 ties 2**24."""
    params = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)}
    scores = {
        "a": np.array([[2**24 + 1, 5, 2**25]], np.int32),
        "b": np.array([[2**24 + 0.0, 7.0, 1.0]], np.float32),
    }
    want = torch_global(params, 4, scores)
    got = flat(jp.global_unstructured(nested(params), 4, importance_scores=nested(scores)))
    # 1, 5 and 7 go first; then a's 2**24 + 1, now 2**24, ties b's 2**24 at the boundary (exact
    # integers would prune b's). jprune prunes the lower flat index (a's); torch's tie order is
    # its own: compare the tie-free entries, and that each prunes one of the two.
    for k in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(got[k])[0, 1:], want[k][0, 1:])
    assert [bool(got["a"][0, 0]), bool(got["b"][0, 0])] == [False, True]
    assert sorted([bool(want["a"][0, 0]), bool(want["b"][0, 0])]) == [False, True]


def torch_l1_scores(scores: np.ndarray, amount) -> np.ndarray:
    """torch's l1_unstructured mask for integer importance scores (on float params)."""
    mod = torch_module({"w": np.ones(scores.shape, np.float32)})
    tprune.l1_unstructured(mod, "w", amount, importance_scores=torch.tensor(scores))
    return torch_mask(mod, "w")


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32"])
def test_integer_scores_rank_as_torch_does(dtype):
    """torch's abs wraps the most negative integer to itself, so it ranks below every magnitude."""
    lo = np.iinfo(dtype).min
    scores = np.array([lo, 3, -2, -lo - 1, 0, 7], dtype)
    for k in range(7):
        got = jp.l1_unstructured(jnp.ones(6), k, importance_scores=jnp.asarray(scores))
        np.testing.assert_array_equal(np.asarray(got), torch_l1_scores(scores, k))
    # globally, int8 beside int32 is promoted first: -128 is then an ordinary magnitude
    params = {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 3), np.float32)}
    scores = {"a": np.array([[-128, 5, 1, 127]], np.int8), "b": np.array([[-(2**31), 100, 2]], np.int32)}
    got = flat(jp.global_unstructured(nested(params), 3, importance_scores=nested(scores)))
    assert_masks(got, torch_global(params, 3, scores))


def test_integer_scores_without_a_common_dtype_are_refused():
    """int32 with uint32 promotes to int64 (torch, numpy): without x64 JAX has no such dtype."""
    params = nested({"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)})
    scores = nested(
        {"a": np.array([[1, -2], [3, 4]], np.int32), "b": np.array([[2**32 - 1, 0], [5, 6]], np.uint32)}
    )
    with pytest.raises(TypeError, match="cannot rank integer scores"):
        jp.global_unstructured(params, 2, importance_scores=scores)
    with jax.enable_x64(True):
        got = jp.global_unstructured(params, 2, importance_scores=jax.tree.map(jnp.asarray, scores))
        assert np.flatnonzero(~np.asarray(got["a"]["kernel"]).ravel()).tolist() == [0]  # |1|
        assert np.flatnonzero(~np.asarray(got["b"]["kernel"]).ravel()).tolist() == [1]  # 0


# --------------------------------------------------------------------------------------------------
# Structured pruning keeps float64 norms' order


@pytest.mark.parametrize("wrap", JITS)
def test_ln_structured_float64_norms_keep_their_order(wrap):
    rng = np.random.default_rng(2)
    x = np.ones((6, 8)) + np.linspace(0, 1e-11, 8)[rng.permutation(8)]  # channels: columns (dim 1)
    mod = torch_module({"w": x})
    tprune.ln_structured(mod, "w", 3, n=2, dim=1)
    with jax.enable_x64(True):
        got = wrap(lambda w: jp.ln_structured(w, 3, n=2, axis=1))(jnp.asarray(x, jnp.float64))
    np.testing.assert_array_equal(np.asarray(got), torch_mask(mod, "w"))


# --------------------------------------------------------------------------------------------------
# What the native kernel receives


@pytest.mark.parametrize("wrap", JITS)
@pytest.mark.parametrize("big", [True, False])
def test_uint32_values_and_bool_leaves(wrap, big):
    """uint32 *values* (2**32 - 1 is a value, not a sentinel) and bool leaves or scores."""
    n = 70_000 if big else 4  # large inputs are where the kernel (or histograms) take over
    rng = np.random.default_rng(3)
    u = np.concatenate([[2**32 - 1, 5, 6, 7], rng.integers(8, 2**32 - 1, n - 4, dtype=np.uint64)]).astype(
        np.uint32
    )
    got = wrap(lambda w: jp.l1_unstructured(w, 1))(jnp.asarray(u))
    assert np.flatnonzero(~np.asarray(got)).tolist() == [1]
    got = wrap(lambda w: jp.l1_unstructured(w, n - 1))(jnp.asarray(u))
    assert np.flatnonzero(np.asarray(got)).tolist() == [0]
    b = np.ones(n, bool)
    b[[1, 3]] = False
    got = wrap(lambda w: jp.l1_unstructured(w, 2))(jnp.asarray(b))
    assert np.flatnonzero(~np.asarray(got)).tolist() == [1, 3]
    w = jnp.asarray(rng.standard_normal(n).astype(np.float32))
    got = wrap(lambda w, s: jp.l1_unstructured(w, 2, importance_scores=s))(w, jnp.asarray(b))
    assert np.flatnonzero(~np.asarray(got)).tolist() == [1, 3]


# --------------------------------------------------------------------------------------------------
# Counts never overflow


@pytest.mark.parametrize(
    "call",
    [
        lambda p, m: jp.l1_unstructured(p, 0.5, masks=m, select="*"),
        lambda p, m: jp.global_unstructured(p, 0.5, masks=m, select="*"),
        lambda p, m: jp.random_unstructured(p, 0.5, masks=m, key=jax.random.key(0), select="*"),
        lambda p, m: jp.prune_to_sparsity(p, 0.5, masks=m, select="*"),
    ],
)
@pytest.mark.parametrize("traced_masks", [False, True])
def test_groups_of_2_31_entries_or_more_are_refused(call, traced_masks):
    """Counts are int32: 2**31 ... 2**32 - 1 candidates would wrap. Checked on shapes, statically,
    so this runs without allocating anything (jax.eval_shape)."""
    for shapes in ([(2**31,)], [(2**16, 2**15 - 1)]):  # one leaf over the bound / one just under
        params = {f"l{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
        masks = (
            {k: jax.ShapeDtypeStruct(v.shape, jnp.bool_) for k, v in params.items()} if traced_masks else None
        )
        if math.prod(shapes[0]) >= 2**31:
            with pytest.raises(ValueError, match="at most 2147483647"):
                jax.eval_shape(call, params, masks)
        else:
            jax.eval_shape(call, params, masks)
    # two leaves under the bound, together over it: refused for a global ranking only
    params = {
        "a": jax.ShapeDtypeStruct((2**30 + 1,), jnp.float32),
        "b": jax.ShapeDtypeStruct((2**30,), jnp.float32),
    }
    with pytest.raises(ValueError, match="at most 2147483647"):
        jax.eval_shape(lambda p: jp.global_unstructured(p, 0.5, select="*"), params)
    jax.eval_shape(lambda p: jp.l1_unstructured(p, 0.5, select="*"), params)


# --------------------------------------------------------------------------------------------------
# Amounts


def torch_pruned(w: np.ndarray, amount) -> int:
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", amount)
    return pruned_count(torch_mask(mod, "w"))


@pytest.mark.parametrize(
    "amount,n", [(np.float32(0.35), 90), (np.float16(0.1), 15), (np.float32(0.7), 5), (np.float16(0.3), 5)]
)
def test_numpy_amounts_under_jit_round_in_their_own_arithmetic(amount, n):
    """np.float32(0.35) * 90 is 31.5 in float32 (torch: 32), 31.4999... in double (31)."""
    w = tie_free(np.random.default_rng(4), (n,))
    want = torch_pruned(w, amount)
    m0 = jnp.ones(n, bool)
    eager = jp.l1_unstructured(jnp.asarray(w), amount, masks=m0)
    traced = jax.jit(lambda w, m: jp.l1_unstructured(w, amount, masks=m))(jnp.asarray(w), m0)
    glob = jax.jit(lambda w, m: jp.global_unstructured(w, amount, masks=m))(jnp.asarray(w), m0)
    assert pruned_count(eager) == pruned_count(traced) == pruned_count(glob) == want
    x = np.repeat(w[None], 3, 0)  # n channels along axis 1 (distinct norms)
    mod = torch_module({"x": x})
    tprune.ln_structured(mod, "x", amount, n=1, dim=1)
    got = jax.jit(lambda x, m: jp.ln_structured(x, amount, 1, 1, masks=m))(
        jnp.asarray(x), jnp.ones(x.shape, bool)
    )
    np.testing.assert_array_equal(np.asarray(got), torch_mask(mod, "x"))


@pytest.mark.parametrize("kind", [np.float32, np.float16, np.float64, float])
def test_device_counts_match_torch_for_large_counts(kind):
    """numpy rounds n into the amount's type before multiplying (float32 above 2**24, float16
    above 2048): the device count does too. The reference is torch's own count."""
    rng = np.random.default_rng(7)
    top = 65503 if kind is np.float16 else 2**31 - 1
    ns = np.concatenate(
        [rng.integers(2**11, top, 150), rng.integers(0, 2**11, 30), [top, 2**24 + 1, 2**24 + 3]]
    )
    ns = ns[ns <= top]
    amounts = [kind(a) for a in rng.uniform(0, 1, ns.size)]
    for a, n in zip(amounts, ns.tolist()):
        if kind is np.float16 and float(a) * n >= 65504:
            continue
        # traced=True: the count of a remaining n known only on the device (one compiled program)
        (k,) = _amount.counts(a, [jnp.int32(n)], [top], where=[""], traced=True)
        assert int(k) == tprune._compute_nparams_toprune(a, n), (a, n)


def test_traced_amounts_float64_and_wide_integers():
    """A traced float64 amount (jax_enable_x64) keeps its 53 bits; a traced integer amount is
    clipped in its own dtype (no wrap to a small count)."""
    w = jnp.asarray(tie_free(np.random.default_rng(8), (5,)))
    f = jax.jit(lambda w, a: jp.l1_unstructured(w, a))
    with jax.enable_x64(True):
        assert pruned_count(f(w, jnp.float64(0.1))) == torch_pruned(np.asarray(w), 0.1) == 0  # 0.5 -> 0
        assert pruned_count(f(w, jnp.float64(0.3))) == torch_pruned(np.asarray(w), 0.3) == 2  # 1.5 -> 2
        assert pruned_count(f(w, jnp.int64(2**32 + 3))) == 5  # clipped to n, not wrapped to 3
    assert pruned_count(f(w, jnp.uint32(2**32 - 1))) == 5  # clipped, not wrapped to -1 -> 0
    assert pruned_count(f(w, jnp.int8(-5))) == 0


def test_float16_amount_that_could_overflow_is_refused_under_jit():
    """torch's round(np.float16(a) * n) overflows to inf (OverflowError) for products >= 65520."""
    w, m = jnp.ones(70_000), jnp.ones(70_000, bool)
    with warnings.catch_warnings(), pytest.raises(OverflowError):
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's own "overflow encountered"
        jp.l1_unstructured(w, np.float16(1.0))  # on the host, as torch
    with pytest.raises(OverflowError, match="float16"):
        jax.jit(lambda w, m: jp.l1_unstructured(w, np.float16(1.0), masks=m))(w, m)


def test_fraction_amount_is_exact_eagerly_and_refused_under_jit():
    w = tie_free(np.random.default_rng(5), (7,))
    assert (
        pruned_count(jp.l1_unstructured(jnp.asarray(w), Fraction(1, 2)))
        == torch_pruned(w, Fraction(1, 2))
        == 4
    )
    with pytest.raises(TypeError, match="cannot be counted exactly on the device"):
        jax.jit(lambda w, m: jp.l1_unstructured(w, Fraction(1, 2), masks=m))(
            jnp.asarray(w), jnp.ones(7, bool)
        )


@pytest.mark.parametrize(
    "amount,python",
    [
        (jnp.float32(1.5), 1.5),
        (jnp.array(-3), -3),
        (jnp.float32(math.nan), math.nan),
        (jnp.array(700), 700),
        (jnp.array(True), True),
        (jnp.array(0.5, jnp.complex64), 0.5j),
    ],
)
@pytest.mark.parametrize(
    "call",
    [
        lambda w, a: jp.l1_unstructured(w, a),
        lambda w, a: jp.global_unstructured(w, a),
        lambda w, a: jp.ln_structured(w, a, 2, 0),
        lambda w, a: jp.random_unstructured(w, a, key=jax.random.key(0)),
    ],
)
def test_concrete_jax_amounts_are_validated_like_python_numbers(amount, python, call):
    """Outside jit a jax scalar is a number: the error a Python number gets, not a silent clip."""
    w = jnp.asarray(tie_free(np.random.default_rng(6), (10, 10)))
    with pytest.raises((TypeError, ValueError)) as python_error:
        call(w, python)
    with pytest.raises(python_error.type):
        call(w, amount)


# --------------------------------------------------------------------------------------------------
# Custom masks


@pytest.mark.parametrize("bad", [0.5, math.nan, 2.0, -1.0])
def test_custom_from_mask_refuses_non_binary_values(bad):
    w = jnp.ones(4)
    mask = jnp.array([1.0, 0.0, bad, 1.0])
    with pytest.raises(ValueError, match="other than 0 and 1"):
        jp.custom_from_mask(w, mask)
    with pytest.raises(TypeError, match="must be bool"):  # under jit the values cannot be checked
        jax.jit(jp.custom_from_mask)(w, mask)
    ok = jax.jit(jp.custom_from_mask)(w, jnp.array([True, False, True, True]))
    assert np.asarray(ok).tolist() == [True, False, True, True]


@pytest.mark.parametrize("bad", [0.5, math.nan, 2])
def test_custom_rules_returning_non_binary_masks_are_refused(bad):
    @jp.custom_method(kind="unstructured")
    def rule(t, default_mask):
        return jnp.where(jnp.arange(t.size).reshape(t.shape) == 0, bad, 1.0)

    with pytest.raises(ValueError, match="other than 0 and 1"):
        rule({"k": {"kernel": jnp.ones((2, 2))}})
    with pytest.raises(TypeError, match="must be bool"):
        jax.jit(rule)({"k": {"kernel": jnp.ones((2, 2))}})

    @jp.custom_method(kind="unstructured")
    def zero_one(t, default_mask):  # 0/1 ints are fine outside jit (checked)
        return jnp.where(jnp.arange(t.size).reshape(t.shape) == 0, 0, 1)

    assert pruned_count(zero_one(jnp.ones((2, 2)))) == 1


# --------------------------------------------------------------------------------------------------
# Trees


def test_non_array_leaves_are_ignored_unless_selected():
    params = {"d": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3), "name": "dense", "act": jax.nn.relu}}
    masks = jp.l1_unstructured(params, 2)
    assert masks["d"]["name"] is None and masks["d"]["act"] is None
    assert pruned_count(masks["d"]["kernel"]) == 2
    applied = jp.apply_masks(params, masks)
    assert applied["d"]["name"] == "dense" and applied["d"]["act"] is jax.nn.relu
    assert jp.sparsity(masks, params).pruned == 2
    for select in ("d/name", lambda p, x: p.endswith("act") or p.endswith("name")):
        if callable(select):
            with pytest.raises(ValueError, match="matches no leaf"):  # predicates see arrays only
                jp.l1_unstructured(params, 1, select=select)
        else:
            with pytest.raises(TypeError, match="'d/name', a str, not an array"):
                jp.l1_unstructured(params, 1, select=select)


def test_colliding_paths_are_refused():
    params = {"a/b": jnp.ones((2, 2)), "a": {"b": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"several leaves at the path\(s\) \['a/b'\]"):
        jp.l1_unstructured(params, 1, select="a/b")
    with pytest.raises(ValueError, match="several leaves"):
        jp.apply_masks(params, {"a/b": None, "a": {"b": None}})


def test_64_bit_numpy_leaves_are_not_narrowed_silently():
    """Without jax_enable_x64, JAX would round a float64 numpy leaf to float32 (and int64 to
    int32): masks and effective weights would no longer be the float64 model's."""
    params = {"d": {"kernel": np.linspace(1.0, 1.0 + 1e-12, 6).reshape(2, 3)}}
    for call in (
        lambda p, s: jp.apply_masks(p, jp.identity(jax.tree.map(jnp.float32, p))),
        lambda p, s: jp.l1_unstructured(p, 2),
        lambda p, s: jp.l1_unstructured(jax.tree.map(jnp.float32, p), 2, importance_scores=s),
    ):
        with pytest.raises(TypeError, match="float64, which JAX would round to float32"):
            call(params, params)
    with pytest.raises(TypeError, match="int64, which JAX would round to int32"):
        jp.l1_unstructured(np.arange(4, dtype=np.int64), 1)
    with jax.enable_x64(True):
        assert pruned_count(jp.l1_unstructured(params, 2)["d"]["kernel"]) == 2


@pytest.mark.parametrize("empty", [{}, [], {"a": {}}, {"a": None}])
def test_an_empty_tree_is_a_clear_error(empty):
    with pytest.raises(ValueError, match="no leaves"):
        jp.l1_unstructured(empty, 0.5)
    with pytest.raises(ValueError, match="no leaves"):
        jp.global_unstructured(empty, 0.5)


# --------------------------------------------------------------------------------------------------
# The default selection


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        pos = self.param("pos_embedding", nn.initializers.normal(1.0), (x.shape[-2], x.shape[-1]))
        x = nn.LayerNorm()(x + pos)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
        x = nn.Dense(16)(x)
        x = nn.Conv(4, (3,))(x)
        return nn.DenseGeneral((2, 3))(x)


def test_default_selection_is_kernels_only():
    """Attention biases are 2-D (heads, head_dim) and the position table is a free-standing 2-D
    param: neither is a kernel, so neither is pruned by default."""
    params = Block().init(jax.random.key(0), jnp.ones((1, 5, 8)))["params"]
    flat_paths = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert flat_paths["MultiHeadDotProductAttention_0/query/bias"].ndim == 2  # the trap
    for fn in (
        lambda p: jp.global_unstructured(p, 0.5),
        lambda p: jp.l1_unstructured(p, 0.5),
        lambda p: jp.prune_to_sparsity(p, 0.5),
        lambda p: jp.identity(p),
    ):
        masks = fn(params)
        got = {
            "/".join(str(getattr(k, "key", k)) for k in path)
            for path, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
            if m is not None
        }
        want = {p for p in flat_paths if p.endswith("/kernel")}
        assert got == want
        assert len(want) == 7  # q, k, v, out, Dense, Conv, DenseGeneral


# --------------------------------------------------------------------------------------------------
# Schedules and the optimizer wrapper


# (the schedules' own tests, ends exact and refusals included, are in tests/test_schedules.py)


def test_keep_pruned_works_under_tree_map_params():
    """optax.tree_utils.tree_map_params (e.g. to cast or shard an optimizer state like its params)
    calls init with a placeholder: the masks stay masks, the params-like trees are mapped."""
    params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    masks = {"d": {"kernel": jnp.array([[True, False]] * 3), "bias": None}}
    tx = jp.keep_pruned(optax.adam(1e-2), masks)
    state = tx.init(params)
    cast = optax.tree_utils.tree_map_params(tx, lambda p: p.astype(jnp.bfloat16), state)
    assert jp.get_masks(cast)["d"]["kernel"].dtype == jnp.bool_
    mu = cast.inner_state[0].mu
    assert mu["d"]["kernel"].dtype == jnp.bfloat16 and mu["d"]["bias"].dtype == jnp.bfloat16
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert np.asarray(optax.apply_updates(params, updates)["d"]["kernel"])[:, 1].tolist() == [0.0] * 3


def test_leaves_a_call_does_not_use_are_left_as_they_are():
    """Only masked or selected leaves become JAX arrays: a step counter too big for int32, a
    float64 numpy leaf without x64, a string: none of them stops a call that does not touch them."""
    params = {"d": {"kernel": jnp.ones((2, 3))}, "step": 2**40, "ema": np.zeros(3), "name": "x"}
    masks = jp.l1_unstructured(params, 2)
    out = jp.apply_masks(params, masks)
    assert out["step"] == 2**40 and out["ema"] is params["ema"] and out["name"] == "x"
    assert jp.sparsity(masks, params).pruned == 2
    with pytest.raises(TypeError, match="not an array"):
        jp.custom_from_mask(params, {"d": {"kernel": None}, "step": None, "ema": None, "name": np.ones(1)})


def test_bool_leaves_stay_bool_when_masks_apply():
    b = jnp.array([True, False, True, True])
    out = jp.apply_masks(b, jp.l1_unstructured(b, 2))
    assert out.dtype == jnp.bool_ and out.tolist() == [False, False, True, True]
