"""jprune.nnx and NNX states in the core: masks on the model, the optimizer's masks in place, and the
calls that used to fail on NNX (issue #10)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jprune as jp
from jprune import nnx as jpnnx


class MLP(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.a = nnx.Linear(6, 8, rngs=rngs, param_dtype=dtype)
        self.b = nnx.Linear(8, 4, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


class Stack(nnx.Module):
    """Layers in a list: paths with integer keys (layers/0/kernel)."""

    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return x


def _data(n=32, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, 6)), jax.random.randint(ky, (n,), 0, 4)


def _leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: x is None or isinstance(x, nnx.Variable))


def _optimizer(model, masks, inner=None):
    return nnx.Optimizer(model, jp.keep_pruned(inner or optax.sgd(0.1), masks), wrt=nnx.Param)


# ------------------------------------------------------------------------------------------------
# The calls the issue lists


def test_identity_of_an_nnx_state_gives_plain_masks():
    model = MLP(nnx.Rngs(0))
    masks = jp.identity(nnx.state(model, nnx.Param))
    assert isinstance(masks, nnx.State)
    assert not any(isinstance(x, nnx.Variable) for x in _leaves(masks))
    assert masks["a"]["bias"] is None and masks["a"]["kernel"].dtype == jnp.bool_
    # the layout nnx.Optimizer hands to tx.update
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    assert jax.tree.structure(jax.tree.map(lambda p, m: 0, pure, masks, is_leaf=lambda x: x is None))


def test_update_masks_takes_param_state_and_optimizer_masks():
    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    opt = _optimizer(model, jp.identity(params))
    new_params, masks = jp.update_masks(params, jp.get_masks(opt.opt_state), 0, 0.5)
    assert isinstance(new_params["a"]["kernel"], nnx.Param)  # params keep their boxes
    assert not any(isinstance(x, nnx.Variable) for x in _leaves(masks))
    assert jp.sparsity(masks).fraction == pytest.approx(0.5)
    nnx.update(model, new_params)
    k, m = np.asarray(model.a.kernel[...]), np.asarray(masks["a"]["kernel"])
    np.testing.assert_array_equal(k[~m], 0.0)


def test_set_masks_on_an_nnx_opt_state():
    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    opt = _optimizer(model, jp.identity(params))
    masks = jp.l1_unstructured(params, 0.25)
    new_state = jp.set_masks(opt.opt_state, masks)  # functional: in the same OptArray boxes
    nnx.update(opt.opt_state, nnx.state(new_state))  # what nnx.Optimizer.update does with a new state
    got = jp.get_masks(opt.opt_state)
    jax.tree.map(np.testing.assert_array_equal, got, masks)
    with pytest.raises(ValueError, match="mask at 'a/kernel' has shape"):
        jp.set_masks(opt.opt_state, {**masks, "a": {"kernel": jnp.ones((8, 6), bool), "bias": None}})
    with pytest.raises(ValueError, match="structure of the old ones"):
        jp.set_masks(opt.opt_state, jp.identity(params, select="*"))


def test_core_calls_on_nnx_states_keep_or_drop_boxes_as_they_should():
    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    masks = jp.global_unstructured(params, 0.5)
    eff = jp.apply_masks(params, masks)
    assert isinstance(eff["a"]["kernel"], nnx.Param)
    # masks boxed as Param (what jprune used to return) or as a plain dict line up too
    boxed = jax.tree.map(
        lambda p, m: p.replace(m), params, masks, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for given in (boxed, nnx.to_pure_dict(masks) if hasattr(nnx, "to_pure_dict") else masks):
        again = jp.l1_unstructured(params, 0.1, masks=given)
        assert jp.sparsity(again).pruned > jp.sparsity(masks).pruned


# ------------------------------------------------------------------------------------------------
# jprune.nnx


def test_masks_are_not_params_and_not_differentiated():
    model = MLP(nnx.Rngs(0))
    jpnnx.attach_masks(model, jp.identity(nnx.state(model, nnx.Param)))
    assert isinstance(model.a.kernel_mask, jpnnx.PruneMask)
    assert not isinstance(model.a.kernel_mask, nnx.Param)
    assert len(nnx.to_flat_state(nnx.state(model, jpnnx.PruneMask))) == 2
    x, y = _data()
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    assert not any("mask" in str(p) for p, _ in nnx.to_flat_state(grads))
    opt = _optimizer(model, jpnnx.masks_of(model))
    assert not any(isinstance(x, jpnnx.PruneMask) for x in _leaves(opt.opt_state))


def test_masks_of_round_trips_and_list_paths():
    model = Stack(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    masks = jp.l1_unstructured(params, 0.5, select="layers/1/kernel")
    jpnnx.attach_masks(model, masks)
    assert isinstance(model.layers[1].kernel_mask, jpnnx.PruneMask)
    assert not hasattr(model.layers[0], "kernel_mask")
    got = jpnnx.masks_of(model)
    jax.tree.map(np.testing.assert_array_equal, got, masks)
    assert got["layers"][0]["kernel"] is None


def test_attach_masks_refuses_and_changes_nothing():
    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    jpnnx.attach_masks(model, jp.l1_unstructured(params, 0.5))
    before = np.asarray(model.a.kernel_mask.get_value())
    bad = jp.identity(params)
    bad["a"]["kernel"] = jnp.ones((8, 6), bool)
    with pytest.raises(ValueError, match="mask at 'a/kernel' has shape"):
        jpnnx.attach_masks(model, bad)
    with pytest.raises(TypeError, match="expected bool"):
        jpnnx.attach_masks(model, jax.tree.map(lambda m: m.astype(jnp.float32), jp.identity(params)))
    with pytest.raises(ValueError, match="is None but the model holds one"):
        jpnnx.attach_masks(model, jp.identity(params, select="b/kernel"))
    np.testing.assert_array_equal(np.asarray(model.a.kernel_mask.get_value()), before)


def test_masked_view_is_apply_masks_and_leaves_the_model_alone():
    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    masks = jp.l1_unstructured(params, 0.5)
    jpnnx.attach_masks(model, masks)
    x, _ = _data()
    kernel = np.asarray(model.a.kernel[...])
    view = jpnnx.masked_view(model)
    eff = jp.apply_masks(nnx.as_pure(params), masks)
    want = nnx.relu(x @ eff["a"]["kernel"] + eff["a"]["bias"]) @ eff["b"]["kernel"] + eff["b"]["bias"]
    np.testing.assert_array_equal(np.asarray(view(x)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(model.a.kernel[...]), kernel)
    # explicit masks (e.g. the optimizer's) instead of the model's own
    none = jax.tree.map(lambda m: jnp.ones_like(m), masks)
    np.testing.assert_array_equal(np.asarray(jpnnx.masked_view(model, none)(x)), np.asarray(model(x)))


def test_set_masks_on_a_plain_optax_state_points_to_jp_set_masks():
    params = {"w": jnp.ones((2, 2))}
    state = jp.keep_pruned(optax.sgd(0.1), jp.identity(params, select="w")).init(params)
    with pytest.raises(TypeError, match="use jp.set_masks"):
        jpnnx.set_masks(state, jp.identity(params, select="w"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradual_nnx_loop_compiles_once(dtype):
    """nnx.jit train step: masked forward, optimizer update, jpnnx.update_masks on the optimizer's
    step; the masks on the model and in the optimizer agree, pruned weights are 0, one compile."""
    x, y = _data()
    model = MLP(nnx.Rngs(0), dtype=dtype)
    jpnnx.attach_masks(model, jp.identity(nnx.state(model, nnx.Param)))
    optimizer = _optimizer(model, jpnnx.masks_of(model), optax.adamw(1e-2, weight_decay=0.1))
    schedule = jp.polynomial_sparsity(0.75, begin_step=0, end_step=12)
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
        traces.append(None)

        def loss_fn(model):
            logits = jpnnx.masked_view(model)(x).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads)
        jpnnx.update_masks(model, optimizer, schedule, frequency=4)

    seen = []
    for _ in range(14):
        train_step(model, optimizer, x, y)
        seen.append(jp.sparsity(jpnnx.masks_of(model)).pruned)
    assert len(traces) == 1
    # optimizer.step counts updates: steps 4, 8, 12 prune (after the 4th, 8th, 12th update)
    assert seen[2] == 0 and seen[3] > 0 and seen[3] == seen[6] < seen[7] == seen[10] < seen[11] == seen[13]
    assert jp.sparsity(jpnnx.masks_of(model)).fraction == pytest.approx(0.75, abs=0.01)
    jax.tree.map(np.testing.assert_array_equal, jpnnx.get_masks(optimizer), jpnnx.masks_of(model))
    p, m = nnx.state(model, nnx.Param), jpnnx.masks_of(model)
    for k in ("a", "b"):
        np.testing.assert_array_equal(
            np.asarray(p[k]["kernel"][...], np.float32)[~np.asarray(m[k]["kernel"])], 0
        )


def test_update_masks_without_masks_on_the_model():
    """Masks held by the optimizer alone: the params are zeroed, nothing is added to the model."""
    model = MLP(nnx.Rngs(0))
    optimizer = _optimizer(model, jp.identity(nnx.state(model, nnx.Param)))
    jpnnx.update_masks(model, optimizer, 0.5, scope="layer")
    assert not hasattr(model.a, "kernel_mask")
    masks = jpnnx.get_masks(optimizer)
    assert int((~masks["a"]["kernel"]).sum()) == 24 and int((~masks["b"]["kernel"]).sum()) == 16
    np.testing.assert_array_equal(np.asarray(model.a.kernel[...])[~np.asarray(masks["a"]["kernel"])], 0)
