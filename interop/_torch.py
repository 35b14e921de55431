"""Torch-side helpers: what a module's classes say about layouts, and loading a pruned
state_dict into a module that is not (yet) pruned."""

import copy
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch.nn.utils import prune

_NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)


def _class_kind(m: torch.nn.Module) -> str | None:
    """The kind a standard torch class makes known (see `_layout.plan`)."""
    if isinstance(m, torch.nn.Linear):
        return "linear"
    if isinstance(m, torch.nn.Embedding):
        return "embedding"
    if isinstance(m, torch.nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(m, torch.nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, torch.nn.MultiheadAttention) and m._qkv_same_embed_dim:
        return f"mha:{m.num_heads}"
    if isinstance(m, _NORMS):
        return "norm"
    if isinstance(m, torch.nn.Bilinear):
        return "keep"  # (out, in1, in2): no Flax layer holds it
    return None


def _shape_kind(m: torch.nn.Module) -> str | None:
    """What a non-square weight with a bias shows: the bias runs along the output axis."""
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor) or b.ndim != 1:
        return None
    if w.ndim < 2 or w.shape[0] == w.shape[1]:
        return None
    if b.shape[0] == w.shape[0]:
        return "linear" if w.ndim == 2 else "conv"
    if b.shape[0] == w.shape[1]:
        return "conv1d" if w.ndim == 2 else "conv_transpose"
    return None


def module_kinds(model: torch.nn.Module) -> dict[str, str]:
    """Module path -> what its class makes known about its tensors' layouts.

    Standard classes (Linear, Embedding, ConvNd, ConvTransposeNd, MultiheadAttention, norms)
    decide by `isinstance`. Another class (e.g. GPT-2's Conv1D) decides for all its instances
    when its non-square instances agree (a weight (768, 2304) with bias (2304,) stores (in, out),
    so its square (768, 768) instances do too); otherwise the default shape rules apply.
    """
    named = list(model.named_modules(remove_duplicate=False))
    kinds = {path: k for path, m in named if (k := _class_kind(m)) is not None}
    seen: dict[type, set[str]] = {}
    for path, m in named:
        if path not in kinds and (k := _shape_kind(m)) is not None:
            seen.setdefault(type(m), set()).add(k)
    for path, m in named:
        if path not in kinds and len(seen.get(type(m), ())) == 1:
            (kinds[path],) = seen[type(m)]
    return kinds


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The module with every tensor replaced by a meta tensor: its structure, no data."""
    memo = {}
    for sub in module.modules():
        values = [*sub._parameters.values(), *sub._buffers.values(), *vars(sub).values()]
        for v in values:  # tensors, and lists of them (an LSTM's _flat_weights)
            for t in v if isinstance(v, list | tuple) else (v,):
                if isinstance(t, torch.Tensor) and id(t) not in memo:
                    meta = t.detach().to("meta")
                    if isinstance(t, torch.nn.Parameter):
                        meta = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
                    memo[id(t)] = meta
    return copy.deepcopy(module, memo)


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

    The whole load is first rehearsed on a copy of the module holding meta tensors (no data),
    so a load that fails (missing or unexpected keys with `strict=True`, a shape mismatch) raises
    torch's own error and leaves `module` exactly as it was.

    Returns:
      `load_state_dict`'s result (missing and unexpected keys).

    Raises:
      RuntimeError: as `load_state_dict`: keys that still do not match with `strict=True`, or a
        shape mismatch.

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
    try:
        rehearsal = _meta_copy(module)
    except Exception:  # a module deepcopy cannot copy: load for real, undone if it fails
        rehearsal = None
    if rehearsal is None:
        saved = _snapshot(module)
        try:
            return _load(module, state_dict, strict, reparametrize)
        except BaseException:
            _restore(saved)
            raise
    meta_sd = _with_metadata({k: v.detach().to("meta") for k, v in state_dict.items()}, state_dict)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*a meta parameter in the current model")
        _load(rehearsal, meta_sd, strict, reparametrize)  # raises here, before any change
    return _load(module, state_dict, strict, reparametrize)


def _snapshot(module: torch.nn.Module) -> list:
    """What a load can change, per submodule: its attributes (dicts copied: parameters, buffers,
    hooks) and the data of its tensors (load_state_dict copies into them in place)."""
    saved = []
    for sub in module.modules():
        attrs = {k: v.copy() if isinstance(v, dict) else v for k, v in vars(sub).items()}
        tensors = [
            (t, t.detach().clone())
            for t in [*sub._parameters.values(), *sub._buffers.values()]
            if t is not None
        ]
        saved.append((sub, attrs, tensors))
    return saved


def _restore(saved: list) -> None:
    """Puts back what `_snapshot` saw; dicts are refilled in place (hook handles refer to them)."""
    for sub, attrs, tensors in saved:
        now = vars(sub)
        for k in [k for k in now if k not in attrs]:
            del now[k]
        for k, v in attrs.items():
            if isinstance(v, dict) and isinstance(now.get(k), dict):
                now[k].clear()
                now[k].update(v)
            else:
                now[k] = v
        with torch.no_grad():
            for t, data in tensors:
                t.copy_(data)


def _with_metadata(items: Mapping, state_dict: Mapping) -> OrderedDict:
    """A new OrderedDict of `items` keeping `state_dict`'s torch metadata (module versions)."""
    out = OrderedDict(items)
    if getattr(state_dict, "_metadata", None) is not None:
        out._metadata = state_dict._metadata
    return out


def _load(module: torch.nn.Module, state_dict: Mapping, strict: bool, reparametrize: bool):
    state_dict = _with_metadata(state_dict, state_dict)
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
        mask, param = state_dict[mask_key], sub._parameters[name]
        if mask.shape != param.shape:  # torch's own words for a shape mismatch
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(module).__name__}:\n\tsize mismatch "
                f"for {mask_key}: copying a mask with shape {mask.shape} from checkpoint, the "
                f"shape of {key[:-5]} in current model is {param.shape}."
            )
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
