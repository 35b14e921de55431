"""jax.export of programs that prune on CPU: the native kernel when compiling to run here, the XLA path
in an exported program (CPU or GPU targets), with jax.export's default safety checks.

The kernel is a primitive (``jprune._cpu``) that carries the XLA path's program: its CPU lowering
emits the kernel's custom call unless the lowering is for export, and other platforms always get
the XLA path. The kernel-level tests give it a stable-argsort fallback of their own; the public API
tests use the fallback jprune passes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jprune as jp
from jprune import _cpu

CUSTOM_CALL = "custom_call @jprune_select"  # the kernel in a lowered program


def argsort_fallback(values, masks, k):
    """The rule on the XLA path, simply: the k smallest float32 keys of |x| (candidates only) pruned,
    ties by flat index (a stable argsort)."""
    keys = []
    for v, m in zip(values, masks):
        bits = jax.lax.bitcast_convert_type(jnp.abs(v.astype(jnp.float32)), jnp.uint32).ravel()
        keys.append(bits if m is None else jnp.where(m.ravel(), bits, jnp.uint32(0xFFFFFFFF)))
    keys = jnp.concatenate(keys)
    order = jnp.argsort(keys, stable=True)
    chosen = jnp.zeros(keys.shape, bool).at[order].set(jnp.arange(keys.size) < k)
    out, start = [], 0
    for v, m in zip(values, masks):
        keep = ~chosen[start : start + v.size].reshape(v.shape)
        out.append(keep if m is None else keep & m)
        start += v.size
    return out


def pruner(k):
    def f(values, masks):
        return _cpu.prune(values, masks, k, joint=True, fallback=lambda: argsort_fallback(values, masks, k))

    return f


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    values = [
        jnp.asarray(rng.standard_normal((300, 200)).astype(np.float32)),
        jnp.asarray(rng.integers(-2, 3, (70_000,)).astype(np.float32)).astype(jnp.bfloat16),  # ties
    ]
    masks = [None, jnp.asarray(rng.random(70_000) < 0.7)]
    return values, masks


def test_jit_uses_the_kernel(inputs):
    f = jax.jit(pruner(40_000))
    assert CUSTOM_CALL in f.lower(*inputs).as_text()
    for got, want in zip(f(*inputs), argsort_fallback(*inputs, 40_000)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("platforms", [("cpu",), ("cuda",), ("cpu", "cuda")])
def test_export_contains_the_xla_path(inputs, platforms):
    """Default safety checks (no disabled_checks): no custom call in the exported program."""
    f = jax.jit(pruner(40_000))
    exported = jax.export.export(f, platforms=platforms)(*inputs)
    assert CUSTOM_CALL not in exported.mlir_module()
    if "cpu" in platforms:
        for got, want in zip(exported.call(*inputs), f(*inputs)):
            np.testing.assert_array_equal(got, want)


def test_vmap_grad_and_eager_agree(inputs):
    """The primitive under vmap (one kernel call per element), grad (masks are constants) and
    eagerly (the kernel at once) gives the same masks as its fallback."""
    w, k = inputs[0][0], 25_000
    f = pruner(k)
    batch = jnp.stack([w, -2 * w, w + 1])
    want = jnp.stack([argsort_fallback([x], [None], k)[0] for x in batch])
    np.testing.assert_array_equal(jax.vmap(lambda x: f([x], [None])[0])(batch), want)
    np.testing.assert_array_equal(jax.jit(jax.vmap(lambda x: f([x], [None])[0]))(batch), want)

    def loss(x):
        return jnp.sum(jnp.where(f([x], [None])[0], x, 0.0) ** 2)

    expected = 2 * jnp.where(want[0], w, 0.0)
    np.testing.assert_array_equal(jax.grad(loss)(w), expected)
    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(w), expected)
    np.testing.assert_array_equal(f([w], [None])[0], want[0])


@pytest.mark.parametrize("platforms", [("cpu",), ("cuda",)])
@pytest.mark.parametrize("name", ["l1_unstructured", "global_unstructured"])
def test_public_api_exports(name, platforms):
    """A program that prunes with jprune exports for CPU and GPU with the default safety checks, and
    the exported CPU program gives the masks of the jitted one."""
    rng = np.random.default_rng(1)
    params = {
        f"d{i}": {"kernel": jnp.asarray(rng.standard_normal((400, 300)).astype(np.float32))} for i in range(2)
    }
    f = jax.jit(lambda p: getattr(jp, name)(p, 0.5))
    assert CUSTOM_CALL in f.lower(params).as_text()  # the kernel when compiling to run here
    exported = jax.export.export(f, platforms=platforms)(params)
    assert CUSTOM_CALL not in exported.mlir_module()
    if platforms == ("cpu",):
        got, want = exported.call(params), f(params)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), got, want))
