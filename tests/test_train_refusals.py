"""The training API refuses what it cannot do exactly: hostile schedules, steps, scopes and masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jprune as jp
from jprune import nnx as jpnnx


def _params():
    key = jax.random.key(0)
    return {"a": {"kernel": jax.random.normal(key, (16, 8))}, "b": {"kernel": jax.random.normal(key, (8, 4))}}


def test_eager_update_masks_refuses_an_unreachable_max_sparsity():
    # 90 % of 160 cannot be pruned with no leaf past 50 %: prune_to_sparsity refuses; so must update_masks
    params = _params()
    with pytest.raises(ValueError, match="cannot be reached with max_sparsity"):
        jp.prune_to_sparsity(params, 0.9, max_sparsity=0.5)
    with pytest.raises(ValueError, match="cannot be reached with max_sparsity"):
        jp.update_masks(params, jp.identity(params), 0, 0.9, max_sparsity=0.5)
    with pytest.raises(ValueError, match="cannot be reached with max_sparsity"):
        jp.update_masks(params, jp.identity(params), 4, optax.linear_schedule(0.0, 0.9, 4), max_sparsity=0.5)


def test_eager_update_masks_refuses_a_schedule_value_outside_a_fraction():
    params = _params()
    for bad in (lambda t: 0.1 * t, lambda t: jnp.nan * t):  # 1.5 at step 15, NaN
        with pytest.raises(ValueError, match="sparsity must be a fraction"):
            jp.update_masks(params, jp.identity(params), 15, bad)


def test_eager_nnx_update_masks_refuses_an_unreachable_max_sparsity_and_changes_nothing():
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    jpnnx.attach_masks(model, jp.identity(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, jp.keep_pruned(optax.sgd(0.1), jpnnx.masks_of(model)), wrt=nnx.Param)
    kernel = np.array(model.kernel.get_value())
    with pytest.raises(ValueError, match="cannot be reached"):
        jpnnx.update_masks(model, optimizer, 0.9, scope="global", select="*", max_sparsity=0.5)
    assert np.array_equal(model.kernel.get_value(), kernel)
    assert bool(jnp.all(jpnnx.masks_of(model)["kernel"]))
    assert bool(jnp.all(jpnnx.get_masks(optimizer)["kernel"]))


def test_update_masks_refuses_a_schedule_that_is_not_a_scalar():
    params = _params()
    with pytest.raises(ValueError, match=r"schedule\(step\) must be a scalar"):
        jp.update_masks(params, jp.identity(params), 0, lambda t: jnp.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"schedule\(step\) must be a scalar"):
        jax.jit(lambda t: jp.update_masks(params, jp.identity(params), t, lambda s: jnp.full(2, 0.5)))(0)


@pytest.mark.parametrize("step", [2.5, 0.0, jnp.float32(3.0)])
def test_update_masks_refuses_a_step_that_is_not_an_integer(step):
    # a float step would silently skip pruning (2.5 % 1 != 0): refused, eager and traced
    params = _params()
    with pytest.raises(TypeError, match="step must be an integer"):
        jp.update_masks(params, jp.identity(params), step, 0.5)
    with pytest.raises(TypeError, match="step must be an integer"):
        jax.jit(lambda t: jp.update_masks(params, jp.identity(params), t, 0.5))(step)


def test_eager_and_jitted_update_masks_agree():
    params, masks = _params(), jp.identity(_params())
    schedule = jp.polynomial_sparsity(0.8, 0, 10)
    jitted = jax.jit(lambda p, m, t: jp.update_masks(p, m, t, schedule, frequency=3, scope="erk"))
    for t in (0, 1, 3, 9, 12):
        eager = jp.update_masks(params, masks, t, schedule, frequency=3, scope="erk")
        for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted(params, masks, t))):
            assert np.array_equal(x, y)
        assert jax.tree.structure(eager) == jax.tree.structure(jitted(params, masks, t))


def test_update_masks_with_a_python_int_step_inside_jit():
    params, masks = _params(), jp.identity(_params())
    schedule = jp.polynomial_sparsity(0.8, 0, 10)
    for t in (2, 3):
        jitted = jax.jit(lambda p, m, t=t: jp.update_masks(p, m, t, schedule, frequency=2))(params, masks)
        eager = jp.update_masks(params, masks, t, schedule, frequency=2)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)))


def test_masks_off_the_params_paths_are_refused_naming_the_paths():
    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    before = jax.tree.map(np.array, nnx.state(model))
    extra = {"layers": {0: {"kernel": jnp.ones((8, 8), bool), "bias": None},
                        1: {"kernel": jnp.ones((8, 4), bool), "bias": None}},
             "head": {"kernel": jnp.ones((8, 4), bool)}}  # fmt: skip
    with pytest.raises(ValueError, match=r"must mirror the structure of params.*'head/kernel'") as e:
        jpnnx.attach_masks(model, extra)
    assert "Array(" not in str(e.value)  # paths, not a dump of the arrays
    missing = {"layers": {0: {"kernel": jnp.ones((8, 8), bool)}}}
    with pytest.raises(ValueError, match=r"no mask at .*'layers/0/bias'.*'layers/1/kernel'") as e:
        jpnnx.attach_masks(model, missing)
    assert "Array(" not in str(e.value)
    after = jax.tree.map(np.array, nnx.state(model))
    assert jax.tree.structure(after) == jax.tree.structure(before)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_a_per_layer_scope_beyond_the_n_m_pattern_is_refused_not_under_pruned():
    # ERK gives the square kernel more than 2/4 sparsity; the pattern cannot prune past 2 of 4,
    # so the total would silently fall short of round(s * N): refused, naming the leaf
    key = jax.random.key(0)
    params = {
        "a": {"kernel": jax.random.normal(key, (64, 64))},
        "b": {"kernel": jax.random.normal(key, (8, 512))},
    }
    n = 64 * 64 + 8 * 512
    with pytest.raises(ValueError, match=r"a/kernel.*2:4"):
        jp.prune_to_sparsity(params, 0.3, scope="erk", pattern=(2, 4))
    with pytest.raises(ValueError, match=r"a/kernel.*2:4"):
        jp.update_masks(params, jp.identity(params), 0, 0.3, scope="erk", pattern=(2, 4))
    for scope in ("global", "layer"):  # what fits is exact
        masks = jp.prune_to_sparsity(params, 0.3, scope=scope, pattern=(2, 4))
        assert sum(int((~m).sum()) for m in jax.tree.leaves(masks)) == round(0.3 * n)


@pytest.mark.parametrize(
    "shapes,sparsity",
    [
        ([(1928, 4873), (1033, 5367)], 0.99),
        ([(199, 849, 125), (1658,), (552, 2239)], 0.5),
        ([(1972,), (1090, 2925), (2860,), (1686, 9, 2515), (164,)], 0.999),
    ],
)
def test_erk_counts_total_exactly_on_large_layers(shapes, sparsity):
    # the documented total, round(s * N), must hold for layers of 1e7 entries too (float32 shares
    # were off by a few); the counts alone, no 1e7-entry arrays needed
    from jprune import _distribution

    counts = [int(c) for c in _distribution.erk(sparsity, shapes)]
    sizes = [int(np.prod(s)) for s in shapes]
    assert sum(counts) == round(sparsity * sum(sizes))
    assert all(0 <= c <= n for c, n in zip(counts, sizes))
    dens = np.asarray(_distribution.erk_densities(sparsity, shapes))
    assert all(c == 0 for c, d in zip(counts, dens) if d >= 1.0)  # a dense leaf stays dense


def _snapshot(*objs):
    return [np.array(x) for o in objs for x in jax.tree.leaves(nnx.state(o))]


def test_nnx_update_masks_that_fails_changes_nothing():
    # the model holds masks on both kernels, the optimizer on one: the new masks cannot go onto the
    # model (a held mask would be dropped); refused before params or optimizer masks change
    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    params = nnx.state(model, nnx.Param)
    jpnnx.attach_masks(model, jp.identity(params))
    tx = jp.keep_pruned(optax.sgd(0.1), jp.identity(params, select="layers/1/kernel"))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match="layers/0/kernel"):
        jpnnx.update_masks(model, optimizer, 0.5, select="layers/1/kernel")
    after = _snapshot(model, optimizer)
    assert len(before) == len(after) and all(np.array_equal(x, y) for x, y in zip(before, after))


def test_attach_masks_that_fails_attaches_nothing():
    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    params = nnx.state(model, nnx.Param)
    jpnnx.attach_masks(model, jp.identity(params, select="layers/1/kernel"))
    masks = jp.l1_unstructured(params, 0.5, select="layers/0/kernel")  # None at layers/1/kernel
    with pytest.raises(ValueError, match="layers/1/kernel"):
        jpnnx.attach_masks(model, masks)
    assert not hasattr(model.layers[0], "kernel_mask")
    assert bool(jnp.all(model.layers[1].kernel_mask.get_value()))
