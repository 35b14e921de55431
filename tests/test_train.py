"""The keep_pruned optax wrapper and mask swaps (jprune/_optim.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jprune import KeepPrunedState, get_masks, keep_pruned, set_masks

# The pattern of optax's contrib/_common_test.py: one wrapper, many inner optimizers.
INNER_OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "nadamw": lambda: optax.nadamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4, weight_decay_rate=0.1),
    "rmsprop": lambda: optax.rmsprop(1e-2, momentum=0.9),
    "adagrad": lambda: optax.adagrad(1e-1),
    "lamb": lambda: optax.lamb(1e-2, weight_decay=0.1),
    "lars": lambda: optax.lars(1e-2),
    "adabelief": lambda: optax.adabelief(1e-2),
    "yogi": lambda: optax.yogi(1e-2),
    "novograd": lambda: optax.novograd(1e-2, weight_decay=0.1),
    "sm3": lambda: optax.sm3(1e-2),
    "fromage": lambda: optax.fromage(1e-2),
    "chain_clip_adamw": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.5)
    ),
    "schedule_sgd_wd": lambda: optax.chain(
        optax.add_decayed_weights(0.1),
        optax.sgd(optax.cosine_decay_schedule(0.1, 50), momentum=0.9),
    ),
}

JITS = {"jit": jax.jit, "nojit": lambda f: f}


def _params_and_masks(seed=0, dtype=jnp.float32):
    """A small LeNet-like tree: conv and dense kernels pruned, biases unpruned (None masks)."""
    ks = jax.random.split(jax.random.key(seed), 8)
    params = {
        "conv": {
            "kernel": jax.random.normal(ks[0], (3, 3, 2, 4), dtype),
            "bias": jax.random.normal(ks[1], (4,), dtype),
        },
        "dense": {
            "kernel": jax.random.normal(ks[2], (8, 6), dtype),
            "bias": jax.random.normal(ks[3], (6,), dtype),
        },
    }
    masks = {
        "conv": {"kernel": jax.random.bernoulli(ks[4], 0.5, (3, 3, 2, 4)), "bias": None},
        "dense": {"kernel": jax.random.bernoulli(ks[5], 0.3, (8, 6)), "bias": None},
    }
    return params, masks


def _pruned_values(params, masks):
    """Concatenated values of params at pruned positions."""
    vals = jax.tree.map(lambda p, m: None if m is None else p[~m], params, masks)
    return np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(vals)])


def _kept_values(params, masks):
    vals = jax.tree.map(lambda p, m: p.ravel() if m is None else p[m], params, masks)
    return np.concatenate([np.asarray(v, np.float32).ravel() for v in jax.tree.leaves(vals)])


def _run(tx, params, steps, jit, seed=1):
    """Runs ``steps`` updates with random gradients (nonzero everywhere, pruned places too)."""
    state = tx.init(params)

    def step(params, state, key):
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape, p.dtype), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jit(step)
    for key in jax.random.split(jax.random.key(seed), steps):
        params, state = step(params, state, key)
    return params, state


@pytest.mark.parametrize("jit", JITS.values(), ids=JITS.keys())
@pytest.mark.parametrize("name", INNER_OPTIMIZERS)
def test_pruned_weights_stay_exactly_zero(name, jit):
    params, masks = _params_and_masks()
    tx = keep_pruned(INNER_OPTIMIZERS[name](), masks)
    new_params, state = _run(tx, params, steps=30 if jit is jax.jit else 3, jit=jit)
    pruned = _pruned_values(new_params, masks)
    assert pruned.size > 0
    np.testing.assert_array_equal(pruned, 0.0)
    # The optimizer still trains the kept weights and the unpruned (None) leaves.
    assert np.all(np.isfinite(_kept_values(new_params, masks)))
    assert not np.allclose(_kept_values(new_params, masks), _kept_values(params, masks))
    assert not np.allclose(new_params["dense"]["bias"], params["dense"]["bias"])
    assert isinstance(state, KeepPrunedState)


@pytest.mark.parametrize("name", ["momentum", "adamw", "lion"])
def test_masking_gradients_alone_is_not_enough(name):
    # The premise of the wrapper: prune mid-training, then zero the gradients at pruned places;
    # the optimizer's momentum still moves the pruned weights away from 0.
    params, masks = _params_and_masks()
    inner = INNER_OPTIMIZERS[name]()
    params, inner_state = _run(inner, params, steps=5, jit=jax.jit)
    params = jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, 0.0), params, masks)

    def masked_grads_update(g, s, p=None):
        g = jax.tree.map(lambda g, m: g if m is None else jnp.where(m, g, 0.0), g, masks)
        return inner.update(g, s, p)

    grads_only = optax.GradientTransformation(lambda p: inner_state, masked_grads_update)
    new_params, _ = _run(grads_only, params, steps=5, jit=jax.jit)
    assert np.abs(_pruned_values(new_params, masks)).max() > 1e-4

    tx = keep_pruned(inner, masks)
    wrapped = optax.GradientTransformation(lambda p: KeepPrunedState(masks, inner_state), tx.update)
    new_params, _ = _run(wrapped, params, steps=5, jit=jax.jit)
    np.testing.assert_array_equal(_pruned_values(new_params, masks), 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params(dtype):
    params, masks = _params_and_masks(dtype=dtype)
    tx = keep_pruned(optax.adamw(1e-2, weight_decay=0.1), masks)
    new_params, _ = _run(tx, params, 10, jax.jit)
    assert new_params["conv"]["kernel"].dtype == dtype
    np.testing.assert_array_equal(_pruned_values(new_params, masks), 0.0)


def test_first_update_zeroes_pruned_weights_that_were_nonzero():
    params, masks = _params_and_masks()
    assert np.abs(_pruned_values(params, masks)).min() > 0
    new_params, _ = _run(keep_pruned(optax.sgd(0.1), masks), params, steps=1, jit=jax.jit)
    np.testing.assert_array_equal(_pruned_values(new_params, masks), 0.0)


def test_all_none_masks_is_the_inner_optimizer():
    params, masks = _params_and_masks()
    none_masks = jax.tree.map(lambda p: None, params)
    wrapped, _ = _run(keep_pruned(optax.adam(1e-2), none_masks), params, 5, jax.jit)
    plain, _ = _run(optax.adam(1e-2), params, 5, jax.jit)
    jax.tree.map(np.testing.assert_array_equal, wrapped, plain)


def test_composes_inside_chain_and_with_extra_args():
    params, masks = _params_and_masks()
    tx = optax.chain(optax.identity(), keep_pruned(optax.adam(1e-2), masks))
    new_params, _ = _run(tx, params, 5, jax.jit)
    np.testing.assert_array_equal(_pruned_values(new_params, masks), 0.0)
    # Extra args (e.g. value for line searches) are passed through to the inner optimizer.
    tx = keep_pruned(optax.polyak_sgd(max_learning_rate=0.1), masks)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params, value=jnp.float32(2.0))
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(_pruned_values(new_params, masks), 0.0)


def test_update_without_params_raises():
    params, masks = _params_and_masks()
    tx = keep_pruned(optax.sgd(0.1), masks)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the current params.*params=None"):
        tx.update(params, state)


def test_init_checks_mask_shapes_and_names_the_leaf():
    params, masks = _params_and_masks()
    masks["dense"]["kernel"] = jnp.ones((6, 8), bool)
    match = r"mask at 'dense/kernel' has shape \(6, 8\), expected \(8, 6\)"
    with pytest.raises(ValueError, match=match):
        keep_pruned(optax.sgd(0.1), masks).init(params)


def test_init_rejects_non_bool_masks():
    params, masks = _params_and_masks()
    masks["conv"]["kernel"] = masks["conv"]["kernel"].astype(jnp.float32)
    with pytest.raises(TypeError, match="mask at 'conv/kernel' has dtype float32, expected bool"):
        keep_pruned(optax.sgd(0.1), masks).init(params)


def test_init_checks_mask_structure():
    params, _ = _params_and_masks()
    with pytest.raises(ValueError, match="masks must mirror the structure of params"):
        keep_pruned(optax.sgd(0.1), {"conv": None}).init(params)


def test_get_and_set_masks_through_a_chain():
    params, masks = _params_and_masks()
    tx = optax.chain(optax.clip(1.0), keep_pruned(optax.adam(1e-2), masks))
    state = tx.init(params)
    jax.tree.map(np.testing.assert_array_equal, get_masks(state), masks)
    new_masks = jax.tree.map(lambda p, m: None if m is None else ~m, params, masks)
    state2 = set_masks(state, new_masks)
    jax.tree.map(np.testing.assert_array_equal, get_masks(state2), new_masks)
    jax.tree.map(np.testing.assert_array_equal, get_masks(state), masks)  # the old state is untouched
    assert state2[0] == state[0]


def test_get_masks_errors():
    with pytest.raises(ValueError, match="found 0"):
        get_masks(optax.adam(1e-2).init({"w": jnp.ones(2)}))
    params, masks = _params_and_masks()
    both = (keep_pruned(optax.sgd(1.0), masks).init(params),) * 2
    with pytest.raises(ValueError, match="found 2"):
        get_masks(both)


def test_set_masks_rejects_a_different_structure_or_shape():
    params, masks = _params_and_masks()
    state = keep_pruned(optax.sgd(0.1), masks).init(params)
    with pytest.raises(ValueError, match="structure of the old ones.*jp.identity"):
        conv = {"kernel": masks["conv"]["kernel"], "bias": jnp.ones(4, bool)}
        set_masks(state, {**masks, "conv": conv})
    bad = {**masks, "dense": {"kernel": jnp.ones((6, 8), bool), "bias": None}}
    with pytest.raises(ValueError, match="mask at 'dense/kernel' has shape"):
        set_masks(state, bad)


def test_swapping_masks_in_a_jitted_step_does_not_recompile():
    params, masks = _params_and_masks()
    tx = keep_pruned(optax.sgd(0.1, momentum=0.9), masks)
    traces = []

    @jax.jit
    def step(params, state, masks):
        traces.append(None)
        state = set_masks(state, masks)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for seed in range(4):
        _, new_masks = _params_and_masks(seed=10 + seed)
        params, state = step(params, state, new_masks)
        # Weights pruned by the new masks are zero right after the first update under them.
        np.testing.assert_array_equal(_pruned_values(params, new_masks), 0.0)
    assert len(traces) == 1
