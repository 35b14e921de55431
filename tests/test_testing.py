"""Tests for jprune/testing.py: comparing masks across frameworks, ties versus real differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune
from conftest import tie_free, torch_mask, torch_module

import jprune as jp
from jprune.testing import (
    assert_masks_equivalent,
    assert_same_effective_weights,
    compare_masks,
    torch_reference,
)


def heavy_ties(rng, shape, levels=3):
    """Few distinct magnitudes: a cut almost always falls inside a run of equal scores."""
    return (rng.integers(1, levels + 1, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


def test_torch_and_jprune_agree_up_to_ties():
    """Heavy ties: torch's tie order is its own, so the masks differ; only by ties."""
    equal = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        w = heavy_ties(rng, (8, 9))
        mod = torch_module({"w": w})
        tprune.l1_unstructured(mod, "w", 0.4)
        ours = np.asarray(jp.l1_unstructured(jnp.asarray(w), 0.4))
        report = compare_masks({"w": torch_mask(mod, "w")}, {"w": ours}, scores={"w": w})
        assert report.equivalent
        assert_masks_equivalent({"w": torch_mask(mod, "w")}, {"w": ours}, scores={"w": w})
        (row,) = report.leaves
        assert row.pruned_a == row.pruned_b == round(0.4 * w.size)
        equal.append(report.equal)
    assert not all(equal)  # the tie orders did differ somewhere: the comparison had work to do


def test_global_ties_may_cross_leaves():
    """torch's global ranking may take a tied entry from another leaf: still ties only."""
    a = {"x": np.array([[False, True]]), "y": np.array([[True, True]])}
    b = {"x": np.array([[True, True]]), "y": np.array([[False, True]])}
    scores = {"x": np.array([[2.0, 5.0]], np.float32), "y": np.array([[-2.0, 7.0]], np.float32)}
    report = compare_masks(a, b, scores=scores)
    assert report.equivalent and not report.equal
    assert [r.ties_only for r in report.leaves] == [True, True]


def test_a_real_difference_is_reported_with_its_leaf_and_index():
    rng = np.random.default_rng(1)
    w = {"a": tie_free(rng, (4, 5)), "b": heavy_ties(rng, (3, 6))}
    want = {k: np.asarray(v) for k, v in jp.l1_unstructured(jax_tree(w), 0.5, select="*").items()}
    broken = {k: v.copy() for k, v in want.items()}
    kept = np.argwhere(broken["a"])[-1]  # the largest kept of a tie-free leaf: no tie explains it
    pruned = np.argwhere(~broken["a"])[0]
    broken["a"][tuple(kept)], broken["a"][tuple(pruned)] = False, True
    report = compare_masks(want, broken, scores=w)
    assert not report.equivalent
    row = {r.path: r for r in report.leaves}["a"]
    assert row.differ == 2 and row.ties_only is False and row.pruned_a == row.pruned_b
    with pytest.raises(AssertionError, match=r"differ beyond ties at leaf 'a' index \("):
        assert_masks_equivalent(want, broken, scores=w)
    assert "differs beyond ties" in str(report)


def test_a_real_difference_hidden_among_ties_is_the_one_named():
    """Two tie swaps and one real difference in one leaf: the index named is the real one."""
    w = np.array([1.0, 1.0, 1.0, 1.0, 5.0, 9.0], np.float32)
    a = np.array([False, False, True, True, True, True])
    b = np.array([True, False, False, True, True, False])  # swaps a tie, then prunes 9 for a 1
    report = compare_masks(a, b, scores=w)
    assert not report.equivalent
    assert report.leaves[0].first in ((0,), (5,))  # a's extra pruned 1.0 or b's pruned 9.0
    b_tie = np.array([True, True, False, False, True, True])
    assert compare_masks(a, b_tie, scores=w).equivalent


def test_without_scores_any_difference_is_real_and_counts_matter():
    a, b = np.array([False, True, True]), np.array([True, False, True])
    report = compare_masks(a, b)
    assert not report.equivalent and report.leaves[0].ties_only is None
    with pytest.raises(AssertionError, match="masks differ at leaf"):
        assert_masks_equivalent(a, b)
    w = np.array([2.0, 2.0, 2.0], np.float32)
    more = np.array([False, False, True])
    assert not compare_masks(a, more, scores=w).equivalent  # 1 vs 2 pruned: never a tie
    assert compare_masks(a, a).equal


def test_none_leaves_and_structure():
    m = {"k": np.array([True, False]), "b": None}
    assert compare_masks(m, {"k": np.array([True, False]), "b": None}).equal
    assert compare_masks(m, {"k": None, "b": None}).leaves[0].differ == 1  # None: all kept
    with pytest.raises(ValueError, match="structure"):
        compare_masks(m, {"k": np.array([True, False])})
    with pytest.raises(ValueError, match="shapes differ"):
        compare_masks(m, {"k": np.array([True, False, True]), "b": None})


def test_nan_scores_compare_exactly():
    """NaN scores rank above inf and tie with each other, as torch ranks them."""
    w = np.array([np.nan, 1.0, np.nan, 3.0], np.float32)
    keep_0 = np.array([True, True, False, True])
    keep_2 = np.array([False, True, True, True])
    assert compare_masks(keep_0, keep_2, scores=w).equivalent
    assert not compare_masks(keep_0, np.array([True, True, True, False]), scores=w).equivalent


def jax_tree(tree):
    return {k: jnp.asarray(v) for k, v in tree.items()}


def test_tie_free_torch_masks_are_equal():
    rng = np.random.default_rng(2)
    w = tie_free(rng, (6, 7))
    mod = torch_module({"w": w})
    tprune.l1_unstructured(mod, "w", 17)
    assert compare_masks(torch_mask(mod, "w"), jp.l1_unstructured(jnp.asarray(w), 17)).equal
    assert torch.__version__


# --------------------------------------------------------------------------------------------------
# torch_reference: torch's answer, jprune-shaped


def flax_params(rng):
    return {
        "conv": {"kernel": jnp.asarray(tie_free(rng, (3, 3, 2, 4))), "bias": jnp.zeros(4)},
        "dense": {"kernel": jnp.asarray(tie_free(rng, (6, 5))), "bias": jnp.zeros(5)},
    }


@pytest.mark.parametrize(
    "steps,ours",
    [
        (("l1_unstructured", 0.3), lambda p: jp.l1_unstructured(p, 0.3)),
        (("global_unstructured", 17), lambda p: jp.global_unstructured(p, 17)),
        (("ln_structured", 0.5, {"n": 2, "axis": -1}), lambda p: jp.ln_structured(p, 0.5, 2, -1)),
        (
            [
                ("l1_unstructured", 0.2),
                ("ln_structured", 1, {"n": 1, "axis": -2}),
                ("global_unstructured", 0.25),
            ],
            lambda p: jp.global_unstructured(
                p, 0.25, masks=jp.ln_structured(p, 1, 1, -2, masks=jp.l1_unstructured(p, 0.2))
            ),
        ),
    ],
)
def test_torch_reference_equals_jprune_on_tie_free_weights(steps, ours):
    params = flax_params(np.random.default_rng(3))
    want = torch_reference(params, steps)
    assert want["conv"]["bias"] is None  # the default selection: kernels
    assert compare_masks(want, ours(params)).equal


def test_torch_reference_with_masks_and_scores():
    rng = np.random.default_rng(4)
    params = flax_params(rng)
    start = jp.random_unstructured(params, 0.3, key=jax.random.key(0))
    scores = jax.tree.map(lambda x: -x if x.ndim > 1 else None, params)
    want = torch_reference(params, ("l1_unstructured", 0.4), masks=start, importance_scores=scores)
    got = jp.l1_unstructured(params, 0.4, masks=start, importance_scores=scores)
    assert compare_masks(want, got).equal
    rand = torch_reference(params, ("random_unstructured", 7), select="dense/kernel")
    assert int((~rand["dense"]["kernel"]).sum()) == 7 and rand["conv"]["kernel"] is None


def test_torch_reference_with_ties_is_equivalent_not_equal():
    rng = np.random.default_rng(5)
    params = {"a": {"kernel": jnp.asarray(heavy_ties(rng, (9, 8)))}}
    want = torch_reference(params, ("global_unstructured", 0.45))
    got = jp.global_unstructured(params, 0.45)
    report = compare_masks(want, got, scores=params)
    assert report.equivalent and not report.equal
    with pytest.raises(ValueError, match="method must be one of"):
        torch_reference(params, ("l2_unstructured", 0.5))


def test_effective_weights_agree_bit_for_bit_across_frameworks(tmp_path):
    """Masks computed in JAX, installed in torch: the effective weights are the same bits; a mask
    one entry off is named by leaf and index."""
    from jprune.interop import apply_to_torch, from_torch, save

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5))
    params = from_torch(model)["params"]
    masks = jp.global_unstructured(params, 0.5)
    apply_to_torch(model, masks)
    assert_same_effective_weights(params, masks, model)
    save(model.state_dict(), tmp_path / "m.pt")
    assert_same_effective_weights(params, masks, tmp_path / "m.pt")
    off = jax.tree.map(np.array, masks)
    i = tuple(np.argwhere(off["2"]["kernel"])[0])
    off["2"]["kernel"][i] = False
    with pytest.raises(AssertionError, match=r"2/kernel: effective weights differ at \(" + f"{i[0]}, {i[1]}"):
        assert_same_effective_weights(params, off, model)
    with pytest.raises(AssertionError, match="on one side only"):
        assert_same_effective_weights({"0": params["0"]}, {"0": masks["0"]}, model)


def test_structured_masks_compare_by_channel():
    """Columns 0 and 2 have the same L2 norm (5) with different entries: torch and jprune may
    prune either; by channel that is a tie, entry by entry it is not."""
    w = np.array([[3.0, 1.0, 0.0, 9.0], [4.0, 1.0, 0.0, 9.0], [0.0, 1.0, 5.0, 9.0]], np.float32)
    prune_0 = np.array([[False, True, True, True]] * 3)
    prune_2 = np.array([[True, True, False, True]] * 3)
    assert not compare_masks(prune_0, prune_2, scores=w).equivalent
    report = compare_masks(prune_0, prune_2, scores=w, axis=1, n=2)
    assert report.equivalent and report.leaves[0].differ == 2
    assert_masks_equivalent(prune_0, prune_2, scores=w, axis=1)
    prune_1 = np.array([[True, False, True, True]] * 3)  # norm sqrt(3): a real difference
    with pytest.raises(AssertionError, match=r"index \(1,\)|index \(0,\)"):
        assert_masks_equivalent(prune_0, prune_1, scores=w, axis=1)
    # against torch: duplicate channels tie exactly
    rng = np.random.default_rng(6)
    base = rng.standard_normal((5, 3)).astype(np.float32)
    x = np.concatenate([base, base[:, :1], base[:, :1] * -1], axis=1)  # columns 0, 3, 4 tie
    for k in (1, 2, 3):
        mod = torch_module({"x": x})
        tprune.ln_structured(mod, "x", k, n=2, dim=1)
        ours = jp.ln_structured(jnp.asarray(x), k, 2, 1)
        assert_masks_equivalent(torch_mask(mod, "x"), ours, scores=x, axis=1)
