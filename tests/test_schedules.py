"""Sparsity schedules (jprune/_schedules.py) and update_masks' frequency, given once."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jprune as jp


def _zhu_gupta(t, s_i, s_f, t0, t1, power=3):
    """The paper's formula (arXiv:1710.01878, eq. 1), in float64."""
    t = min(max(t, t0), t1)
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power


def test_polynomial_matches_zhu_gupta_formula():
    s = jp.polynomial_sparsity(0.9, 100, 1100, initial_sparsity=0.1)
    for t in [0, 99, 100, 149, 150, 600, 1049, 1099, 1100, 5000]:
        assert float(s(t)) == pytest.approx(_zhu_gupta(t, 0.1, 0.9, 100, 1100), abs=1e-6), t
    values = [float(s(t)) for t in range(0, 1200, 7)]
    assert values == sorted(values)  # never decreases


@pytest.mark.parametrize("begin,end", [(0, 100), (3, 10), (10, 11), (0, 7)])
def test_polynomial_ends_exactly_at_final_sparsity(begin, end):
    s = jp.polynomial_sparsity(0.9, begin_step=begin, end_step=end, initial_sparsity=0.1)
    values = [float(s(t)) for t in range(0, end + 30)]
    assert all(v == float(np.float32(0.9)) for v in values[end:])
    assert values == sorted(values)
    assert float(jax.jit(s)(jnp.int32(end))) == float(np.float32(0.9))


def test_polynomial_power_and_jit():
    s = jp.polynomial_sparsity(0.8, 0, 10, power=1.0)
    assert float(jax.jit(s)(5)) == pytest.approx(0.4)
    assert s(jnp.int32(5)).dtype == jnp.float32


def test_one_shot():
    s = jp.one_shot_sparsity(0.5, step=10)
    assert [float(s(t)) for t in (0, 9, 10, 11, 1000)] == [0.0, 0.0, 0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"final_sparsity": 1.5}, ValueError, "final_sparsity must be a fraction in"),
        ({"final_sparsity": math.nan}, ValueError, "final_sparsity must be a fraction"),
        ({"final_sparsity": math.inf}, ValueError, "final_sparsity must be a fraction"),
        ({"initial_sparsity": -0.1}, ValueError, "initial_sparsity must be a fraction"),
        ({"initial_sparsity": 0.95}, ValueError, "initial_sparsity must be <= final_sparsity"),
        ({"end_step": 0}, ValueError, "begin_step < end_step"),
        ({"begin_step": -1}, ValueError, "begin_step must be an integer >= 0"),
        ({"begin_step": 1.0}, TypeError, "begin_step must be an integer"),
        ({"end_step": math.inf}, TypeError, "end_step must be an integer"),
        ({"power": 0}, ValueError, "power must be a finite number > 0"),
        ({"power": math.nan}, ValueError, "power must be a finite number > 0"),
        ({"power": math.inf}, ValueError, "power must be a finite number > 0"),
        ({"frequency": 10}, TypeError, "frequency"),  # given once: to update_masks
    ],
)
def test_polynomial_validation(kwargs, error, match):
    args = {"final_sparsity": 0.9, "begin_step": 0, "end_step": 10, **kwargs}
    with pytest.raises(error, match=match):
        jp.polynomial_sparsity(**args)


def test_one_shot_and_constant_validation():
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        jp.one_shot_sparsity(2.0, step=1)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        jp.one_shot_sparsity(0.5, step=-3)
    with pytest.raises(TypeError, match="step must be an integer"):
        jp.one_shot_sparsity(0.5, step=2.5)
    params, masks = {"kernel": jnp.ones((2, 2))}, {"kernel": jnp.ones((2, 2), bool)}
    for bad, error in ((math.nan, ValueError), (1.5, ValueError), ("0.5", TypeError), (True, TypeError)):
        with pytest.raises(error, match="constant sparsity"):
            jp.update_masks(params, masks, 0, bad)
    with pytest.raises(TypeError, match="frequency must be an integer"):
        jp.update_masks(params, masks, 0, 0.5, frequency=1.5)


def _params():
    return {"d": {"kernel": jax.random.normal(jax.random.key(0), (10, 10))}}


def _pruned(masks):
    return int((~masks["d"]["kernel"]).sum())


@pytest.mark.parametrize(
    "schedule",
    [
        optax.linear_schedule(0.0, 0.6, 20),
        optax.cosine_decay_schedule(0.6, 20, alpha=0.0),  # a decreasing one: nothing comes back
        optax.piecewise_interpolate_schedule("linear", 0.0, {5: 1.0, 10: 0.0}),
        jp.polynomial_sparsity(0.6, 2, 18),
        jp.one_shot_sparsity(0.6, 7),
        lambda step: jnp.where(step >= 4, 0.3, 0.1),  # any step -> sparsity function
    ],
)
def test_any_optax_schedule_drives_update_masks(schedule):
    """On pruning steps (step % frequency == 0) the masks hold round(schedule(step) * n) pruned, or
    what they already had (a pruned weight never comes back); in between they do not change."""
    params = _params()
    step_fn = jax.jit(lambda p, m, t: jp.update_masks(p, m, t, schedule, frequency=3))
    masks, want = jp.identity(params), 0
    for t in range(30):
        _, new = step_fn(params, masks, jnp.int32(t))
        if t % 3 == 0:
            target = round(100 * float(np.float32(schedule(t))))  # the count rule of a float32 fraction
            want = max(want, target)
        assert _pruned(new) == want, t
        masks = new


@settings(max_examples=6, deadline=None)
@given(
    begin=st.integers(0, 20),
    span=st.integers(1, 40),
    frequency=st.integers(1, 12),
    final=st.floats(0.05, 1.0),
)
def test_masks_reach_the_final_sparsity_on_the_first_pruning_step_after_the_end(
    begin, span, frequency, final
):
    """frequency is given once (to update_masks): the schedule is read on pruning steps, so the
    masks reach final_sparsity exactly at the first multiple of frequency at or after end_step."""
    end = begin + span
    schedule = jp.polynomial_sparsity(final, begin, end)
    first = -(-end // frequency) * frequency
    want_final = round(100 * float(np.float32(final)))
    params = _params()
    _, masks = jp.update_masks(params, jp.identity(params), first, schedule, frequency=frequency)
    assert _pruned(masks) == want_final
    if first - frequency >= 0:  # the pruning step before reads the schedule before its end
        assert float(schedule(first - frequency)) <= float(schedule(end))


def test_nnx_optimizer_uint32_step_does_not_wrap():
    """nnx.Optimizer counts steps in uint32: (step - begin_step) must not wrap to a huge step."""
    params = _params()
    schedule = jp.polynomial_sparsity(0.9, begin_step=10, end_step=20)
    _, masks = jp.update_masks(params, jp.identity(params), jnp.uint32(0), schedule)
    assert _pruned(masks) == 0
