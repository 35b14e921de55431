"""Structured pruning that shrinks: jprune on a Flax ResNet-18 beside Torch-Pruning on torch's.

One run, side by side: ResNet-18 (torchvision's layout), batch 16, 224x224 inputs, CPU, 50 % of the
channels pruned, then physically removed.

- jprune: ``jp.channel_groups`` (from the jaxpr) -> ``jp.group_structured`` (L2 norms over each
  group's coupled slices) -> ``jp.shrink``; the model is rebuilt from the returned widths.
  FLOPs from XLA's cost analysis of the compiled forward; the shrunk output is checked against the
  masked model's.
- Torch-Pruning (the anchor, if ``torch_pruning`` is installed): ``MagnitudePruner`` (L2, 50 %,
  the classifier ignored) on the same architecture; MACs from its op counter.

Latency is measured twice, with XLA's default compilation and with ``NO_YNNPACK``
(``examples/structured_models.py``: XLA:CPU's own convolutions instead of YNNPACK's, which run
narrow convolutions at a fraction of their wide-layer throughput). Latencies are medians of
interleaved runs (dense, pruned, dense, ...), so load from other processes hits all alike; ratios
are what to read, absolute times drift on a shared machine.

Run: ``make bench-structured`` or ``python bench/bench_structured.py [--batch 16] [--size 224]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))

from structured_models import NO_YNNPACK, ResNet18, torch_resnet18  # noqa: E402

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
    masks = jp.group_structured(variables, args.amount, groups, n=2, scope=args.scope, round_to=args.round_to)
    t_select = time.perf_counter() - start
    start = time.perf_counter()
    small, widths = jp.shrink(variables, masks, groups)
    small = jax.block_until_ready(small)
    t_shrink = time.perf_counter() - start
    small_model = ResNet18(widths=widths)

    def apply_small(v, x):
        return small_model.apply(v, x)

    # Two compilations of each forward: XLA's default, and without YNNPACK (``NO_YNNPACK``), so that
    # convolutions run on XLA's own (Eigen) emitter.
    configs = {"XLA default": None, "YNNPACK off": NO_YNNPACK}
    fwds, inputs = [], []
    for options in configs.values():
        fwds += [jax.jit(apply, compiler_options=options), jax.jit(apply_small, compiler_options=options)]
        inputs += [variables, small]
    # The shrunk model, in both, against the masked model (XLA default).
    probe = x[:4]
    ref = np.asarray(fwds[0](jp.apply_masks(variables, masks), probe))
    outs = [np.asarray(fwd(small, probe)) for fwd in fwds[1::2]]
    rel = max(float(np.max(np.abs(out - ref)) / np.max(np.abs(ref))) for out in outs)

    jax.block_until_ready([fwd(v, x) for fwd, v in zip(fwds, inputs)])  # compile
    times = interleaved(
        [lambda fwd=fwd, v=v: fwd(v, x).block_until_ready() for fwd, v in zip(fwds, inputs)], args.repeats
    )
    latency = {name: (times[2 * i], times[2 * i + 1]) for i, name in enumerate(configs)}
    return {
        "params": (count(variables["params"]), count(small["params"])),
        "flops": (flops(apply, variables, x), flops(apply_small, small, x)),
        "latency": latency,
        "prep": (t_groups, t_select, t_shrink),
        "rel": rel,
        "groups": groups,
    }


def conv_table(args):
    """Each distinct convolution of ResNet-18 alone, at full and half width, under both XLA
    configurations: where XLA:CPU's time goes, and how it scales with the width."""
    shapes = [  # (input size, in, out, kernel, stride, how many in the model)
        (args.size, 3, 64, 7, 2, 1), (args.size // 4, 64, 64, 3, 1, 4), (args.size // 4, 64, 128, 3, 2, 1),
        (args.size // 4, 64, 128, 1, 2, 1), (args.size // 8, 128, 128, 3, 1, 3),
        (args.size // 8, 128, 256, 3, 2, 1), (args.size // 8, 128, 256, 1, 2, 1),
        (args.size // 16, 256, 256, 3, 1, 3), (args.size // 16, 256, 512, 3, 2, 1),
        (args.size // 16, 256, 512, 1, 2, 1), (args.size // 32, 512, 512, 3, 1, 3),
    ]  # fmt: skip
    print(f"\nResNet-18's convolutions alone, batch {args.batch}: ms at full width / half width (ratio)")
    print(
        f"  {'size':>4} {'in':>4} {'out':>4} k s  n  "
        + "".join(f"{name:>26}" for name in ("XLA default", "YNNPACK off"))
    )
    total = np.zeros((2, 2))
    for size, cin, cout, k, stride, n in shapes:
        cells = []
        for c, options in enumerate((None, NO_YNNPACK)):
            ms = []
            for half in (1, 2):
                x = jnp.ones((args.batch, size, size, cin if cin == 3 else cin // half))
                w = jnp.ones((k, k, x.shape[-1], cout // half))
                conv = jax.jit(
                    lambda x, w, s=stride, p=k // 2: jax.lax.conv_general_dilated(
                        x, w, (s, s), [(p, p)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
                    ),
                    compiler_options=options,
                )
                conv(x, w).block_until_ready()
                ms.append(
                    1e3
                    * interleaved([lambda conv=conv, x=x, w=w: conv(x, w).block_until_ready()], args.repeats)[
                        0
                    ]
                )
            total[c] += n * np.array(ms)
            cells.append(f"{ms[0]:8.2f} / {ms[1]:6.2f} ({ms[0] / ms[1]:.2f}x)")
        print(f"  {size:>4} {cin:>4} {cout:>4} {k} {stride} {n:>2}  " + "".join(f"{c:>26}" for c in cells))
    print(
        "  total (x n)            "
        + "".join(f"{f'{a:8.1f} / {b:6.1f} ({a / b:.2f}x)':>26}" for a, b in total)
    )


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
        round_to=args.round_to,
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
        "version": importlib.metadata.version("torch-pruning"),  # its wheel has no __version__
        "threads": torch.get_num_threads(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--scope", choices=("layer", "global"), default="layer")
    parser.add_argument("--round-to", type=int, default=None, help="keep a multiple of this many channels")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--groups", action="store_true", help="print the ResNet-18's channel groups")
    parser.add_argument("--convs", action="store_true", help="time each convolution alone at both widths")
    args = parser.parse_args(argv)

    print(
        f"ResNet-18, batch {args.batch}, {args.size}x{args.size}, {100 * args.amount:.0f} % of channels "
        f"(scope={args.scope}, round_to={args.round_to}), "
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}"
    )
    if args.convs:
        conv_table(args)
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
    for name, (dense, small) in j["latency"].items():
        row(f"latency, {name}", dense, small, "ms", 1e-3)
    tg, ts, tk = j["prep"]
    print(
        f"  channel_groups {tg:.2f} s + group_structured {ts:.2f} s + shrink {tk:.2f} s "
        f"= {tg + ts + tk:.2f} s; shrunk vs masked: max |diff| / max |out| = {j['rel']:.1e}"
    )
    if t is None:
        print("\nTorch-Pruning is not installed (pip install --no-deps torch-pruning): no anchor")
        return j, t
    print(f"\nTorch-Pruning {t['version']} (torch, {t['threads']} threads)")
    row("params", *t["params"], "M", 1e6)
    row("MACs (x2 = FLOPs)", *t["macs"], "G", 1e9)
    row("latency (median)", *t["latency"], "ms", 1e-3)
    print(f"  MagnitudePruner + step: {t['prep']:.2f} s")
    ratios = ", ".join(f"{d / s:.2f}x ({name})" for name, (d, s) in j["latency"].items())
    print(
        f"\nreduction, jprune vs Torch-Pruning: FLOPs {j['flops'][0] / j['flops'][1]:.2f}x vs "
        f"{t['macs'][0] / t['macs'][1]:.2f}x; latency {ratios} vs {t['latency'][0] / t['latency'][1]:.2f}x"
    )
    return j, t


if __name__ == "__main__":
    main()
