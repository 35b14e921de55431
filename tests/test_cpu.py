"""Tests for jprune/_cpu.py: the native CPU selection kernel against a stable-argsort reference.

Every case runs twice: with the kernel's AVX-512 code (where the CPU has it) and with its portable
code. The reference prunes the k smallest keys (bits of |x| for float32, the keys themselves for uint32),
ties by lowest flat index, never a masked-out entry: the rule of ``_select``. Sizes cross the
kernel's internal boundaries: 2**14 entries (small groups skip the histogram) and 2**18 (chunks
shared between threads).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_select import reference as smallest  # the k smallest keys, ties by flat index

import jprune as jp
from jprune import _cpu, _unstructured

SENTINEL = np.uint32(0xFFFFFFFF)
SIZES = [0, 1, 7, 5000, 2**14, 2**14 + 1, 70_000, 2**18 + 3, 600_000]


def keys(x, mask):
    k = x.view(np.uint32) & np.uint32(0x7FFFFFFF) if x.dtype == np.float32 else x.copy()
    return k if mask is None else np.where(mask, k, SENTINEL)


def reference(values, masks, k, joint):
    """Keep masks: candidates minus the k smallest keys (per value, or of all, ``joint``)."""
    ks = [keys(x, m) for x, m in zip(values, masks)]
    groups = [ks] if joint else [[x] for x in ks]
    counts = [k] if joint else k
    out = []
    for group, n in zip(groups, counts):  # sentinels sort last, and n <= the candidates
        out += [(x != SENTINEL) & ~chosen for x, chosen in zip(group, smallest(group, n))]
    return out


def sample(rng, n, kind):
    if kind == "uint32":
        return rng.integers(0, 2**31, n, dtype=np.uint32)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":  # few distinct values: ties at the k-th key, cut by flat index
        return rng.integers(-3, 4, n).astype(np.float32)
    if kind == "special":  # NaN (above inf), +-inf, -0.0, subnormals
        x = rng.standard_normal(n).astype(np.float32)
        for value, p in [(np.nan, 0.1), (-0.0, 0.1), (np.inf, 0.05), (-np.inf, 0.05), (1e-40, 0.1)]:
            x[rng.random(n) < p] = value
        return x
    return np.sort(rng.standard_normal(n).astype(np.float32))  # "sorted": one bucket per region


def test_kernel_is_built():
    """CI builds the extension; a silent fallback to XLA would hide a broken build."""
    assert _cpu.available()


@pytest.mark.parametrize("kind", ["normal", "ties", "special", "sorted", "uint32"])
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("simd", [True, False], ids=["avx512-if-any", "portable"])
def test_matches_reference(kind, joint, simd):
    rng = np.random.default_rng([ord(c) for c in kind] + [joint])
    for _ in range(6):
        sizes = list(rng.choice(SIZES, size=rng.integers(1, 4)))
        values = [sample(rng, int(n), kind) for n in sizes]
        masks = [rng.random(x.size) < 0.6 if rng.random() < 0.5 else None for x in values]
        left = [x.size if m is None else int(m.sum()) for x, m in zip(values, masks)]
        k = int(rng.integers(0, sum(left) + 1)) if joint else [int(rng.integers(0, n + 1)) for n in left]
        arrays = [jnp.asarray(x) for x in values]
        candidates = [None if m is None else jnp.asarray(m) for m in masks]
        got = _cpu.prune(arrays, candidates, k, joint=joint, simd=simd)
        for g, w in zip(got, reference(values, masks, k, joint)):
            np.testing.assert_array_equal(np.asarray(g), w)


@pytest.mark.parametrize("n", [100, 300_000])
def test_k_extremes(n):
    x = sample(np.random.default_rng(n), n, "ties")
    for k in (0, 1, n - 1, n):
        (got,) = _cpu.prune([jnp.asarray(x)], [None], [k], joint=False)
        np.testing.assert_array_equal(np.asarray(got), reference([x], [None], [k], False)[0])


def test_traced_count_does_not_recompile():
    x = jnp.asarray(sample(np.random.default_rng(0), 50_000, "normal"))
    f = jax.jit(lambda x, k: _cpu.prune([x], [None], k, joint=True)[0])
    for k in (0, 10, 25_000, 50_000):
        np.testing.assert_array_equal(np.asarray(f(x, k)), reference([np.asarray(x)], [None], k, True)[0])
    assert f._cache_size() == 1


def test_public_api_uses_the_kernel_and_agrees_with_xla():
    rng = np.random.default_rng(1)
    kernels = [sample(rng, 300_000, "ties").reshape(600, 500) for _ in range(2)]
    params = {f"d{i}": {"kernel": jnp.asarray(k)} for i, k in enumerate(kernels)}
    tree = _unstructured.Tree(params)
    idx = tree.select(None)
    sources = [(_unstructured.l1_keys, (tree.values[i], None, None)) for i in idx]
    assert _unstructured.native_inputs(sources) is not None
    for joint, fn in [(True, jp.global_unstructured), (False, jp.l1_unstructured)]:
        want = _unstructured.run(tree, idx, 0.4, kind="l1", joint=joint, method="hist")
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), fn(params, 0.4), want))


def test_dtypes_it_takes():
    assert _cpu.usable([jnp.zeros(3, jnp.float32), jnp.zeros(3, jnp.uint32), jnp.zeros(3, bool)])
    assert not _cpu.usable([jnp.zeros(3, jnp.bfloat16)])
    assert not _cpu.usable([jnp.zeros(3, jnp.int32)])


def test_switched_off_by_environment():
    code = "from jprune import _cpu; print(_cpu.available())"
    env = dict(os.environ, JPRUNE_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_differentiable_around_and_vmappable():
    """Masks are constants to autodiff (a loss may prune inside itself), and vmap maps the kernel."""
    w = jnp.asarray(sample(np.random.default_rng(2), 60_000, "normal").reshape(300, 200))

    def loss(w):
        return jnp.sum(jp.apply_masks(w, jp.l1_unstructured(w, 0.5)) ** 2)

    m = jp.l1_unstructured(w, 0.5)
    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(w), 2 * jp.apply_masks(w, m))
    batch = jnp.stack([w, -0.5 * w, w + 1])
    got = jax.vmap(lambda x: jp.l1_unstructured(x, 0.3))(batch)
    np.testing.assert_array_equal(got, jnp.stack([jp.l1_unstructured(x, 0.3) for x in batch]))
