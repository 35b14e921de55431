"""Cost of a masked train step vs the same step unmasked, side by side in one run.

Masked: forward on ``jp.apply_masks(params, masks)`` and ``jp.keep_pruned(adam)`` (gradients
zeroed at pruned places, updates pinned so pruned weights stay exactly 0). Unmasked: plain forward
and plain adam. Models: the seed's LeNet (batch 128) and a ~10M-parameter MLP (batch 256), 90 %
global sparsity. The two steps are timed interleaved (A, B, A, B, ...) so that load from other
processes hits both alike; the overhead is the ratio of the medians.

Run: ``python bench/bench_train.py [--repeats 7] [--iters 50]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

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


def make_steps(model, params, masks, lr=1e-3):
    def xent(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    plain_tx = optax.adam(lr)
    masked_tx = jp.keep_pruned(optax.adam(lr), masks)

    @jax.jit
    def plain_step(params, opt_state, x, y):
        grads = jax.grad(lambda p: xent(model.apply({"params": p}, x), y))(params)
        updates, opt_state = plain_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def masked_step(params, opt_state, x, y):
        masks = jp.get_masks(opt_state)
        loss = lambda p: xent(model.apply({"params": jp.apply_masks(p, masks)}, x), y)  # noqa: E731
        grads = jax.grad(loss)(params)
        updates, opt_state = masked_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return (plain_step, plain_tx.init(params)), (masked_step, masked_tx.init(params))


def time_loop(step, params, opt_state, x, y, iters):
    t0 = time.perf_counter()
    for _ in range(iters):
        params, opt_state = step(params, opt_state, x, y)
    jax.block_until_ready(params)
    return (time.perf_counter() - t0) / iters, params, opt_state


def bench(name, model, x_shape, batch, *, repeats, iters, sparsity=0.9):
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, *x_shape))
    y = jax.random.randint(key, (batch,), 0, 10)
    params = model.init(key, x[:1])["params"]
    n_params = sum(p.size for p in jax.tree.leaves(params))
    masks = jp.global_unstructured(params, sparsity)
    (plain, plain_state), (masked, masked_state) = make_steps(model, params, masks)
    runs = {"plain": [plain, params, plain_state, []], "masked": [masked, params, masked_state, []]}
    for run in runs.values():  # compile and warm up
        _, run[1], run[2] = time_loop(run[0], run[1], run[2], x, y, 3)
    for _ in range(repeats):
        for run in runs.values():
            dt, run[1], run[2] = time_loop(run[0], run[1], run[2], x, y, iters)
            run[3].append(dt)
    # The masked run really kept its pruned weights at 0.
    zeros = jax.tree.map(
        lambda p, m: None if m is None else bool(jnp.all(p[~m] == 0)), runs["masked"][1], masks
    )
    assert all(jax.tree.leaves(zeros))
    t_plain = statistics.median(runs["plain"][3])
    t_masked = statistics.median(runs["masked"][3])
    overhead = 100 * (t_masked / t_plain - 1)
    print(
        f"{name:<16}{n_params / 1e6:>9.2f}M{batch:>7}{1e3 * t_plain:>12.3f}{1e3 * t_masked:>12.3f}"
        f"{overhead:>+11.1f}%",
        flush=True,
    )
    return t_plain, t_masked, overhead


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny run, for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.iters = 1, 1
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(f"90 % global sparsity, adam; median of {args.repeats} x {args.iters} steps, interleaved")
    print(
        f"{'model':<16}{'params':>10}{'batch':>7}{'plain ms':>12}{'masked ms':>12}{'overhead':>12}"
    )
    out = {
        "lenet": bench("LeNet", LeNet(), (28, 28, 1), 128, repeats=args.repeats, iters=args.iters)
    }
    if not args.smoke:
        out["mlp"] = bench("MLP", MLP(), (28, 28, 1), 256, repeats=args.repeats, iters=args.iters)
    return out


if __name__ == "__main__":
    main()
