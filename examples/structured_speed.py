"""Structured pruning that makes models smaller and faster: prune channels/heads, fine-tune, shrink.

For three Flax models on scikit-learn's handwritten digits (nothing downloaded):
the seed's LeNet (28x28), a ResNet-18-style CNN (BatchNorm, residual stages; 16x16 inputs) and a
small ViT (multi-head attention; 16x16 inputs, 4x4 patches):

1. train the dense model;
2. ``jp.channel_groups`` reads the coupled parameter axes from the model's jaxpr (a conv's output
   channels with its BatchNorm, the next layer's input channels and, through residual additions,
   every conv of a stage; an attention head across q/k/v/out), and ``jp.group_structured`` prunes
   50 % of the channels and heads, ranked globally;
3. fine-tune briefly with ``jp.keep_pruned`` (the pruned slices stay exactly 0);
4. ``jp.shrink`` removes the pruned channels and heads; the model is rebuilt from the returned
   widths and computes what the masked model computes.

Prints params, FLOPs (XLA's cost analysis) and CPU latency before and after, and the test accuracy.

Run: ``make structured`` or ``python examples/structured_speed.py [--amount 0.5] [--smoke]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lenet  # noqa: E402
from structured_models import ResNet18, ViT  # noqa: E402

import jprune as jp  # noqa: E402


def digits(size: int):
    """scikit-learn's digits resized to ``size`` x ``size``: ``(x_train, y_train, x_test, y_test)``."""
    x_tr, y_tr, x_te, y_te = lenet.load_digits_28()
    resize = lambda x: np.asarray(jax.image.resize(x, (len(x), size, size, 1), "bilinear"))  # noqa: E731
    return (x_tr, y_tr, x_te, y_te) if size == 28 else (resize(x_tr), y_tr, resize(x_te), y_te)


class Net:
    """A Linen model and how to call it: ``train=`` for BatchNorm models, eval mode otherwise;
    ``select`` picks the channel groups to prune (None: all prunable ones)."""

    def __init__(self, make, *, batch_norm: bool, select=None):
        self.make, self.batch_norm, self.select = make, batch_norm, select

    def apply(self, model, variables, x):
        return model.apply(variables, x, train=False) if self.batch_norm else model.apply(variables, x)

    def forward(self, model):
        """The jitted eval forward ``(variables, x) -> logits`` of ``model``."""
        return jax.jit(functools.partial(self.apply, model))

    def loss(self, model, params, rest, x, y):
        variables = {"params": params, **rest}
        if self.batch_norm:
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            rest = {**rest, **updates}
        else:
            logits = model.apply(variables, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), rest


def fit(net, model, variables, masks, data, *, epochs, lr, seed=0, batch_size=64):
    """Adam wrapped in ``jp.keep_pruned``: ``epochs`` of training with the params' masks held."""
    x_tr, y_tr = data
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    params = jp.apply_masks(params, masks)
    tx = jp.keep_pruned(optax.adam(lr), masks)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, rest, opt_state, x, y):
        (loss, rest), grads = jax.value_and_grad(lambda p: net.loss(model, p, rest, x, y), has_aux=True)(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state

    for key in jax.random.split(jax.random.key(seed), epochs):
        for xb, yb in lenet.batches(x_tr, y_tr, batch_size, key=key):
            params, rest, opt_state = step(params, rest, opt_state, xb, yb)
    return {"params": params, **rest}


def accuracy(forward, variables, x, y) -> float:
    logits = forward(variables, x)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def measure(fwd, variables, x, repeats):
    """(params, FLOPs, median latency in s) of the jitted forward ``fwd`` on ``x``."""
    compiled = fwd.lower(variables, x).compile()
    fwd(variables, x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fwd(variables, x).block_until_ready()
        times.append(time.perf_counter() - start)
    n = sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))
    return n, float(compiled.cost_analysis()["flops"]), statistics.median(times)


def prune_and_shrink(name, net, variables, data, *, amount=0.5, finetune=3, lr=1e-3, batch=256, repeats=20):
    """Trained ``variables`` -> ``amount`` of the channels/heads pruned globally -> fine-tuned ->
    shrunk; prints params, FLOPs, latency and accuracy before and after, and returns them."""
    x_tr, y_tr, x_te, y_te = data
    model = net.make(None)
    dense = net.forward(model)
    dense_acc = accuracy(dense, variables, x_te, y_te)

    groups = jp.channel_groups(lambda v, x: net.apply(model, v, x), variables, x_tr[:1])
    masks = jp.group_structured(variables, amount, groups, n=2, scope="global", select=net.select)
    pruned_acc = accuracy(dense, jp.apply_masks(variables, masks), x_te, y_te)
    tuned = fit(net, model, variables, masks["params"], (x_tr, y_tr), epochs=finetune, lr=lr)
    tuned = jp.apply_masks(tuned, masks)
    tuned_acc = accuracy(dense, tuned, x_te, y_te)

    small, widths = jp.shrink(tuned, masks, groups)
    shrunk = net.forward(net.make(widths))
    small_acc = accuracy(shrunk, small, x_te, y_te)
    ref = np.asarray(dense(tuned, x_te))  # compiled already, by accuracy
    out = np.asarray(shrunk(small, x_te))
    rel = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))

    x = x_te[:batch]
    before = measure(dense, variables, x, repeats)
    after = measure(shrunk, small, x, repeats)
    print(f"\n{name}: {100 * amount:.0f} % of the channels/heads pruned globally, fine-tuned, shrunk")
    print(f"  {'':<22}{'dense':>12}{'shrunk':>12}{'ratio':>8}")
    for label, b, a, scale, unit in (
        ("params", before[0], after[0], 1e3, "k"),
        ("FLOPs / batch", before[1], after[1], 1e6, "M"),
        (f"latency, batch {len(x)}", before[2], after[2], 1e-3, "ms"),
    ):
        print(f"  {label:<22}{b / scale:>10.1f}{unit:<2}{a / scale:>10.1f}{unit:<2}{b / a:>7.2f}x")
    print(
        f"  accuracy: dense {100 * dense_acc:.1f} %, pruned {100 * pruned_acc:.1f} %, "
        f"fine-tuned {100 * tuned_acc:.1f} %, shrunk {100 * small_acc:.1f} % "
        f"(shrunk vs masked logits: max |diff| / max |logit| = {rel:.1e})"
    )
    resized = [k for k in widths if k.startswith("params/")]
    print(f"  {len(resized)} layers resized; e.g. " + ", ".join(f"{k}: {widths[k]}" for k in resized[:4]))
    return {"accuracy": (dense_acc, small_acc), "dense": before, "shrunk": after, "rel": rel}


def heads_not_value_dims(group) -> bool:
    """Linen's attention has one head size for q, k and v: prune whole heads, never value dims
    alone (the group named by a value projection's head-size axis)."""
    return "/value/kernel[2]" not in group.name


MODELS = {  # name: (model from widths, BatchNorm?, image size, groups to prune)
    "LeNet": (lambda w: lenet.LeNet(widths=w), False, 28, None),
    "ResNet-18-style CNN": (lambda w: ResNet18(10, base=16, small_input=True, widths=w), True, 16, None),
    "ViT": (lambda w: ViT(10, dim=64, depth=3, heads=4, mlp=128, widths=w), False, 16, heads_not_value_dims),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of channels/heads to prune")
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs after pruning")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=256, help="batch size for the latency")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.finetune, args.repeats, args.batch = 1, 0, 2, 128  # finetune: one compile less
    results = {}
    for name in args.models:
        make, batch_norm, size, select = MODELS[name]
        net = Net(make, batch_norm=batch_norm, select=select)
        data = digits(size)
        if args.smoke:
            data = (data[0][:256], data[1][:256], data[2][:128], data[3][:128])
        model = make(None)
        variables = model.init(jax.random.key(0), data[0][:1])
        no_masks = jax.tree.map(lambda _: None, variables["params"])
        variables = fit(net, model, variables, no_masks, data[:2], epochs=args.epochs, lr=args.lr)
        results[name] = prune_and_shrink(
            name, net, variables, data, amount=args.amount, finetune=args.finetune, lr=args.lr / 3,
            batch=args.batch, repeats=args.repeats,
        )  # fmt: skip
    return results


if __name__ == "__main__":
    main()
