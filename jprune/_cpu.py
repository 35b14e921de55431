"""Exact selection on CPU by a native kernel: ``jprune/_cpu_select.cc``, an XLA FFI custom call.

It gives ``_select``'s answer (the k smallest keys, ties by flat index) for float32, bfloat16 and
float16 scores (the float32 key of ``|x|``, so mixed float dtypes rank on one scale) and uint32 keys,
with optional candidate masks, in two or three passes over the data instead of XLA's scatter-add
passes. It is used on the CPU backend when the extension was built (pip builds it where a C++17
compiler is found) and the arrays live on one device; everything else takes the XLA path.
``JPRUNE_NATIVE=0`` turns it off. A kernel that was built but that the running jaxlib refuses (its
XLA FFI version, a broken build) is reported once by a ``RuntimeWarning``, then the XLA path is used.

Under a trace (``jit``, ``vmap``, ``grad``) the kernel is a primitive that carries the XLA path's
program too (``fallback``), and each lowering picks: the kernel when compiling for this process's
CPU, the XLA path when lowering for ``jax.export`` (a custom call is not a stable, portable
operation: the exported program must run where jprune is not installed) or for another platform.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

try:
    from . import _cpu_select

    _import_error = None
except ModuleNotFoundError as e:  # not built (no compiler): the XLA path does everything, quietly
    _cpu_select = None
    _import_error = None if e.name == f"{__package__}._cpu_select" else e
except ImportError as e:  # built, but this Python or jaxlib refuses it: said once by available()
    _cpu_select = None
    _import_error = e

_TARGET = "jprune_select"
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.uint32, jnp.bool_)


@partial(jax.jit, static_argnames=("joint", "masked", "simd", "fault"))
def _call(k, values, masks, *, joint, masked, simd=True, fault=0):
    out = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.bool_) for x in values]
    select = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")
    values = jax.lax.stop_gradient(values)  # masks are constants to autodiff, as on the XLA path
    masked = np.asarray(masked, np.int64)
    return select(k, *values, *masks, joint=joint, masked=masked, simd=simd, fault=fault)


def _runtime_ffi_version() -> tuple[int, int] | None:
    """The XLA FFI API version of the running jaxlib, from the headers it ships (None if unknown)."""
    try:
        with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as f:
            text = f.read()
        major, minor = (
            int(re.search(rf"#define XLA_FFI_API_{w} (\d+)", text).group(1)) for w in ("MAJOR", "MINOR")
        )
        return major, minor
    except (OSError, AttributeError):
        return None


def _version(v) -> str:
    return "unknown" if v is None else ".".join(map(str, v))


def _refused(why: str) -> None:
    import jaxlib.version

    built = "?"
    if _cpu_select is not None:
        built = f"jaxlib {_cpu_select.jaxlib_version}, XLA FFI {_version(_cpu_select.ffi_api_version)}"
    running = f"jaxlib {jaxlib.version.__version__}, XLA FFI {_version(_runtime_ffi_version())}"
    warnings.warn(
        f"jprune's native CPU selection kernel was built but cannot be used: {why} (built with {built}; "
        f"running {running}). Pruning on CPU "
        "falls back to the XLA path, 3-6x slower. Rebuild the kernel against the installed jaxlib "
        "(`pip install -e .` or `make`), or set JPRUNE_NATIVE=0 to use the XLA path without this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


@functools.cache
def available() -> bool:
    """Whether the kernel is built, registered, and answers a probe.

    A kernel that exists but cannot be used (it does not load, the running jaxlib refuses its FFI
    version, the probe fails or answers wrongly) warns once, with the reason. Not built, or
    ``JPRUNE_NATIVE=0``: False, silently.
    """
    if os.environ.get("JPRUNE_NATIVE", "1") == "0":
        return False
    if _cpu_select is None:
        if _import_error is not None:
            _refused(f"it does not load ({_import_error})")
        return False
    built, running = tuple(_cpu_select.ffi_api_version), _runtime_ffi_version()
    if running is not None and (built[0] != running[0] or built[1] > running[1]):
        _refused("its XLA FFI headers are newer than the running jaxlib's, which refuses such a handler")
        return False
    try:
        # The CPU client first: a handler registered before it exists is only checked when the
        # client starts, and a refused one then fails the start of the whole CPU backend.
        jax.devices("cpu")
        jax.ffi.register_ffi_target(_TARGET, _cpu_select.select, platform="cpu")
        with jax.ensure_compile_time_eval():
            x = np.array([2.0, -1.0], np.float32)
            (keep,) = _call(np.array([1], np.int32), [x], [], joint=True, masked=())
            answer = np.asarray(keep).tolist()
    except Exception as e:  # noqa: BLE001 - whatever the failure, XLA selects instead
        _refused(f"{type(e).__name__}: {e}".strip())
        return False
    if answer != [True, False]:
        _refused(f"its probe answered {answer} instead of [True, False]")
        return False
    return True


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


def prune(values, masks, k, *, joint: bool, simd: bool = True, fallback=None):
    """Keep masks: the ``k`` smallest keys of each value (or of all of them, ``joint``) pruned.

    Args:
      values: float32, bfloat16 or float16 arrays (keys: the float32 bits of ``|x|``, NaN above inf)
        or uint32 keys below 2**31.
      masks: one bool mask of candidates per value, or None (every entry is one).
      k: an int32 count (``joint``) or one per value; traced or not, at most the candidates.
      simd: use the kernel's AVX-512 code where the CPU has it (the masks are the same either way).
      fallback: a function of no arguments that returns the same masks by the XLA path (traceable:
        no host syncs). Under a trace it is traced too, and it is what a program exported with
        ``jax.export`` (or lowered for another platform) contains instead of the kernel. Without it
        the kernel's custom call is always emitted.
    """
    if not available():
        raise RuntimeError("jprune's CPU kernel is not available (not built, or JPRUNE_NATIVE=0)")
    if not values:
        return []
    masked = tuple(i for i, m in enumerate(masks) if m is not None)
    k = jnp.asarray(k, jnp.int32).reshape(-1)  # one per group: (1,) if joint
    present = [masks[i] for i in masked]
    if fallback is None or not _tracing(k, *values, *present):  # runs now, on this CPU
        return list(_call(k, list(values), present, joint=joint, masked=masked, simd=simd))
    program = jax.make_jaxpr(lambda: list(fallback()))()  # its closure: the program's consts
    values = jax.lax.stop_gradient(list(values))
    return _select_p.bind(
        k,
        *values,
        *present,
        *program.consts,
        n_values=len(values),
        joint=joint,
        masked=masked,
        simd=simd,
        fallback=program.jaxpr,
    )


def _tracing(*args) -> bool:
    """Whether this call is being traced (jit, vmap, grad, export...) rather than run now."""
    if any(isinstance(a, jax.core.Tracer) for a in args):
        return True
    try:  # also under jit when every input is a constant (closed over by the jitted function)
        from jax._src import core

        return not isinstance(core.trace_ctx.trace, core.EvalTrace)
    except (ImportError, AttributeError):  # another jax: assume a trace (right answers either way)
        return True


# The traced form: operands (k, *values, *present masks, *fallback consts) -> one bool mask per value.
_select_p = Primitive("jprune_select")
_select_p.multiple_results = True


def _split(ops, n_values, masked):
    n = 1 + n_values + len(masked)
    return ops[0], list(ops[1 : 1 + n_values]), list(ops[1 + n_values : n]), list(ops[n:])


@_select_p.def_impl
def _impl(*ops, n_values, joint, masked, simd, fallback):
    k, values, present, _ = _split(ops, n_values, masked)
    return list(_call(k, values, present, joint=joint, masked=masked, simd=simd))


@_select_p.def_abstract_eval
def _abstract_eval(*avals, n_values, **_):
    return [jax.core.ShapedArray(a.shape, jnp.bool_) for a in avals[1 : 1 + n_values]]


def _jvp(primals, tangents, **params):
    out = _select_p.bind(*primals, **params)
    return out, [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in out]  # bool: float0 tangents


def _batch(args, dims, **params):
    """vmap: one kernel call per batch element (``lax.map``), as ``ffi_call``'s "sequential"."""
    mapped = [i for i, d in enumerate(dims) if d is not None]  # None: not mapped

    def one(xs):
        ops = list(args)
        for i, x in zip(mapped, xs):
            ops[i] = x
        return _select_p.bind(*ops, **params)

    xs = [jnp.moveaxis(args[i], dims[i], 0) for i in mapped]
    out = jax.lax.map(one, xs)
    return out, [0] * len(out)


def _lower_fallback(ctx, *ops, n_values, joint, masked, simd, fallback):
    """The XLA path's program, from the traced ``fallback``: for export and other platforms."""
    if fallback is None:
        raise NotImplementedError("jprune's CPU kernel was traced without an XLA fallback")
    n = 1 + n_values + len(masked)
    from jax._src import core

    def run(*consts):
        return core.eval_jaxpr(fallback, consts)

    return mlir.lower_fun(run, multiple_results=True)(ctx.replace(avals_in=ctx.avals_in[n:]), *ops[n:])


def _lower_cpu(ctx, *ops, n_values, joint, masked, simd, fallback):
    """The kernel's custom call when compiling to run here; the XLA path when exporting."""
    params = dict(n_values=n_values, joint=joint, masked=masked, simd=simd, fallback=fallback)
    if ctx.module_context.lowering_parameters.for_export:
        return _lower_fallback(ctx, *ops, **params)
    n = 1 + n_values + len(masked)
    rule = jax.ffi.ffi_lowering(_TARGET)
    attrs = dict(joint=joint, masked=np.asarray(masked, np.int64), simd=simd, fault=0)
    return rule(ctx.replace(avals_in=ctx.avals_in[:n]), *ops[:n], **attrs)


ad.primitive_jvps[_select_p] = _jvp
batching.primitive_batchers[_select_p] = _batch
mlir.register_lowering(_select_p, _lower_fallback)
mlir.register_lowering(_select_p, _lower_cpu, platform="cpu")
