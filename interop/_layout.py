"""Which torch state_dict key becomes which Flax leaf, in which layout (the "recipe").

A recipe is a list of entries `(torch_key, target, layout)` in state_dict order:

* `target` is `("params", *path)`, `("masks", *path)`, `("batch_stats", *path)` or `("extra",)`
  (kept verbatim under the torch key);
* `layout` is `"same"`, `"linear"` (torch (out, in) <-> Flax (in, out)) or `"conv"`
  (torch (O, I, *spatial) <-> Flax (*spatial, I, O)).

Names come from the rules in `_default_fit`, or from a template (Flax params) by matching.
"""

from collections.abc import Mapping

import numpy as np

Shape = tuple[int, ...]

_WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")
_STATS = {"running_mean": "mean", "running_var": "var"}
_STATS_BACK = {v: k for k, v in _STATS.items()}


def to_flax_perm(layout: str, ndim: int) -> tuple[int, ...] | None:
    """The permutation taking a torch tensor of `ndim` axes to its Flax layout."""
    if layout == "linear":
        return (1, 0)
    if layout == "conv":
        return (*range(2, ndim), 1, 0)
    return None


def to_torch_perm(layout: str, ndim: int) -> tuple[int, ...] | None:
    """The inverse of `to_flax_perm`."""
    if layout == "linear":
        return (1, 0)
    if layout == "conv":
        return (ndim - 1, ndim - 2, *range(ndim - 2))
    return None


def flax_shape(layout: str, shape: Shape) -> Shape:
    perm = to_flax_perm(layout, len(shape))
    return tuple(shape) if perm is None else tuple(shape[i] for i in perm)


# ------------------------------------------------------------------ parsing a torch state_dict


class _Attr:
    """One tensor name of a torch module: its value key and, when pruned, its mask key."""

    __slots__ = ("name", "key", "mask_key", "shape")

    def __init__(self, name: str, key: str, mask_key: str | None, shape: Shape):
        self.name, self.key, self.mask_key, self.shape = name, key, mask_key, shape


def _split(key: str) -> tuple[str, str]:
    module, _, attr = key.rpartition(".")
    return module, attr


def parse(shapes: Mapping[str, Shape]) -> dict[str, dict[str, _Attr]]:
    """Group state_dict keys by module; pair `X_orig` with `X_mask`.

    Raises:
      ValueError: `X_mask` without `X_orig` (or the reverse) for a parameter-like `X`, or a mask
        whose shape differs from its `_orig`.
    """
    modules: dict[str, dict[str, _Attr]] = {}
    for key, shape in shapes.items():
        module, attr = _split(key)
        prefix = f"{module}." if module else ""
        base, suffix = attr[:-5], attr[-5:]
        attrs = modules.setdefault(module, {})
        if suffix in ("_orig", "_mask") and base:
            other = prefix + base + ("_mask" if suffix == "_orig" else "_orig")
            if other in shapes:
                if suffix == "_mask":
                    continue  # recorded with its _orig
                if prefix + base in shapes:
                    raise ValueError(
                        f"'{prefix}{base}' and '{key}' are both present: a tensor is either "
                        "plain or pruned (_orig and _mask), not both"
                    )
                mask_shape = tuple(shapes[other])
                if mask_shape != tuple(shape):
                    raise ValueError(
                        f"mask '{other}' has shape {mask_shape}, expected {tuple(shape)} "
                        f"(the shape of '{key}')"
                    )
                attrs[base] = _Attr(base, key, other, tuple(shape))
                continue
            # A lone `attn_mask` buffer is ordinary; a lone `weight_mask` is half a pruned tensor.
            if base in ("weight", "bias") or prefix + base in shapes:
                raise ValueError(
                    f"'{key}' has no matching '{other}': a pruned tensor needs both "
                    f"'{prefix}{base}_orig' and '{prefix}{base}_mask'"
                )
        attrs[attr] = _Attr(attr, key, None, tuple(shape))
    return {m: a for m, a in modules.items() if a}


# ------------------------------------------------------------------ per-module rules


def _default_fit(module: str, attrs: dict[str, _Attr]) -> dict[str, tuple[str, str, str]]:
    """attr -> (collection, leaf, layout) by the documented default rules (no template)."""
    fit = {}
    weight, bias = attrs.get("weight"), attrs.get("bias")
    for name in attrs:
        if name in _STATS:
            fit[name] = ("batch_stats", _STATS[name], "same")
        elif name == "bias":
            fit[name] = ("params", "bias", "same")
        elif name != "weight":
            fit[name] = ("extra", name, "same")
    if weight is None:
        return fit
    where = f"'{weight.key}' of shape {weight.shape}"
    nd = len(weight.shape)
    if bias is not None and bias.shape == weight.shape or nd == 1:
        fit["weight"] = ("params", "scale", "same")
    elif nd == 2 and bias is not None and bias.shape == weight.shape[:1]:
        fit["weight"] = ("params", "kernel", "linear")
    elif nd == 2:
        raise ValueError(
            f"{where} is ambiguous: a Linear without bias (Flax kernel, transposed) or an "
            "Embedding (Flax embedding, same layout)? Pass a template (template= or "
            "--template: the Flax params, e.g. from jax.eval_shape(model.init, ...)) to decide"
        )
    elif 3 <= nd <= 5 and (bias is None or bias.shape == weight.shape[:1]):
        fit["weight"] = ("params", "kernel", "conv")
    else:
        raise ValueError(
            f"{where} has no default Flax layout (only Linear, Conv1d/2d/3d, Embedding and "
            "norm layers have one); pass a template (template= or --template) to decide"
        )
    return fit


def _template_fit(
    attrs: dict[str, _Attr], leaves: Mapping[str, Shape], stats: Mapping[str, Shape] | None
) -> dict[str, tuple[str, str, str]] | str:
    """attr -> (collection, leaf, layout) fitting a template module, or why it does not fit."""
    fit, used = {}, set()
    for name, a in attrs.items():
        if name in _STATS:
            leaf = _STATS[name]
            if stats is not None and stats.get(leaf) != a.shape:
                return f"'{a.key}' {a.shape} has no batch_stats '{leaf}' of that shape"
            fit[name] = ("batch_stats", leaf, "same")
            continue
        if name == "weight":
            leaf = next((n for n in _WEIGHT_LEAVES if n in leaves), None)
        else:
            leaf = name if name in leaves else None
        if leaf is None:
            if name in ("weight", "bias"):
                return f"'{a.key}' has no counterpart (leaves: {sorted(leaves)})"
            fit[name] = ("extra", name, "same")
            continue
        layout = "same"
        if leaf == "kernel":
            layout = "linear" if len(a.shape) == 2 else "conv"
        want = flax_shape(layout, a.shape)
        if tuple(leaves[leaf]) != want:
            return f"'{a.key}' {a.shape} gives {leaf} {want}, the template has {tuple(leaves[leaf])}"
        fit[name] = ("params", leaf, layout)
        used.add(leaf)
    if set(leaves) - used:
        return f"template leaves {sorted(set(leaves) - used)} have no torch tensor"
    return fit


# ------------------------------------------------------------------ templates


def _is_leaf(x) -> bool:
    return not isinstance(x, Mapping)


def _modules(tree: Mapping, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict]:
    """path -> {leaf name: shape} for every dict in `tree` that holds array leaves."""
    out = {}
    leaves = {
        k: tuple(v.shape) if hasattr(v, "shape") else np.shape(v)
        for k, v in tree.items()
        if _is_leaf(v) and v is not None
    }
    if leaves:
        out[path] = leaves
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_modules(v, (*path, str(k))))
    return out


def split_template(template) -> tuple[Mapping, Mapping | None]:
    """(params, batch_stats or None) from either Flax params or a whole variables dict."""
    if not isinstance(template, Mapping):
        raise TypeError(f"Expected template to be Flax params (a nested dict), got {type(template).__name__}")
    if "params" in template and isinstance(template["params"], Mapping):
        if set(template) <= {"params", "batch_stats"}:
            return template["params"], template.get("batch_stats")
    return template, None


def _candidates(module: str) -> list[tuple[str, ...]]:
    """Flax paths a torch module path may have: as is, and with Flax's list naming (`b_0`)."""
    comps = module.split(".") if module else []
    merged: list[str] = []
    after_name = False  # the previous component was a plain name (`blocks` in `blocks.0`)
    for c in comps:
        if c.isdigit():
            if after_name:
                merged[-1] = f"{merged[-1]}_{c}"
            else:  # a Sequential's own index: Flax's nn.Sequential names it layers_<i>
                merged.append(f"layers_{c}")
        else:
            merged.append(c)
        after_name = not c.isdigit()
    out = [tuple(comps)]
    if tuple(merged) != out[0]:
        out.append(tuple(merged))
    return out


def _fits_needed(attrs: dict[str, _Attr]) -> bool:
    return any(n == "weight" or n == "bias" or n in _STATS for n in attrs)


def plan(shapes: Mapping[str, Shape], template=None) -> list[tuple[str, tuple, str]]:
    """The recipe for a state_dict (given as key -> shape), in key order.

    Raises:
      ValueError: ambiguous layouts without a template, or a template that does not match.
    """
    modules = parse(shapes)
    fits: dict[str, tuple[tuple[str, ...], dict]] = {}
    if template is None:
        for module, attrs in modules.items():
            fits[module] = (tuple(module.split(".")) if module else (), _default_fit(module, attrs))
    else:
        fits = _match_template(modules, *split_template(template))
    recipe = []
    for key in shapes:
        module, attr = _split(key)
        path, fit = fits[module]
        attrs = modules[module]
        a = attrs.get(attr)
        if a is None:  # an _orig/_mask key: find its attr
            base = attr[:-5]
            a = attrs[base]
            coll, leaf, layout = fit[base]
            target = ("masks" if key == a.mask_key else coll, *path, leaf)
        else:
            coll, leaf, layout = fit[attr]
            target = ("extra",) if coll == "extra" else (coll, *path, leaf)
        recipe.append((key, target, layout))
    return recipe


def _match_template(modules, params, stats):
    t_params, t_stats = _modules(params), _modules(stats) if stats is not None else {}
    unmatched = dict.fromkeys([*t_params, *(p for p in t_stats if p not in t_params)])
    fits, pending = {}, []
    for module, attrs in modules.items():
        if not _fits_needed(attrs) and not any(
            c in unmatched and set(attrs) & set(t_params.get(c, {})) for c in _candidates(module)
        ):
            fits[module] = ((), {n: ("extra", n, "same") for n in attrs})
            continue
        found = False
        for cand in _candidates(module):
            if cand in unmatched:
                fit = _template_fit(attrs, t_params.get(cand, {}), t_stats.get(cand, None))
                if isinstance(fit, str):
                    where = "/".join(cand) or "<root>"
                    raise ValueError(f"template does not match at '{where}': {fit}")
                fits[module] = (cand, fit)
                del unmatched[cand]
                found = True
                break
        if not found:
            pending.append(module)
    for module in pending:
        attrs = modules[module]
        options = []
        for cand in unmatched:
            fit = _template_fit(attrs, t_params.get(cand, {}), t_stats.get(cand, None))
            if not isinstance(fit, str):
                options.append((cand, fit))
        shown = ", ".join(f"{a.key} {a.shape}" for a in attrs.values())
        if not options:
            left = ", ".join("/".join(p) for p in unmatched) or "none"
            raise ValueError(
                f"template does not match: torch module '{module}' ({shown}) has no counterpart "
                f"in the template (unmatched template modules: {left})"
            )
        if len(options) > 1:
            names = ", ".join("/".join(c) for c, _ in options)
            raise ValueError(
                f"template is ambiguous for torch module '{module}' ({shown}): it fits {names}; "
                "name the Flax modules like the torch ones to decide"
            )
        cand, fit = options[0]
        fits[module] = (cand, fit)
        del unmatched[cand]
    if unmatched:
        left = ", ".join("/".join(p) or "<root>" for p in unmatched)
        raise ValueError(f"template does not match: template modules {left} have no torch tensors")
    return fits


# ------------------------------------------------------------------ Flax -> torch default names


def default_recipe(params: Mapping, stats: Mapping | None) -> list[tuple[str, tuple, str, bool]]:
    """Torch names for a Flax checkpoint without a recorded recipe.

    Returns entries `(torch_key, target, layout, synthesized)`; `synthesized` marks the
    `num_batches_tracked` counters torch's BatchNorm expects (value 0).
    """
    p_mods = _modules(params)
    s_mods = _modules(stats) if stats else {}
    order = [*p_mods, *(p for p in s_mods if p not in p_mods)]
    recipe = []
    for path in order:
        prefix = "".join(f"{c}." for c in path)
        for leaf, shape in p_mods.get(path, {}).items():
            layout, name = "same", leaf
            if leaf == "kernel":
                if not 2 <= len(shape) <= 5:
                    where = "/".join((*path, leaf))
                    raise ValueError(
                        f"params leaf '{where}' has shape {shape}; expected a 2-D (Dense) "
                        "or 3-D to 5-D (Conv) kernel"
                    )
                layout = "linear" if len(shape) == 2 else "conv"
            if leaf in _WEIGHT_LEAVES:
                name = "weight"
            recipe.append((prefix + name, ("params", *path, leaf), layout, False))
        stat_leaves = s_mods.get(path, {})
        for leaf in stat_leaves:
            name = _STATS_BACK.get(leaf, leaf)
            recipe.append((prefix + name, ("batch_stats", *path, leaf), "same", False))
        if stat_leaves:
            recipe.append((prefix + "num_batches_tracked", ("extra",), "same", True))
    return recipe
