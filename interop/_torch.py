"""Torch-side helper: load a pruned state_dict into a module that is not (yet) pruned."""

from collections.abc import Mapping

import torch
from torch.nn.utils import prune


def load_pruned_state_dict(
    module: torch.nn.Module, state_dict: Mapping, *, strict: bool = True, reparametrize: bool = True
):
    """Loads a pruned state_dict (`X_orig` + `X_mask` keys) into a module that has plain `X`.

    A plain `load_state_dict` fails with missing `weight` and unexpected `weight_orig`,
    `weight_mask`. With `reparametrize=True` each such tensor first gets torch's own pruning
    reparametrisation (`prune.identity`, with the mask buffer in the state_dict's mask dtype), so
    the module ends up pruned exactly like the source: same keys, order, dtypes and values, and
    the mask keeps pruned entries at zero in training. With `reparametrize=False` the effective
    weight `X_mask * X_orig` is loaded into the plain `X` instead (torch's `prune.remove` result).
    Tensors the module already holds as `X_orig`/`X_mask` load as usual.

    Args:
      module: the target module.
      state_dict: a state_dict, pruned or not.
      strict: passed on to `load_state_dict`.
      reparametrize: keep pruning live (True) or bake the masks into the weights (False).

    Returns:
      `load_state_dict`'s result (missing and unexpected keys).

    Raises:
      RuntimeError: as `load_state_dict` with `strict=True`, for keys that still do not match.

    Examples:
      >>> import torch
      >>> from torch.nn.utils import prune
      >>> from jprune.interop import load_pruned_state_dict
      >>> src = prune.l1_unstructured(torch.nn.Linear(3, 2), "weight", amount=2)
      >>> dst = torch.nn.Linear(3, 2)
      >>> load_pruned_state_dict(dst, src.state_dict())
      <All keys matched successfully>
      >>> list(dst.state_dict()), int((dst.weight == 0).sum())
      (['bias', 'weight_orig', 'weight_mask'], 2)
    """
    state_dict = dict(state_dict) if reparametrize else {**state_dict}
    for key in list(state_dict):
        if not key.endswith("_orig"):
            continue
        mask_key = key[:-5] + "_mask"
        if mask_key not in state_dict:
            continue
        prefix, _, name = key[:-5].rpartition(".")
        try:
            sub = module.get_submodule(prefix)
        except AttributeError:
            continue  # load_state_dict reports the keys
        if name not in sub._parameters or f"{name}_orig" in sub._parameters:
            continue
        mask = state_dict[mask_key]
        if reparametrize:
            prune.identity(sub, name)
            device = getattr(sub, f"{name}_orig").device
            # identity's mask has the parameter's dtype; torch's may differ (e.g. float64 after
            # ln_structured with float64 scores), and load_state_dict keeps the buffer's dtype.
            sub.register_buffer(f"{name}_mask", torch.ones_like(mask, device=device))
        else:
            orig = state_dict.pop(key)
            state_dict.pop(mask_key)
            state_dict[f"{prefix}.{name}" if prefix else name] = mask.to(orig.dtype) * orig
    result = module.load_state_dict(state_dict, strict=strict)
    if reparametrize:  # recompute `name` now, as the pre-forward hook would
        for sub in module.modules():
            for hook in sub._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(sub, hook._tensor_name, hook.apply_mask(sub))
    return result
