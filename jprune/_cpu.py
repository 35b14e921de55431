"""Exact selection on CPU by a native kernel: ``jprune/_cpu_select.cc``, an XLA FFI custom call.

It gives ``_select``'s answer (the k smallest keys, ties by flat index) for float32 scores (keys of
``|x|``) and uint32 keys, with optional candidate masks, in two passes over the data instead of
three XLA scatter-add passes. It is used on the CPU backend when the extension was built (pip
builds it where a C++17 compiler is found) and the arrays live on one device; everything else,
sharded params and other dtypes included, takes the XLA path. ``JPRUNE_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

try:
    from . import _cpu_select
except ImportError:  # built without a compiler: the XLA path does everything
    _cpu_select = None

_TARGET = "jprune_select"
_DTYPES = (jnp.float32, jnp.uint32, jnp.bool_)


@partial(jax.jit, static_argnames=("joint", "masked", "simd"))
def _call(k, values, masks, *, joint, masked, simd=True):
    out = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.bool_) for x in values]
    select = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")
    values = jax.lax.stop_gradient(values)  # masks are constants to autodiff, as on the XLA path
    return select(k, *values, *masks, joint=joint, masked=np.asarray(masked, np.int64), simd=simd)


@functools.cache
def available() -> bool:
    """Whether the kernel is built, registered, and answers a probe (a kernel built against other
    FFI headers than the running jaxlib's would be refused at its first call, not at import)."""
    if _cpu_select is None or os.environ.get("JPRUNE_NATIVE", "1") == "0":
        return False
    try:
        jax.ffi.register_ffi_target(_TARGET, _cpu_select.select, platform="cpu")
        with jax.ensure_compile_time_eval():
            x = np.array([2.0, -1.0], np.float32)
            (keep,) = _call(np.array([1], np.int32), [x], [], joint=True, masked=())
            return np.asarray(keep).tolist() == [True, False]
    except Exception:  # noqa: BLE001 - any failure means: use XLA
        return False


def usable(arrays) -> bool:
    """Whether the kernel can take these arrays: supported dtypes on one CPU device."""
    if jax.default_backend() != "cpu" or not available():
        return False
    for a in arrays:
        if a.dtype not in _DTYPES:
            return False
        if isinstance(a, jax.core.Tracer):  # sharding unknown under jit: one device only
            if jax.device_count() != 1:
                return False
        elif hasattr(a, "sharding") and len(a.sharding.device_set) != 1:
            return False
    return True


def prune(values, masks, k, *, joint: bool, simd: bool = True):
    """Keep masks: the ``k`` smallest keys of each value (or of all of them, ``joint``) pruned.

    Args:
      values: float32 arrays (keys of ``|x|``) or uint32 keys below 2**31.
      masks: one bool mask of candidates per value, or None (every entry is one).
      k: an int32 count (``joint``) or one per value; traced or not, at most the candidates.
      simd: use the kernel's AVX-512 code where the CPU has it (the masks are the same either way).
    """
    if not available():
        raise RuntimeError("jprune's CPU kernel is not available (not built, or JPRUNE_NATIVE=0)")
    if not values:
        return []
    masked = tuple(i for i, m in enumerate(masks) if m is not None)
    k = jnp.asarray(k, jnp.int32).reshape(-1)  # one per group: (1,) if joint
    args = (k, list(values), [masks[i] for i in masked])
    return list(_call(*args, joint=joint, masked=masked, simd=simd))
