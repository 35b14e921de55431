"""Prune -> fine-tune an NNX model with ``nnx.Optimizer`` and ``jp.keep_pruned``.

The masks live on the model as ``PruneMask`` variables (``model.fc1.kernel_mask``): not
``nnx.Param``, so ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` leave them alone. The
forward pass uses ``param * mask`` (``masked_view``); the optimizer holds the same masks in its
state and keeps pruned weights at exactly 0. A second pruning round swaps the masks in both
places without rebuilding the optimizer or recompiling the train step.

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

from lenet import (  # noqa: E402
    LeNetNNX,
    attach_masks,
    batches,
    cross_entropy,
    load_digits_28,
    masked_view,
    read_masks,
)

import jprune as jp  # noqa: E402

TRACES = []  # one entry per compilation of train_step


@nnx.jit
def train_step(model, optimizer, x, y):
    TRACES.append(None)

    def loss_fn(model):
        return cross_entropy(masked_view(model)(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # grads w.r.t. nnx.Param only
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model, x, y):
    return (masked_view(model)(x).argmax(-1) == y).mean()


def set_nnx_masks(model, optimizer, masks):
    """Swaps the masks on the model and in the optimizer state (no rebuild, no recompile)."""
    attach_masks(model, masks)
    new_state = jp.set_masks(nnx.as_pure(optimizer.opt_state), read_masks(model))
    nnx.update(optimizer.opt_state, nnx.state(new_state))


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
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    attach_masks(model, jp.identity(params))  # all True: nothing pruned yet, one compiled step
    tx = jp.keep_pruned(optax.adamw(1e-3, weight_decay=1e-4), read_masks(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    fit(model, optimizer, x_tr, y_tr, epochs=args.epochs, key=jax.random.fold_in(key, 0))
    print(f"dense:                  {100 * float(accuracy(model, x_te, y_te)):.2f} %")

    for round_, sparsity in enumerate((0.5, 0.9), start=1):
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        # Global L1 over the kernels (biases stay None), pruning further from the current masks.
        masks = jp.prune_to_sparsity(params, sparsity, masks=read_masks(model))
        set_nnx_masks(model, optimizer, masks)
        before = float(accuracy(model, x_te, y_te))
        fit(model, optimizer, x_tr, y_tr, epochs=args.epochs, key=jax.random.fold_in(key, round_))
        after = float(accuracy(model, x_te, y_te))
        print(
            f"pruned to {sparsity:.0%} (round {round_}): {100 * before:.2f} % -> "
            f"{100 * after:.2f} % after fine-tuning"
        )

    params = nnx.as_pure(nnx.state(model, nnx.Param))
    masks = read_masks(model)
    zeros = jax.tree.map(
        lambda p, m: None if m is None else bool((np.asarray(p)[~np.asarray(m)] == 0).all()),
        params,
        masks,
    )
    print(jp.sparsity(masks, params))
    print(
        f"pruned weights exactly 0: {all(jax.tree.leaves(zeros))}; train_step compiled {len(TRACES)} time(s)"
    )
    return model, optimizer


if __name__ == "__main__":
    main()
