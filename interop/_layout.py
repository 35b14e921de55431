"""Which torch state_dict key becomes which Flax leaf, in which layout (the "recipe").

A recipe is a list of entries `(torch_key, target, layout)` in state_dict order:

* `target` is `("params", *path)`, `("masks", *path)`, `("batch_stats", *path)` or `("extra",)`
  (kept verbatim under the torch key);
* `layout` is one of `LAYOUTS`. The attention layouts (`qkv:H`, `qkv_bias:H`) turn one torch
  tensor into three Flax leaves, `query`/`key`/`value` beside the target's leaf (`leaves`).

What decides a layout, most authoritative first: the torch module's class (`kinds`, known when
`from_torch` is given an `nn.Module`), a template (Flax params, matched by name and shape), the
default shape rules of `_default_fit`. What none of them decides is refused, never guessed; a
pruned tensor none of them places keeps torch's name and layout in `params` (layout `same`).
"""

from collections.abc import Mapping

import numpy as np

Shape = tuple[int, ...]

LAYOUTS = {
    "same": "the torch layout, unchanged",
    "linear": "torch Linear weight (out, in) <-> Flax Dense kernel (in, out)",
    "conv": "torch ConvNd weight (O, I, *k) <-> Flax Conv kernel (*k, I, O)",
    "conv_transpose": "torch ConvTransposeNd weight (I, O, *k) <-> Flax ConvTranspose kernel "
    "(*k, I, O) with the spatial axes reversed (Flax's default transpose_kernel=False)",
    "qkv:H": "torch MultiheadAttention in_proj_weight (3E, E) <-> query/key/value kernels (E, H, E/H)",
    "qkv_bias:H": "in_proj_bias (3E,) <-> query/key/value biases (H, E/H)",
    "heads_out:H": "out_proj.weight (E, E) <-> out kernel (H, E/H, E)",
}
QKV = ("query", "key", "value")

_WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")
_STATS = {"running_mean": "mean", "running_var": "var"}
_STATS_BACK = {v: k for k, v in _STATS.items()}
_MHA_IN = {"in_proj_weight": ("kernel", "qkv"), "in_proj_bias": ("bias", "qkv_bias")}
# What a torch module class (its "kind") makes of its `weight`: (Flax leaf, layout).
_KIND_WEIGHT = {
    "linear": ("kernel", "linear"),
    "conv1d": ("kernel", "same"),
    "conv": ("kernel", "conv"),
    "conv_transpose": ("kernel", "conv_transpose"),
    "embedding": ("embedding", "same"),
    "norm": ("scale", "same"),
    "keep": ("weight", "same"),
}


def _split_layout(layout: str) -> tuple[str, int]:
    """`"qkv:4"` -> `("qkv", 4)`; `"conv"` -> `("conv", 0)`."""
    name, _, heads = layout.partition(":")
    return name, int(heads) if heads else 0


def is_layout(layout: str) -> bool:
    """Whether `layout` is one of `LAYOUTS` (with a positive head count where it takes one)."""
    name, _, heads = layout.partition(":")
    if name in ("qkv", "qkv_bias", "heads_out"):
        return heads.isdigit() and int(heads) > 0
    return name in LAYOUTS and not heads


def to_flax_perm(layout: str, ndim: int) -> tuple[int, ...] | None:
    """The permutation taking a torch tensor of `ndim` axes to its Flax layout, if it is one."""
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


def leaves(target: tuple, layout: str) -> list[tuple]:
    """The Flax leaves one recipe target stands for: three for the attention in-projection."""
    if _split_layout(layout)[0] in ("qkv", "qkv_bias"):
        return [(*target[:-1], name, target[-1]) for name in QKV]
    return [tuple(target)]


def _valid(layout: str, shape: Shape) -> bool:
    name, h = _split_layout(layout)
    nd = len(shape)
    if name == "qkv":
        return nd == 2 and h > 0 and shape[0] % (3 * h) == 0
    if name == "qkv_bias":
        return nd == 1 and h > 0 and shape[0] % (3 * h) == 0
    if name == "heads_out":
        return nd == 2 and h > 0 and shape[1] % h == 0
    if name in ("conv", "conv_transpose"):
        return 3 <= nd <= 5
    if name == "linear":
        return nd == 2
    return name == "same"


def flax_shapes(layout: str, shape: Shape) -> list[Shape]:
    """The shapes of the Flax leaves (see `leaves`) of a torch tensor of `shape`."""
    name, h = _split_layout(layout)
    shape = tuple(shape)
    if name == "qkv":
        return [(shape[1], h, shape[0] // 3 // h)] * 3
    if name == "qkv_bias":
        return [(h, shape[0] // 3 // h)] * 3
    if name == "heads_out":
        return [(h, shape[1] // h, shape[0])]
    if name == "conv_transpose":
        return [(*shape[2:], shape[0], shape[1])]
    perm = to_flax_perm(layout, len(shape))
    return [shape if perm is None else tuple(shape[i] for i in perm)]


def to_flax(layout: str, a: np.ndarray) -> list[np.ndarray]:
    """The Flax leaves of torch array `a` (fresh C-contiguous arrays; `a` itself for `same`)."""
    name, h = _split_layout(layout)
    if name == "qkv":
        return [np.array(w.T.reshape(w.shape[1], h, -1), order="C") for w in np.split(a, 3)]
    if name == "qkv_bias":
        return [np.array(b.reshape(h, -1), order="C") for b in np.split(a, 3)]
    if name == "heads_out":
        return [np.array(a.T.reshape(h, -1, a.shape[0]), order="C")]
    if name == "conv_transpose":
        k = a.transpose(*range(2, a.ndim), 0, 1)
        return [np.array(np.flip(k, tuple(range(a.ndim - 2))), order="C")]
    perm = to_flax_perm(layout, a.ndim)
    return [a if perm is None else np.array(a.transpose(perm), order="C")]


def to_torch(layout: str, parts: list[np.ndarray]) -> np.ndarray:
    """The inverse of `to_flax`: the torch array from its Flax leaves."""
    name, _ = _split_layout(layout)
    if name == "qkv":
        return np.concatenate([p.reshape(p.shape[0], -1).T for p in parts])
    if name == "qkv_bias":
        return np.concatenate([p.reshape(-1) for p in parts])
    (a,) = parts
    if name == "heads_out":
        return a.reshape(-1, a.shape[-1]).T
    if name == "conv_transpose":
        nd = a.ndim
        return np.flip(a, tuple(range(nd - 2))).transpose(nd - 2, nd - 1, *range(nd - 2))
    perm = to_torch_perm(layout, a.ndim)
    return a if perm is None else a.transpose(perm)


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

_RESOLVE = (
    "pass the nn.Module to from_torch (its classes decide) or a template (template= or "
    "--template: the Flax params, e.g. from jax.eval_shape(model.init, ...))"
)


def _norm_after(modules: dict[str, dict[str, "_Attr"]]) -> dict[str, int]:
    """For each bias-less 3-D to 5-D weight, the feature count of the norm layer right after it
    in state_dict order (a conv's BatchNorm has its output channels: dim 0 for a Conv, dim 1 for
    a ConvTranspose)."""
    out, items = {}, list(modules.values())
    for attrs, nxt in zip(items, items[1:]):
        w = attrs.get("weight")
        if w is None or "bias" in attrs or not 3 <= len(w.shape) <= 5:
            continue
        norm = nxt.get("running_mean") or nxt.get("weight")
        if norm is not None and len(norm.shape) == 1 and ("running_mean" in nxt or "bias" in nxt):
            out[w.key] = norm.shape[0]
    return out


def _clues(modules: dict[str, dict[str, "_Attr"]]) -> dict:
    """Keys showing that this state_dict stores some layers transposed: a weight whose bias (or,
    without a bias, the norm after it) runs along its second axis, not its first (2: GPT-2
    Conv1D, 3: ConvTranspose); and under "after", the `_norm_after` feature counts."""
    after = _norm_after(modules)
    clues: dict = {"after": after}
    for attrs in modules.values():
        w, b = attrs.get("weight"), attrs.get("bias")
        if w is None or len(w.shape) < 2 or w.shape[0] == w.shape[1]:
            continue
        features = b.shape[0] if b is not None and len(b.shape) == 1 else after.get(w.key)
        if features == w.shape[1]:
            clues.setdefault(min(len(w.shape), 3), w.key)
    return clues


def _kernel_layouts(w: "_Attr", b: "_Attr | None", kind: str | None) -> list[str]:
    """The layouts a Flax `kernel` may have for torch weight `w`, the conventional one first."""
    if kind is not None:
        name, h = _split_layout(kind)
        if name == "mha_out":
            return [f"heads_out:{h}"]
        if name == "conv_transpose":  # Flax's default, then transpose_kernel=True (conv's axes)
            return ["conv_transpose", "conv"]
        leaf, layout = _KIND_WEIGHT.get(name, (None, None))
        return [layout] if leaf == "kernel" else []
    nd = len(w.shape)
    # A bias along the first axis rules out Conv1D and ConvTranspose; none, or one along the
    # second axis, leaves both readings open (a template's shape then decides).
    either = b is None or b.shape == w.shape[1:2]
    if nd == 2:
        return ["linear", "same"] if either else ["linear"]
    if 3 <= nd <= 5:
        return ["conv", "conv_transpose"] if either else ["conv"]
    return []


def _either_way(w: "_Attr", clues: dict[int, str]) -> ValueError:
    nd = len(w.shape)
    what = ("a Linear", "GPT-2 Conv1D") if nd == 2 else ("a Conv", "ConvTranspose")
    return ValueError(
        f"'{w.key}' of shape {w.shape} may be {what[0]} or {what[1]}: this state_dict has "
        f"{what[1]} weights (e.g. '{clues[min(nd, 3)]}', whose bias or norm runs along the second axis), "
        "stored transposed, and this one's shape fits both, in torch and in a Flax template; "
        "pass the torch model, whose classes decide: from_torch(model) or "
        "from_torch(state_dict, template=model)"
    )


def _default_weight(w: "_Attr", b: "_Attr | None", kind: str | None, clues) -> tuple[str, str]:
    """(Flax leaf, layout) of a `weight` by its module's class or the default shape rules."""
    where = f"'{w.key}' of shape {w.shape}"
    nd = len(w.shape)
    if kind is not None:
        name, _ = _split_layout(kind)
        leaf, layout = _KIND_WEIGHT.get(name, ("kernel", None))
        if layout is None:
            layout = _kernel_layouts(w, b, kind)[0]
        if not _valid(layout, w.shape):
            raise ValueError(f"{where} does not fit its torch module ({kind})")
        return leaf, layout
    if nd == 1 or b is not None and b.shape == w.shape:
        return "scale", "same"
    if nd == 2 and b is None:
        raise ValueError(
            f"{where} is ambiguous: a Linear without bias (Flax kernel, transposed) or an "
            f"Embedding (Flax embedding, same layout)? {_RESOLVE}"
        )
    layouts = _kernel_layouts(w, b, None)
    if not layouts or b is not None and b.shape not in (w.shape[:1], w.shape[1:2]):
        raise ValueError(
            f"{where} has no default Flax layout (only Linear, GPT-2 Conv1D, Conv1d/2d/3d, "
            f"ConvTranspose, Embedding and norm layers have one); {_RESOLVE}"
        )
    square = w.shape[0] == w.shape[1]
    if b is not None and not square and b.shape == w.shape[1:2]:
        return "kernel", layouts[1]  # bias along the second axis: Conv1D or ConvTranspose
    if b is None and not square and clues.get("after", {}).get(w.key) == w.shape[1]:
        return "kernel", layouts[1]  # the norm after it has dim 1's size: a ConvTranspose
    if min(nd, 3) in clues and (square or b is None):
        raise _either_way(w, clues)
    return "kernel", layouts[0]


def _rest(name: str, a: "_Attr") -> tuple[str, str, str]:
    """A tensor no rule names: pruned tensors are Parameters (torch prunes nothing else), kept in
    params under the torch name and layout; anything else verbatim in extra."""
    return ("params", name, "same") if a.mask_key is not None else ("extra", name, "same")


def _default_fit(attrs: dict[str, "_Attr"], kind: str | None, clues) -> dict[str, tuple[str, str, str]]:
    """attr -> (collection, leaf, layout) by the module's class or the documented default rules."""
    fit = {}
    mha, heads = _split_layout(kind or "")
    for name, a in attrs.items():
        if name in _STATS:
            fit[name] = ("batch_stats", _STATS[name], "same")
        elif name == "bias":
            fit[name] = ("params", "bias", "same")
        elif name == "weight":
            fit[name] = ("params", *_default_weight(a, attrs.get("bias"), kind, clues))
        elif mha == "mha" and name in _MHA_IN:
            leaf, layout = _MHA_IN[name]
            if not _valid(f"{layout}:{heads}", a.shape):
                raise ValueError(f"'{a.key}' of shape {a.shape} does not fit {heads} heads")
            fit[name] = ("params", leaf, f"{layout}:{heads}")
        else:
            fit[name] = _rest(name, a)
    return fit


def _template_fit(
    attrs: dict[str, "_Attr"],
    leaves: Mapping[str, Shape],
    stats: Mapping[str, Shape] | None,
    kind: str | None,
    clues,
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
            fit[name] = _rest(name, a)
            continue
        layouts = ["same"]
        if leaf == "kernel":
            layouts = _kernel_layouts(a, attrs.get("bias"), kind) or ["same"]
        want = tuple(leaves[leaf])
        fitting = [lay for lay in layouts if _valid(lay, a.shape) and flax_shapes(lay, a.shape) == [want]]
        if not fitting:
            got = flax_shapes(layouts[0], a.shape)[0] if _valid(layouts[0], a.shape) else a.shape
            return f"'{a.key}' {a.shape} gives {leaf} {got}, the template has {want}"
        if len(fitting) > 1 and kind is None and min(len(a.shape), 3) in clues:
            raise _either_way(a, clues)
        fit[name] = ("params", leaf, fitting[0])
        used.add(leaf)
    if set(leaves) - used:
        return f"template leaves {sorted(set(leaves) - used)} have no torch tensor"
    return fit


def _mha_template_fit(attrs, t_params, cand: tuple[str, ...], kind: str | None):
    """attr -> (collection, leaf, layout) for a torch MultiheadAttention (`in_proj_weight`) whose
    template counterpart is Flax's MultiHeadDotProductAttention at `cand` (query/key/value
    modules), with its head count; or why it does not fit, or None if `cand` has no such modules."""
    mods = [t_params.get((*cand, n)) for n in QKV]
    if any(m is None for m in mods):
        return None
    kernel = mods[0].get("kernel")
    if kernel is None or len(kernel) != 3:
        return f"query kernel {kernel} is not 3-D (embed, heads, head_dim)"
    heads = kernel[1]
    if kind is not None and _split_layout(kind) != ("mha", heads):
        return f"the torch module has {kind}, the template {heads} heads"
    fit, used = {}, set()
    for name, a in attrs.items():
        if name not in _MHA_IN:
            fit[name] = _rest(name, a)
            continue
        leaf, layout = _MHA_IN[name]
        layout = f"{layout}:{heads}"
        got = [tuple(m[leaf]) if leaf in m else None for m in mods]
        if not _valid(layout, a.shape) or flax_shapes(layout, a.shape) != got:
            return f"'{a.key}' {a.shape} does not give query/key/value {leaf} {got}"
        fit[name] = ("params", leaf, layout)
        used.add(leaf)
    extra = sorted({leaf for m in mods for leaf in m} - used)
    if extra:
        return f"template leaves {extra} of query/key/value have no torch tensor"
    return fit, heads


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


def _fits_needed(attrs: dict[str, "_Attr"]) -> bool:
    return any(n == "weight" or n == "bias" or n in _STATS for n in attrs)


def _child(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _default_path(module: str, kinds: Mapping[str, str]) -> tuple[str, ...]:
    """`a.b` -> `("a", "b")`; an attention's `out_proj` is Flax's `out`."""
    if _split_layout(kinds.get(module, ""))[0] == "mha_out":
        parent = module.rpartition(".")[0]
        return (*(parent.split(".") if parent else ()), "out")
    return tuple(module.split(".")) if module else ()


def plan(shapes: Mapping[str, Shape], template=None, kinds: Mapping[str, str] | None = None) -> list:
    """The recipe for a state_dict (given as key -> shape), in key order.

    Args:
      shapes: torch key -> shape, in state_dict order.
      template: optional Flax params (or variables) to match; it may cover only part of the
        model: modules it does not name follow the default rules.
      kinds: optional torch module path -> what its class makes known (`linear`, `conv1d`,
        `conv`, `conv_transpose`, `embedding`, `norm`, `keep`, `mha:<heads>`).

    Raises:
      ValueError: a layout nothing decides, a template that does not match, or two torch
        tensors on one Flax leaf.
    """
    modules = parse(shapes)
    kinds = dict(kinds or {})
    for module, kind in list(kinds.items()):
        name, heads = _split_layout(kind)
        if name == "mha" and _child(module, "out_proj") in modules:
            kinds[_child(module, "out_proj")] = f"mha_out:{heads}"
    clues = _clues(modules)
    if template is None:
        fits = {
            module: (_default_path(module, kinds), _default_fit(attrs, kinds.get(module), clues))
            for module, attrs in modules.items()
        }
    else:
        fits = _match_template(modules, kinds, clues, *split_template(template))
    recipe = []
    for key in shapes:
        module, attr = _split(key)
        path, fit = fits[module]
        attrs = modules[module]
        a = attrs.get(attr)
        if a is None:  # an _orig/_mask key: find its attr
            a = attrs[attr[:-5]]
            coll, leaf, layout = fit[a.name]
            target = ("masks" if key == a.mask_key else coll, *path, leaf)
        else:
            coll, leaf, layout = fit[attr]
            target = ("extra",) if coll == "extra" else (coll, *path, leaf)
        recipe.append((key, target, layout))
    _check_targets(recipe)
    return recipe


def _check_targets(recipe: list) -> None:
    """Refuses two torch tensors on one Flax leaf, and a leaf where another needs a module."""
    owner: dict[tuple, str] = {}
    for key, target, layout in recipe:
        if target[0] in ("extra", "masks"):  # masks sit where their params do
            continue
        for leaf in leaves(target, layout):
            if leaf in owner:
                raise ValueError(
                    f"'{owner[leaf]}' and '{key}' both map to {leaf[0]} leaf "
                    f"'{'/'.join(leaf[1:])}'; rename one of them in torch"
                )
            owner[leaf] = key
    for leaf, key in owner.items():
        for i in range(2, len(leaf)):
            if leaf[:i] in owner:
                raise ValueError(
                    f"'{owner[leaf[:i]]}' maps to {leaf[0]} leaf '{'/'.join(leaf[1:i])}', which "
                    f"'{key}' needs as a module (for '{'/'.join(leaf[1:])}'); rename one of them "
                    "in torch"
                )


def _match_template(modules, kinds, clues, params, stats):
    """module -> (Flax path, fit): by the template where it names the module (by name, or by a
    unique shape match), by the default rules where it does not."""
    t_params, t_stats = _modules(params), _modules(stats) if stats is not None else {}
    unmatched = dict.fromkeys([*t_params, *(p for p in t_stats if p not in t_params)])
    fits, forced = {}, {}

    def refuse(cand, why):
        raise ValueError(f"template does not match at '{'/'.join(cand) or '<root>'}': {why}")

    for module, attrs in modules.items():  # attention first: its out_proj follows it
        if "in_proj_weight" not in attrs:
            continue
        for cand in _candidates(module):
            found = _mha_template_fit(attrs, t_params, cand, kinds.get(module))
            if found is None:
                continue
            if isinstance(found, str):
                refuse(cand, found)
            fit, heads = found
            fits[module] = (cand, fit)
            for name in QKV:
                unmatched.pop((*cand, name), None)
            if _child(module, "out_proj") in modules:
                kinds[_child(module, "out_proj")] = f"mha_out:{heads}"
                forced[_child(module, "out_proj")] = (*cand, "out")
            break
    pending = []
    for module, attrs in modules.items():
        if module in fits:
            continue
        cands = [forced[module]] if module in forced else _candidates(module)
        if not _fits_needed(attrs) and not any(
            c in unmatched and set(attrs) & set(t_params.get(c, {})) for c in cands
        ):
            pending.append(module)
            continue
        for cand in cands:
            if cand in unmatched:
                fit = _template_fit(
                    attrs, t_params.get(cand, {}), t_stats.get(cand), kinds.get(module), clues
                )
                if isinstance(fit, str):
                    refuse(cand, fit)
                fits[module] = (cand, fit)
                del unmatched[cand]
                break
        else:
            pending.append(module)
    for module in pending:
        attrs = modules[module]
        options = []
        if _fits_needed(attrs):
            for cand in unmatched:
                fit = _template_fit(
                    attrs, t_params.get(cand, {}), t_stats.get(cand), kinds.get(module), clues
                )
                if not isinstance(fit, str):
                    options.append((cand, fit))
        if len(options) > 1:
            shown = ", ".join(f"{a.key} {a.shape}" for a in attrs.values())
            names = ", ".join("/".join(c) for c, _ in options)
            raise ValueError(
                f"template is ambiguous for torch module '{module}' ({shown}): it fits {names}; "
                "name the Flax modules like the torch ones to decide"
            )
        if options:
            fits[module] = options[0]
            del unmatched[options[0][0]]
        else:  # the template does not cover this module
            path = forced.get(module) or _default_path(module, kinds)
            fits[module] = (path, _default_fit(attrs, kinds.get(module), clues))
    if unmatched:
        left = ", ".join("/".join(p) or "<root>" for p in unmatched)
        raise ValueError(f"template does not match: template modules {left} have no torch tensors")
    return fits


# ------------------------------------------------------------------ Flax -> torch default names


def _flax_attention(p_mods: Mapping) -> dict[tuple[str, ...], tuple[int, bool]]:
    """Flax MultiHeadDotProductAttention modules (query/key/value/out with 3-D kernels):
    path -> (heads, use_bias). Refused unless torch's nn.MultiheadAttention can hold them."""
    out = {}
    for path in p_mods:
        if not path or path[-1] != "query":
            continue
        parent = path[:-1]
        mods = [p_mods.get((*parent, n)) for n in (*QKV, "out")]
        if any(m is None or len(m.get("kernel", ())) != 3 for m in mods):
            continue
        e, h, d = mods[0]["kernel"]
        bias = "bias" in mods[0]
        want = [{"kernel": (e, h, d), **({"bias": (h, d)} if bias else {})}] * 3
        want.append({"kernel": (h, d, e), **({"bias": (e,)} if bias else {})})
        got = [{k: tuple(v) for k, v in m.items()} for m in mods]
        if h * d != e or got != want:
            raise ValueError(
                f"Flax attention '{'/'.join(parent) or '<root>'}' (query, key, value, out: {got}) "
                "has no torch counterpart: nn.MultiheadAttention holds query/key/value kernels "
                "(E, H, E/H) of one E, out (H, E/H, E), and biases on all of them or none"
            )
        out[parent] = (h, bias)
    return out


def default_recipe(params: Mapping, stats: Mapping | None) -> list[tuple[str, tuple, str, bool]]:
    """Torch names for a Flax checkpoint without a recorded recipe.

    Returns entries `(torch_key, target, layout, synthesized)`; `synthesized` marks the
    `num_batches_tracked` counters torch's BatchNorm expects (value 0).

    Raises:
      ValueError: a kernel with no known torch layout, or two Flax modules that would become one
        torch module (`a.b/*` and `a/b/*`).
    """
    p_mods = _modules(params)
    s_mods = _modules(stats) if stats else {}
    attention = _flax_attention(p_mods)
    order = [*p_mods, *(p for p in s_mods if p not in p_mods)]
    recipe, owner = [], {}

    def claim(torch_path: tuple[str, ...], path: tuple[str, ...]) -> str:
        name = ".".join(torch_path)
        if owner.setdefault(name, path) != path:
            first, second = ("/".join(p) for p in (owner[name], path))
            raise ValueError(
                f"Flax modules '{first}' and '{second}' would both become torch module '{name}'; "
                "rename one of them"
            )
        return "".join(f"{c}." for c in torch_path)

    for path in order:
        if path[:-1] in attention and path[-1] in (*QKV, "out"):
            if path[-1] == "query":  # the whole attention, in nn.MultiheadAttention's order
                parent, (heads, bias) = path[:-1], attention[path[:-1]]
                prefix, out = claim(parent, parent), claim((*parent, "out_proj"), (*parent, "out"))
                recipe.append(
                    (prefix + "in_proj_weight", ("params", *parent, "kernel"), f"qkv:{heads}", False)
                )
                if bias:
                    recipe.append(
                        (prefix + "in_proj_bias", ("params", *parent, "bias"), f"qkv_bias:{heads}", False)
                    )
                recipe.append(
                    (out + "weight", ("params", *parent, "out", "kernel"), f"heads_out:{heads}", False)
                )
                if bias:
                    recipe.append((out + "bias", ("params", *parent, "out", "bias"), "same", False))
            continue
        prefix = claim(path, path)
        p_leaves = p_mods.get(path, {})
        for leaf, shape in p_leaves.items():
            layout, name = "same", leaf
            if leaf == "kernel":
                bias = p_leaves.get("bias")
                if not 2 <= len(shape) <= 5 or bias is not None and len(bias) != 1:
                    where = "/".join((*path, leaf))
                    raise ValueError(
                        f"params leaf '{where}' has shape {shape}"
                        + (f" with a bias of shape {tuple(bias)}" if bias is not None else "")
                        + ": expected a 2-D (Dense) or 3-D to 5-D (Conv) kernel with a 1-D bias; "
                        "a DenseGeneral or attention kernel has no known torch layout"
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
