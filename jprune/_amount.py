"""Pruning amounts: torch's validation and its count rule, on the host and inside jit.

An ``amount`` is an integer count or a fraction in ``[0, 1]``. Integer versus fraction is decided by
*type* (``1`` prunes one unit, ``1.0`` prunes everything), exactly as in ``torch.nn.utils.prune``.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp


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
        raise ValueError(f"amount={k} should be smaller than the number of parameters to prune={n}")
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


# Multi-word unsigned integers: little-endian lists of uint32 scalars; shifts are traced int32.
_U = jnp.uint32


def _shl32(x, b):
    return jnp.where(b >= 32, _U(0), x << jnp.minimum(b, 31).astype(_U))


def _shr32(x, b):
    return jnp.where(b >= 32, _U(0), x >> jnp.minimum(b, 31).astype(_U))


def _shr(words, sh):
    """``words >> sh`` (same number of words)."""
    padded = jnp.stack([*words, *[_U(0)] * (len(words) + 1)])
    w, b = sh // 32, sh % 32
    out = []
    for i in range(len(words)):
        lo = padded[jnp.minimum(i + w, 2 * len(words))]
        hi = padded[jnp.minimum(i + w + 1, 2 * len(words))]
        out.append(_shr32(lo, b) | jnp.where(b == 0, _U(0), _shl32(hi, 32 - b)))
    return out


def _any_below(words, nbits):
    """True if any bit below position ``nbits`` is set."""
    found = jnp.bool_(False)
    for j, x in enumerate(words):
        low = jnp.clip(nbits - 32 * j, 0, 32)
        found |= (x & jnp.where(low >= 32, _U(0xFFFFFFFF), _shl32(_U(1), low) - 1)) != 0
    return found


def _round_shift(words, sh):
    """``words / 2**sh`` rounded half to even (``sh >= 0``)."""
    s1 = jnp.maximum(sh, 1)
    q2 = _shr(words, s1 - 1)
    half = (q2[0] & 1) == 1
    q = _shr(q2, 1)
    up = half & (_any_below(words, s1 - 1) | ((q[0] & 1) == 1))
    out, carry = [], up.astype(_U)
    for x in q:
        y = x + carry
        carry = (y < x).astype(_U)
        out.append(y)
    return [jnp.where(sh == 0, x, y) for x, y in zip(words, out)]


def _bitlen(x):
    return 32 - jax.lax.clz(x).astype(jnp.int32)


def _fraction_words(a):
    """A traced fraction as words ``(m_hi, m_lo, s)``: ``a == (m_hi * 2**32 + m_lo) / 2**s``."""
    a = jnp.clip(jnp.asarray(a).astype(jnp.float32), 0.0, 1.0)
    a = jnp.where(jnp.isnan(a), 0.0, a)  # a NaN fraction prunes nothing
    bits = jax.lax.bitcast_convert_type(a, _U)
    exp = ((bits >> 23) & 0xFF).astype(jnp.int32)
    m = jnp.where(exp == 0, bits & 0x7FFFFF, (bits & 0x7FFFFF) | 0x800000)
    return _U(0), m, 150 - jnp.maximum(exp, 1)


def count_traced(amount, n):
    """``count`` inside jit, for a traced candidate count ``n`` (int32).

    ``amount`` is an integer scalar (a count), a floating scalar (a fraction, used at float32), or
    the exact words ``(m_hi, m_lo, s)`` of a double fraction from ``as_device_amount``. A fraction
    gives ``round(a * n)`` exactly as Python does it for a double ``a``: the product rounded to a
    double, then half to even, emulated in integer arithmetic. Counts are clipped to ``[0, n]``:
    errors cannot be raised under jit.
    """
    n = jnp.asarray(n, jnp.int32)
    if not isinstance(amount, tuple):
        amount = jnp.asarray(amount)
        if not jnp.issubdtype(amount.dtype, jnp.floating):
            return jnp.clip(amount.astype(jnp.int32), 0, n)
        amount = _fraction_words(amount)
    m_hi, m_lo, s = (jnp.asarray(x) for x in amount)
    a_hi, a_lo = _mul_u32(m_lo.astype(_U), n.astype(_U))
    b_hi, b_lo = _mul_u32(m_hi.astype(_U), n.astype(_U))
    p1 = a_hi + b_lo
    p = [a_lo, p1, b_hi + (p1 < a_hi).astype(_U)]  # m * n, below 2**85
    length = jnp.where(p[2] > 0, 64 + _bitlen(p[2]), jnp.where(p[1] > 0, 32 + _bitlen(p[1]), _bitlen(p[0])))
    r = jnp.maximum(length - 53, 0)
    q = _round_shift(p, r)  # the product as a double: 53 significant bits, times 2**(r - s)
    k = _round_shift(q, jnp.clip(s - r, 0, 95))[0]
    k = jnp.where(s - r > 95, _U(0), k)
    return jnp.clip(k.astype(jnp.int32), 0, n)


def as_device_amount(amount):
    """A concrete amount as device scalars that `count_traced` reads exactly (no recompiles)."""
    if isinstance(amount, numbers.Integral):
        return jnp.asarray(int(amount), jnp.int32)
    a = float(amount)
    if not 0.0 < a <= 1.0:  # 0 (and NaN, which `validate`/`count` reject on the host) prune nothing
        return _U(0), _U(0), jnp.int32(0)
    f, e = math.frexp(a)
    m = int(f * 2**53)
    return _U(m >> 32), _U(m & 0xFFFFFFFF), jnp.int32(53 - e)
