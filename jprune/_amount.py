"""Pruning amounts: torch's validation and its count rule, on the host and inside jit.

An ``amount`` is an integer count or a fraction in ``[0, 1]``. Integer versus fraction is decided by
*type* (``1`` prunes one unit, ``1.0`` prunes everything), exactly as in ``torch.nn.utils.prune``.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(amount) -> bool:
    """True for a JAX array amount (traced under jit, or concrete): it is counted on the device."""
    return isinstance(amount, jax.Array)


def validate(amount) -> None:
    """Check ``amount`` as torch does when a pruning method is constructed.

    Raises:
      TypeError: ``amount`` is not a real number (or is a ``bool``, which torch cannot use either).
      ValueError: a negative integer, or a fraction outside ``[0, 1]``.
    """
    if is_traced(amount):
        if jnp.ndim(amount) != 0:
            raise TypeError(f"A traced amount must be a scalar, got shape {jnp.shape(amount)}.")
        return
    # torch accepts bool here and then fails inside topk/kthvalue; refusing it early is clearer.
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"Invalid type for amount: {amount}. Must be int or float.")
    if (isinstance(amount, numbers.Integral) and amount < 0) or (
        not isinstance(amount, numbers.Integral) and (float(amount) > 1.0 or float(amount) < 0.0)
    ):
        raise ValueError(
            f"amount={amount} should either be a float in the range [0, 1] or a non-negative integer"
        )


def count(amount, n: int) -> int:
    """Number of units to prune out of ``n`` candidates, torch's rule (host Python).

    An integer is a count; a fraction gives ``round(amount * n)`` exactly as torch computes it:
    Python's banker's rounding of the product in the amount's own arithmetic (a double for a
    float, so 0.07 * 150 -> 11; float32 for ``np.float32``; exact for a ``Fraction``).

    Raises:
      ValueError: the count exceeds ``n``, or the amount is NaN.

    Examples:
      >>> count(0.5, 5), count(0.07, 150), count(3, 10)
      (2, 11, 3)
    """
    if isinstance(amount, numbers.Integral):
        k = int(amount)
    else:
        k = int(round(amount * n))  # ValueError("cannot convert float NaN to integer") for NaN
    if k > n:
        raise ValueError(
            f"amount={k} should be smaller than the number of parameters to prune={n}"
        )
    return k


def _mul_u32(a, b):
    """Exact 32x32 -> 64-bit unsigned product as (hi, lo) uint32 words."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    lo = (p00 & 0xFFFF) | (mid << 16)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi, lo


def _shr64(hi, lo, s):
    """(hi:lo) >> s for 0 < s < 64, as one uint32 (the caller knows the result fits)."""
    s = s.astype(jnp.uint32)
    small = (hi << (32 - jnp.minimum(s, 31))) | (lo >> jnp.minimum(s, 31))
    big = hi >> (jnp.maximum(s, 32) - 32)
    return jnp.where(s < 32, jnp.where(s == 0, lo, small), big)


def count_traced(amount, n):
    """``count`` inside jit: ``amount`` a traced scalar, ``n`` a traced int32 candidate count.

    An integer-dtype amount is a count; a floating amount is a fraction whose float32 value ``a``
    gives ``k = round_half_even(a * n)`` computed *exactly* in integer arithmetic (float32 cannot hold
    ``a * n`` for large ``n``). Counts are clipped to ``[0, n]``: errors cannot be raised under jit.
    """
    n = jnp.asarray(n, jnp.int32)
    amount = jnp.asarray(amount)
    if jnp.issubdtype(amount.dtype, jnp.integer) or amount.dtype == jnp.bool_:
        return jnp.clip(amount.astype(jnp.int32), 0, n)
    a = jnp.clip(amount.astype(jnp.float32), 0.0, 1.0)
    a = jnp.where(jnp.isnan(a), 0.0, a)  # a NaN fraction prunes nothing
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    exp = (bits >> 23) & 0xFF
    m = jnp.where(exp == 0, bits & 0x7FFFFF, (bits & 0x7FFFFF) | 0x800000)
    shift = 150 - jnp.maximum(exp, 1).astype(jnp.int32)  # a == m * 2**-shift, shift >= 23
    hi, lo = _mul_u32(m, n.astype(jnp.uint32))  # m * n < 2**55
    s = jnp.clip(shift, 1, 63)
    q = _shr64(hi, lo, s)  # floor(a * n)
    # Round half to even: compare the s bits below the binary point with half = 1 << (s - 1).
    low_lo = jnp.where(s >= 32, lo, lo & ((jnp.uint32(1) << s.astype(jnp.uint32)) - 1))
    low_hi = jnp.where(s > 32, hi & ((jnp.uint32(1) << (s - 32).astype(jnp.uint32)) - 1), 0)
    half_lo = jnp.where(s - 1 >= 32, 0, jnp.uint32(1) << jnp.minimum(s - 1, 31).astype(jnp.uint32))
    half_hi = jnp.where(s - 1 >= 32, jnp.uint32(1) << jnp.maximum(s - 33, 0).astype(jnp.uint32), 0)
    gt = (low_hi > half_hi) | ((low_hi == half_hi) & (low_lo > half_lo))
    eq = (low_hi == half_hi) & (low_lo == half_lo)
    k = q + (gt | (eq & ((q & 1) == 1))).astype(jnp.uint32)
    k = jnp.where(shift > 63, 0, k).astype(jnp.int32)  # a * n < 2**55 * 2**-64 < 1/2
    return jnp.clip(k, 0, n)


def as_device_amount(amount):
    """A concrete Python/NumPy amount as a jax scalar that `count_traced` reads the same way."""
    if isinstance(amount, numbers.Integral):
        return jnp.asarray(int(amount), jnp.int32)
    return jnp.asarray(np.float32(amount))
