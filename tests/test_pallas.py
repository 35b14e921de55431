"""Tests for jprune/_pallas.py: the GPU selection kernels, run in Pallas interpret mode on CPU.

Every input of ``tests/test_select.py`` that fits 32-bit keys (uint64 keys are XLA-only) and float
scores with NaN, infinities, subnormals, signed zeros and bf16 ties: the Pallas masks must equal the
XLA path's (histogram and sort) and an independent stable-sort reference. Small blocks make every
input span several programs and end in a partial block; one case runs the real block sizes.
"""

import re
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jprune as jp
from jprune import _pallas, _select, _unstructured

SMALL = dict(block=32, chunk=16)  # several programs per input, a partial last block


def pallas(values, masks, k, joint=True, **kw):
    out = _pallas.prune(values, masks, k, joint=joint, interpret=True, **(kw or SMALL))
    return [np.asarray(m) for m in out]


def xla(values, masks, k, joint=True, method="hist"):
    """The XLA path (``_select``) on the same inputs: float scores keyed as ``l1_unstructured``
    keys them, uint32 values as keys."""
    sources = [
        (_select.given, (v, m)) if v.dtype == jnp.uint32 else (_unstructured.l1_keys, (v, m, None))
        for v, m in zip(values, masks)
    ]
    out = _unstructured._prune_xla(sources, k, joint=joint, bits=(32,) * len(values), method=method)
    return [np.asarray(m) for m in out]


def reference(values, masks, k):
    """Keep masks: the k smallest candidate keys pruned, ties by flat index (a stable sort)."""
    keys = np.concatenate([np.asarray(_select.magnitude_keys(jnp.asarray(v))).ravel() for v in values])
    cand = np.concatenate(
        [np.ones(np.size(v), bool) if m is None else np.ravel(m) for v, m in zip(values, masks)]
    )
    chosen = np.zeros(keys.size, bool)
    chosen[np.lexsort((keys, ~cand))[:k]] = True
    keep, out, off = cand & ~chosen, [], 0
    for v in values:
        out.append(keep[off : off + np.size(v)].reshape(np.shape(v)))
        off += np.size(v)
    return out


def check(values, masks, ks, joint=True, **kw):
    values = [jnp.asarray(v) for v in values]
    masks = [None if m is None else jnp.asarray(m) for m in masks]
    for k in ks:
        got = pallas(values, masks, k, joint=joint, **kw)
        for method in ("hist", "sort"):
            for g, w in zip(got, xla(values, masks, k, joint=joint, method=method)):
                np.testing.assert_array_equal(g, w, err_msg=f"k={k} {method}")
        if joint:
            for g, w in zip(got, reference(values, masks, k)):
                np.testing.assert_array_equal(g, w, err_msg=f"k={k} reference")


def test_heavy_ties():
    rng = np.random.default_rng(0)
    keys = [rng.integers(0, 4, (10, 5)).astype(np.uint32), rng.integers(0, 4, (50,)).astype(np.uint32)]
    check(keys, [None, None], [0, 1, 2, 7, 50, 99, 100])


def test_keys_sharing_the_high_digits():
    """Keys that differ only in their low bits (one bucket for 7 of the 8 passes), and across buckets."""
    rng = np.random.default_rng(3)
    base = np.uint32(0x3F80_0000)
    keys = [
        (base + rng.permutation(300)).astype(np.uint32).reshape(20, 15),
        (base + 0x10000 + rng.integers(0, 3, 40)).astype(np.uint32),
    ]
    check(keys, [None, None], [0, 1, 150, 299, 300, 301, 340])


def test_non_candidates_and_every_uint32_key():
    """The largest uint32 is an ordinary key; non-candidates are never chosen."""
    keys = np.array([5, 0, 3, 2**32 - 1, 9, 2**32 - 2, 7, 2**31], np.uint32)
    cand = np.array([True, False, True, True, True, False, True, True])
    check([keys], [cand], range(7))
    check([keys], [None], range(9))


def test_float_scores_special_values_and_masks():
    """|x| order +0 == -0 < subnormals < normals < inf < NaN; float32 beside bfloat16 on one scale."""
    rng = np.random.default_rng(1)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-40, 3.0, -3.0], np.float32)
    a = np.concatenate([special, rng.standard_normal(54).astype(np.float32)]).reshape(8, 8)
    a[2, :] = 0.5  # a block of ties
    b = rng.choice([1.0, 1.001, 1.002, -2.0, 0.0], 45).astype(ml_dtypes.bfloat16)  # bf16 ties
    ma, mb = rng.random((8, 8)) < 0.8, None
    check([a, b], [ma, mb], [0, 1, 9, 40, 60, int(ma.sum()) + 45])


def test_per_leaf():
    rng = np.random.default_rng(2)
    a = rng.integers(-3, 4, (6, 7)).astype(np.float32)
    b = rng.standard_normal(33).astype(ml_dtypes.bfloat16)
    m = rng.random(33) < 0.5
    check(
        [a, b], [None, m], [jnp.array([0, 0]), jnp.array([5, 3]), jnp.array([42, int(m.sum())])], joint=False
    )


def test_real_block_sizes_span_programs():
    """The GPU configuration (8192-entry programs, 256-entry steps) on 90000 entries: 11 programs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 300)).astype(np.float32)
    x[::7, ::3] = 0.5
    check([x], [None], [1, 45000, 89999], block=_pallas._BLOCK, chunk=_pallas._CHUNK)


@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=100),
    split=st.integers(0, 100),
    kfrac=st.floats(0, 1),
)
def test_property(data, split, kfrac):
    """test_select's property test: two padded parts (one shape, one compilation), candidates."""
    keys = np.array(data, np.uint32)
    split = min(split, keys.size)
    parts, cands = [], []
    for part in (keys[:split], keys[split:]):
        padded = np.full(100, 0xFFFFFFFF, np.uint32)
        padded[: part.size] = part
        parts.append(padded)
        cands.append(np.arange(100) < part.size)
    k = round(kfrac * keys.size)
    got = pallas([jnp.asarray(p) for p in parts], [jnp.asarray(c) for c in cands], k)
    for g, w in zip(got, reference(parts, cands, k)):
        np.testing.assert_array_equal(g, w)


def test_off_by_default_and_only_for_its_dtypes(monkeypatch):
    monkeypatch.delenv("JPRUNE_PALLAS", raising=False)
    assert not _pallas.enabled()
    monkeypatch.setenv("JPRUNE_PALLAS", "1")
    assert _pallas.enabled() == (jax.default_backend() == "gpu")  # GPU only
    monkeypatch.setattr(_pallas, "_PLATFORM", "cpu")  # as if this CPU were the GPU
    assert _pallas.enabled()
    x = jnp.ones(4)
    assert _pallas.usable([x, x.astype(jnp.bfloat16), x.astype(jnp.uint32)], [None, x > 0, None])
    for dtype in (jnp.float16, jnp.int32, jnp.uint8):
        assert not _pallas.usable([x.astype(dtype)], [None])
    with pytest.raises(ValueError, match="powers of two"):
        _pallas.prune([x], [None], 1, joint=True, interpret=True, block=48, chunk=16)


def test_public_api_takes_the_pallas_path_when_switched_on(monkeypatch):
    """The dispatch hook: with the kernels switched on, L1 (re-pruning, jitted) and random (eager)
    pruning run them (in interpret mode here) and give the masks of the default path."""
    rng = np.random.default_rng(4)
    params = {
        "a": {"kernel": jnp.asarray(rng.integers(-5, 6, (12, 10)).astype(np.float32))},
        "b": {
            "kernel": jnp.asarray(rng.standard_normal((9, 7)).astype(ml_dtypes.bfloat16)),
            "bias": jnp.ones(7),
        },
    }
    calls = {
        "global": lambda p: jp.global_unstructured(p, 0.4, masks=jp.global_unstructured(p, 0.2)),
        "random": lambda p: jp.global_unstructured(p, 0.5, method="random", key=jax.random.key(1)),
    }
    want = {name: f(params) for name, f in calls.items()}
    used = []

    def traced(*args, **kw):
        used.append(kw["joint"])
        return original(*args, **kw, interpret=True, **SMALL)

    original = _pallas.prune
    monkeypatch.setenv("JPRUNE_PALLAS", "1")
    monkeypatch.setattr(_pallas, "_PLATFORM", "cpu")  # as if this CPU were the GPU
    monkeypatch.setattr(_pallas, "prune", traced)
    for (name, f), wrap in zip(calls.items(), (jax.jit, lambda g: g)):
        used.clear()
        got = wrap(f)(params)
        assert used, f"{name}: the Pallas path was not taken"
        same = jax.tree.map(lambda a, b: bool((a == b).all()), got, want[name])
        assert jax.tree.all(same), name
        assert got["b"]["bias"] is None


def test_under_jit_with_traced_k_compiles_once():
    x = jnp.asarray(np.random.default_rng(5).standard_normal(100).astype(np.float32))
    f = jax.jit(partial(_pallas.prune, joint=True, interpret=True, **SMALL))
    for k in (0, 3, 50, 100):
        np.testing.assert_array_equal(np.asarray(f([x], [None], k)[0]), reference([x], [None], k)[0])
    assert f._cache_size() == 1


def test_kernels_lower_to_triton_for_cuda():
    """Lowered for CUDA (no GPU needed), every kernel goes through Pallas' Triton lowering, which
    refuses operations Triton lacks: the counting kernels (keys and tied indices) and the mask kernel,
    for float32, bfloat16 and uint32 values, with and without candidate masks."""
    f = jax.jit(partial(_pallas.prune, joint=True))
    values = [
        jax.ShapeDtypeStruct(s, d)
        for s, d in [((1000, 300), jnp.float32), ((77,), jnp.bfloat16), ((9,), jnp.uint32)]
    ]
    masks = [jax.ShapeDtypeStruct((1000, 300), jnp.bool_), None, None]
    text = (
        f.trace(values, masks, jax.ShapeDtypeStruct((), jnp.int32))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    calls = re.findall(r"custom_call @(\S+)\(", text)
    assert calls and set(calls) == {"__gpu$xla.gpu.triton"}
    # 3 values: a counting kernel for keys and one for tied indices each, and a mask kernel each
    assert len(calls) == 9
