"""Compact and lossless pruned checkpoints vs dense ones and torch's, side by side.

Targets (issue 12), each printed as a ratio:
  * a 90 %-sparse LeNet and a 90 %-sparse 1e8-parameter MLP, compact: <= 13 % of dense float32;
  * lossless files: masks <= 1/32 of torch's float32 masks;
  * compact 1e8: save and load each <= 2x the dense msgpack save / load;
  * compact 1e8: peak memory of save and of load <= 2x the dense size.

    python bench/bench_compact.py                  # LeNet + the 1e8 MLP (400 MB dense), ~1 min
    python bench/bench_compact.py --params 1e7     # a smaller MLP

Times are the best of `--repeat`, files in the page cache. Peak memory is what `tracemalloc`
sees (numpy and Python allocations) in a separate run of each step: for a load the arrays it
returns are included; for a save, the checkpoint being saved is counted on top of what the save
allocates.
"""

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch
from jprune.interop import _packed, from_torch, load, save
from torch.nn.utils import prune

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))

from lenet import torch_lenet  # noqa: E402  (the seed's LeNet in torch)


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def dense_bytes(sd) -> int:
    return sum(t.numel() * 4 for k, t in sd.items() if not (k.endswith("_mask") and f"{k[:-5]}_orig" in sd))


def mask_ratio(masks) -> tuple[int, int]:
    """(bytes of the packed mask records as the files store them, bytes of float32 masks)."""
    return sum(len(_packed.pack_mask(m)) for m in masks), sum(m.size * 4 for m in masks)


def lenet(d: str) -> None:
    torch.manual_seed(0)
    model = torch_lenet()
    layers = [model.conv1, model.conv2, model.fc1, model.fc2, model.fc3]
    prune.global_unstructured(
        [(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=0.9
    )
    sd = model.state_dict()
    dense = dense_bytes(sd)
    ckpt = from_torch(model)
    files = {
        "torch .pt (weight_orig + float32 weight_mask)": ("a.pt", sd, {}),
        "lossless .msgpack": ("l.msgpack", ckpt, {}),
        "lossless .safetensors": ("l.safetensors", sd, {}),
        "compact .msgpack": ("c.msgpack", ckpt, {"compact": True}),
        "compact .safetensors": ("c.safetensors", sd, {"compact": True}),
        "compact orbax": ("c.orbax", ckpt, {"compact": True}),
    }
    n = sum(p.numel() for p in model.parameters())
    print(f"\nLeNet, {n} parameters, 90 % of the weights pruned (global L1); dense float32 {dense} B")
    sizes = {}
    for label, (name, obj, kw) in files.items():
        save(obj, os.path.join(d, name), **kw)
        path = os.path.join(d, name)
        size = (
            sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
            if os.path.isdir(path)
            else os.path.getsize(path)
        )
        sizes[label] = size
        print(f"  {label:<46}{size:>9} B  {pct(size / dense):>9} of dense")
    packed, floats = mask_ratio([m for m in _leaves(ckpt["masks"]) if m is not None])
    best = min(sizes["compact .msgpack"], sizes["compact .safetensors"]) / dense
    print(
        f"  compact: {pct(best)} of dense float32 (target <= 13 %: {verdict(best <= 0.13)}); "
        f"lossless masks {packed} B vs torch's float32 masks {floats} B = 1/{floats / packed:.1f} "
        f"(target <= 1/32: {verdict(packed * 32 <= floats)})"
    )


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def mlp_checkpoint(n_params: int, width: int) -> dict:
    """Linear layers width x width, each weight 90 % pruned by magnitude (the 10 % largest kept)."""
    rng = np.random.default_rng(0)
    layers = max(1, round(n_params / (width * width + width)))
    params, masks = {}, {}
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32)
        k = int(0.9 * w.size)
        threshold = np.partition(np.abs(w).reshape(-1), k)[k]
        params[f"fc{i}"] = {"kernel": w, "bias": rng.standard_normal(width, dtype=np.float32)}
        masks[f"fc{i}"] = {"kernel": np.abs(w) >= threshold, "bias": None}
    return {"params": params, "masks": masks}


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return min(times)


def peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    out = fn()
    top = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    return top


def mlp(d: str, n_params: float, width: int, repeat: int) -> None:
    ckpt = mlp_checkpoint(int(n_params), width)
    n = sum(p.size for p in _leaves(ckpt["params"]))
    dense_size = sum(p.nbytes for p in _leaves(ckpt["params"]))
    dense = {"params": ckpt["params"], "masks": {k: {"kernel": None, "bias": None} for k in ckpt["params"]}}
    input_bytes = dense_size + sum(m.nbytes for m in _leaves(ckpt["masks"]) if m is not None)
    print(
        f"\nMLP, {n:.3g} parameters ({len(ckpt['params'])} x {width}^2), weights 90 % pruned; "
        f"dense {dense_size / 1e6:.0f} MB"
    )
    paths = {k: os.path.join(d, f"{k}.msgpack") for k in ("dense", "lossless", "compact")}
    kinds = {"dense": (dense, {}), "lossless": (ckpt, {}), "compact": (ckpt, {"compact": True})}
    rows = {}
    for kind, (obj, kw) in kinds.items():
        t_save = best_time(lambda obj=obj, kw=kw, kind=kind: save(obj, paths[kind], **kw), repeat)
        t_load = best_time(lambda kind=kind: load(paths[kind]), repeat)
        m_save = peak(lambda obj=obj, kw=kw, kind=kind: save(obj, paths[kind], **kw))
        m_load = peak(lambda kind=kind: load(paths[kind]))
        rows[kind] = (os.path.getsize(paths[kind]), t_save, t_load, m_save, m_load)
    print(
        f"  {'msgpack':<10}{'size':>10}{'of dense':>10}{'save s':>9}{'load s':>9}"
        f"{'save peak':>11}{'load peak':>11}"
    )
    for kind, (size, ts, tl, ms, ml) in rows.items():
        held = input_bytes if kind != "dense" else dense_size  # the checkpoint being saved
        print(
            f"  {kind:<10}{size / 1e6:>8.1f}MB{pct(size / dense_size):>10}{ts:>9.2f}{tl:>9.2f}"
            f"{(held + ms) / dense_size:>10.2f}x{ml / dense_size:>10.2f}x"
        )
    size, ts, tl, ms, ml = rows["compact"]
    _, ds, dl, _, _ = rows["dense"]
    packed, floats = mask_ratio([m for m in _leaves(ckpt["masks"]) if m is not None])
    save_peak = (input_bytes + ms) / dense_size
    print(
        f"  compact: {pct(size / dense_size)} of dense float32 (target <= 13 %: "
        f"{verdict(size <= 0.13 * dense_size)})\n"
        f"  lossless masks: 1/{floats / packed:.1f} of torch's float32 masks (target <= 1/32: "
        f"{verdict(packed * 32 <= floats)})\n"
        f"  compact save {ts / ds:.2f}x dense save, load {tl / dl:.2f}x dense load (target <= 2x: "
        f"{verdict(ts <= 2 * ds and tl <= 2 * dl)})\n"
        f"  compact peak memory: save {save_peak:.2f}x dense (the checkpoint held included), load "
        f"{ml / dense_size:.2f}x dense (the loaded arrays included) (target <= 2x: "
        f"{verdict(save_peak <= 2 and ml <= 2 * dense_size)})"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e8, help="MLP parameters (default 1e8)")
    parser.add_argument("--width", type=int, default=5000, help="MLP width (default 5000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the files (default tmp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        lenet(d)
        mlp(d, args.params, args.width, args.repeat)


if __name__ == "__main__":
    main()
