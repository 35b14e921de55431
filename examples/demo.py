"""jprune demo: prune -> fine-tune the seed's LeNet on real handwritten digits, export to torch.

1. Train the seed's LeNet (Flax Linen) on scikit-learn's digits (8x8, resized to 28x28; nothing is
   downloaded), or on MNIST idx files with ``--data FOLDER``.
2. Walk the seed's pruning steps with jprune (single module, iterative, remove, several modules,
   global, custom method), printing the sparsity table after each.
3. Accuracy vs sparsity: one-shot global L1 pruning at 0/50/70/80/90/95 %, without and with
   fine-tuning (``jp.keep_pruned`` keeps pruned weights at exactly 0), gradual pruning to 90 %
   (Zhu & Gupta's polynomial schedule, traced inside one compiled train step), 90 % split across
   the layers by Erdős–Rényi-kernel (``scope="erk"``) and 2:4 N:M sparsity on the fully connected
   layers (``jp.n_m_unstructured``), each fine-tuned. Table on the terminal, plot in the output
   folder.
4. Export the fine-tuned 90 %-sparse model to a torch checkpoint (``weight_orig``/``weight_mask``),
   load it into the torch LeNet and check that torch predicts the same classes.
5. Structured pruning that shrinks: 50 % of the channels pruned globally over the coupled groups
   read from the jaxpr (``jp.channel_groups``), fine-tuned, then removed (``jp.shrink``): params,
   FLOPs, latency and accuracy of the dense and the smaller LeNet (``examples/structured_speed.py``
   does the same for a ResNet-18-style CNN and a ViT).

Run: ``make demo`` or ``python examples/demo.py [--out out] [--data MNIST_DIR] [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lenet  # noqa: E402
import seed_walkthrough  # noqa: E402
import structured_speed  # noqa: E402

import jprune as jp  # noqa: E402

SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def train(params, masks, step_fn, tx, data, *, epochs, batch_size, key, desc, quiet):
    """Runs ``epochs`` of ``step_fn`` from a fresh optimizer state with ``masks``."""
    x_tr, y_tr = data
    params = jp.apply_masks(params, masks)  # pruned weights start at 0; keep_pruned holds them there
    opt_state = jp.set_masks(tx.init(params), masks)
    steps_per_epoch = len(x_tr) // batch_size
    step = 0
    with tqdm(total=epochs * steps_per_epoch, desc=desc, leave=False, disable=quiet) as bar:
        for epoch_key in jax.random.split(key, epochs):
            for xb, yb in lenet.batches(x_tr, y_tr, batch_size, key=epoch_key):
                params, opt_state, loss = step_fn(params, opt_state, step, xb, yb)
                step += 1
                bar.update()
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return params, jp.get_masks(opt_state)


def _all_arrays(masks, like):
    """``masks`` with an all-True array where it has None and ``like`` an array: the fine-tuning
    step was compiled for masks on all five weights."""
    return jax.tree.map(lambda k, m: k if m is None else m, like, masks, is_leaf=lambda x: x is None)


def per_layer(masks, params):
    """Sparsity of each LeNet weight (kernel), in %."""
    rows = {r.path: r.fraction for r in jp.sparsity(masks, params).rows}
    return [100 * rows.get(f"{name}/kernel", 0.0) for name in LAYERS]


def plot(path, results, dense_acc, gradual, layer_bars, extra=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [100 * s for s, _, _, _ in results]
    ax1.plot(xs, [100 * a for _, a, _, _ in results], "o--", label="one-shot, no fine-tuning")
    ax1.plot(xs, [100 * a for _, _, a, _ in results], "o-", label="one-shot + fine-tuning")
    ax1.plot([100 * gradual[0]], [100 * gradual[1]], "*", markersize=14, label="gradual (polynomial)")
    for (label, sparsity, acc), marker in zip(extra, "Dsv^"):
        ax1.plot([100 * sparsity], [100 * acc], marker, markersize=9, label=f"{label} + fine-tuning")
    ax1.axhline(100 * dense_acc, color="gray", lw=0.8, ls=":", label="dense")
    ax1.set(xlabel="global sparsity of the 5 weights (%)", ylabel="test accuracy (%)")
    ax1.set_title("LeNet on held-out digits: accuracy vs sparsity")
    ax1.set_ylim(0, 100)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower left")

    width = 0.8 / len(layer_bars)
    for i, (label, values) in enumerate(layer_bars.items()):
        pos = np.arange(len(LAYERS)) + (i - (len(layer_bars) - 1) / 2) * width
        ax2.bar(pos, values, width, label=label)
    ax2.set_xticks(np.arange(len(LAYERS)), LAYERS)
    ax2.set(xlabel="weight", ylabel="sparsity (%)", ylim=(0, 115))
    ax2.set_title("per-layer sparsity: global L1 decides the split, ERK and 2:4 set it")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export_to_torch(params, masks, x_test, out_dir):
    """Step 4: jprune -> torch checkpoint -> torch LeNet; returns (agreement, path, torch preds)."""
    import torch
    from jprune.interop import load_pruned_state_dict, save, to_torch

    ckpt = {
        "params": jax.tree.map(np.asarray, params),
        "masks": jax.tree.map(np.asarray, masks),
    }
    state_dict = to_torch(ckpt)
    path = os.path.join(out_dir, "lenet_pruned90.pt")
    torch.save(state_dict, path)
    compact = os.path.join(out_dir, "lenet_pruned90.compact.msgpack")  # kept values + packed masks
    save(ckpt, compact, compact=True)
    print(
        f"checkpoint sizes: torch .pt {os.path.getsize(path)} B (weight_orig + float32 weight_mask), "
        f"compact {os.path.getsize(compact)} B ({compact})"
    )

    model = lenet.torch_lenet()
    load_pruned_state_dict(model, torch.load(path, weights_only=True))
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x_test.transpose(0, 3, 1, 2))))
    torch_pred = logits.argmax(-1).numpy()
    jax_pred = np.asarray(lenet.predict(params, masks, x_test))
    zeros = sum(int((m == 0).sum()) for k, m in state_dict.items() if k.endswith("_mask"))
    return float(np.mean(torch_pred == jax_pred)), path, zeros, list(state_dict)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="output folder (default: out)")
    parser.add_argument("--data", help="folder with the 4 MNIST idx files (default: sklearn digits)")
    parser.add_argument("--epochs", type=int, help="dense training epochs (digits 30, MNIST 3)")
    parser.add_argument("--ft-epochs", type=int, help="fine-tuning epochs (digits 15, MNIST 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    quiet = args.smoke
    sparsities = SPARSITIES
    if args.smoke:
        args.epochs, args.ft_epochs, sparsities = 1, 1, (0.0, 0.9)
    big = args.data is not None  # MNIST: 60k images, far fewer epochs needed
    args.epochs = args.epochs or (3 if big else 30)
    args.ft_epochs = args.ft_epochs or (2 if big else 15)

    # 1. Data and dense training ------------------------------------------------------------
    banner("1. Train the seed's LeNet (Flax) on handwritten digits")
    if args.data:
        x_tr, y_tr, x_te, y_te = lenet.load_mnist(args.data)
        source = f"MNIST from {args.data}"
    else:
        x_tr, y_tr, x_te, y_te = lenet.load_digits_28(seed=args.seed)
        source = "scikit-learn digits (8x8 -> 28x28)"
    if args.smoke:
        x_tr, y_tr, x_te, y_te = x_tr[:256], y_tr[:256], x_te[:128], y_te[:128]
    print(f"data: {source}; {len(x_tr)} train / {len(x_te)} held-out test images")

    key = jax.random.key(args.seed)
    params = lenet.init_params(args.seed)
    all_kept = jp.identity(params)  # all-True masks on the 5 weights: one program for every run
    train_tx = jp.keep_pruned(optax.adam(1e-3), all_kept)
    ft_tx = jp.keep_pruned(optax.adam(5e-4), all_kept)
    train_step = lenet.make_train_step(train_tx)
    ft_step = lenet.make_train_step(ft_tx)
    data = (x_tr, y_tr)
    fit = dict(batch_size=args.batch_size, quiet=quiet)

    params, _ = train(
        params, all_kept, train_step, train_tx, data, epochs=args.epochs,
        key=jax.random.fold_in(key, 0), desc="dense training", **fit,
    )  # fmt: skip
    dense_acc = lenet.accuracy(params, None, x_te, y_te)
    print(f"dense LeNet: {100 * dense_acc:.2f} % test accuracy ({args.epochs} epochs)")

    # 2. The seed's steps -------------------------------------------------------------------
    banner("2. The seed's pruning steps with jprune (examples/seed_walkthrough.py)")

    def show(title, report):
        print(f"\n-- {title}\n{report}")

    seed_walkthrough.walkthrough(params, key=jax.random.fold_in(key, 1), show=show)

    # 3. Accuracy vs sparsity ---------------------------------------------------------------
    banner("3. Accuracy vs sparsity: one-shot global L1 pruning, then fine-tuning; gradual")
    results, kept = [], {}
    for i, s in enumerate(tqdm(sparsities, desc="sparsities", disable=quiet)):
        masks = jp.global_unstructured(params, s)  # the 5 weights (default: ndim >= 2)
        acc_oneshot = lenet.accuracy(params, masks, x_te, y_te)
        ft_params, ft_masks = train(
            params, masks, ft_step, ft_tx, data, epochs=args.ft_epochs,
            key=jax.random.fold_in(key, 10 + i), desc=f"fine-tune at {s:.0%}", **fit,
        )  # fmt: skip
        acc_ft = lenet.accuracy(ft_params, ft_masks, x_te, y_te)
        results.append((s, acc_oneshot, acc_ft, jp.sparsity(ft_masks).fraction))
        kept[s] = (ft_params, ft_masks)

    # Gradual: from the dense model, Zhu & Gupta's cubic schedule 0 -> 90 % over the first
    # ft_epochs, re-pruning every 10 steps inside the jitted step, then as long again at 90 %.
    steps_per_epoch = len(x_tr) // args.batch_size
    prune_steps = max(args.ft_epochs * steps_per_epoch - 1, 1)
    schedule = jp.polynomial_sparsity(0.9, 0, prune_steps)
    gradual_step = lenet.make_train_step(ft_tx, schedule, frequency=min(10, prune_steps))
    g_params, g_masks = train(
        params, all_kept, gradual_step, ft_tx, data, epochs=2 * args.ft_epochs,
        key=jax.random.fold_in(key, 99), desc="gradual pruning to 90%", **fit,
    )  # fmt: skip
    g_acc = lenet.accuracy(g_params, g_masks, x_te, y_te)
    g_sparsity = jp.sparsity(g_masks).fraction
    exact_zero = all(
        jax.tree.leaves(
            jax.tree.map(
                lambda p, m: None if m is None else bool((np.asarray(p)[~np.asarray(m)] == 0).all()),
                g_params,
                g_masks,
            )
        )
    )

    # Two other splits, each one-shot then fine-tuned like the rows above: 90 % with layer
    # sparsities from Erdős–Rényi-kernel (RigL), and 2:4 N:M on the fully connected layers (the
    # conv kernels' input axes, 1 and 6, do not tile into groups of 4).
    other = {
        "one-shot ERK 90%": jp.prune_to_sparsity(params, 0.9, scope="erk"),
        "one-shot N:M 2:4 (fc layers)": jp.n_m_unstructured(params, 2, 4, select="fc*/kernel"),
    }
    extra = []
    for j, (label, masks) in enumerate(other.items()):
        acc_oneshot = lenet.accuracy(params, masks, x_te, y_te)
        o_params, o_masks = train(
            params, _all_arrays(masks, all_kept), ft_step, ft_tx, data, epochs=args.ft_epochs,
            key=jax.random.fold_in(key, 50 + j), desc=f"fine-tune {label}", **fit,
        )  # fmt: skip
        extra.append(
            (label, jp.sparsity(o_masks).fraction, acc_oneshot, lenet.accuracy(o_params, o_masks, x_te, y_te))
        )
        kept[label] = (o_params, o_masks)

    lines = [
        f"dense accuracy: {100 * dense_acc:.2f} %  (held-out: {len(x_te)} images)",
        f"{'method':<34}{'sparsity':>10}{'no fine-tune':>14}{'fine-tuned':>12}{'vs dense':>10}",
    ]
    for _, a0, a1, real in results:
        lines.append(
            f"{'one-shot global L1':<34}{100 * real:>9.1f}%{100 * a0:>13.2f}%{100 * a1:>11.2f}%"
            f"{100 * (a1 - dense_acc):>+9.2f}"
        )
    for label, real, a0, a1 in extra:
        lines.append(
            f"{label:<34}{100 * real:>9.1f}%{100 * a0:>13.2f}%{100 * a1:>11.2f}%"
            f"{100 * (a1 - dense_acc):>+9.2f}"
        )
    label = f"gradual (cubic, {2 * args.ft_epochs} epochs)"
    lines.append(
        f"{label:<34}{100 * g_sparsity:>9.1f}%{'-':>14}{100 * g_acc:>11.2f}%"
        f"{100 * (g_acc - dense_acc):>+9.2f}"
    )
    nm_layers = [r.path for r in jp.sparsity(kept["one-shot N:M 2:4 (fc layers)"][1]).rows if r.n_m]
    lines.append(f"2:4 pattern after fine-tuning (jp.sparsity): {', '.join(nm_layers)}")
    table = os.path.join(args.out, "accuracy_vs_sparsity.txt")
    with open(table, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"pruned weights exactly 0 after fine-tuning (gradual run): {exact_zero}")

    target = 0.9 if 0.9 in kept else max(kept)
    ft90_params, ft90_masks = kept[target]
    png = os.path.join(args.out, "accuracy_vs_sparsity.png")
    bars = {
        f"one-shot {target:.0%} + fine-tune": per_layer(ft90_masks, ft90_params),
        "gradual 90%": per_layer(g_masks, g_params),
        "ERK 90% + fine-tune": per_layer(*reversed(kept["one-shot ERK 90%"])),
        "2:4 + fine-tune": per_layer(*reversed(kept["one-shot N:M 2:4 (fc layers)"])),
    }
    plot(png, results, dense_acc, (g_sparsity, g_acc), bars, [(lb, s, a1) for lb, s, _, a1 in extra])
    print(f"plot: {png}; table: {table}")

    # 4. Export to torch --------------------------------------------------------------------
    banner(f"4. Export the fine-tuned {target:.0%}-sparse model to torch and compare predictions")
    agreement, pt_path, zeros, keys = export_to_torch(ft90_params, ft90_masks, x_te, args.out)
    print(f"torch state_dict keys: {keys}")
    print(f"{zeros} pruned entries in the torch *_mask buffers")
    print(f"torch vs jprune: {100 * agreement:.2f} % of {len(x_te)} test predictions agree")
    print(f"checkpoint: {pt_path}")

    # 5. Structured pruning that shrinks the model -------------------------------------------
    banner("5. Structured: prune 50 % of LeNet's channels globally, fine-tune, remove them (jp.shrink)")
    net = structured_speed.Net(lambda widths: lenet.LeNet(widths=widths), batch_norm=False)
    structured = structured_speed.prune_and_shrink(
        "LeNet", net, {"params": params}, (x_tr, y_tr, x_te, y_te), finetune=args.ft_epochs, lr=5e-4,
        batch=min(256, len(x_te)), repeats=3 if args.smoke else 20,
    )  # fmt: skip

    ft90_acc = next(a1 for s, _, a1, _ in results if s == target)
    print(
        f"\nDone in {time.perf_counter() - t0:.0f}s: dense {100 * dense_acc:.2f} %, "
        f"{target:.0%}-sparse fine-tuned {100 * ft90_acc:.2f} %, gradual {100 * g_acc:.2f} %, "
        f"torch agreement {100 * agreement:.2f} %; files: {png}, {table}, {pt_path}"
    )
    return {
        "dense": dense_acc,
        "results": results,
        "gradual": (g_sparsity, g_acc),
        "extra": {label: (real, a0, a1) for label, real, a0, a1 in extra},
        "nm_layers": nm_layers,
        "agreement": agreement,
        "exact_zero": exact_zero,
        "structured": structured,
    }


if __name__ == "__main__":
    main()
