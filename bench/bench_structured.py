"""Structured pruning that shrinks: jprune on a Flax ResNet-18 beside Torch-Pruning on torch's.

One run, side by side: ResNet-18 (torchvision's layout), batch 16, 224x224 inputs, CPU, 50 % of the
channels pruned, then physically removed.

- jprune: ``jp.channel_groups`` (from the jaxpr) -> ``jp.group_structured`` (L2 norms over each
  group's coupled slices) -> ``jp.shrink``; the model is rebuilt from the returned widths.
  FLOPs from XLA's cost analysis of the compiled forward; the shrunk output is checked against the
  masked model's.
- Torch-Pruning (the anchor, if ``torch_pruning`` is installed): ``MagnitudePruner`` (L2, 50 %,
  the classifier ignored) on the same architecture; MACs from its op counter.

Latencies are medians of interleaved runs (dense, pruned, dense, ...), so load from other
processes hits both alike; ratios are what to read, absolute times drift on a shared machine.

Run: ``make bench-structured`` or ``python bench/bench_structured.py [--batch 16] [--size 224]``.
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
import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))

from structured_models import ResNet18, torch_resnet18  # noqa: E402

import jprune as jp  # noqa: E402


def interleaved(fns, repeats):
    """Median seconds of each ``fn`` over ``repeats`` rounds, calling them in turn each round."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def jprune_side(args):
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
    model = ResNet18()
    variables = model.init(jax.random.key(1), x[:1])
    # Non-trivial BatchNorm statistics, so that a shrink that mishandled them would show.
    variables = jax.tree.map(lambda v: v, dict(variables))
    variables["batch_stats"] = jax.tree.map(
        lambda v: v + 0.1 * jax.random.uniform(jax.random.key(2), v.shape), variables["batch_stats"]
    )

    def apply(v, x):
        return model.apply(v, x)

    start = time.perf_counter()
    groups = jp.channel_groups(apply, variables, x[:1])
    t_groups = time.perf_counter() - start
    start = time.perf_counter()
    masks = jp.group_structured(variables, args.amount, groups, n=2, scope=args.scope)
    t_select = time.perf_counter() - start
    start = time.perf_counter()
    small, widths = jp.shrink(variables, masks, groups)
    small = jax.block_until_ready(small)
    t_shrink = time.perf_counter() - start
    small_model = ResNet18(widths=widths)

    def apply_small(v, x):
        return small_model.apply(v, x)

    masked = jp.apply_masks(variables, masks)
    probe = x[:4]
    ref = np.asarray(jax.jit(apply)(masked, probe))
    out = np.asarray(jax.jit(apply_small)(small, probe))
    rel = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))

    dense_fwd = jax.jit(apply)
    small_fwd = jax.jit(apply_small)
    jax.block_until_ready((dense_fwd(variables, x), small_fwd(small, x)))  # compile
    t_dense, t_small = interleaved(
        [
            lambda: dense_fwd(variables, x).block_until_ready(),
            lambda: small_fwd(small, x).block_until_ready(),
        ],
        args.repeats,
    )
    # XLA:CPU's convolution speed is not monotonic in the output channels (3 -> 32 can be slower than
    # 3 -> 64): time the stem conv alone at both widths, so a latency ratio can be read with it.
    stem = []
    for width in (variables["params"]["stem_conv"]["kernel"].shape[-1], widths["params/stem_conv"]):
        conv = jax.jit(nn.Conv(width, (7, 7), 2, padding=3, use_bias=False).apply)
        w = {"params": {"kernel": jnp.ones((7, 7, 3, width))}}
        conv(w, x).block_until_ready()
        run = lambda conv=conv, w=w: conv(w, x).block_until_ready()  # noqa: E731
        stem.append((width, interleaved([run], args.repeats)[0]))
    return {
        "stem": stem,
        "params": (count(variables["params"]), count(small["params"])),
        "flops": (flops(apply, variables, x), flops(apply_small, small, x)),
        "latency": (t_dense, t_small),
        "prep": (t_groups, t_select, t_shrink),
        "rel": rel,
        "groups": groups,
    }


def torch_side(args):
    import torch

    try:
        import torch_pruning as tp
    except ImportError:
        return None
    torch.manual_seed(0)
    model = torch_resnet18().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    example = x[:1]
    macs0, params0 = tp.utils.count_ops_and_params(model, example)
    dense = torch_resnet18().eval()
    dense.load_state_dict(model.state_dict())
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=args.amount,
        global_pruning=args.scope == "global",
        ignored_layers=[model.fc],
    )
    pruner.step()
    t_prune = time.perf_counter() - start
    macs1, params1 = tp.utils.count_ops_and_params(model, example)
    with torch.no_grad():
        dense(x), model(x)  # warm-up
        t_dense, t_small = interleaved([lambda: dense(x), lambda: model(x)], args.repeats)
    return {
        "params": (params0, params1),
        "macs": (macs0 * args.batch, macs1 * args.batch),
        "latency": (t_dense, t_small),
        "prep": t_prune,
        "version": tp.__version__,
        "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--scope", choices=("layer", "global"), default="layer")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--groups", action="store_true", help="print the ResNet-18's channel groups")
    args = parser.parse_args()

    print(
        f"ResNet-18, batch {args.batch}, {args.size}x{args.size}, {100 * args.amount:.0f} % of channels "
        f"(scope={args.scope}), CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__}"
    )
    j = jprune_side(args)
    if args.groups:
        print(j["groups"])
    t = torch_side(args)

    def row(name, before, after, unit, scale=1.0):
        b, a = before / scale, after / scale
        print(f"  {name:<28} {b:>10.3f} {unit:<3} -> {a:>8.3f} {unit:<3}  {before / after:5.2f}x")

    print("\njprune (Flax, XLA CPU)")
    row("params", *j["params"], "M", 1e6)
    row("FLOPs (XLA cost analysis)", *j["flops"], "G", 1e9)
    row("latency (median)", *j["latency"], "ms", 1e-3)
    tg, ts, tk = j["prep"]
    print(
        f"  channel_groups {tg:.2f} s + group_structured {ts:.2f} s + shrink {tk:.2f} s "
        f"= {tg + ts + tk:.2f} s; shrunk vs masked: max |diff| / max |out| = {j['rel']:.1e}"
    )
    (c0, s0), (c1, s1), (t0, t1) = *j["stem"], j["latency"]
    print(
        f"  the stem conv alone (7x7/2, 3 -> C channels), XLA CPU: C={c0} {1e3 * s0:.1f} ms, "
        f"C={c1} {1e3 * s1:.1f} ms; the rest of the model: {(t0 - s0) / (t1 - s1):.2f}x"
    )
    if t is None:
        print("\nTorch-Pruning is not installed (pip install --no-deps torch-pruning): no anchor")
        return
    print(f"\nTorch-Pruning {t['version']} (torch, {t['threads']} threads)")
    row("params", *t["params"], "M", 1e6)
    row("MACs (x2 = FLOPs)", *t["macs"], "G", 1e9)
    row("latency (median)", *t["latency"], "ms", 1e-3)
    print(f"  MagnitudePruner + step: {t['prep']:.2f} s")
    print(
        f"\nreduction, jprune vs Torch-Pruning: FLOPs {j['flops'][0] / j['flops'][1]:.2f}x vs "
        f"{t['macs'][0] / t['macs'][1]:.2f}x, latency {j['latency'][0] / j['latency'][1]:.2f}x vs "
        f"{t['latency'][0] / t['latency'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
