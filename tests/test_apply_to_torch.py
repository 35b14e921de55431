"""jprune.interop.apply_to_torch: masks computed in JAX installed on a live torch module."""

import jax
import numpy as np
import pytest
import torch
from jprune.interop import apply_to_torch, from_torch
from torch.nn.utils import prune

import jprune as jp


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )


def state(module: torch.nn.Module) -> tuple:
    """Everything apply_to_torch may change: state_dict keys and values, pruning hooks."""
    sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    hooks = [len(m._forward_pre_hooks) for m in module.modules()]
    return sd, hooks


def same_state(a: tuple, b: tuple) -> bool:
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1]


def test_jax_masks_become_torch_pruning():
    """Global L1 in JAX on the torch model's own params; torch's effective weights are then the
    masked Flax weights in torch's layout (Conv (O, I, kh, kw), Linear (out, in))."""
    model = cnn()
    params = from_torch(model)["params"]
    masks = jp.global_unstructured(params, 0.6)
    apply_to_torch(model, masks)
    eff = jax.tree.map(np.asarray, jp.apply_masks(params, masks))
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), eff["0"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(model[4].weight.detach().numpy(), eff["4"]["kernel"].T)
    assert prune.is_pruned(model) and not hasattr(model[4], "bias_mask")
    # and back: from_torch reads the same masks
    back = from_torch(model)["masks"]
    for k in ("0", "4"):
        np.testing.assert_array_equal(back[k]["kernel"], np.asarray(masks[k]["kernel"]))


def test_attention_masks_pack_into_in_proj_weight():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    params = from_torch(model)["params"]
    masks = jp.l1_unstructured(params, 0.5)  # query/key/value/out kernels
    apply_to_torch(model, masks)
    assert hasattr(model[0], "in_proj_weight_mask") and hasattr(model[0].out_proj, "weight_mask")
    back = from_torch(model)["masks"]
    for name in ("query", "key", "value", "out"):
        np.testing.assert_array_equal(back["0"][name]["kernel"], np.asarray(masks["0"][name]["kernel"]))
    x = torch.randn(5, 1, 8)
    out = model[0](x, x, x, need_weights=False)[0]  # the pruned layer still runs
    assert out.shape == (5, 1, 8)


def test_a_mask_on_an_already_pruned_tensor_is_combined_as_torch_does():
    model = cnn()
    prune.l1_unstructured(model[4], "weight", amount=0.3)
    before = model[4].weight_mask.clone()
    params = from_torch(model)["params"]
    keep = np.ones(params["4"]["kernel"].shape, bool)
    keep[:5] = False  # the first 5 input features
    apply_to_torch(model, {"4": {"kernel": keep}})
    np.testing.assert_array_equal(model[4].weight_mask.numpy(), before.numpy() * keep.T)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"9": {"kernel": np.ones((2, 2), bool)}}, r"masks at \['9/kernel'\] have no tensor"),
        (
            {"4": {"kernel": np.ones((10, 128), bool)}},
            r"mask at 4/kernel must be a bool array of shape \(128, 10\)",
        ),
        ({"4": {"kernel": np.ones((128, 10), np.int32)}}, "must be a bool array"),
    ],
)
def test_refusals_name_the_mask_and_change_nothing(bad, match):
    model = cnn()
    before = state(model)
    masks = {"0": {"kernel": np.zeros((3, 3, 3, 8), bool)}, **bad}
    with pytest.raises(ValueError, match=match):
        apply_to_torch(model, masks)
    assert same_state(state(model), before)


def test_a_failure_midway_is_undone(monkeypatch):
    model = cnn()
    before = state(model)
    params = from_torch(model)["params"]
    masks = jp.l1_unstructured(params, 0.5)
    real, calls = prune.custom_from_mask, []

    def flaky(module, name, mask):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(module, name, mask)

    monkeypatch.setattr(prune, "custom_from_mask", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        apply_to_torch(model, masks)
    assert len(calls) == 2  # the first mask was installed, then undone
    assert same_state(state(model), before) and not prune.is_pruned(model)
