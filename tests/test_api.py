"""The public API on pytrees: Linen params dicts and NNX State, select, errors naming the leaf path,
every transform jitted and not, traced amounts without recompiles, and the Flax <-> torch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.prune as tprune
from conftest import JITS, pruned_count, tie_free, torch_mask, torch_module
from flax import linen as nn
from flax import nnx

import jprune as jp
from jprune import _amount
from jprune._tree import ShapeError


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dense(6, name="fc1")(x)
        return nn.Dense(3, name="fc2")(nn.relu(x))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(4 * 5 * 5, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 3, rngs=rngs)
        self.steps = nnx.Variable(jnp.array(0))  # not a Param: not in the pruned state

    def __call__(self, x):
        x = nnx.relu(self.conv1(x)).reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))


X = jnp.ones((2, 5, 5, 2))
KERNELS = ["conv1/kernel", "fc1/kernel", "fc2/kernel"]
BIASES = ["conv1/bias", "fc1/bias", "fc2/bias"]


def linen_params():
    return LinenNet().init(jax.random.key(0), X)["params"]


def nnx_state():
    model = NNXNet(nnx.Rngs(0))
    return model, nnx.state(model, nnx.Param)


def mask_paths(masks):
    """Paths of leaves that hold a mask."""
    return sorted(r.path for r in jp.sparsity(masks).rows)


TREES = {"linen": linen_params, "nnx": lambda: nnx_state()[1]}


# --------------------------------------------------------------------------------------------------
# select


@pytest.mark.parametrize("tree", TREES)
def test_default_select_is_floating_ndim2_leaves(tree):
    params = TREES[tree]()
    masks = jp.l1_unstructured(params, 0.5)
    assert mask_paths(masks) == KERNELS
    for r in jp.sparsity(masks).rows:
        assert r.pruned == round(0.5 * r.total)


def test_default_select_skips_integer_leaves_and_bare_arrays_are_pruned():
    params = {"d": {"kernel": jnp.ones((3, 3)), "idx": jnp.ones((3, 3), jnp.int32), "bias": jnp.ones(3)}}
    assert mask_paths(jp.l1_unstructured(params, 1)) == ["d/kernel"]
    params["d"]["kernel"] = jnp.ones((3, 3), jnp.int32)  # an integer kernel is not a weight to prune
    with pytest.raises(ValueError, match="matches no leaf"):
        jp.l1_unstructured(params, 1)
    assert pruned_count(jp.l1_unstructured(jnp.arange(1.0, 5.0), 1)) == 1  # 1-D bare array
    assert pruned_count(jp.l1_unstructured(jnp.arange(4), 1)) == 1  # integer bare array


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize(
    "select,want",
    [
        ("fc1/kernel", ["fc1/kernel"]),
        ("*/bias", BIASES),
        ("fc*", ["fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel"]),
        (["conv1/kernel", "fc2/*"], ["conv1/kernel", "fc2/bias", "fc2/kernel"]),
        (lambda path, leaf: leaf.ndim == 4, ["conv1/kernel"]),
        (lambda path, leaf: path.endswith("bias") and leaf.size > 3, ["conv1/bias", "fc1/bias"]),
    ],
)
def test_select_forms(tree, select, want):
    params = TREES[tree]()
    assert mask_paths(jp.l1_unstructured(params, 1, select=select)) == want
    assert mask_paths(jp.identity(params, select=select)) == want


@pytest.mark.parametrize("select", ["nothing", "conv1", ["fc3/*"], lambda p, v: False])
def test_select_matching_nothing(select):
    with pytest.raises(ValueError, match="matches no leaf; the paths are"):
        jp.l1_unstructured(linen_params(), 1, select=select)


def test_select_bad_type():
    with pytest.raises(TypeError, match="select must be"):
        jp.l1_unstructured(linen_params(), 1, select=[1, 2])


def test_masks_keep_other_leaves():
    """A second call with another select keeps the first call's masks untouched."""
    params = linen_params()
    m = jp.l1_unstructured(params, 0.5, select="fc1/kernel")
    m = jp.ln_structured(params, 1, 2, -1, masks=m, select="conv1/kernel")
    assert mask_paths(m) == ["conv1/kernel", "fc1/kernel"]
    np.testing.assert_array_equal(
        m["fc1"]["kernel"], jp.l1_unstructured(params, 0.5, select="fc1/kernel")["fc1"]["kernel"]
    )


# --------------------------------------------------------------------------------------------------
# NNX and Linen end to end


def test_nnx_state_round_trip():
    model, state = nnx_state()
    before = jax.tree.map(np.array, state)
    masks = jp.l1_unstructured(state, 0.5)
    masks = jp.ln_structured(state, 1, 2, -1, masks=masks, select="fc1/kernel")
    assert isinstance(masks, nnx.State)
    eff = jp.apply_masks(state, masks)
    jax.tree.map(np.testing.assert_array_equal, state, before)  # jprune did not mutate the state
    nnx.update(model, eff)
    assert int((model.fc1.kernel[...] == 0).sum()) >= 0.5 * model.fc1.kernel[...].size
    np.testing.assert_array_equal(model.fc2.bias[...], before["fc2"]["bias"].get_value())
    assert model(X).shape == (2, 3)
    assert jp.is_pruned(masks)


def test_nnx_and_linen_give_the_same_masks_for_the_same_values():
    _, state = nnx_state()
    params = {k: {n: state[k][n].get_value() for n in ("kernel", "bias")} for k in ("conv1", "fc1", "fc2")}
    mn = jp.global_unstructured(state, 0.6)
    ml = jp.global_unstructured(params, 0.6)
    for k in ("conv1", "fc1", "fc2"):
        # masks are plain arrays, never wrapped as a Param (issue #10)
        np.testing.assert_array_equal(mn[k]["kernel"], ml[k]["kernel"])


def test_linen_layout_matches_torch_linear_and_conv():
    """torch dim=0 (out) of Linear/Conv weights is axis=-1 of the Flax kernel; dim=1 is axis=-2."""
    rng = np.random.default_rng(0)
    dense = tie_free(rng, (8, 5))  # Flax (in, out)
    conv = tie_free(rng, (3, 3, 2, 4))  # Flax (kh, kw, in, out)
    mod = torch_module({"lin": dense.T.copy(), "conv": conv.transpose(3, 2, 0, 1).copy()})
    params = {"lin": jnp.asarray(dense), "conv": jnp.asarray(conv)}
    for dim, axis in [(0, -1), (1, -2)]:
        tprune.ln_structured(mod, "lin", 0.4, n=2, dim=dim)
        tprune.ln_structured(mod, "conv", 0.5, n=1, dim=dim)
        m = jp.ln_structured(params, 0.4, 2, axis, select="lin", masks=None if dim == 0 else m)  # noqa: F821
        m = jp.ln_structured(params, 0.5, 1, axis, select="conv", masks=m)
        np.testing.assert_array_equal(np.asarray(m["lin"]).T, torch_mask(mod, "lin"))
        np.testing.assert_array_equal(np.asarray(m["conv"]).transpose(3, 2, 0, 1), torch_mask(mod, "conv"))
    tprune.l1_unstructured(mod, "lin", 0.3)
    m = jp.l1_unstructured(params, 0.3, masks=m, select="lin")
    np.testing.assert_array_equal(np.asarray(m["lin"]).T, torch_mask(mod, "lin"))


# --------------------------------------------------------------------------------------------------
# Errors name the leaf path


def test_errors_name_the_leaf_path():
    params = linen_params()
    with pytest.raises(ValueError, match=r"fc2/kernel: amount=20 should be smaller .* prune=18"):
        jp.l1_unstructured(params, 20)
    with pytest.raises(ValueError, match=r"fc1/bias: Structured pruning can only be applied"):
        jp.ln_structured(params, 1, 2, 0, select="fc1/*")
    with pytest.raises(IndexError, match=r"conv1/kernel: Invalid index 4"):
        jp.random_structured(params, 1, 4, key=jax.random.key(0), select="conv1/kernel")
    with pytest.raises(RuntimeError, match=r"conv1/kernel: linalg.matrix_norm"):
        jp.ln_structured(params, 1, "fro", -1)
    masks = jp.l1_unstructured(params, 0.5)
    masks["fc1"]["kernel"] = jnp.ones((6, 100), bool)
    with pytest.raises(ShapeError, match=r"mask at 'fc1/kernel' has shape \(6, 100\), expected \(100, 6\)"):
        jp.l1_unstructured(params, 1, masks=masks)
    masks["fc1"]["kernel"] = jnp.ones((100, 6), jnp.float32)
    with pytest.raises(TypeError, match=r"mask at 'fc1/kernel' has dtype float32, expected bool"):
        jp.apply_masks(params, masks)
    scores = jax.tree.map(lambda x: None, params)
    scores["fc2"]["kernel"] = jnp.ones((3, 6))
    with pytest.raises(ShapeError, match=r"importance_scores at 'fc2/kernel'"):
        jp.l1_unstructured(params, 1, importance_scores=scores)
    with pytest.raises(ShapeError, match=r"fc2/kernel"):
        jp.custom_from_mask(
            params,
            {**jax.tree.map(lambda x: None, params), "fc2": {"kernel": jnp.ones((3, 6)), "bias": None}},
        )


def test_k_too_large_on_a_reprune_names_the_leaf():
    params = linen_params()
    m = jp.l1_unstructured(params, 15, select="fc2/kernel")  # 18 entries, 3 left
    with pytest.raises(ValueError, match=r"fc2/kernel: amount=4 .* prune=3"):
        jp.l1_unstructured(params, 4, masks=m, select="fc2/kernel")


def test_random_needs_an_explicit_key():
    with pytest.raises(TypeError):
        jp.random_unstructured(jnp.ones(4), 1)  # key is keyword-only and required
    with pytest.raises(TypeError, match="explicit PRNG key"):
        jp.random_structured(jnp.ones((2, 2)), 1, 0, key=None)


def test_custom_from_mask_rejects_non_binary():
    """Documented deviation: torch stores a 0.5 mask and scales the weight; jprune refuses it."""
    with pytest.raises(ValueError, match="other than 0 and 1"):
        jp.custom_from_mask(jnp.ones(3), jnp.array([0.5, 1.0, 2.0]))


def test_masks_structure_mismatch():
    with pytest.raises(ValueError, match="must mirror the structure of params"):
        jp.l1_unstructured(linen_params(), 1, masks={"fc1": None})


# --------------------------------------------------------------------------------------------------
# Every transform jitted and not


def _custom_every_other(t, default_mask):
    return default_mask.ravel().at[::2].set(False).reshape(t.shape)


every_other = jp.custom_method(_custom_every_other)

TRANSFORMS = {
    "l1": lambda p, m: jp.l1_unstructured(p, 0.4, masks=m),
    "l1_scores": lambda p, m: jp.l1_unstructured(
        p, 3, masks=m, importance_scores=jax.tree.map(lambda x: -x[::-1] if x.ndim else x, p)
    ),
    "random": lambda p, m: jp.random_unstructured(p, 0.3, key=jax.random.key(1), masks=m),
    "ln": lambda p, m: jp.ln_structured(p, 1, 2, -1, masks=m),
    "ln_inf_in": lambda p, m: jp.ln_structured(p, 0.25, float("inf"), -2, masks=m),
    "random_structured": lambda p, m: jp.random_structured(p, 1, -1, key=jax.random.key(2), masks=m),
    "global": lambda p, m: jp.global_unstructured(p, 0.5, masks=m),
    "global_random": lambda p, m: jp.global_unstructured(
        p, 40, method="random", key=jax.random.key(3), masks=m
    ),
    "custom_every_other": lambda p, m: every_other(p, masks=m),
    "custom_from_mask": lambda p, m: jp.custom_from_mask(
        p,
        jax.tree.map(lambda x: (jnp.arange(x.size) % 3 > 0).reshape(x.shape) if x.ndim >= 2 else None, p),
        masks=m,
    ),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_transform_jit_equals_eager(name):
    params = linen_params()
    f = TRANSFORMS[name]
    first_eager = f(params, None)
    first_jit = jax.jit(f)(params, None)
    second_eager = f(params, first_eager)
    second_jit = jax.jit(f)(params, first_jit)
    for a, b in [(first_eager, first_jit), (second_eager, second_jit)]:
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert mask_paths(second_jit) == KERNELS


@pytest.mark.parametrize("wrap", JITS)
def test_apply_remove_is_pruned_sparsity(wrap):
    params = linen_params()
    masks = jp.l1_unstructured(params, 0.5)
    eff = wrap(jp.apply_masks)(params, masks)
    removed = wrap(jp.remove)(params, masks)
    jax.tree.map(np.testing.assert_array_equal, eff, removed)
    np.testing.assert_array_equal(eff["fc1"]["bias"], params["fc1"]["bias"])
    assert jp.is_pruned(masks) and not jp.is_pruned(jax.tree.map(lambda x: None, params))
    report = jp.sparsity(masks, params)
    assert [r.path for r in report.rows] == sorted(BIASES + KERNELS)
    assert report.pruned == sum(round(0.5 * params[k.split("/")[0]]["kernel"].size) for k in KERNELS)
    assert "global" in str(report)


# --------------------------------------------------------------------------------------------------
# Traced amounts: one compilation, the concrete call's counts


TRACED = {
    "l1": lambda p, a, m: jp.l1_unstructured(p, a, masks=m),
    "ln": lambda p, a, m: jp.ln_structured(p, a, 1, -1, masks=m),
    "global": lambda p, a, m: jp.global_unstructured(p, a, masks=m),
    "random": lambda p, a, m: jp.random_unstructured(p, a, key=jax.random.key(0), masks=m),
    "random_structured": lambda p, a, m: jp.random_structured(p, a, -1, key=jax.random.key(0), masks=m),
}


@pytest.mark.parametrize("name", TRACED)
def test_traced_amount_compiles_once(name):
    params = linen_params()
    base = jp.l1_unstructured(params, 0.2)
    traces = 0

    def f(p, a, m):
        nonlocal traces
        traces += 1
        return TRACED[name](p, a, m)

    jf = jax.jit(f)
    for a in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        got = jf(params, jnp.float32(a), base)
        want = TRACED[name](params, float(np.float32(a)), base)
        for r_got, r_want in zip(jp.sparsity(got).rows, jp.sparsity(want).rows):
            assert r_got == r_want, (a, r_got, r_want)
        if name in ("l1", "ln", "global"):
            jax.tree.map(np.testing.assert_array_equal, got, want)
    assert traces == 1
    for k in (0, 2, 3):  # integer amounts: one more trace for the int32 dtype
        jf(params, jnp.int32(k), base)
    assert traces == 2


def test_traced_amount_inside_a_schedule_scan():
    """A schedule under lax.scan: the amount changes every step, one trace, monotone masks."""
    params = linen_params()

    def step(m, a):
        m2 = jp.l1_unstructured(params, a, masks=m)
        return m2, jp.sparsity(m2).rows[0].pruned if False else jnp.sum(~m2["fc1"]["kernel"])

    m0 = jp.identity(params)
    _, pruned = jax.lax.scan(step, m0, jnp.float32([0.1, 0.2, 0.5, 0.0]))
    # of 600: 60, then 0.2 of 540 = 108 -> 168, then 0.5 of 432 = 216 -> 384, then 0
    assert pruned.tolist() == [60, 168, 384, 384]


def test_traced_amount_eager_jax_scalar():
    w = jnp.asarray(tie_free(np.random.default_rng(0), (10, 10)))
    assert pruned_count(jp.l1_unstructured(w, jnp.float32(0.35))) == 35
    assert pruned_count(jp.l1_unstructured(w, jnp.int32(7))) == 7
    with pytest.raises(ValueError, match="smaller than the number"):  # validated like 700
        jp.l1_unstructured(w, jnp.int32(700))


def test_python_float_amount_with_traced_masks_uses_host_rule():
    """Was a bug (fixed in c2c420f): with traced masks a Python 0.7 was counted as float32 (3 of 5)."""
    w = tie_free(np.random.default_rng(0), (5,))
    mod = torch_module({"w": w})
    tprune.identity(mod, "w")
    tprune.l1_unstructured(mod, "w", 0.7)
    m0 = jnp.ones(5, bool)
    eager = jp.l1_unstructured(jnp.asarray(w), 0.7, masks=m0)
    jitted = jax.jit(lambda p, m: jp.l1_unstructured(p, 0.7, masks=m))(jnp.asarray(w), m0)
    np.testing.assert_array_equal(np.asarray(eager), torch_mask(mod, "w"))
    np.testing.assert_array_equal(np.asarray(jitted), torch_mask(mod, "w"))


def test_python_float_amount_with_traced_masks_structured():
    """Was a bug (fixed in c2c420f): the same float32 count for channels."""
    w = tie_free(np.random.default_rng(0), (5, 3))
    mod = torch_module({"w": w})
    tprune.identity(mod, "w")
    tprune.ln_structured(mod, "w", 0.7, n=1, dim=0)
    m = jax.jit(lambda p, m: jp.ln_structured(p, 0.7, 1, 0, masks=m))(jnp.asarray(w), jnp.ones((5, 3), bool))
    np.testing.assert_array_equal(np.asarray(m), torch_mask(mod, "w"))


def test_device_amount_matches_host_where_float32_agrees():
    """as_device_amount(a) reproduces the host count for the rounding table's cases."""
    for a, n in [(0.07, 150), (0.35, 90), (0.1, 15), (0.5, 5), (0.45, 10), (0.625, 4)]:
        assert int(_amount.count_traced(_amount.as_device_amount(a), n)) == _amount.count(a, n)


def test_torch_is_not_imported_by_jprune():
    import subprocess
    import sys

    code = (
        "import sys, jprune; jprune.l1_unstructured(__import__('numpy').ones(3, 'float32'), 1); "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert torch.__version__  # the tests do use it
