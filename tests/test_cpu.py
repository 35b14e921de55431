"""Tests for jprune/_cpu.py: the native CPU selection kernel against a stable-argsort reference.

Every case runs twice: with the kernel's AVX-512 code (where the CPU has it) and with its portable
code. The reference prunes the k smallest keys (the float32 bits of |x| for float32, bfloat16 and
float16, the keys themselves for uint32), ties by lowest flat index, never a masked-out entry: the
rule of ``_select``. Sizes cross the kernel's internal boundaries: 2**14 entries (small groups skip the
histogram) and 2**18 (chunks shared between threads); tie-heavy kinds take its no-gather path (a
bucket holding more than 1/64 of the group: exact zeros, or one repeated value).
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_select import reference as smallest  # the k smallest keys, ties by flat index

import jprune as jp
from jprune import _cpu, _unstructured

SENTINEL = np.uint32(0xFFFFFFFF)
SIZES = [0, 1, 7, 5000, 2**14, 2**14 + 1, 70_000, 2**18 + 3, 600_000]


def float32_keys(x):
    """The float32 bits of |x|, the key of every float dtype. A float16 NaN becomes a quiet float32
    NaN with its payload, as XLA converts it (numpy's astype keeps a signaling NaN signaling)."""
    k = x.astype(np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
    if x.dtype == np.float16:
        k[np.isnan(x)] |= np.uint32(0x00400000)
    return k


def keys(x, mask):
    k = x.copy() if x.dtype == np.uint32 else float32_keys(x)
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
    if kind in ("bfloat16", "float16"):  # every bit pattern (NaNs, infinities, subnormals, -0) is likely
        bits = rng.integers(0, 2**16, n, dtype=np.uint16)
        return bits.view(ml_dtypes.bfloat16 if kind == "bfloat16" else np.float16)
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "normal":
        return x
    if kind == "ties":  # few distinct values: ties at the k-th key, cut by flat index
        return rng.integers(-3, 4, n).astype(np.float32)
    if kind == "zeros":  # after `remove`: about half exact zeros (either sign), then normals
        x[rng.random(n) < 0.5] = 0.0
        x[rng.random(n) < 0.1] = -0.0
        x[rng.random(n) < 0.03] = 1e-44  # nonzero keys below 2**16: the zeros' bucket
        return x
    if kind == "repeated":  # one nonzero value held by 40 %: the k-th key's bucket is large
        x[rng.random(n) < 0.4] = -1.5
        return x
    if kind == "special":  # NaN (above inf), +-inf, -0.0, subnormals
        for value, p in [(np.nan, 0.1), (-0.0, 0.1), (np.inf, 0.05), (-np.inf, 0.05), (1e-40, 0.1)]:
            x[rng.random(n) < p] = value
        return x
    return np.sort(x)  # "sorted": one bucket per region


def test_kernel_is_built():
    """CI builds the extension; a silent fallback to XLA would hide a broken build."""
    assert _cpu.available()


KINDS = ["normal", "ties", "zeros", "repeated", "special", "sorted", "uint32", "bfloat16", "float16"]


@pytest.mark.parametrize("kind", KINDS)
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


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_public_api_16_bit_agrees_with_xla(dtype, monkeypatch):
    """Every 16-bit pattern (NaNs included: the large amounts cut among them) next to a float32
    leaf: the kernel and the XLA path (kernel refused through ``usable``) give the same masks."""
    rng = np.random.default_rng(7)
    x = rng.permutation(np.arange(2**16, dtype=np.uint32).astype(np.uint16)).view(dtype).reshape(256, 256)
    params = {
        "a": {"kernel": jnp.asarray(x)},
        "b": {"kernel": jnp.asarray(sample(rng, 60_000, "normal").reshape(300, 200))},
    }
    for fn in (jp.l1_unstructured, jp.global_unstructured):
        for amount in (0.3, 0.97, 0.999):
            native = fn(params, amount)
            with monkeypatch.context() as m:
                m.setattr(_cpu, "usable", lambda arrays: False)
                xla = fn(params, amount)
            assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), native, xla))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("simd", [True, False], ids=["avx512-if-any", "portable"])
def test_every_16_bit_pattern(dtype, simd):
    """All 65536 values of a 16-bit float, in two orders: keys as float32 keys (NaN above inf),
    +-x tied and cut by flat index."""
    x = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype)
    for values in (x, np.random.default_rng(3).permutation(x)):
        for k in (0, 1, 1000, 2**15 - 7, 2**15, 63_000, 64_000, 2**16 - 1, 2**16):
            (got,) = _cpu.prune([jnp.asarray(values)], [None], k, joint=True, simd=simd)
            np.testing.assert_array_equal(np.asarray(got), reference([values], [None], k, True)[0])


@pytest.mark.parametrize("simd", [True, False], ids=["avx512-if-any", "portable"])
def test_mixed_float_dtypes_rank_on_one_scale(simd):
    """A joint group of float32, bfloat16 and float16 leaves gives the masks of the same group
    converted to float32 first (by XLA), and of the reference."""
    rng = np.random.default_rng(4)
    for kind in ("normal", "special", "zeros", "repeated"):
        base = [sample(rng, n, kind) for n in (70_000, 2**18 + 3, 5000)]
        values = [base[0], base[1].astype(ml_dtypes.bfloat16), base[2].astype(np.float16)]
        arrays = [jnp.asarray(x) for x in values]
        as_f32 = [x.astype(jnp.float32) for x in arrays]
        total = sum(x.size for x in values)
        for k in (1, total // 3, total // 2, total - 1):
            got = _cpu.prune(arrays, [None] * 3, k, joint=True, simd=simd)
            want = _cpu.prune(as_f32, [None] * 3, k, joint=True, simd=simd)
            for g, w, r in zip(got, want, reference(values, [None] * 3, k, True)):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
                np.testing.assert_array_equal(np.asarray(g), r)


@pytest.mark.parametrize("simd", [True, False], ids=["avx512-if-any", "portable"])
def test_huge_tie_at_zero(simd):
    """After `remove`: the k-th key is 0, held by half the entries over several chunks; every count
    around the tie boundary, with and without candidate masks."""
    rng = np.random.default_rng(5)
    x = sample(rng, 3 * 2**18 + 5, "normal")
    x[rng.random(x.size) < 0.5] = 0.0
    zeros = int((x == 0).sum())
    for mask in (None, rng.random(x.size) < 0.7):
        for k in (1, 2, zeros // 3, zeros // 2, zeros // 2 + 1, zeros - 1, zeros, zeros + 1, x.size):
            m = None if mask is None else jnp.asarray(mask)
            (got,) = _cpu.prune([jnp.asarray(x)], [m], k, joint=True, simd=simd)
            np.testing.assert_array_equal(np.asarray(got), reference([x], [mask], k, True)[0])


def test_dtypes_it_takes():
    ok = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.uint32, jnp.bool_]
    assert _cpu.usable([jnp.zeros(3, t) for t in ok])
    for dtype in (jnp.int32, jnp.int8, jnp.uint16, jnp.float8_e4m3fn):
        assert not _cpu.usable([jnp.zeros(3, dtype)])


def test_switched_off_by_environment():
    """JPRUNE_NATIVE=0: the XLA path, silently (warnings are errors in this subprocess)."""
    code = "from jprune import _cpu; print(_cpu.available())"
    env = dict(os.environ, JPRUNE_NATIVE="0")
    cmd = [sys.executable, "-W", "error", "-c", code]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_refused_kernel_warns_once(monkeypatch):
    """A kernel that jax refuses to register: a RuntimeWarning with the reason, once, then XLA."""

    def refuse(*args, **kwargs):
        raise RuntimeError("INVALID_ARGUMENT: handler refused (test)")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    _cpu.available.cache_clear()
    try:
        with pytest.warns(
            RuntimeWarning, match=r"cannot be used: RuntimeError: .*handler refused.*3-6x slower"
        ):
            assert not _cpu.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _cpu.available()
            assert not _cpu.usable([jnp.zeros(3)])
    finally:
        monkeypatch.undo()
        _cpu.available.cache_clear()
    assert _cpu.available()


# Loads a given file as jprune._cpu_select, then prints whether the kernel is available and the
# warnings it gave, one per line.
LOAD_AS_KERNEL = """if True:
    import importlib.machinery, importlib.util, sys, warnings
    import jax.numpy as jnp, numpy as np
    path = sys.argv[1]

    class Finder:
        def find_spec(self, name, target=None, *args):
            if name == "jprune._cpu_select":
                loader = importlib.machinery.ExtensionFileLoader(name, path)
                return importlib.util.spec_from_file_location(name, path, loader=loader)

    sys.meta_path.insert(0, Finder())
    from jprune import _cpu
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = _cpu.available() and _cpu.available()  # twice: one warning at most
        if ok:
            (keep,) = _cpu.prune([np.array([3.0, -1.0, 2.0], np.float32)], [None], 1, joint=True)
            ok = np.asarray(keep).tolist() == [True, False, True]
    print(ok, float(jnp.sum(jnp.ones(3))))  # jax still works
    for w in caught:
        print(w.category.__name__, str(w.message).replace(chr(10), " "))
"""


def build_kernel(tmp_path, minor):
    """The kernel compiled (-O0) against a copy of jaxlib's FFI headers that says API version 0.minor."""
    include = tmp_path / f"include{minor}"
    shutil.copytree(jax.ffi.include_dir(), include)
    c_api = include / "xla" / "ffi" / "api" / "c_api.h"
    text, n = re.subn(
        r"#define XLA_FFI_API_MINOR \d+", f"#define XLA_FFI_API_MINOR {minor}", c_api.read_text()
    )
    assert n == 1
    c_api.write_text(text)
    out = tmp_path / f"kernel{minor}.so"
    source = os.path.join(os.path.dirname(_cpu.__file__), "_cpu_select.cc")
    python = sysconfig.get_paths()["include"]
    cmd = [
        "c++",
        "-std=c++17",
        "-O0",
        "-shared",
        "-fPIC",
        "-w",
        f"-I{include}",
        f"-I{python}",
        source,
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def load_as_kernel(path):
    out = subprocess.run([sys.executable, "-c", LOAD_AS_KERNEL, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_ffi_versions_the_running_jaxlib_accepts_or_refuses(tmp_path):
    """The kernel's handler reports its headers' XLA FFI version. One that is older than the running
    jaxlib's, within its support window, runs (an upgraded jaxlib keeps the kernel); a newer one, or
    one older than the window, is refused with one warning naming both versions, and jax still works."""
    major, minor = _cpu._runtime_ffi_version()
    if minor >= 2:
        assert load_as_kernel(build_kernel(tmp_path, minor - 1)) == ["True 3.0"]
    for bad, reason in [(minor + 1, "newer than the running jaxlib"), (0, "incompatible")]:
        lines = load_as_kernel(build_kernel(tmp_path, bad))
        assert lines[0] == "False 3.0" and len(lines) == 2, lines
        assert lines[1].startswith("RuntimeWarning") and reason in lines[1], lines[1]
        assert f"XLA FFI {major}.{bad}; running jaxlib" in lines[1], lines[1]


def test_broken_kernel_file_warns(tmp_path):
    """A kernel file that does not load (here: not an ELF file) warns once; jax still works."""
    path = tmp_path / "broken.so"
    path.write_bytes(b"not a shared library")
    lines = load_as_kernel(path)
    assert lines[0] == "False 3.0" and len(lines) == 2, lines
    assert lines[1].startswith("RuntimeWarning") and "it does not load" in lines[1], lines[1]


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


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux peak-RSS reset")
def test_huge_tie_gathers_nothing():
    """The zeros' bucket is not gathered: pruning 2**24 entries, half of them zeros, down into the
    zeros raises the peak memory by the mask it returns (16 MiB) and little more. (The gathering
    kernel took 8 bytes per bracketed zero: +100 MiB here.)"""
    code = """if True:
        import numpy as np, jax, jax.numpy as jnp
        from jprune import _cpu

        def rss(field):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

        n = 2**24
        fresh = jnp.asarray(np.random.default_rng(1).standard_normal(n, dtype=np.float32))
        x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
        x[::2] = 0.0
        x = jnp.asarray(x)
        out = jax.block_until_ready(_cpu.prune([fresh], [None], 3 * n // 10, joint=True))  # compiles
        del out
        before = rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from here
        (keep,) = jax.block_until_ready(_cpu.prune([x], [None], 3 * n // 10, joint=True))
        grown = rss("VmHWM") - before
        assert int(np.sum(~np.asarray(keep))) == 3 * n // 10
        print(grown)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown = int(out.stdout.split()[-1])
    assert grown < 2**24 + 2**23, f"peak memory grew by {grown / 2**20:.1f} MiB"


@pytest.mark.parametrize("fault", [1, 2], ids=["calling-thread", "pool-task"])
@pytest.mark.parametrize("joint", [True, False])
def test_cpp_exception_becomes_python_error(fault, joint):
    """A C++ exception (std::bad_alloc, injected by the test-only `fault` attribute) in the kernel,
    on its own thread or in an XLA pool task, is an error in Python, not a crash; the kernel works
    afterwards."""
    assert _cpu.available()  # registers the kernel
    rng = np.random.default_rng(6)
    values = [jnp.asarray(sample(rng, n, "zeros")) for n in (2**20, 2**18 + 3, 5000)]
    k = np.array([2**19] if joint else [2**17, 100, 2000], np.int32)
    with pytest.raises(jax.errors.JaxRuntimeError, match="out of memory"):
        jax.block_until_ready(_cpu._call(k, values, [], joint=joint, masked=(), fault=fault))
    got = _cpu.prune(values, [None] * 3, k.tolist() if not joint else int(k[0]), joint=joint)
    want = reference(
        [np.asarray(v) for v in values], [None] * 3, k.tolist() if not joint else int(k[0]), joint
    )
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)
