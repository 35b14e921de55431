"""Convert a torch pruned checkpoint to Flax, keep pruning and fine-tuning in JAX, and go back.

1. torch: train the seed's LeNet briefly, prune it (``prune.global_unstructured``, L1, 80 %) and
   save its state_dict (``weight_orig`` + ``weight_mask`` keys).
2. ``jprune.interop.from_torch``: Flax params (kernels in Flax layout) + bool masks; the Flax
   LeNet predicts exactly what the torch one does.
3. jprune: prune further to 90 % (``jp.prune_to_sparsity``) and fine-tune with ``jp.keep_pruned``.
4. ``jprune.interop.to_torch``: back to a torch state_dict with the same keys, loaded into a fresh
   torch LeNet with ``load_pruned_state_dict``.

Run: ``python examples/convert_torch_checkpoint.py [--out out] [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import optax
import torch
from torch.nn.utils import prune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lenet  # noqa: E402
from jprune.interop import from_torch, load_pruned_state_dict, to_torch  # noqa: E402

import jprune as jp  # noqa: E402


def torch_predict(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).argmax(-1)


def torch_train(model, x, y, *, epochs, batch_size=64):
    """A few epochs of Adam in torch: the checkpoint we convert is a trained one."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y).long()
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--epochs", type=int, default=5, help="training / fine-tuning epochs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    x_tr, y_tr, x_te, y_te = lenet.load_digits_28()
    if args.smoke:
        args.epochs = 1
        x_tr, y_tr, x_te, y_te = x_tr[:256], y_tr[:256], x_te[:128], y_te[:128]

    # 1. A pruned torch checkpoint ----------------------------------------------------------
    torch.manual_seed(0)
    model = torch_train(lenet.torch_lenet(), x_tr, y_tr, epochs=args.epochs)
    weights = [(getattr(model, n), "weight") for n in ("conv1", "conv2", "fc1", "fc2", "fc3")]
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=0.8)
    src = os.path.join(args.out, "torch_lenet_pruned80.pt")
    torch.save(model.state_dict(), src)
    acc = np.mean(torch_predict(model, x_te).numpy() == y_te)
    print(f"torch LeNet pruned to 80 %: {100 * acc:.2f} % accuracy; checkpoint: {src}")
    print(f"  keys: {list(model.state_dict())}")

    # 2. torch -> Flax ----------------------------------------------------------------------
    ckpt = from_torch(src)
    params, masks = ckpt["params"], ckpt["masks"]
    print(f"\nFlax params + masks from torch:\n{jp.sparsity(masks, params)}")
    same = np.mean(np.asarray(lenet.predict(params, masks, x_te)) == torch_predict(model, x_te).numpy())
    print(f"Flax vs torch predictions on {len(x_te)} digits: {100 * same:.2f} % agree")

    # 3. Prune further and fine-tune in JAX -------------------------------------------------
    masks = jp.prune_to_sparsity(params, 0.9, masks=masks)
    tx = jp.keep_pruned(optax.adam(1e-3), masks)
    opt_state = tx.init(params)
    step = lenet.make_train_step(tx)
    key = jax.random.key(0)
    for epoch_key in jax.random.split(key, args.epochs):
        for xb, yb in lenet.batches(x_tr, y_tr, 64, key=epoch_key):
            params, opt_state, _ = step(params, opt_state, 0, xb, yb)
    acc = lenet.accuracy(params, masks, x_te, y_te)
    print(f"\npruned to {jp.sparsity(masks).fraction:.1%} and fine-tuned: {100 * acc:.2f} % accuracy")

    # 4. Flax -> torch ----------------------------------------------------------------------
    sd = to_torch({"params": params, "masks": masks, "torch": ckpt["torch"]})
    dst = os.path.join(args.out, "torch_lenet_pruned90_finetuned.pt")
    torch.save(sd, dst)
    fresh = lenet.torch_lenet()
    load_pruned_state_dict(fresh, torch.load(dst, weights_only=True))
    agree = np.mean(np.asarray(lenet.predict(params, masks, x_te)) == torch_predict(fresh, x_te).numpy())
    print(
        f"back in torch ({dst}): same keys {list(sd) == list(model.state_dict())}, "
        f"{100 * agree:.2f} % of predictions agree"
    )
    return {"agree_in": float(same), "agree_out": float(agree), "accuracy": acc}


if __name__ == "__main__":
    main()
