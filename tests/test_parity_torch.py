"""Parity with real ``torch.nn.utils.prune`` (CPU): every method, iterative sequences, scores, errors.

Inputs are tie-free (§3.1: torch's tie order cannot be matched), so every mask must be identical.
torch runs through its module API, so its own PruningContainer handles re-prunes; JAX gets the same
array in the same layout with ``axis = dim``. Random methods are compared in counts and structure.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune
from conftest import (
    JITS,
    assert_same_masks,
    pruned_count,
    run_both,
    tie_free,
    tie_free_channels,
    to_np,
    torch_mask,
    torch_module,
)
from interop_models import FooBarPruningMethod  # the seed's example: prune every other entry

import jprune as jp
from jprune._tree import ShapeError

SHAPES = [(7,), (5, 7), (4, 3, 2, 2), (6, 4, 3)]
ND_SHAPES = [s for s in SHAPES if len(s) >= 2]


def rng_for(*key):
    return np.random.default_rng(abs(hash(key)) % 2**32)


# --------------------------------------------------------------------------------------------------
# Single calls


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_l1_unstructured(shape):
    w = tie_free(np.random.default_rng(len(shape)), shape)
    for amount in [0, 1, 3, 0.0, 0.3, 0.5, 1.0]:
        t, j = run_both({"w": w}, [("l1", amount)])
        assert_same_masks(t, j)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_l1_unstructured_jit(shape):
    w = tie_free(np.random.default_rng(len(shape)), shape)
    for amount in [3, 0.5]:
        t, j = run_both({"w": w}, [("l1", amount)], wrap=jax.jit)
        assert_same_masks(t, j)


LN_NORMS = [1, 2, 3, 0.5, math.inf, -math.inf, -1, "fro"]


@pytest.mark.parametrize("n", LN_NORMS, ids=str)
def test_ln_structured(n):
    for shape in ND_SHAPES:
        if n == "fro" and len(shape) > 3:
            continue  # 'fro' raises on 4-D (test_fro_nuc_errors)
        for dim in [0, 1, -1]:
            w = tie_free_channels(np.random.default_rng(7), shape, dim)
            for amount in [1, 0.5]:
                t, j = run_both({"w": w}, [("ln", amount, n, dim)])
                assert_same_masks(t, j)


@pytest.mark.parametrize("n", [1, 2, math.inf, -1, "fro"], ids=str)
def test_ln_structured_jit(n):
    w = tie_free_channels(np.random.default_rng(7), (6, 4, 3), 1)
    t, j = run_both({"w": w}, [("ln", 0.5, n, 1)], wrap=jax.jit)
    assert_same_masks(t, j)


@pytest.mark.parametrize("wrap", JITS)
def test_ln_structured_nuclear_norm_3d(wrap):
    for dim in [0, 1, 2, -1]:
        w = tie_free_channels(np.random.default_rng(2), (5, 4, 3), dim)
        t, j = run_both({"w": w}, [("ln", 2, "nuc", dim)], wrap=wrap)
        assert_same_masks(t, j)


def test_ln_structured_n0_counts_nonzeros():
    """n=0 scores a channel by its number of nonzeros; distinct counts make it tie-free."""
    w = tie_free(np.random.default_rng(0), (6, 5))
    for row, zeros in enumerate([3, 0, 5, 1, 4, 2]):
        w[row, :zeros] = 0.0
    t, j = run_both({"w": w}, [("ln", 2, 0, 0)])
    assert_same_masks(t, j)
    assert t["w"].sum(1).tolist() == [5, 5, 0, 5, 0, 5]


def test_peer_conv2d_worked_examples():
    """§3.5 worked examples on the Conv2d weight built from Generator.manual_seed(1234)."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(4, 3, 2, 2, generator=g).numpy()
    for amount, dim, pruned in [(0.5, 0, {0, 1}), (1, 1, {1}), (1, -1, {1})]:
        t, j = run_both({"w": w}, [("ln", amount, 2, dim)])
        assert_same_masks(t, j)
        others = tuple(d for d in range(4) if d != dim % 4)
        assert set(np.flatnonzero(~j["w"].any(axis=others)).tolist()) == pruned


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_unstructured_counts(shape):
    for amount in [0, 2, 0.4, 1.0]:
        check_random_unstructured(shape, amount)


def check_random_unstructured(shape, amount):
    w = tie_free(np.random.default_rng(0), shape)
    mod = torch_module({"w": w})
    tprune.random_unstructured(mod, "w", amount)
    tprune.random_unstructured(mod, "w", 0.5)  # and a re-prune: half of what remains
    m1 = jp.random_unstructured(jnp.asarray(w), amount, key=jax.random.key(0))
    m2 = jp.random_unstructured(jnp.asarray(w), 0.5, key=jax.random.key(1), masks=m1)
    assert pruned_count(m2) == int((mod.w_mask == 0).sum())
    assert not np.any(np.asarray(m2) & ~np.asarray(m1))  # pruned stays pruned


@pytest.mark.parametrize("shape", ND_SHAPES, ids=str)
def test_random_structured_counts_and_structure(shape):
    for dim in [0, -1]:
        for amount in [1, 0.6, 0.0]:
            check_random_structured(shape, dim, amount)


def check_random_structured(shape, dim, amount):
    w = tie_free(np.random.default_rng(0), shape)
    mod = torch_module({"w": w})
    tprune.random_structured(mod, "w", amount, dim=dim)
    m = np.asarray(jp.random_structured(jnp.asarray(w), amount, dim, key=jax.random.key(3)))
    others = tuple(d for d in range(len(shape)) if d != dim % len(shape))
    t_ch = (mod.w_mask != 0).numpy().any(axis=others)
    j_ch = m.any(axis=others)
    assert j_ch.sum() == t_ch.sum()
    # whole channels: a channel is all kept or all pruned
    assert np.array_equal(m.all(axis=others), j_ch)


@pytest.mark.parametrize("wrap", JITS)
def test_global_unstructured(wrap):
    rng = np.random.default_rng(5)
    arrays = dict(zip(["a", "b", "c"], tie_free(rng, [(4, 5), (3,), (2, 3, 2)])))
    amounts = [0, 1, 4, 17, 0.25, 0.5, 0.9, 1.0] if wrap is not jax.jit else [17, 0.25]
    for amount in amounts:
        t, j = run_both(arrays, [("global", amount)], wrap=wrap)
        assert_same_masks(t, j)


def test_global_random_exact_total_count():
    arrays = dict(zip(["a", "b"], tie_free(np.random.default_rng(0), [(6, 5), (4, 4)])))
    mod = torch_module(arrays)
    tprune.global_unstructured([(mod, "a"), (mod, "b")], tprune.RandomUnstructured, amount=0.3)
    want = sum(int((getattr(mod, n + "_mask") == 0).sum()) for n in "ab")
    m = jp.global_unstructured(
        {k: jnp.asarray(v) for k, v in arrays.items()},
        0.3,
        method="random",
        key=jax.random.key(0),
        select=["a", "b"],
    )
    assert pruned_count(m["a"]) + pruned_count(m["b"]) == want == round(0.3 * 46)


def test_identity():
    arrays = {"w": tie_free(np.random.default_rng(0), (3, 4)), "b": np.ones(3, np.float32)}
    t, j = run_both(arrays, [("identity",)], names=["w"])
    assert_same_masks(t, j)
    assert j["w"].all() and j["b"] is None


def test_custom_from_mask():
    w = tie_free(np.random.default_rng(0), (3, 4))
    mask = np.random.default_rng(1).integers(0, 2, (3, 4))
    t, j = run_both({"w": w}, [("custom", {"w": mask}), ("l1", 0.5), ("custom", {"w": mask.T.reshape(3, 4)})])
    assert_same_masks(t, j)


# --------------------------------------------------------------------------------------------------
# Iterative sequences (torch PruningContainer)

SEQUENCES = {
    "l1_twice_fraction": [("l1", 0.5), ("l1", 0.5)],
    "l1_int_then_fraction": [("l1", 3), ("l1", 0.3), ("l1", 2)],
    "ln_same_dim_twice": [("ln", 0.5, 2, 0), ("ln", 0.5, 2, 0)],
    "ln_different_dims": [("ln", 0.5, 2, 0), ("ln", 0.5, 1, 1)],
    "unstructured_after_structured": [("ln", 1, 1, 0), ("l1", 0.5)],
    "structured_after_unstructured": [("l1", 0.4), ("ln", 0.6, 2, 0)],
    "structured_last_dim_after_l1": [("l1", 0.3), ("ln", 0.5, math.inf, -1), ("l1", 1)],
    "mixed_four": [("l1", 2), ("ln", 1, 2, 0), ("ln", 1, math.inf, 1), ("l1", 0.25)],
    "identity_then_l1": [("identity",), ("l1", 0.5)],
}


@pytest.mark.parametrize("seq", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_iterative_sequences(seq):
    for shape in [(6, 4), (5, 4, 3)]:
        w = tie_free(np.random.default_rng(11), shape)
        t, j = run_both({"w": w}, seq)
        assert_same_masks(t, j)


@pytest.mark.parametrize("seq", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_iterative_sequences_jit(seq):
    w = tie_free(np.random.default_rng(11), (5, 4, 3))
    t, j = run_both({"w": w}, seq, wrap=jax.jit)
    assert_same_masks(t, j)


def test_structured_partially_pruned_channels_count():
    """§5: a 5x2 weight with row 0 zeroed by L1, then Ln(0.7, dim 0): N = 4 -> 3 more rows."""
    w = np.array([[0.01, 0.02], [1, 2], [3, -4], [-5, 6], [7, 8.5]], np.float32)
    t, j = run_both({"w": w}, [("l1", 2), ("ln", 0.7, 2, 0)])
    assert_same_masks(t, j)
    assert (~j["w"].any(1)).sum() == 4


@pytest.mark.parametrize("wrap", JITS)
def test_global_then_per_leaf_and_back(wrap):
    rng = np.random.default_rng(3)
    arrays = dict(zip(["a", "b"], tie_free(rng, [(5, 6), (4, 3)])))
    seq = [("global", 0.4), ("l1", 0.5), ("ln", 1, 2, 0), ("global", 5), ("global", 0.25)]
    t, j = run_both(arrays, seq, wrap=wrap)
    assert_same_masks(t, j)


def test_iterative_global_counts():
    """§6: 0.5 then 0.5 of (6 + 4) entries prunes 5, then round(2.5) = 2 more."""
    arrays = dict(zip(["a", "b"], tie_free(np.random.default_rng(0), [(2, 3), (4,)])))
    t, j = run_both(arrays, [("global", 0.5)])
    assert sum(pruned_count(m) for m in j.values()) == 5
    t, j = run_both(arrays, [("global", 0.5), ("global", 0.5)])
    assert_same_masks(t, j)
    assert sum(pruned_count(m) for m in j.values()) == 7


def test_container_exhaustion():
    """§5: 0.5, 0.5, int 3 leave 0 of 10; a float is then a no-op and int 1 raises."""
    w = tie_free(np.random.default_rng(0), (10,))
    t, j = run_both({"w": w}, [("l1", 0.5), ("l1", 0.5), ("l1", 3), ("l1", 0.5)])
    assert_same_masks(t, j)
    assert not j["w"].any()
    with pytest.raises(ValueError, match=r"prune=0"):
        jp.l1_unstructured(jnp.asarray(w), 1, masks=jnp.asarray(j["w"]))
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 1.0)
    with pytest.raises(ValueError, match=r"prune=0"):
        tprune.l1_unstructured(mod, "w", 1)


# --------------------------------------------------------------------------------------------------
# Importance scores


@pytest.mark.parametrize("wrap", JITS)
def test_importance_scores_per_leaf_sequence(wrap):
    rng = np.random.default_rng(4)
    w, s1, s2 = tie_free(rng, (5, 4)), tie_free(rng, (5, 4)), tie_free_channels(rng, (5, 4), 0)
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 6, importance_scores=torch.tensor(s1))
    tprune.ln_structured(mod, "w", 0.5, n=2, dim=0, importance_scores=torch.tensor(s2))
    tprune.l1_unstructured(mod, "w", 0.5)  # default scores: orig * mask
    p = jnp.asarray(w)
    m = wrap(lambda p, s: jp.l1_unstructured(p, 6, importance_scores=s))(p, jnp.asarray(s1))
    m = wrap(lambda p, m, s: jp.ln_structured(p, 0.5, 2, 0, masks=m, importance_scores=s))(
        p, m, jnp.asarray(s2)
    )
    m = wrap(lambda p, m: jp.l1_unstructured(p, 0.5, masks=m))(p, m)
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))


def test_structured_reprune_default_scores_are_masked_values():
    """§4: default re-prune scores are orig*mask; explicit orig scores choose differently."""
    w = np.array([[10.0, 0.5], [1.2, 1.2], [5, 5]], np.float32)
    t, j = run_both({"w": w}, [("l1", 1), ("ln", 1, 2, 0)])
    assert_same_masks(t, j)  # row 0 has masked norm 10 (0.5 is pruned) -> row 1 goes
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 1)
    tprune.ln_structured(mod, "w", 1, n=1, dim=0, importance_scores=torch.tensor(w))
    m = jp.l1_unstructured(jnp.asarray(w), 1)
    m = jp.ln_structured(jnp.asarray(w), 1, 1, 0, masks=m, importance_scores=jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))


@pytest.mark.parametrize("wrap", JITS)
@pytest.mark.parametrize("amount", [3, 0.4])
def test_global_importance_scores_dict(wrap, amount):
    """Scores for some leaves; the others fall back to their (masked) values."""
    rng = np.random.default_rng(8)
    a, b, c = tie_free(rng, [(3, 4), (5,), (2, 2)])
    sa, sc = tie_free(rng, [(3, 4), (2, 2)])
    mod = torch_module({"a": a, "b": b, "c": c})
    params = {"a": jnp.asarray(a), "b": jnp.asarray(b), "c": jnp.asarray(c)}
    sel = ["a", "b", "c"]
    tprune.l1_unstructured(mod, "b", 1)
    masks = jp.l1_unstructured(params, 1, select="b")
    tprune.global_unstructured(
        [(mod, n) for n in sel],
        tprune.L1Unstructured,
        importance_scores={(mod, "a"): torch.tensor(sa), (mod, "c"): torch.tensor(sc)},
        amount=amount,
    )
    scores = {"a": jnp.asarray(sa), "b": None, "c": jnp.asarray(sc)}
    m = wrap(lambda p, m, s: jp.global_unstructured(p, amount, masks=m, importance_scores=s, select=sel))(
        params, masks, scores
    )
    assert_same_masks({n: torch_mask(mod, n) for n in sel}, to_np(m))


def test_nan_scores_l1():
    """§3.3: scores [1, NaN, .5, 2, -3]: k=2 prunes {0, 2}; k=4 prunes {0, 2, 3, 4}."""
    s = np.array([1, np.nan, 0.5, 2, -3], np.float32)
    w = np.arange(1, 6, dtype=np.float32)
    for k, want in [(2, {0, 2}), (4, {0, 2, 3, 4}), (5, {0, 1, 2, 3, 4})]:
        mod = torch_module({"w": w})
        tprune.l1_unstructured(mod, "w", k, importance_scores=torch.tensor(s))
        m = np.asarray(jp.l1_unstructured(jnp.asarray(w), k, importance_scores=jnp.asarray(s)))
        np.testing.assert_array_equal(m, torch_mask(mod, "w"))
        assert set(np.flatnonzero(~m).tolist()) == want
    # NaN in the weight itself (default scores) behaves the same
    m = jp.l1_unstructured(jnp.asarray(s), 2)
    assert set(np.flatnonzero(~np.asarray(m)).tolist()) == {0, 2}


def test_nan_channel_is_kept_by_ln():
    w = tie_free_channels(np.random.default_rng(0), (4, 3), 0)
    w[np.argmin(np.abs(w).sum(1)), 1] = np.nan
    t, j = run_both({"w": w}, [("ln", 2, 1, 0)])
    assert_same_masks(t, j)


# --------------------------------------------------------------------------------------------------
# Custom methods vs real torch BasePruningMethod subclasses


@jp.custom_method(kind="unstructured")
def every_other(t, default_mask):
    return default_mask.ravel().at[::2].set(False).reshape(t.shape)


class EveryOtherChannel(tprune.BasePruningMethod):
    PRUNING_TYPE = "structured"

    def __init__(self, dim=-1):
        self.dim = dim

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        idx = [slice(None)] * t.ndim
        idx[self.dim] = slice(None, None, 2)
        mask[tuple(idx)] = 0
        return mask


@jp.custom_method(kind="structured")
def every_other_channel(t, default_mask, axis):
    idx = [slice(None)] * t.ndim
    idx[axis] = slice(None, None, 2)
    return default_mask.at[tuple(idx)].set(False)


class BelowThreshold(tprune.BasePruningMethod):
    PRUNING_TYPE = "global"

    def __init__(self, thr):
        self.thr = thr

    def compute_mask(self, t, default_mask):
        return default_mask * (t.abs() >= self.thr).to(default_mask.dtype)


@jp.custom_method(kind="global")
def below_threshold(t, default_mask, thr):
    return default_mask & (jnp.abs(t) >= thr)


@pytest.mark.parametrize("wrap", JITS)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 2)], ids=str)
def test_custom_every_other_entry_like_foobar(wrap, shape):
    """FooBarPruningMethod twice: every other entry, then every other of the remaining."""
    w = tie_free(np.random.default_rng(0), shape)
    mod = torch_module({"w": w})
    FooBarPruningMethod.apply(mod, "w")
    first = torch_mask(mod, "w")
    FooBarPruningMethod.apply(mod, "w")
    p = jnp.asarray(w)
    m1 = wrap(lambda p: every_other(p))(p)
    np.testing.assert_array_equal(np.asarray(m1), first)
    m2 = wrap(lambda p, m: every_other(p, masks=m))(p, m1)
    np.testing.assert_array_equal(np.asarray(m2), torch_mask(mod, "w"))


@pytest.mark.parametrize("wrap", JITS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_custom_structured_every_other_channel(wrap, dim):
    w = tie_free(np.random.default_rng(1), (7, 5, 3))
    mod = torch_module({"w": w})
    p, m = jnp.asarray(w), None
    for _ in range(3):
        EveryOtherChannel.apply(mod, "w", dim=dim)
        m = wrap(lambda p, m: every_other_channel(p, dim, masks=m))(p, m)
        np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))


@pytest.mark.parametrize("wrap", JITS)
def test_custom_mixed_with_builtins(wrap):
    """l1, custom unstructured, custom structured, custom global, Ln: torch's container each time."""
    w = tie_free_channels(np.random.default_rng(2), (6, 5), 0)
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 3)
    FooBarPruningMethod.apply(mod, "w")
    EveryOtherChannel.apply(mod, "w", dim=1)
    BelowThreshold.apply(mod, "w", thr=float(np.median(np.abs(w))))
    tprune.ln_structured(mod, "w", 1, n=1, dim=0)
    p = jnp.asarray(w)
    m = jp.l1_unstructured(p, 3)
    m = wrap(lambda p, m: every_other(p, masks=m))(p, m)
    m = wrap(lambda p, m: every_other_channel(p, 1, masks=m))(p, m)
    m = wrap(lambda p, m: below_threshold(p, masks=m, thr=float(np.median(np.abs(w)))))(p, m)
    m = wrap(lambda p, m: jp.ln_structured(p, 1, 1, 0, masks=m))(p, m)
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))


def test_custom_unstructured_with_importance_scores():
    rng = np.random.default_rng(3)
    w, s = tie_free(rng, (4, 4)), tie_free(rng, (4, 4))

    class Bottom3(tprune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            mask = default_mask.clone()
            mask.view(-1)[torch.topk(t.abs().view(-1), 3, largest=False).indices] = 0
            return mask

    @jp.custom_method
    def bottom3(t, default_mask):
        # padding (default_mask False on a re-prune) must never be chosen: rank it last
        keys = jnp.where(default_mask.ravel(), jnp.abs(t.ravel()), jnp.inf)
        idx = jnp.argsort(keys)[:3]
        return default_mask.ravel().at[idx].set(False).reshape(t.shape)

    mod = torch_module({"w": w})
    Bottom3.apply(mod, "w", importance_scores=torch.tensor(s))
    Bottom3.apply(mod, "w")
    m = bottom3(jnp.asarray(w), importance_scores=jnp.asarray(s))
    m = bottom3(jnp.asarray(w), masks=m)
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))


# --------------------------------------------------------------------------------------------------
# remove, apply_masks


def test_remove_then_prune_again():
    """§7.6: L1(0.3) prunes {1, 3, 6}; after remove, L1(0.5) prunes {1, 2, 3, 6, 8}."""
    w = np.array([5, -1, 3, 0.5, 9, -7, 2, 8, -4, 6], np.float32)
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 0.3)
    tprune.remove(mod, "w")
    baked_torch = mod.w.detach().numpy().copy()
    p = jnp.asarray(w)
    m = jp.l1_unstructured(p, 0.3)
    assert set(np.flatnonzero(~np.asarray(m)).tolist()) == {1, 3, 6}
    baked = jp.remove(p, m)
    np.testing.assert_array_equal(np.asarray(baked), baked_torch)
    np.testing.assert_array_equal(np.signbit(np.asarray(baked)), np.signbit(baked_torch))
    # Pruning again starts from scratch; the 3 baked zeros tie, so compare the tie-invariant part.
    tprune.l1_unstructured(mod, "w", 0.5)
    m2 = np.asarray(jp.l1_unstructured(baked, 0.5))
    assert set(np.flatnonzero(~m2).tolist()) == {1, 2, 3, 6, 8}
    np.testing.assert_array_equal(m2, torch_mask(mod, "w"))


@pytest.mark.parametrize("wrap", JITS)
def test_apply_masks_bitwise_like_torch(wrap):
    """§1: a product, not a select: pruned NaN/inf stay NaN, pruned negatives become -0.0.

    Was a bug under jit (fixed in 9dd8c2b): XLA rewrote p * mask.astype(p.dtype) to a select."""
    w = np.array([1.0, -2.0, np.nan, np.inf, -np.inf, -0.0, 3.0, np.nan], np.float32)
    mask = np.array([0, 0, 0, 0, 0, 0, 1, 1], bool)
    mod = torch_module({"w": w})
    tprune.custom_from_mask(mod, "w", torch.tensor(mask))
    want = mod.w.detach().numpy()
    got = np.asarray(wrap(jp.apply_masks)(jnp.asarray(w), jnp.asarray(mask)))
    removed = np.asarray(wrap(jp.remove)(jnp.asarray(w), jnp.asarray(mask)))
    np.testing.assert_array_equal(removed.view(np.uint32), got.view(np.uint32))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])
    np.testing.assert_array_equal(np.signbit(got[ok]), np.signbit(want[ok]))
    assert np.signbit(got[1]) and got[1] == 0  # -2 * 0 = -0.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_apply_masks_keeps_dtype(dtype):
    w = jnp.asarray([1.0, -2.0, 3.0], dtype)
    out = jp.apply_masks(w, jnp.asarray([True, False, True]))
    assert out.dtype == dtype
    assert out.tolist() == [1.0, 0.0, 3.0]


# --------------------------------------------------------------------------------------------------
# Errors: same exception types as torch (§10)


def both_raise(torch_fn, jax_fn, exc, match_torch=None, match_jax=None):
    with pytest.raises(exc, match=match_torch):
        torch_fn()
    with pytest.raises(exc, match=match_jax or match_torch):
        jax_fn()


@pytest.mark.parametrize(
    "amount,exc",
    [
        ("0.5", TypeError),
        (None, TypeError),
        (1.1, ValueError),
        (-1, ValueError),
        (-0.1, ValueError),
        (21, ValueError),
    ],
)
def test_amount_errors_every_method(amount, exc):
    w = tie_free(np.random.default_rng(0), (4, 5))
    p = jnp.asarray(w)
    key = jax.random.key(0)
    calls = [
        (lambda m: tprune.l1_unstructured(m, "w", amount), lambda: jp.l1_unstructured(p, amount)),
        (
            lambda m: tprune.random_unstructured(m, "w", amount),
            lambda: jp.random_unstructured(p, amount, key=key),
        ),
        (
            lambda m: tprune.ln_structured(m, "w", amount, n=2, dim=0),
            lambda: jp.ln_structured(p, amount, 2, 0),
        ),
        (
            lambda m: tprune.random_structured(m, "w", amount, dim=0),
            lambda: jp.random_structured(p, amount, 0, key=key),
        ),
        (
            lambda m: tprune.global_unstructured([(m, "w")], tprune.L1Unstructured, amount=amount),
            lambda: jp.global_unstructured({"w": p}, amount, select="w"),
        ),
    ]
    for tf, jf in calls:
        both_raise(lambda tf=tf: tf(torch_module({"w": w})), jf, exc)


def test_k_larger_than_remaining_on_reprune():
    w = tie_free(np.random.default_rng(0), (3, 4))
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 8)
    m = jp.l1_unstructured(jnp.asarray(w), 8)
    msg = r"amount=5 should be smaller than the number of parameters to prune=4"
    both_raise(
        lambda: tprune.l1_unstructured(mod, "w", 5),
        lambda: jp.l1_unstructured(jnp.asarray(w), 5, masks=m),
        ValueError,
        msg,
    )
    # structured: 2 of 3 rows pruned, 2 more rows do not exist
    mod = torch_module({"w": w})
    tprune.ln_structured(mod, "w", 2, n=1, dim=0)
    m = jp.ln_structured(jnp.asarray(w), 2, 1, 0)
    both_raise(
        lambda: tprune.ln_structured(mod, "w", 2, n=1, dim=0),
        lambda: jp.ln_structured(jnp.asarray(w), 2, 1, 0, masks=m),
        ValueError,
        r"amount=2 should be smaller than the number of parameters to prune=1",
    )
    # global: 12 entries, 8 pruned
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 8)
    m = jp.l1_unstructured(jnp.asarray(w), 8)
    both_raise(
        lambda: tprune.global_unstructured([(mod, "w")], tprune.L1Unstructured, amount=5),
        lambda: jp.global_unstructured({"w": jnp.asarray(w)}, 5, masks={"w": m}, select="w"),
        ValueError,
        r"amount=5 should be smaller than the number of parameters to prune=4",
    )


@pytest.mark.parametrize("method", ["ln", "random"])
def test_structured_ndim_and_axis_errors(method):
    key = jax.random.key(0)

    def t_call(w, dim):
        mod = torch_module({"w": w})
        if method == "ln":
            return tprune.ln_structured(mod, "w", 1, n=2, dim=dim)
        return tprune.random_structured(mod, "w", 1, dim=dim)

    def j_call(w, axis):
        if method == "ln":
            return jp.ln_structured(jnp.asarray(w), 1, 2, axis)
        return jp.random_structured(jnp.asarray(w), 1, axis, key=key)

    v = np.arange(1.0, 5.0, dtype=np.float32)
    both_raise(
        lambda: t_call(v, 0),
        lambda: j_call(v, 0),
        ValueError,
        r"Structured pruning can only be applied to multidimensional tensors. "
        r"Found tensor of shape \(4,\) with 1 dims|torch.Size\(\[4\]\) with 1 dims",
    )
    w = tie_free(np.random.default_rng(0), (3, 4))
    both_raise(lambda: t_call(w, 2), lambda: j_call(w, 2), IndexError, r"Invalid index 2")
    both_raise(lambda: t_call(w, -3), lambda: j_call(w, -3), IndexError, r"out of range")


def test_structured_axis_errors_on_reprune():
    """torch's container raises IndexError with other messages; jprune the same IndexError."""
    w = tie_free(np.random.default_rng(0), (3, 4))
    m = jp.l1_unstructured(jnp.asarray(w), 1)
    for dim in (2, -3):
        mod = torch_module({"w": w})
        tprune.l1_unstructured(mod, "w", 1)
        with pytest.raises(IndexError):
            tprune.ln_structured(mod, "w", 1, n=2, dim=dim)
        with pytest.raises(IndexError):
            jp.ln_structured(jnp.asarray(w), 1, 2, dim, masks=m)


@pytest.mark.parametrize("shape,n", [((4, 3, 2, 2), "fro"), ((4, 3), "nuc"), ((4, 3, 2, 2), "nuc")])
@pytest.mark.parametrize("amount", [0, 1])
def test_fro_nuc_errors(shape, n, amount):
    """Raised even for amount 0 (§2.5: the norms are computed first)."""
    w = tie_free(np.random.default_rng(0), shape)
    both_raise(
        lambda: tprune.ln_structured(torch_module({"w": w}), "w", amount, n=n, dim=0),
        lambda: jp.ln_structured(jnp.asarray(w), amount, n, 0),
        RuntimeError,
        r"linalg.matrix_norm: dim must be a 2-tuple",
    )


def test_fro_on_3d_equals_2():
    w = tie_free_channels(np.random.default_rng(0), (5, 3, 2), 0)
    t, j = run_both({"w": w}, [("ln", 2, "fro", 0)])
    assert_same_masks(t, j)
    np.testing.assert_array_equal(np.asarray(jp.ln_structured(jnp.asarray(w), 2, 2, 0)), j["w"])


def test_integer_scores_for_ln():
    w = tie_free(np.random.default_rng(0), (3, 4))
    s = np.arange(12).reshape(3, 4)
    both_raise(
        lambda: tprune.ln_structured(
            torch_module({"w": w}), "w", 1, n=2, dim=0, importance_scores=torch.tensor(s)
        ),
        lambda: jp.ln_structured(jnp.asarray(w), 1, 2, 0, importance_scores=jnp.asarray(s)),
        RuntimeError,
        r"linalg.vector_norm: Expected a floating point",
    )


def test_shape_mismatch_errors_are_assertion_errors_like_torch():
    w = tie_free(np.random.default_rng(0), (3, 4))
    bad = np.ones((4, 3), np.float32)
    p = jnp.asarray(w)
    both_raise(
        lambda: tprune.l1_unstructured(torch_module({"w": w}), "w", 1, importance_scores=torch.tensor(bad)),
        lambda: jp.l1_unstructured(p, 1, importance_scores=jnp.asarray(bad)),
        AssertionError,
        r"importance_scores should have the same shape",
        r"importance_scores at .* should have the same shape",
    )
    both_raise(
        lambda: tprune.ln_structured(
            torch_module({"w": w}), "w", 1, n=1, dim=0, importance_scores=torch.tensor(bad)
        ),
        lambda: jp.ln_structured(p, 1, 1, 0, importance_scores=jnp.asarray(bad)),
        AssertionError,
        r"importance_scores should have the same shape",
        r"importance_scores at .* should have the same shape",
    )
    both_raise(
        lambda: tprune.custom_from_mask(torch_module({"w": w}), "w", torch.tensor(bad)),
        lambda: jp.custom_from_mask(p, jnp.asarray(bad)),
        AssertionError,
        r"default_mask shape .* must match",
    )
    for exc in (AssertionError, ValueError):
        with pytest.raises(exc):
            jp.l1_unstructured(p, 1, masks=jnp.ones((4, 3), bool))
        with pytest.raises(ShapeError):
            jp.ln_structured(p, 1, 1, 0, masks=jnp.ones((3,), bool))


def test_global_method_name():
    """torch: TypeError for a non-unstructured method class; jprune: ValueError for an unknown name."""
    w = tie_free(np.random.default_rng(0), (3, 4))
    with pytest.raises(TypeError, match='Only "unstructured" PRUNING_TYPE'):
        tprune.global_unstructured([(torch_module({"w": w}), "w")], tprune.LnStructured, amount=1, n=2, dim=0)
    for bad in ("ln", "L1", "structured", None):
        with pytest.raises(ValueError, match="method must be 'l1' or 'random'"):
            jp.global_unstructured({"w": jnp.asarray(w)}, 1, method=bad, select="w")
    with pytest.raises(TypeError, match="explicit PRNG key"):
        jp.global_unstructured({"w": jnp.asarray(w)}, 1, method="random", select="w")


def test_failed_reprune_is_atomic():
    """§7.5: torch loses its hook on a failed re-prune; jprune is pure: the inputs are unchanged."""
    w = tie_free(np.random.default_rng(0), (3, 4))
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 8)
    with pytest.raises(ValueError):
        tprune.l1_unstructured(mod, "w", 5)
    assert not tprune.is_pruned(mod)  # torch's bug
    p = jnp.asarray(w)
    m = jp.l1_unstructured(p, 8)
    before = np.asarray(m).copy()
    with pytest.raises(ValueError):
        jp.l1_unstructured(p, 5, masks=m)
    np.testing.assert_array_equal(np.asarray(m), before)
    assert jp.is_pruned(m)
    np.testing.assert_array_equal(np.asarray(p), w)
