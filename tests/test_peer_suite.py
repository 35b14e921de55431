"""PyTorch's own ``test/nn/test_pruning.py`` (class TestPruningNN, 34 tests; §11), ported in spirit.

One test per torch test, same name and order. Where torch computes the expected answer (masks,
weights, errors), it runs here. Tests about torch module internals (hooks, ``_orig`` Parameters,
pickling a module, Parameter identity, PruningContainer bookkeeping) are ported as the closest JAX
meaning, which each docstring states: jprune is functional, so "module state" is the pair
(params, masks) and "no mutation" replaces "same Parameter object".
"""

import pickle

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.utils.prune as tprune
from conftest import pruned_count, tie_free, torch_mask, torch_module

import jprune as jp
from jprune import _amount

KEY = jax.random.key(0)


def linear(in_f=5, out_f=7, seed=0):
    """A Flax Dense (torch ``nn.Linear(in_f, out_f)``): params and its apply function."""
    model = nn.Dense(out_f)
    params = model.init(jax.random.key(seed), jnp.ones((1, in_f)))["params"]
    return model, params


def conv3d(seed=0):
    """A Flax Conv (torch ``nn.Conv3d(2, 5, 2)``)."""
    model = nn.Conv(5, (2, 2, 2), padding="VALID")
    params = model.init(jax.random.key(seed), jnp.ones((1, 4, 4, 4, 2)))["params"]
    return model, params


def effective_apply(model, params, masks, x):
    return model.apply({"params": jp.apply_masks(params, masks)}, x)


# 1
def test_validate_pruning_amount_init():
    with pytest.raises(TypeError):
        _amount.validate("I'm a string")
    for bad in (1.1, 20.0, -10):
        with pytest.raises(ValueError):
            _amount.validate(bad)
    for ok in (0.34, 1500, 0, 0.0, 1, 1.0):
        _amount.validate(ok)
        tprune._validate_pruning_amount_init(ok)


# 2
def test_validate_pruning_amount():
    with pytest.raises(ValueError):
        _amount.count(20, 19)
    with pytest.raises(ValueError):
        tprune._validate_pruning_amount(20, 19)
    # a float never fails the size check; k == n is allowed
    assert _amount.count(0.2, 0) == 0
    assert _amount.count(19, 20) == 19
    assert _amount.count(0, 0) == 0
    assert _amount.count(1, 1) == 1


# 3
def test_compute_nparams_to_prune():
    for amount, n, want in [(0, 15, 0), (10, 15, 10), (1, 15, 1), (1.0, 15, 15), (0.4, 17, 7)]:
        assert _amount.count(amount, n) == want == tprune._compute_nparams_toprune(amount, n)


# 4
def test_random_pruning_sizes():
    """Masks, orig params and effective params keep each leaf's shape (Dense and Conv3d)."""
    for _, params in (linear(), conv3d()):
        masks = jp.random_unstructured(params, 0.1, key=KEY, select=["kernel", "bias"])
        eff = jp.apply_masks(params, masks)
        for name in ("kernel", "bias"):
            assert masks[name].shape == params[name].shape == eff[name].shape
            assert masks[name].dtype == jnp.bool_


# 5
def test_random_pruning_orig():
    """torch: ``name_orig`` equals the tensor before pruning. JAX: the params are never mutated."""
    for _, params in (linear(), conv3d()):
        before = jax.tree.map(np.array, params)
        jp.random_unstructured(params, 0.1, key=KEY, select=["kernel", "bias"])
        jax.tree.map(np.testing.assert_array_equal, params, before)


# 6
def test_random_pruning_new_weight():
    """The effective weight is ``orig * mask`` with the mask cast to the param dtype."""
    for _, params in (linear(), conv3d()):
        masks = jp.random_unstructured(params, 0.1, key=KEY, select=["kernel", "bias"])
        eff = jp.apply_masks(params, masks)
        for name in ("kernel", "bias"):
            want = params[name] * masks[name].astype(params[name].dtype)
            np.testing.assert_array_equal(eff[name], want)


# 7
def test_identity_pruning():
    """With identity masks the output and the gradients are unchanged, and stable when repeated."""
    model, params = linear()
    x = jax.random.normal(jax.random.key(1), (3, 5))
    masks = jp.identity(params)
    loss = lambda p, m: jnp.sum(effective_apply(model, p, m, x) ** 2)  # noqa: E731
    plain = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)  # noqa: E731
    np.testing.assert_array_equal(
        effective_apply(model, params, masks, x), model.apply({"params": params}, x)
    )
    g = jax.grad(loss)(params, masks)
    jax.tree.map(np.testing.assert_array_equal, g, jax.grad(plain)(params))
    for _ in range(2):  # repeated forwards are stable
        jax.tree.map(np.testing.assert_array_equal, jax.grad(loss)(params, masks), g)


# 8
def test_random_pruning_0perc():
    """An all-ones mask (torch mocks it; here custom_from_mask) changes neither output nor grads."""
    model, params = linear()
    x = jax.random.normal(jax.random.key(1), (3, 5))
    masks = jp.custom_from_mask(params, {"kernel": jnp.ones((5, 7)), "bias": None})
    assert pruned_count(masks["kernel"]) == 0
    np.testing.assert_array_equal(
        effective_apply(model, params, masks, x), model.apply({"params": params}, x)
    )
    g1 = jax.grad(lambda p: effective_apply(model, p, masks, x).sum())(params)
    g2 = jax.grad(lambda p: model.apply({"params": p}, x).sum())(params)
    jax.tree.map(np.testing.assert_array_equal, g1, g2)


# 9
def test_random_pruning():
    """The gradient w.r.t. orig is the mask (input ones, loss = sum); SGD keeps pruned entries."""
    model, params = linear()
    mask = jax.random.bernoulli(jax.random.key(3), 0.5, (5, 7))
    masks = jp.custom_from_mask(params, {"kernel": mask, "bias": None})
    x = jnp.ones((1, 5))
    loss = lambda p: effective_apply(model, p, masks, x).sum()  # noqa: E731
    g = jax.grad(loss)(params)
    np.testing.assert_array_equal(g["kernel"], mask.astype(jnp.float32))
    opt = optax.sgd(0.1)
    updates, _ = opt.update(g, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["kernel"][~mask], params["kernel"][~mask])
    assert not np.array_equal(new["kernel"][mask], params["kernel"][mask])


# 10
def test_random_pruning_forward():
    """Forward uses only the unmasked weights (checked by hand)."""
    model = nn.Dense(1)
    params = {"kernel": jnp.array([[1.0], [2.0]]), "bias": jnp.zeros(1)}
    masks = jp.custom_from_mask(params, {"kernel": jnp.array([[1], [0]]), "bias": None})
    x = jnp.array([[3.0, 5.0]])
    assert effective_apply(model, params, masks, x).tolist() == [[3.0]]  # 3*1 + 5*0
    masks = jp.custom_from_mask(params, {"kernel": jnp.array([[0], [1]]), "bias": None})
    assert effective_apply(model, params, masks, x).tolist() == [[10.0]]


# 11
def test_remove_pruning_forward():
    model, params = linear()
    masks = jp.l1_unstructured(params, 0.4)
    x = jax.random.normal(jax.random.key(1), (3, 5))
    pruned_out = effective_apply(model, params, masks, x)
    removed = jp.remove(params, masks)
    np.testing.assert_array_equal(model.apply({"params": removed}, x), pruned_out)


# 12
def test_pruning_id_consistency():
    """torch: the same Parameter object through prune and remove. JAX: the same pytree structure
    (paths, shapes, dtypes) comes back from prune and remove, and the input is not mutated."""
    _, params = conv3d()
    before = jax.tree.map(np.array, params)
    masks = jp.l1_unstructured(params, 0.5)
    assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(
        jax.tree.map(lambda _: 0, params)
    )
    removed = jp.remove(params, masks)
    assert jax.tree.structure(removed) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(removed), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype
    jax.tree.map(np.testing.assert_array_equal, params, before)


# 13
def test_random_pruning_pickle():
    """A pruned model is (params, masks): both survive a pickle round trip, None leaves included."""
    for _, params in (linear(), conv3d()):
        masks = jp.random_unstructured(params, 0.1, key=KEY, select="kernel")
        p2, m2 = pickle.loads(pickle.dumps((params, masks)))
        assert m2["bias"] is None
        np.testing.assert_array_equal(m2["kernel"], masks["kernel"])
        jax.tree.map(np.testing.assert_array_equal, jp.apply_masks(p2, m2), jp.apply_masks(params, masks))


# 14
def test_multiple_pruning_calls():
    """L1, then Ln(dim 0), then Ln(inf, dim 1) vs torch; earlier zeros stay zero at every step.

    torch's PruningContainer (len 2, members in order) is the history; jprune keeps only the
    combined mask, which is all that affects future behaviour (§9)."""
    w = tie_free(np.random.default_rng(0), (6, 5))
    mod = torch_module({"w": w})
    p = jnp.asarray(w)
    steps = [
        (lambda: tprune.l1_unstructured(mod, "w", 0.5), lambda m: jp.l1_unstructured(p, 0.5)),
        (
            lambda: tprune.ln_structured(mod, "w", 0.2, n=2, dim=0),
            lambda m: jp.ln_structured(p, 0.2, 2, 0, masks=m),
        ),
        (
            lambda: tprune.ln_structured(mod, "w", 0.2, n=float("inf"), dim=1),
            lambda m: jp.ln_structured(p, 0.2, float("inf"), 1, masks=m),
        ),
    ]
    m = None
    for tstep, jstep in steps:
        tstep()
        new = jstep(m)
        np.testing.assert_array_equal(np.asarray(new), torch_mask(mod, "w"))
        if m is not None:
            assert not np.any(np.asarray(new) & ~np.asarray(m))  # pruned stays pruned
        m = new
    assert isinstance(mod._forward_pre_hooks[next(iter(mod._forward_pre_hooks))], tprune.PruningContainer)


# 15
def test_pruning_container():
    """torch: a container rejects other tensor names and non-methods. JAX: masks must mirror the
    params (structure: ValueError, dtype: TypeError), and a custom method needs a known kind."""
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="must mirror the structure"):
        jp.l1_unstructured(params, 1, masks={"a": jnp.ones((2, 2), bool)})
    with pytest.raises(TypeError, match="expected bool"):
        jp.l1_unstructured(params, 1, masks={"a": jnp.ones((2, 2)), "b": None})
    with pytest.raises(ValueError, match="kind must be one of"):
        jp.custom_method(lambda t, m: m, kind="container")
    c = tprune.PruningContainer()
    assert len(c) == 0
    with pytest.raises(TypeError):
        c.add_pruning_method(object())


# 16
def test_pruning_container_compute_mask():
    """torch's container running L1(2), Ln(1, dim 0), Ln(1, dim 1) on a fixed t and default mask.

    The container scores ``t`` itself (not ``t * default_mask``): pass it as importance scores."""
    t = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    default = np.array([[1, 1, 1, 0], [1, 1, 0, 1]])
    c = tprune.PruningContainer()
    c._tensor_name = "test"
    tt, dm = torch.tensor(t), torch.tensor(default)
    methods = [
        (tprune.L1Unstructured(amount=2), lambda: jp.l1_unstructured(jt, 2, masks=jm, importance_scores=jt)),
        (
            tprune.LnStructured(amount=1, n=2, dim=0),
            lambda: jp.ln_structured(jt, 1, 2, 0, masks=jm, importance_scores=jt),
        ),
        (
            tprune.LnStructured(amount=1, n=2, dim=1),
            lambda: jp.ln_structured(jt, 1, 2, 1, masks=jm, importance_scores=jt),
        ),
    ]
    jt, jm = jnp.asarray(t), jnp.asarray(default, bool)
    expected = [[[0, 0, 1, 0], [1, 1, 0, 1]], [[0, 0, 0, 0], [1, 1, 0, 1]], [[0, 1, 1, 0], [0, 1, 0, 1]]]
    for (method, jcall), exp in zip(methods, expected):
        method._tensor_name = "test"
        c.add_pruning_method(method)
        want = (c.compute_mask(tt, dm) != 0).numpy()
        assert want.astype(int).tolist() == exp
        np.testing.assert_array_equal(np.asarray(jcall()), want)


def _peer_t():
    return np.array([[1, 2, 3, 4], [-4, -3, -2, -1]], np.float32)


# 17
def test_l1_unstructured_pruning():
    w = _peer_t()
    mod = torch_module({"w": w})
    p = jnp.asarray(w)
    tprune.l1_unstructured(mod, "w", 2)
    m = jp.l1_unstructured(p, 2)
    np.testing.assert_array_equal(jp.apply_masks(p, m), mod.w.detach().numpy())
    assert np.asarray(jp.apply_masks(p, m)).tolist() == [[0, 2, 3, 4], [-4, -3, -2, 0]]
    tprune.l1_unstructured(mod, "w", 2)
    m = jp.l1_unstructured(p, 2, masks=m)
    np.testing.assert_array_equal(jp.apply_masks(p, m), mod.w.detach().numpy())
    assert np.asarray(jp.apply_masks(p, m)).tolist() == [[0, 0, 3, 4], [-4, -3, 0, 0]]


# 18
def test_l1_unstructured_pruning_with_importance_scores():
    w = _peer_t()
    s = np.array([[4, 2, 1, 3], [-3, -1, -2, -4]], np.float32)
    mod = torch_module({"w": w})
    p, js = jnp.asarray(w), jnp.asarray(s)
    tprune.l1_unstructured(mod, "w", 2, importance_scores=torch.tensor(s))
    m = jp.l1_unstructured(p, 2, importance_scores=js)
    np.testing.assert_array_equal(jp.apply_masks(p, m), mod.w.detach().numpy())
    assert np.asarray(jp.apply_masks(p, m)).tolist() == [[1, 2, 0, 4], [-4, 0, -2, -1]]
    tprune.l1_unstructured(mod, "w", 2, importance_scores=torch.tensor(s))
    m = jp.l1_unstructured(p, 2, masks=m, importance_scores=js)
    np.testing.assert_array_equal(jp.apply_masks(p, m), mod.w.detach().numpy())
    assert np.asarray(jp.apply_masks(p, m)).tolist() == [[1, 0, 0, 4], [-4, 0, 0, -1]]


# 19
def test_unstructured_pruning_same_magnitude():
    """Values in {-2, 0, 2}: exactly k pruned (a count, not a threshold), smallest |x| first."""
    w = jax.random.choice(jax.random.key(0), jnp.array([-2.0, 0.0, 2.0]), (6, 7))
    for k in (0, 5, 13, 20, 42):
        m = np.asarray(jp.l1_unstructured(w, k))
        assert pruned_count(m) == k
        mod = torch_module({"w": np.asarray(w)})
        tprune.l1_unstructured(mod, "w", k)
        assert int((mod.w_mask == 0).sum()) == k
        a = np.abs(np.asarray(w))
        if 0 < k < 42:
            assert a[~m].max() <= a[m].min()


# 20
def test_random_structured_pruning_amount():
    w = jnp.asarray(tie_free(np.random.default_rng(0), (5, 4, 2)))
    m = np.asarray(jp.random_structured(w, 0.6, 2, key=KEY))
    assert sorted((~m).sum(axis=(0, 1)).tolist()) == [0, 20]
    mod = torch_module({"w": np.asarray(w)})
    tprune.random_structured(mod, "w", 0.6, dim=2)
    assert sorted((mod.w_mask == 0).sum(dim=(0, 1)).tolist()) == [0, 20]


CONV_W = np.array(
    [[[[1.0, 2.0], [1.0, 2.5]], [[0.5, 1.0], [0.1, 0.1]], [[-3.0, -5.0], [0.1, -1.0]]]], np.float32
)  # torch Conv2d(3, 1, 2).weight: (out 1, in 3, 2, 2)


# 21
def test_ln_structured_pruning():
    """Conv2d(3, 1, 2): Ln(1, n=2, dim=1) prunes channel 1, then Ln(1, n=1, dim=-1) column 0.

    Same (torch) layout in JAX, ``axis = dim``; the Flax kernel layout is (2, 2, in 3, out 1)."""
    mod = torch_module({"w": CONV_W})
    p = jnp.asarray(CONV_W)
    tprune.ln_structured(mod, "w", 1, n=2, dim=1)
    m = jp.ln_structured(p, 1, 2, 1)
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))
    assert (~np.asarray(m)).all(axis=(0, 2, 3)).tolist() == [False, True, False]
    tprune.ln_structured(mod, "w", 1, n=1, dim=-1)
    m = jp.ln_structured(p, 1, 1, -1, masks=m)
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))
    assert (~np.asarray(m)).all(axis=(0, 1, 2)).tolist() == [True, False]
    # the Flax layout: the same pruning along axis -2 (in) then axis 1 (kernel width)
    k = jnp.transpose(p, (2, 3, 1, 0))
    mk = jp.ln_structured(k, 1, 2, -2)
    mk = jp.ln_structured(k, 1, 1, 1, masks=mk)
    np.testing.assert_array_equal(np.transpose(np.asarray(mk), (3, 2, 0, 1)), torch_mask(mod, "w"))


# 22
def test_ln_structured_pruning_importance_scores():
    s = np.array(
        [[[[10.0, 1.0], [9.0, 0.5]], [[20.0, 2.0], [30.0, 3.0]], [[40.0, 0.1], [50.0, 0.2]]]], np.float32
    )
    mod = torch_module({"w": CONV_W})
    p, js = jnp.asarray(CONV_W), jnp.asarray(s)
    tprune.ln_structured(mod, "w", 1, n=2, dim=1, importance_scores=torch.tensor(s))
    m = jp.ln_structured(p, 1, 2, 1, importance_scores=js)
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))
    assert (~np.asarray(m)).all(axis=(0, 2, 3)).tolist() == [True, False, False]
    tprune.ln_structured(mod, "w", 1, n=1, dim=-1, importance_scores=torch.tensor(s))
    m = jp.ln_structured(p, 1, 1, -1, masks=m, importance_scores=js)
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))
    assert (~np.asarray(m)).all(axis=(0, 1, 2)).tolist() == [False, True]


# 23
def test_remove_pruning():
    """After remove the params are plain arrays again (no masks needed) equal to the pruned ones."""
    _, params = linear()
    masks = jp.l1_unstructured(params, 0.5)
    removed = jp.remove(params, masks)
    jax.tree.map(np.testing.assert_array_equal, removed, jp.apply_masks(params, masks))
    assert pruned_count(np.asarray(removed["kernel"]) != 0) == pruned_count(masks["kernel"])
    np.testing.assert_array_equal(removed["bias"], params["bias"])
    mod = torch_module({"w": np.asarray(params["kernel"])})
    tprune.l1_unstructured(mod, "w", 0.5)
    tprune.remove(mod, "w")
    assert isinstance(mod.w, torch.nn.Parameter) and not hasattr(mod, "w_mask")
    np.testing.assert_array_equal(removed["kernel"], mod.w.detach().numpy())


# 24
def test_remove_pruning_exception():
    _, params = linear()
    masks = jax.tree.map(lambda _: None, params)
    assert not jp.is_pruned(masks)
    with pytest.raises(ValueError):
        jp.remove(params, masks)
    mod = torch_module({"w": np.ones((2, 2), np.float32)})
    assert not tprune.is_pruned(mod)
    with pytest.raises(ValueError):
        tprune.remove(mod, "w")


def _global_arrays():
    return {"a": _peer_t(), "b": np.array([[0, 0.1, -2]], np.float32)}


# 25
def test_global_pruning():
    arrays = _global_arrays()
    mod = torch_module(arrays)
    tprune.global_unstructured([(mod, "a"), (mod, "b")], tprune.L1Unstructured, amount=4)
    params = {k: jnp.asarray(v) for k, v in arrays.items()}
    eff = jp.apply_masks(params, jp.global_unstructured(params, 4, select=["a", "b"]))
    for k in "ab":
        np.testing.assert_array_equal(eff[k], getattr(mod, k).detach().numpy())
    assert np.asarray(eff["a"]).tolist() == [[0, 2, 3, 4], [-4, -3, -2, 0]]
    assert np.asarray(eff["b"]).tolist() == [[0, 0, -2]]


# 26
def test_global_pruning_importance_scores():
    arrays = _global_arrays()
    scores = {
        "a": np.array([[1.5, 2.5, 0.1, 3], [-4, 0.2, -2, -1.2]], np.float32),
        "b": np.array([[0.3, 0.9, 0.05]], np.float32),
    }
    mod = torch_module(arrays)
    tprune.global_unstructured(
        [(mod, "a"), (mod, "b")],
        tprune.L1Unstructured,
        amount=4,
        importance_scores={(mod, k): torch.tensor(v) for k, v in scores.items()},
    )
    params = {k: jnp.asarray(v) for k, v in arrays.items()}
    m = jp.global_unstructured(
        params, 4, select=["a", "b"], importance_scores={k: jnp.asarray(v) for k, v in scores.items()}
    )
    eff = jp.apply_masks(params, m)
    for k in "ab":
        np.testing.assert_array_equal(eff[k], getattr(mod, k).detach().numpy())
    assert np.asarray(eff["a"]).tolist() == [[1, 2, 0, 4], [-4, 0, -2, -1]]
    np.testing.assert_array_equal(eff["b"], np.float32([[0, 0.1, 0]]))


# 27
def test_custom_from_mask_pruning():
    t = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    default = np.array([[0, 1, 1, 0], [1, 1, 0, 1]], np.float32)
    new = np.array([[1, 0, 1, 1], [0, 1, 1, 1]], np.float32)
    want = tprune.CustomFromMask(torch.tensor(new)).compute_mask(torch.tensor(t), torch.tensor(default))
    got = jp.custom_from_mask(jnp.asarray(t), jnp.asarray(new), masks=jnp.asarray(default, bool))
    np.testing.assert_array_equal(np.asarray(got), (want != 0).numpy())
    np.testing.assert_array_equal(np.asarray(got), (default * new) != 0)


# 28
def test_pruning_rollback():
    """torch rolls the module back when compute_mask raises on a first prune. JAX: the error
    propagates, nothing is returned and nothing is changed, even if an earlier leaf succeeded."""

    @jp.custom_method
    def fails_on_bias(t, default_mask):
        if t.ndim == 1:
            raise RuntimeError("boom")
        return default_mask

    _, params = linear()
    before = jax.tree.map(np.array, params)
    with pytest.raises(RuntimeError, match="boom"):
        fails_on_bias(params, select=["kernel", "bias"])
    jax.tree.map(np.testing.assert_array_equal, params, before)
    # a multi-leaf built-in that fails on its second leaf returns nothing either
    masks0 = jp.l1_unstructured(params, 2, select=["kernel", "bias"])
    with pytest.raises(ValueError, match="bias"):
        jp.l1_unstructured(params, 6, masks=masks0, select=["kernel", "bias"])


# 29
def test_pruning_serialization_model():
    """torch.save of the pruned model keeps orig, mask and the pruned weight. JAX: params and masks
    through flax.serialization (msgpack) and pickle, then the same effective weights."""
    model, params = linear()
    masks = jp.l1_unstructured(params, 0.5)
    x = jax.random.normal(jax.random.key(1), (2, 5))
    blob = flax.serialization.msgpack_serialize({"params": params, "mask": {"kernel": masks["kernel"]}})
    restored = flax.serialization.msgpack_restore(blob)
    m2 = {"kernel": jnp.asarray(restored["mask"]["kernel"]), "bias": None}
    p2 = jax.tree.map(jnp.asarray, restored["params"])
    assert m2["kernel"].dtype == jnp.bool_
    np.testing.assert_array_equal(effective_apply(model, p2, m2, x), effective_apply(model, params, masks, x))
    p3, m3 = pickle.loads(pickle.dumps((params, masks)))
    jax.tree.map(np.testing.assert_array_equal, p3, params)
    np.testing.assert_array_equal(m3["kernel"], masks["kernel"])


# 30
def test_pruning_serialization_state_dict():
    """Prune, remove, save the params, load into a fresh model: plain keys, equal weights."""
    model, params = linear()
    removed = jp.remove(params, jp.l1_unstructured(params, 0.5))
    fresh = linear(seed=9)[1]
    loaded = flax.serialization.from_bytes(fresh, flax.serialization.to_bytes(removed))
    assert set(loaded) == {"kernel", "bias"}
    jax.tree.map(np.testing.assert_array_equal, loaded, removed)
    x = jnp.ones((1, 5))
    np.testing.assert_array_equal(model.apply({"params": loaded}, x), model.apply({"params": removed}, x))


# 31
def test_prune():
    """``L1Unstructured(2).prune(t, default_mask)``; jprune's masks= is the container rule, which
    agrees here because the entries masked by default_mask are not among the 2 smallest."""
    t = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    default = np.array([[1, 1, 1, 0], [1, 1, 0, 1]])
    want = tprune.L1Unstructured(amount=2).prune(torch.tensor(t), torch.tensor(default)).numpy()
    m = jp.l1_unstructured(jnp.asarray(t), 2, masks=jnp.asarray(default, bool))
    got = jp.apply_masks(jnp.asarray(t), m)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, t * np.array([[0, 0, 1, 0], [1, 1, 0, 1]]))


# 32
def test_prune_importance_scores():
    t = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    default = np.array([[1, 1, 1, 0], [1, 1, 0, 1]])
    s = np.array([[1, 5, 6, 3], [2, 7, 4, 8]], np.float32)
    want = (
        tprune.L1Unstructured(amount=2)
        .prune(torch.tensor(t), torch.tensor(default), importance_scores=torch.tensor(s))
        .numpy()
    )
    m = jp.l1_unstructured(
        jnp.asarray(t), 2, masks=jnp.asarray(default, bool), importance_scores=jnp.asarray(s)
    )
    got = jp.apply_masks(jnp.asarray(t), m)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, t * np.array([[0, 1, 1, 0], [0, 1, 0, 1]]))


# 33
def test_prune_importance_scores_mimic_default():
    t = jnp.asarray(tie_free(np.random.default_rng(0), (4, 5)))
    default = jax.random.bernoulli(jax.random.key(2), 0.7, (4, 5))
    for amount in (2, 0.5):
        np.testing.assert_array_equal(
            jp.l1_unstructured(t, amount, importance_scores=t), jp.l1_unstructured(t, amount)
        )
        # with masks the default scores are t * mask
        np.testing.assert_array_equal(
            jp.l1_unstructured(t, amount, masks=default, importance_scores=t * default),
            jp.l1_unstructured(t, amount, masks=default),
        )
        np.testing.assert_array_equal(
            jp.ln_structured(t, amount, 2, 0, importance_scores=t), jp.ln_structured(t, amount, 2, 0)
        )


# 34
def test_rnn_pruning():
    """torch: pruning LSTM.weight_ih_l0 keeps the other flat weights Parameters; remove restores.
    JAX: prune one kernel of a Flax LSTMCell by path; the other leaves keep None masks, the cell
    runs on the effective params, and remove gives back the full params structure."""
    cell = nn.LSTMCell(4)
    x = jnp.ones((2, 3))
    carry = cell.initialize_carry(jax.random.key(0), x.shape)
    params = cell.init(jax.random.key(0), carry, x)["params"]
    masks = jp.l1_unstructured(params, 0.5, select="ii/kernel")
    leaves = jax.tree.leaves(masks, is_leaf=lambda v: v is None)
    assert sum(v is not None for v in leaves) == 1 and len(leaves) == len(jax.tree.leaves(params))
    assert pruned_count(masks["ii"]["kernel"]) == 6
    (c, h), out = cell.apply({"params": jp.apply_masks(params, masks)}, carry, x)
    assert out.shape == (2, 4)
    removed = jp.remove(params, masks)
    assert jax.tree.structure(removed) == jax.tree.structure(params)
    assert int((removed["ii"]["kernel"] == 0).sum()) == 6
    (_, _), out2 = cell.apply({"params": removed}, carry, x)
    np.testing.assert_array_equal(out2, out)
    lstm = torch.nn.LSTM(3, 4)
    tprune.l1_unstructured(lstm, "weight_ih_l0", 0.5)
    tprune.remove(lstm, "weight_ih_l0")
    assert len(lstm._flat_weights) == 4
