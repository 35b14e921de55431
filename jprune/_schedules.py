"""Sparsity schedules: any ``optax.Schedule`` (step -> sparsity), and two named recipes over optax's.

A schedule only says *how much*; *when* the masks change is :func:`jprune.update_masks`'s
``frequency``, given once, there.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import optax

__all__ = ["polynomial_sparsity", "one_shot_sparsity", "as_schedule"]


def check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
    return float(value)


def check_step(name: str, value: Any, minimum: int = 0) -> int:
    """A step count or frequency: an integer (not a float such as 2.5 or inf), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def as_schedule(schedule: Any) -> optax.Schedule:
    """A schedule as given (any callable ``step -> sparsity``), or a fraction as a constant one.

    Raises:
      TypeError, ValueError: a number that is not a fraction in [0, 1].
    """
    if callable(schedule):
        return schedule
    return optax.constant_schedule(check_fraction("schedule (a constant sparsity)", schedule))


def polynomial_sparsity(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
) -> optax.Schedule:
    """Zhu & Gupta's gradual pruning schedule (arXiv:1710.01878), ``optax.polynomial_schedule``.

    ``s(t) = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** power`` with ``t`` clipped to
    ``[t_0, t_end]``: ``initial_sparsity`` up to ``begin_step``, fast then slow, and exactly
    ``final_sparsity`` from ``end_step`` on. Zhu & Gupta's Δt (prune every ``frequency`` steps) is
    :func:`jprune.update_masks`'s ``frequency``.

    Args:
      final_sparsity: the sparsity reached at ``end_step``, in [0, 1].
      begin_step: the first pruning step.
      end_step: the step at which ``final_sparsity`` is reached; greater than ``begin_step``.
      initial_sparsity: the sparsity at ``begin_step``, in [0, final_sparsity].
      power: the exponent, 3 in the paper; > 0.

    Returns:
      An ``optax.Schedule``: ``step -> sparsity`` (a float32 scalar, traced when ``step`` is).

    Raises:
      ValueError: on a sparsity outside [0, 1], ``initial_sparsity > final_sparsity``,
        ``end_step <= begin_step``, a negative ``begin_step``, or a ``power`` that is not a finite
        number > 0.
      TypeError: steps that are not integers (``2.5``, ``inf``), or a sparsity that is not a real
        number.

    Examples:
      >>> import jprune as jp
      >>> s = jp.polynomial_sparsity(0.9, begin_step=0, end_step=100)
      >>> [round(float(s(t)), 4) for t in (0, 10, 50, 100, 500)]
      [0.0, 0.2439, 0.7875, 0.9, 0.9]
    """
    final_sparsity = check_fraction("final_sparsity", final_sparsity)
    initial_sparsity = check_fraction("initial_sparsity", initial_sparsity)
    if initial_sparsity > final_sparsity:
        raise ValueError(
            f"initial_sparsity must be <= final_sparsity, got {initial_sparsity} > {final_sparsity}"
        )
    begin_step, end_step = check_step("begin_step", begin_step), check_step("end_step", end_step)
    if end_step <= begin_step:
        raise ValueError(
            f"expected 0 <= begin_step < end_step, got begin_step={begin_step}, end_step={end_step}"
        )
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not 0 < power < math.inf:
        raise ValueError(f"power must be a finite number > 0, got {power!r}")
    return optax.polynomial_schedule(
        init_value=initial_sparsity,
        end_value=final_sparsity,
        power=float(power),
        transition_steps=end_step - begin_step,
        transition_begin=begin_step,
    )


def one_shot_sparsity(sparsity: float, step: int) -> optax.Schedule:
    """0 before ``step``, ``sparsity`` from ``step`` on (``optax.join_schedules`` of two constants).

    Args:
      sparsity: the target fraction of pruned weights, in [0, 1].
      step: the step at which to prune.

    Returns:
      An ``optax.Schedule``: ``step -> sparsity``.

    Raises:
      ValueError: if ``sparsity`` is not in [0, 1] (NaN included) or ``step`` is negative.
      TypeError: if ``sparsity`` is not a real number or ``step`` not an integer.

    Examples:
      >>> import jprune as jp
      >>> s = jp.one_shot_sparsity(0.75, step=100)
      >>> float(s(99)), float(s(100))
      (0.0, 0.75)
    """
    sparsity = check_fraction("sparsity", sparsity)
    step = check_step("step", step)
    return optax.join_schedules([optax.constant_schedule(0.0), optax.constant_schedule(sparsity)], [step])
