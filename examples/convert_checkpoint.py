"""A pruned PyTorch checkpoint -> Flax -> pruned further in jprune -> back to PyTorch.

    python examples/convert_checkpoint.py [--out out]

1. torch: the seed's LeNet pruned with torch.nn.utils.prune, saved as a state_dict (.pt) with
   `weight_orig` / `weight_mask` keys;
2. `jprune convert` it to Flax (.msgpack) and `jprune inspect` both files;
3. Flax: the same logits from `LeNet().apply` on `jp.apply_masks(params, masks)`;
4. prune fc1 further in jprune, convert back, and load it into a fresh, unpruned torch LeNet with
   `load_pruned_state_dict`: torch predicts what Flax predicts.

The Flax LeNet flattens its NHWC activations in torch's (C, H, W) order before fc1, so fc1's
converted kernel is used as is (see `lenet.LeNet`).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lenet  # noqa: E402  (the Flax LeNet and the torch twin)
from jprune.interop import convert, load, load_pruned_state_dict, save  # noqa: E402
from jprune.interop._cli import main as jprune_cli  # noqa: E402

import jprune as jp  # noqa: E402


def torch_pruned_lenet(seed: int):
    """The seed's LeNet pruned in torch with the seed's sequence (tutorial order)."""
    import torch
    from torch.nn.utils import prune

    torch.manual_seed(seed)
    model = lenet.torch_lenet()
    prune.random_unstructured(model.conv1, name="weight", amount=0.3)
    prune.l1_unstructured(model.conv1, name="bias", amount=3)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=0.2)
        elif isinstance(module, torch.nn.Linear):
            prune.ln_structured(module, name="weight", amount=0.4, n=2, dim=0)
    prune.global_unstructured(
        [(getattr(model, n), "weight") for n in ("conv1", "conv2", "fc1", "fc2", "fc3")],
        pruning_method=prune.L1Unstructured,
        amount=0.2,
    )
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="output folder (default: out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="(same run; for the test suite)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch

    images = np.random.default_rng(args.seed).normal(size=(16, 28, 28, 1)).astype(np.float32)
    images_nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    print("1. torch: prune the seed's LeNet, save its state_dict")
    model = torch_pruned_lenet(args.seed)
    with torch.no_grad():
        torch_logits = model(images_nchw).numpy()
    pt, flax_file = (
        os.path.join(args.out, "lenet_pruned.pt"),
        os.path.join(args.out, "lenet.msgpack"),
    )
    save(model.state_dict(), pt)  # same as torch.save(model.state_dict(), pt), written atomically

    print(f"\n2. jprune convert {pt} {flax_file}; jprune inspect {flax_file}")
    convert(pt, flax_file)
    jprune_cli(["inspect", flax_file])

    print("\n3. Flax: same logits")
    ckpt = load(flax_file)  # {"params", "masks", "torch"}
    effective = jp.apply_masks(ckpt["params"], ckpt["masks"])
    flax_logits = np.asarray(lenet.LeNet().apply({"params": effective}, images))
    diff = float(np.abs(flax_logits - torch_logits).max())
    print(f"max |flax - torch| = {diff:.2e}")

    print("\n4. jprune: prune 80% of fc1's remaining weights, convert back to torch")
    masks = jp.l1_unstructured(ckpt["params"], 0.8, masks=ckpt["masks"], select="fc1/kernel")
    ckpt = {**ckpt, "masks": masks}
    flax_logits = np.asarray(lenet.LeNet().apply({"params": jp.apply_masks(ckpt["params"], masks)}, images))
    flax_back, pt_back = (
        os.path.join(args.out, "lenet_more.msgpack"),
        os.path.join(args.out, "lenet_more.pt"),
    )
    save(ckpt, flax_back)
    convert(flax_back, pt_back)
    fresh = lenet.torch_lenet()  # plain `weight` parameters
    load_pruned_state_dict(fresh, torch.load(pt_back, weights_only=True))
    with torch.no_grad():
        back_logits = fresh(images_nchw).numpy()
    agree = float(np.mean(back_logits.argmax(-1) == flax_logits.argmax(-1)))
    back_diff = float(np.abs(back_logits - flax_logits).max())
    print(
        f"torch (fresh LeNet + load_pruned_state_dict) vs Flax: max diff {back_diff:.2e}, "
        f"same predictions: {agree:.0%}"
    )
    jprune_cli(["inspect", pt_back])
    return {"diff": diff, "back_diff": back_diff, "agreement": agree}


if __name__ == "__main__":
    main()
