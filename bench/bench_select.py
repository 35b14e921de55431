"""jprune vs torch, side by side in one process: global and per-tensor magnitude pruning.

Prints medians and the ratios the issue asks for (jprune on CPU uses its native kernel, see
``jprune/_cpu.py``; the XLA path it falls back to is timed too):
- torch ``global_unstructured`` / jprune ``global_unstructured`` (speed-up, target >= 30x on CPU),
- jprune / one-pass floor (target <= 15x global, <= 5x per-tensor), where the floor is one jitted
  pass over the same data (``sum(|w|)`` over all layers): no selection can be cheaper.

Usage: python bench/bench_select.py [--n 1e7] [--layers 48] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.utils.prune as tprune

import jprune as jp
from jprune import _cpu, _unstructured
from jprune._tree import Tree


def median_time(fn, repeat, setup=lambda: None):
    setup()
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeat):
        setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e7, help="total number of weights")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--amount", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--skip-torch-per-tensor", action="store_true")
    args = ap.parse_args()

    n_in = 1000
    n_out = max(1, int(args.n) // (args.layers * n_in))
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((n_out, n_in)).astype(np.float32) for _ in range(args.layers)]
    total = sum(w.size for w in weights)

    # torch: Linear weights (out, in), pruned the usual way (module API, L1).
    layers = [torch.nn.Linear(n_in, n_out, bias=False) for _ in weights]
    with torch.no_grad():
        for layer, w in zip(layers, weights):
            layer.weight.copy_(torch.from_numpy(w))

    def torch_reset():  # unpruned layers holding the original weights (not timed)
        with torch.no_grad():
            for layer, w in zip(layers, weights):
                if tprune.is_pruned(layer):
                    tprune.remove(layer, "weight")
                layer.weight.copy_(torch.from_numpy(w))

    def torch_global():
        tprune.global_unstructured(
            [(layer, "weight") for layer in layers], tprune.L1Unstructured, amount=args.amount
        )

    def torch_per_tensor():
        for layer in layers:
            tprune.l1_unstructured(layer, "weight", amount=args.amount)

    def torch_ln():
        for layer in layers:
            tprune.ln_structured(layer, "weight", amount=args.amount, n=2, dim=0)

    # jprune: Flax kernels (in, out) in a params dict.
    params = {f"dense_{i}": {"kernel": jnp.asarray(w.T)} for i, w in enumerate(weights)}
    floor = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)))

    def run(f):
        return lambda: jax.block_until_ready(f())

    def xla_only(fn):  # the selection jprune falls back to where the native kernel is not used
        tree = Tree(params)
        joint = fn is jp.global_unstructured
        return _unstructured.run(tree, tree.select(None), args.amount, kind="l1", joint=joint, method="hist")

    results = {
        "floor (one pass, sum |w|)": median_time(run(lambda: floor(params)), args.repeat),
        "jprune global_unstructured": median_time(
            run(lambda: jp.global_unstructured(params, args.amount)), args.repeat
        ),
        "  (XLA path, without the CPU kernel)": median_time(
            run(lambda: xla_only(jp.global_unstructured)), args.repeat
        ),
        "jprune l1_unstructured (per tensor)": median_time(
            run(lambda: jp.l1_unstructured(params, args.amount)), args.repeat
        ),
        "jprune ln_structured (per tensor)": median_time(
            run(lambda: jp.ln_structured(params, args.amount, n=2, axis=-1)), args.repeat
        ),
        "torch global_unstructured": median_time(torch_global, args.repeat, torch_reset),
        "torch ln_structured (per tensor)": median_time(torch_ln, args.repeat, torch_reset),
    }
    if not args.skip_torch_per_tensor:
        results["torch l1_unstructured (per tensor)"] = median_time(
            torch_per_tensor, args.repeat, torch_reset
        )

    # Same answer: 1e7 float32 normals hold exact ties in |w|, where torch's order is its own; so
    # check the count, and that masks differ only at entries whose |w| equals the threshold.
    torch_reset()
    torch_global()
    masks = jp.global_unstructured(params, args.amount)
    ours = np.concatenate([np.asarray(masks[f"dense_{i}"]["kernel"]).T.ravel() for i in range(len(layers))])
    theirs = np.concatenate([layer.weight_mask.numpy().ravel() != 0 for layer in layers])
    w = np.abs(np.concatenate([x.ravel() for x in weights]))
    threshold = w[~ours].max()
    differ = ours != theirs
    same = ours.sum() == theirs.sum() and bool(np.all(w[differ] == threshold))

    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {jax.default_backend()}, {os.cpu_count()} cores, {cpu}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}; "
        f"native CPU kernel: {'used' if _cpu.available() else 'not built'}"
    )
    print(
        f"N = {total:.3g} weights in {args.layers} layers, amount = {args.amount}; "
        f"same answer as torch: {same} ({differ.sum()} tied entries ordered differently)"
    )
    for name, t in results.items():
        print(f"  {name:<38} {t * 1e3:10.2f} ms")
    f = results["floor (one pass, sum |w|)"]
    g = results["jprune global_unstructured"]
    p = results["jprune l1_unstructured (per tensor)"]
    print(f"  torch / jprune, global:      {results['torch global_unstructured'] / g:8.1f}x")
    if "torch l1_unstructured (per tensor)" in results:
        speedup = results["torch l1_unstructured (per tensor)"] / p
        print(f"  torch / jprune, per tensor:  {speedup:8.1f}x")
    print(f"  jprune / floor, global:      {g / f:8.1f}x")
    print(f"  jprune / floor, per tensor:  {p / f:8.1f}x")
    ln = results["jprune ln_structured (per tensor)"]
    print(f"  torch / jprune, ln_structured: {results['torch ln_structured (per tensor)'] / ln:6.1f}x")
    print(f"  jprune / floor, ln_structured: {ln / f:6.1f}x")


if __name__ == "__main__":
    main()
