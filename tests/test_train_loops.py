"""Pruning inside training loops: prune_to_sparsity / update_masks, Linen TrainState and NNX (public
helpers only: jp.* and jprune.nnx)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import jprune as jp
from jprune import nnx as jpnnx


def _params(seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return {
        "a": {"kernel": jax.random.normal(ks[0], (6, 10)), "bias": jnp.zeros(10)},
        "b": {"kernel": jax.random.normal(ks[1], (10, 4)), "bias": jnp.zeros(4)},
    }


def _n_pruned(m):
    return int(np.size(m) - np.asarray(m).sum())


def test_prune_to_sparsity_global_counts_and_monotone():
    params = _params()
    masks = jp.prune_to_sparsity(params, 0.5)
    assert masks["a"]["bias"] is None and masks["b"]["bias"] is None
    assert _n_pruned(masks["a"]["kernel"]) + _n_pruned(masks["b"]["kernel"]) == 50
    more = jp.prune_to_sparsity(params, 0.8, masks=masks)
    assert _n_pruned(more["a"]["kernel"]) + _n_pruned(more["b"]["kernel"]) == 80
    for k in ("a", "b"):  # a pruned weight never comes back
        assert not np.any(np.asarray(more[k]["kernel"]) & ~np.asarray(masks[k]["kernel"]))


def test_prune_to_sparsity_ranks_by_effective_weights():
    # Already-pruned weights count as 0 even when the raw param is large: they stay pruned and
    # the count is of the whole leaf, not of what remains.
    w = jnp.array([[100.0, 1.0, 2.0, 3.0, 4.0]])
    masks = {"w": jnp.array([[False, True, True, True, True]])}
    new = jp.prune_to_sparsity({"w": w}, 0.4, masks=masks, select="w")
    assert np.asarray(new["w"]).tolist() == [[False, False, True, True, True]]


def test_prune_to_sparsity_exact_count_with_zero_weights_left():
    # Kept weights that are exactly 0 tie with the pruned ones; the count stays exact anyway.
    w = {"w": jnp.array([[0.0, 0.0, 3.0, 4.0, 5.0]])}
    masks = {"w": jnp.array([[True, True, False, True, True]])}
    new = jp.prune_to_sparsity(w, 0.4, masks=masks, select="w")
    assert np.asarray(new["w"]).tolist() == [[False, True, False, True, True]]
    # A target below what is already pruned prunes nothing more (nothing comes back).
    again = jp.prune_to_sparsity(w, 0.0, masks=new, select="w")["w"]
    assert np.asarray(again).tolist() == np.asarray(new["w"]).tolist()
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        jp.prune_to_sparsity(w, 1.5, select="w")


def test_prune_to_sparsity_per_layer():
    params = _params()
    masks = jp.prune_to_sparsity(params, 0.25, scope="layer")
    assert _n_pruned(masks["a"]["kernel"]) == 15
    assert _n_pruned(masks["b"]["kernel"]) == 10


def test_prune_to_sparsity_select_and_scope_error():
    params = _params()
    masks = jp.prune_to_sparsity(params, 0.5, select="a/*")
    assert masks["b"]["kernel"] is None
    assert _n_pruned(masks["a"]["bias"]) == 10  # zeros go first
    assert _n_pruned(masks["a"]["kernel"]) == 25
    with pytest.raises(ValueError, match='scope must be "global", "layer", "erk" or a dict'):
        jp.prune_to_sparsity(params, 0.5, scope="model")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_traced_sparsity_compiles_once(scope):
    params = _params()
    traces = []

    @jax.jit
    def f(params, masks, sparsity):
        traces.append(None)
        return jp.prune_to_sparsity(params, sparsity, masks=masks, scope=scope)

    masks = jp.identity(params)
    totals = []
    for s in (0.1, 0.3, 0.5, 0.9):
        masks = f(params, masks, jnp.float32(s))
        totals.append(_n_pruned(masks["a"]["kernel"]) + _n_pruned(masks["b"]["kernel"]))
    assert len(traces) == 1
    assert totals == ([10, 30, 50, 90] if scope == "global" else [10, 30, 50, 90])


def test_update_masks_follows_the_schedule_every_frequency_steps():
    params = _params()
    schedule = jp.polynomial_sparsity(0.9, begin_step=2, end_step=12)
    traces = []

    @jax.jit
    def step(params, masks, t):
        traces.append(None)
        return jp.update_masks(params, masks, t, schedule, frequency=5)[1]

    masks = jp.identity(params)
    seen = []
    zeroed = jax.jit(lambda p, m, t: jp.update_masks(p, m, t, schedule, frequency=5))
    p, m = params, masks
    for t in range(20):
        new = step(params, masks, jnp.int32(t))
        p, m = zeroed(p, m, jnp.int32(t))
        for k in ("a", "b"):  # the carried params are 0 wherever the masks prune
            np.testing.assert_array_equal(np.asarray(p[k]["kernel"])[~np.asarray(m[k]["kernel"])], 0)
        pruned = _n_pruned(new["a"]["kernel"]) + _n_pruned(new["b"]["kernel"])
        if t % 5:
            assert pruned == seen[-1]  # masks only change on multiples of frequency
        seen.append(pruned)
        masks = new
    assert len(traces) == 1
    expected = [round(100 * float(schedule(t))) for t in (0, 5, 10, 15)]
    assert seen[::5] == expected
    assert seen[-1] == 90


def test_update_masks_needs_arrays_on_pruned_leaves():
    params = _params()
    masks = jax.tree.map(lambda p: None, params)
    with pytest.raises(ValueError, match="needs a mask array.*jp.identity"):
        jp.update_masks(params, masks, 0, 0.5)
    with pytest.raises(ValueError, match="frequency must be"):
        jp.update_masks(params, jp.identity(params), 0, 0.5, frequency=0)


# ------------------------------------------------------------------------------------------------
# Linen: flax.training.train_state.TrainState (apply_gradients passes params to tx.update)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="b")(nn.relu(nn.Dense(10, name="a")(x)))


def _data(n=64, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, 6)), jax.random.randint(ky, (n,), 0, 4)


def test_linen_train_state_gradual_pruning_loop():
    x, y = _data()
    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]
    masks = jp.identity(params)
    schedule = jp.polynomial_sparsity(0.8, begin_step=0, end_step=20)
    state = train_state.TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=jp.keep_pruned(optax.sgd(0.1, momentum=0.9), masks),
    )
    traces = []

    @jax.jit
    def train_step(state, x, y):
        traces.append(None)
        masks = jp.get_masks(state.opt_state)

        def loss_fn(params):
            logits = state.apply_fn({"params": jp.apply_masks(params, masks)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state = state.apply_gradients(grads=grads)
        params, masks = jp.update_masks(state.params, masks, state.step, schedule, frequency=4)
        return state.replace(params=params, opt_state=jp.set_masks(state.opt_state, masks)), loss

    losses = []
    for _ in range(30):
        state, loss = train_step(state, x, y)
        losses.append(float(loss))
    assert len(traces) == 1
    masks = jp.get_masks(state.opt_state)
    assert jp.sparsity(masks).fraction == pytest.approx(0.8, abs=0.01)
    for k in ("a", "b"):
        p, m = np.asarray(state.params[k]["kernel"]), np.asarray(masks[k]["kernel"])
        np.testing.assert_array_equal(p[~m], 0.0)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------
# NNX: masks as PruneMask variables on the model; nnx.Optimizer(wrt=nnx.Param) ignores them


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(6, 10, rngs=rngs)
        self.b = nnx.Linear(10, 4, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


def test_nnx_optimizer_loop_with_mask_swap():
    x, y = _data()
    model = NNXMLP(nnx.Rngs(0))
    jpnnx.attach_masks(model, jp.global_unstructured(nnx.state(model, nnx.Param), 0.5))
    assert isinstance(model.a.kernel_mask, jpnnx.PruneMask) and not hasattr(model.a, "bias_mask")
    tx = jp.keep_pruned(optax.adamw(1e-2, weight_decay=0.1), jpnnx.masks_of(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # The masks are not trainable: not in the optimizer's params, not differentiated.
    assert all("mask" not in str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(None)

        def loss_fn(model):
            logits = jpnnx.masked_view(model)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    def check_zero():
        p, m = nnx.state(model, nnx.Param), jpnnx.masks_of(model)
        for k in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(p[k]["kernel"][...])[~np.asarray(m[k]["kernel"])], 0)

    for _ in range(5):
        train_step(model, optimizer, x, y)
    check_zero()
    mask_before = np.asarray(model.a.kernel_mask.get_value())

    # Second round: prune further; swap the masks on the model and in the optimizer, in place.
    masks = jp.prune_to_sparsity(nnx.state(model, nnx.Param), 0.8, masks=jpnnx.masks_of(model))
    jpnnx.attach_masks(model, masks)
    jpnnx.set_masks(optimizer, masks)
    assert jp.sparsity(jpnnx.masks_of(model)).fraction == pytest.approx(0.8, abs=0.01)
    assert not np.any(np.asarray(model.a.kernel_mask.get_value()) & ~mask_before)
    for _ in range(5):
        train_step(model, optimizer, x, y)
    check_zero()
    assert len(traces) == 1
