"""torch's pruning tutorial, step by step in jprune: each torch line as a comment, jprune below it.

Run: ``python examples/seed_walkthrough.py`` (a freshly initialised LeNet; ``examples/demo.py`` runs
the same steps on a trained one). The params are a Linen params dict; masks mirror it (a bool
array where a leaf is pruned, None elsewhere); nothing is mutated. Torch's ``dim=0`` of a conv or
linear weight (output channels) is the last axis of a Flax kernel, hence ``axis=-1``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lenet import init_params  # noqa: E402

import jprune as jp  # noqa: E402

WEIGHTS = ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel", "fc3/kernel"]


def _only(masks, path):
    """``masks`` with every leaf but ``path`` set to None (to act on one parameter)."""
    module, name = path.split("/")
    return {
        mod: {n: (m if (mod, n) == (module, name) else None) for n, m in leaves.items()}
        for mod, leaves in masks.items()
    }


def _without(masks, path):
    """``masks`` with ``path`` set to None (that parameter is no longer pruned)."""
    module, name = path.split("/")
    return {
        mod: {n: (None if (mod, n) == (module, name) else m) for n, m in leaves.items()}
        for mod, leaves in masks.items()
    }


@jp.custom_method(kind="unstructured")
def foobar_unstructured(t, default_mask):
    """The tutorial's FooBarPruningMethod: prune every other entry."""
    # mask = default_mask.clone(); mask.view(-1)[::2] = 0; return mask
    return default_mask.ravel().at[::2].set(False).reshape(t.shape)


def walkthrough(params, *, key, show=print):
    """Runs the tutorial's steps on ``params``; returns ``(params, masks)`` after the last step.

    ``show(title, report)`` is called after each step with a ``jp.sparsity`` report.
    """
    k1, _ = jax.random.split(key)
    original = params

    # --- Pruning a single module -----------------------------------------------------------
    # module = model.conv1
    # prune.random_unstructured(module, name="weight", amount=0.3)
    masks = jp.random_unstructured(params, 0.3, key=k1, select="conv1/kernel")
    show("random_unstructured(conv1.weight, 0.3)", jp.sparsity(masks, params))

    # prune.l1_unstructured(module, name="bias", amount=3)
    masks = jp.l1_unstructured(params, 3, masks=masks, select="conv1/bias")
    show("l1_unstructured(conv1.bias, amount=3)", jp.sparsity(masks, params))

    # --- Iterative pruning: the new mask is combined with the old one -----------------------
    # prune.ln_structured(module, name="weight", amount=0.5, n=2, dim=0)
    masks = jp.ln_structured(params, 0.5, 2, -1, masks=masks, select="conv1/kernel")
    show("ln_structured(conv1.weight, 0.5, n=2, dim=0)", jp.sparsity(masks, params))

    # --- Remove the re-parametrization: bake the zeros into conv1.weight --------------------
    # prune.remove(module, "weight")
    params = jp.remove(params, _only(masks, "conv1/kernel"))
    masks = _without(masks, "conv1/kernel")
    show("remove(conv1, 'weight')  (conv1.bias stays pruned)", jp.sparsity(masks, params))

    # --- Pruning multiple parameters in a model ---------------------------------------------
    # new_model = LeNet()
    # for name, module in new_model.named_modules():
    #     if isinstance(module, torch.nn.Conv2d):
    #         prune.l1_unstructured(module, name="weight", amount=0.2)
    #     elif isinstance(module, torch.nn.Linear):
    #         prune.ln_structured(module, name="weight", amount=0.4, n=2, dim=0)
    several = jp.l1_unstructured(original, 0.2, select="conv*/kernel")
    several = jp.ln_structured(original, 0.4, 2, -1, masks=several, select="fc*/kernel")
    show(
        "new model, several modules: l1 0.2 on convs, ln n=2 dim=0 0.4 on linears",
        jp.sparsity(several, original),
    )

    # --- Global pruning (the tutorial starts again from a fresh model) -----------------------
    # model = LeNet()
    # parameters_to_prune = ((model.conv1, "weight"), (model.conv2, "weight"),
    #                        (model.fc1, "weight"), (model.fc2, "weight"), (model.fc3, "weight"))
    # prune.global_unstructured(parameters_to_prune, pruning_method=prune.L1Unstructured,
    #                           amount=0.2)
    params = original
    masks = jp.global_unstructured(params, 0.2, select=WEIGHTS)
    show("global_unstructured(5 weights, L1, 0.2)", jp.sparsity(masks, params))

    # --- Extending torch.nn.utils.prune with custom pruning functions -----------------------
    # class FooBarPruningMethod(prune.BasePruningMethod): PRUNING_TYPE = "unstructured" ...
    # foobar_unstructured(model.fc3, name="bias")
    masks = foobar_unstructured(params, masks=masks, select="fc3/bias")
    show("foobar_unstructured(fc3.bias): every other entry", jp.sparsity(masks, params))

    # --- Make it permanent ------------------------------------------------------------------
    # for module, name in parameters_to_prune: prune.remove(module, name)
    params = jp.remove(params, masks)
    return params, masks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="(same run; kept for the test suite)")
    args = parser.parse_args(argv)

    def show(title, report):
        print(f"\n== {title}\n{report}")

    params = init_params(args.seed)
    _, masks = walkthrough(params, key=jax.random.key(args.seed), show=show)
    print(
        f"\nfinal: {jp.sparsity(masks).fraction:.1%} of the masked entries pruned; "
        "jp.remove baked the zeros into the params"
    )


if __name__ == "__main__":
    main()
