"""Prune -> fine-tune an NNX model with ``nnx.Optimizer`` and ``jp.keep_pruned``, public helpers only.

The masks live on the model as ``jprune.nnx.PruneMask`` variables (``model.fc1.kernel_mask``): not
``nnx.Param``, so ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` leave them alone. The
forward pass uses ``param * mask`` (``jpnnx.masked_view``); the optimizer holds the same masks in
its state and keeps pruned weights at exactly 0. A pruning round swaps the masks in both places
(``jpnnx.attach_masks``, ``jpnnx.set_masks``) without rebuilding the optimizer or recompiling the
train step. Last, gradual 2:4 pruning inside the compiled step (``jpnnx.update_masks``).

Run: ``python examples/nnx_finetune.py [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lenet import LeNetNNX, batches, cross_entropy, load_digits_28  # noqa: E402

import jprune as jp  # noqa: E402
from jprune import nnx as jpnnx  # noqa: E402

TRACES = []  # one entry per compilation of train_step


@nnx.jit
def train_step(model, optimizer, x, y):
    TRACES.append(None)

    def loss_fn(model):
        return cross_entropy(jpnnx.masked_view(model)(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # grads w.r.t. nnx.Param only
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model, x, y):
    return (jpnnx.masked_view(model)(x).argmax(-1) == y).mean()


GRADUAL_TRACES = []


@nnx.jit(static_argnames=("schedule", "frequency"))
def gradual_step(model, optimizer, x, y, schedule, frequency):
    """A train step that also re-prunes every ``frequency`` steps towards 2:4 (``jpnnx.update_masks``)."""
    GRADUAL_TRACES.append(None)
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(jpnnx.masked_view(m)(x), y))(model)
    optimizer.update(model, grads)
    jpnnx.update_masks(model, optimizer, schedule, frequency=frequency, pattern=(2, 4), select="fc*/kernel")
    return loss


def fit(model, optimizer, x, y, *, epochs, key, batch_size=64):
    for epoch_key in jax.random.split(key, epochs):
        for xb, yb in batches(x, y, batch_size, key=epoch_key):
            train_step(model, optimizer, xb, yb)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    x_tr, y_tr, x_te, y_te = load_digits_28()
    if args.smoke:
        args.epochs = 1
        x_tr, y_tr, x_te, y_te = x_tr[:256], y_tr[:256], x_te[:128], y_te[:128]
    key = jax.random.key(0)

    model = LeNetNNX(rngs=nnx.Rngs(0))
    # all True: nothing pruned yet, one compiled step for every round
    jpnnx.attach_masks(model, jp.identity(nnx.state(model, nnx.Param)))
    tx = jp.keep_pruned(optax.adamw(1e-3, weight_decay=1e-4), jpnnx.masks_of(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    dense = nnx.state(model)  # to start the gradual run from the same dense model

    fit(model, optimizer, x_tr, y_tr, epochs=args.epochs, key=jax.random.fold_in(key, 0))
    print(f"dense:                  {100 * float(accuracy(model, x_te, y_te)):.2f} %")

    for round_, sparsity in enumerate((0.5, 0.9), start=1):
        # Global L1 over the kernels (biases stay None), pruning further from the current masks.
        masks = jp.prune_to_sparsity(nnx.state(model, nnx.Param), sparsity, masks=jpnnx.masks_of(model))
        jpnnx.attach_masks(model, masks)  # on the model, for the masked forward
        jpnnx.set_masks(optimizer, masks)  # in the optimizer, which keeps pruned weights at 0
        before = float(accuracy(model, x_te, y_te))
        fit(model, optimizer, x_tr, y_tr, epochs=args.epochs, key=jax.random.fold_in(key, round_))
        after = float(accuracy(model, x_te, y_te))
        print(
            f"pruned to {sparsity:.0%} (round {round_}): {100 * before:.2f} % -> "
            f"{100 * after:.2f} % after fine-tuning"
        )

    params = nnx.as_pure(nnx.state(model, nnx.Param))
    masks = jpnnx.masks_of(model)
    print(jp.sparsity(masks, params))
    print(
        f"pruned weights exactly 0: {_exact_zero(params, masks)}; train_step compiled {len(TRACES)} time(s)"
    )

    # Gradual 2:4 on the dense model's fully connected layers: the pattern sparse tensor cores take.
    nnx.update(model, dense)
    jpnnx.attach_masks(model, jp.identity(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, jp.keep_pruned(optax.adamw(1e-3), jpnnx.masks_of(model)), wrt=nnx.Param)
    steps = args.epochs * (len(x_tr) // 64)
    frequency = max(1, min(8, steps // 4))
    end = max(frequency, steps // 2 // frequency * frequency)  # 2:4 by half way, then fine-tuning
    schedule = jp.polynomial_sparsity(0.5, begin_step=0, end_step=end)
    for epoch_key in jax.random.split(jax.random.fold_in(key, 9), args.epochs):
        for xb, yb in batches(x_tr, y_tr, 64, key=epoch_key):
            gradual_step(model, optimizer, xb, yb, schedule, frequency)
    masks = jpnnx.masks_of(model)
    nm = [r.path for r in jp.sparsity(masks).rows if r.n_m]
    print(
        f"gradual 2:4 ({steps} steps): {100 * float(accuracy(model, x_te, y_te)):.2f} %; 2:4 layers: {nm}; "
        f"gradual_step compiled {len(GRADUAL_TRACES)} time(s)"
    )
    return model, optimizer


def _exact_zero(params, masks) -> bool:
    zeros = jax.tree.map(
        lambda p, m: None if m is None else bool((np.asarray(p)[~np.asarray(m)] == 0).all()), params, masks
    )
    return all(jax.tree.leaves(zeros))


if __name__ == "__main__":
    main()
