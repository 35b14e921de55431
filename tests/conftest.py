"""Shared helpers for the core tests: tie-free inputs and a real-torch reference runner.

Every parity test builds the same arrays in torch and in JAX, runs ``torch.nn.utils.prune`` on a
plain ``nn.Module`` holding them as Parameters (the module API, so torch's own PruningContainer
does the iterative bookkeeping) and compares the masks. Torch is computed in the test, never copied.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jprune as jp
from jprune.testing import compare_masks, torch_reference

# Each transform runs jitted and not jitted: wrap a lambda that closes over the static arguments.
JITS = [pytest.param(jax.jit, id="jit"), pytest.param(lambda f: f, id="eager")]


class NearTie(Exception):
    """Two candidate scores at the pruning boundary are too close for float32 norms to order alike."""


# --------------------------------------------------------------------------------------------------
# Inputs


def tie_free(rng, shapes, dtype=np.float32, scale=1.0):
    """Arrays of the given shapes whose |values| are all distinct, also across arrays.

    ``|x| = perm + u`` with a permutation of ``0..N-1`` and ``u`` in ``[0.1, 0.9]``: distinct integer
    parts, so no two entries tie even after float32 rounding; random signs.
    """
    single = isinstance(shapes[0], numbers.Integral) if len(shapes) else False
    shapes = [tuple(shapes)] if single else [tuple(s) for s in shapes]
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    mag = (rng.permutation(total) + rng.uniform(0.1, 0.9, total)) * (scale / max(total, 1))
    sign = rng.choice([-1.0, 1.0], total)
    flat = (mag * sign).astype(dtype)
    out, off = [], 0
    for s, n in zip(shapes, sizes):
        out.append(flat[off : off + n].reshape(s))
        off += n
    return out[0] if single else out


def tie_free_channels(rng, shape, axis, dtype=np.float32):
    """A tie-free array whose channels along ``axis`` have well separated norms (for any p).

    Channel ``c`` is scaled by a distinct factor in ``{1, 2, ..., C}`` (shuffled), so any norm of one
    channel differs from the others' by far more than float32 summation error.
    """
    x = np.abs(tie_free(rng, shape, dtype=np.float64))
    x = 0.5 + x / (x.max() + 1.0)  # |x| in [0.5, 1.5): each channel's norm is within a factor of 3
    c = shape[axis]
    factors = 4.0 ** rng.permutation(c)
    view = [1] * len(shape)
    view[axis] = c
    x = x * factors.reshape(view) * rng.choice([-1.0, 1.0], x.shape)
    return x.astype(dtype)


# --------------------------------------------------------------------------------------------------
# torch side


def torch_module(arrays: dict) -> torch.nn.Module:
    """A bare module with each array as a float Parameter named by its key."""
    mod = torch.nn.Module()
    for name, a in arrays.items():
        setattr(mod, name, torch.nn.Parameter(torch.tensor(np.array(a))))
    return mod


def torch_mask(mod, name):
    """The bool mask torch holds for ``name`` (False = pruned), or None if never pruned."""
    buf = getattr(mod, name + "_mask", None)
    return None if buf is None else (buf != 0).numpy().copy()


def _count(amount, n):
    return int(amount) if isinstance(amount, numbers.Integral) else round(amount * n)


def check_ln_boundary(t, mask, amount, n, dim, rel=1e-4):
    """Raise NearTie if the channel norms at the pruning boundary are within ``rel``.

    Computed in float64 on the effective weights ``t`` (scores) over the remaining channels only
    (``mask``, None for all), before the step.
    """
    t = np.asarray(t, np.float64)
    ndim = t.ndim
    if ndim < 2 or not -ndim <= dim < ndim:
        return
    d = dim % ndim
    others = tuple(i for i in range(ndim) if i != d)
    live = np.ones(t.shape[d], bool) if mask is None else np.asarray(mask).any(axis=others)
    tt = torch.from_numpy(t)
    p = 2 if n == "fro" else n
    if n == "nuc":
        norms = torch.linalg.matrix_norm(tt.movedim(d, 0), ord="nuc").numpy()
    else:
        norms = torch.linalg.vector_norm(tt, ord=p, dim=others).numpy()
    norms = np.sort(norms[live])
    k = _count(amount, len(norms))
    if 0 < k < len(norms):
        lo, hi = norms[k - 1], norms[k]
        if not hi - lo > rel * max(abs(hi), 1e-30):
            raise NearTie(f"norms {lo} and {hi} at the boundary k={k}")


def torch_steps(steps, names, keys):
    """run_both's steps as jprune.testing.torch_reference calls (``keys``: all the arrays')."""
    out = []
    for kind, *args in steps:
        if kind == "l1":
            out.append(("l1_unstructured", args[0]))
        elif kind == "ln":
            amount, n, dim = args
            out.append(("ln_structured", amount, {"n": n, "axis": dim}))
        elif kind == "global":
            out.append(("global_unstructured", args[0]))
        elif kind == "identity":
            out.append(("identity", None))
        elif kind == "custom":
            (mask,) = args
            out.append(
                ("custom_from_mask", None, {"mask": {k: mask[k] if k in names else None for k in keys}})
            )
        else:  # pragma: no cover
            raise ValueError(kind)
    return out


# --------------------------------------------------------------------------------------------------
# JAX side


def jax_step(params, masks, names, step, wrap=lambda f: f):
    """Apply one step to the JAX params; returns the new masks dict."""
    kind, *args = step
    sel = list(names)
    if kind == "l1":
        (amount,) = args
        f = lambda p, m: jp.l1_unstructured(p, amount, masks=m, select=sel)  # noqa: E731
    elif kind == "ln":
        amount, n, dim = args
        f = lambda p, m: jp.ln_structured(p, amount, n, dim, masks=m, select=sel)  # noqa: E731
    elif kind == "global":
        (amount,) = args
        f = lambda p, m: jp.global_unstructured(p, amount, masks=m, select=sel)  # noqa: E731
    elif kind == "identity":

        def f(p, m):
            new = jp.identity(p, select=sel)
            return {
                k: (m or {}).get(k)
                if new[k] is None
                else (new[k] if (m or {}).get(k) is None else new[k] & m[k])
                for k in p
            }
    elif kind == "custom":
        (mask,) = args
        given = {k: (jnp.asarray(mask[k]) if k in names else None) for k in params}
        f = lambda p, m: jp.custom_from_mask(p, given, masks=m)  # noqa: E731
    else:  # pragma: no cover
        raise ValueError(kind)
    return wrap(f)(params, masks)


def to_np(masks):
    return {k: None if m is None else np.asarray(m) for k, m in masks.items()}


def run_both(arrays: dict, steps, names=None, wrap=lambda f: f):
    """Run the same pruning steps in torch and jprune; return (torch masks, jprune masks) as numpy.

    Steps: ``("l1", amount)``, ``("ln", amount, n, dim)``, ``("global", amount)``,
    ``("identity",)``, ``("custom", {name: 0/1 array})``, each applied to every name in ``names``
    (default: all). ``dim`` is used as the JAX ``axis`` (same layout). torch runs the same arrays
    (as JAX holds them) through ``jprune.testing.torch_reference``. Raises NearTie when a
    structured step would be decided by a float32-rounding-level difference in norms.
    """
    names = list(arrays) if names is None else list(names)
    params = {k: jnp.asarray(v) for k, v in arrays.items()}
    masks = None
    for step in steps:
        if step[0] == "ln":
            for nm in names:
                m = None if masks is None else masks.get(nm)
                eff = (
                    np.asarray(params[nm])
                    if m is None
                    else np.where(np.asarray(m), np.asarray(params[nm]), 0)
                )
                check_ln_boundary(eff, m, step[1], step[2], step[3])
        masks = jax_step(params, masks, names, step, wrap)
    full = {k: None for k in arrays}
    tmasks = torch_reference(params, torch_steps(steps, names, list(arrays)), select=names)
    return to_np({**full, **tmasks}), to_np(masks)


def assert_same_masks(tmasks: dict, jmasks: dict):
    assert set(tmasks) == set(jmasks)
    for k in tmasks:
        t, j = tmasks[k], jmasks[k]
        if t is None:
            assert j is None, k
            continue
        assert j is not None, k
        assert j.dtype == np.bool_, (k, j.dtype)
    report = compare_masks(tmasks, jmasks)
    assert report.equal, f"masks differ from torch's:\n{report}"


def pruned_count(m) -> int:
    return int(np.size(m) - np.asarray(m).sum())
