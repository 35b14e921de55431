"""Cost of a masked train step vs the same step unmasked, side by side in one run.

Masked, two ways: ``keep-pruned`` = ``jp.keep_pruned(adam)`` (gradients zeroed at pruned places,
updates pinned so pruned weights stay exactly 0) with the forward on the params themselves (they
are 0 where pruned: the recommended step); ``mask-in-fwd`` = the same plus ``jp.apply_masks`` in
every forward (torch's way). Unmasked (``plain``): plain forward and plain adam. Models: the
seed's LeNet (batch 128) and a ~10M-parameter MLP (batch 256), 90 % global sparsity. The steps
are timed in interleaved chunks (A, B, C, A, B, C, ...) so that load from other processes hits
all alike; overheads are given for the best chunk (least disturbed), the median chunk, the median
process CPU time (less sensitive to other processes than wall time), and XLA's cost analysis of
the compiled step (flops, bytes accessed: noise-free).

Run: ``python bench/bench_train.py [--repeats 20] [--iters 5] [--mlp-batch 256 1024]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))

from lenet import LeNet  # noqa: E402

import jprune as jp  # noqa: E402


class MLP(nn.Module):
    """784 -> 2048 -> 2048 -> 2048 -> 512 -> 10: about 10.4M params."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in (2048, 2048, 2048, 512):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


def make_steps(model, masks, lr=1e-3):
    """Three jitted steps ``(params, opt_state, x, y) -> (params, opt_state)``, buffers donated.

    plain: no pruning. mask-in-fwd: forward on ``jp.apply_masks(params, masks)`` + ``jp.keep_pruned``
    (torch's way: mask in every forward). keep-pruned: forward on the params themselves, which
    ``jp.keep_pruned`` holds at exactly 0 where pruned (masked once at pruning time; what
    ``examples/lenet.make_train_step`` does).
    """

    def xent(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def make(tx, mask_forward):
        @partial(jax.jit, donate_argnums=(0, 1))
        def step(params, opt_state, x, y):
            def loss(p):
                if mask_forward:
                    p = jp.apply_masks(p, jp.get_masks(opt_state))
                return xent(model.apply({"params": p}, x), y)

            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return step, tx

    return {
        "plain": make(optax.adam(lr), False),
        "mask-in-fwd": make(jp.keep_pruned(optax.adam(lr), masks), True),
        "keep-pruned": make(jp.keep_pruned(optax.adam(lr), masks), False),
    }


def time_chunk(step, params, opt_state, x, y, iters):
    """Wall and process CPU seconds per step over ``iters`` steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        params, opt_state = step(params, opt_state, x, y)
    jax.block_until_ready(params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return (wall / iters, cpu / iters), params, opt_state


def bench(name, model, x_shape, batch, *, repeats, iters, sparsity=0.9):
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, *x_shape))
    y = jax.random.randint(key, (batch,), 0, 10)
    params = model.init(key, x[:1])["params"]
    n_params = sum(p.size for p in jax.tree.leaves(params))
    masks = jp.global_unstructured(params, sparsity)
    params = jp.apply_masks(params, masks)  # prune once: pruned weights start at 0
    runs, cost = {}, {}
    for label, (step, tx) in make_steps(model, masks).items():
        p = jax.tree.map(jnp.copy, params)  # own buffers: each step donates its inputs
        runs[label] = [step, p, jax.tree.map(jnp.copy, tx.init(p)), []]
        # XLA's own estimate of the compiled step: noise-free, unlike the timings.
        analysis = step.lower(p, runs[label][2], x, y).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        cost[label] = (analysis.get("flops", 0.0), analysis.get("bytes accessed", 0.0))
    for run in runs.values():  # compile and warm up
        _, run[1], run[2] = time_chunk(run[0], run[1], run[2], x, y, 2)
    for _ in range(repeats):  # interleaved: background load hits every variant alike
        for run in runs.values():
            dt, run[1], run[2] = time_chunk(run[0], run[1], run[2], x, y, iters)
            run[3].append(dt)
    for label in ("mask-in-fwd", "keep-pruned"):  # pruned weights really stayed at 0
        zeros = jax.tree.map(
            lambda p, m: None if m is None else bool(jnp.all(p[~m] == 0)), runs[label][1], masks
        )
        assert all(jax.tree.leaves(zeros)), label
    stats = {
        k: (
            min(w for w, _ in r[3]),
            statistics.median(w for w, _ in r[3]),
            statistics.median(c for _, c in r[3]),
        )
        for k, r in runs.items()
    }
    base, base_cost = stats["plain"], cost["plain"]
    for k, (best, med, cpu) in stats.items():
        over = "".join(
            f"{100 * (v / b - 1):>+9.1f}%" for v, b in zip((best, med, cpu, *cost[k]), (*base, *base_cost))
        )
        print(
            f"{name:<7}{n_params / 1e6:>6.2f}M{batch:>6}  {k:<13}"
            f"{1e3 * best:>9.2f}{1e3 * med:>9.2f}{1e3 * cpu:>9.2f}{over}",
            flush=True,
        )
    return {"params": n_params, "batch": batch, "cost": cost, **stats}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--mlp-batch", type=int, nargs="+", default=[256], help="MLP batch sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny run, for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.iters = 1, 1
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(
        f"90 % global sparsity, adam, buffers donated; {args.repeats} interleaved chunks of "
        f"{args.iters} steps. ms per step: best wall, median wall, median process CPU time; "
        "overhead vs plain for each, and for XLA's cost analysis of the compiled step (flops, bytes)"
    )
    print(
        f"{'model':<7}{'params':>7}{'batch':>6}  {'step':<13}{'best':>9}{'median':>9}{'cpu':>9}"
        f"{'best':>10}{'median':>10}{'cpu':>10}{'flops':>10}{'bytes':>10}"
    )
    kw = dict(repeats=args.repeats, iters=args.iters)
    out = {"lenet": bench("LeNet", LeNet(), (28, 28, 1), 128, **kw)}
    if not args.smoke:
        for batch in args.mlp_batch:
            out[f"mlp{batch}"] = bench("MLP", MLP(), (28, 28, 1), batch, **kw)
    return out


if __name__ == "__main__":
    main()
