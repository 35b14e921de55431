"""The interop corpus: real torch.nn models, pruned in realistic sequences, converted every way.

Over every model and dtype: the round trip is bit-exact (API and every file format), no mask is
lost (the effective weights after `jp.remove` are torch's after `prune.remove`), the summaries count
what torch's masks hold, and where Flax has the same layers the Flax model gives torch's logits.
Torch answers every question here; nothing is hard-coded.
"""

import dataclasses
import json
import os
import re
import threading
from collections.abc import Callable

import jax
import numpy as np
import pytest
import torch
from interop_models import (
    FlaxAttnNet,
    FlaxBNNet,
    FlaxEmbedNet,
    FlaxGPT2Block,
    FlaxUpNet,
    TorchAttnNet,
    TorchBNNet,
    TorchEmbedNet,
    TorchGPT2Block,
    TorchUpNet,
    assert_identical,
    raw,
)
from jprune.interop import convert, from_torch, load, load_pruned_state_dict, save, summarize, to_torch
from torch.nn.utils import prune

import jprune as jp


def masks_of(sd) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.endswith("_mask") and k[:-5] + "_orig" in sd}


# ------------------------------------------------------------------------------ the models


class TorchCustom(torch.nn.Module):
    """Parameters with names no layer has: one on the root module, one on a Linear."""

    def __init__(self):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.randn(4, 3))
        self.fc = torch.nn.Linear(3, 4)
        self.fc.register_parameter("gate", torch.nn.Parameter(torch.randn(4)))


def _encoder():
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _nhwc(x):
    return x.numpy().transpose(0, 2, 3, 1)


@dataclasses.dataclass
class Spec:
    build: Callable[[], torch.nn.Module]
    # (torch input, Flax model, Flax input, torch output -> Flax layout) where Flax has the layers
    twin: Callable | None = None
    refused: str | None = None  # the key a bare state_dict is refused for (layout unknowable)


def _bn_twin():
    x = torch.randn(2, 3, 8, 8)
    return x, FlaxBNNet(), _nhwc(x), lambda y: y


def _attn_twin():
    x = torch.randn(2, 5, 8)
    return x, FlaxAttnNet(), x.numpy(), lambda y: y


def _embed_twin():
    ids = torch.randint(0, 20, (2, 7))
    return ids, FlaxEmbedNet(), ids.numpy(), lambda y: y


def _up_twin():
    x = torch.randn(2, 3, 5, 5)
    return x, FlaxUpNet(), _nhwc(x), lambda y: y.transpose(0, 2, 3, 1)


def _gpt2_twin():
    x = torch.randn(2, 5, 8)
    return x, FlaxGPT2Block(), x.numpy(), lambda y: y


SPECS = {
    "lstm2-bidir": Spec(lambda: torch.nn.LSTM(6, 5, num_layers=2, bidirectional=True)),
    "gru": Spec(lambda: torch.nn.GRU(4, 3)),
    "transformer-encoder": Spec(_encoder),
    "mha": Spec(TorchAttnNet, _attn_twin),
    "embedding-layernorm": Spec(TorchEmbedNet, _embed_twin, refused=r"emb\.weight"),
    "conv-transpose": Spec(TorchUpNet, _up_twin, refused=r"up2\.weight"),
    "bn-cnn": Spec(TorchBNNet, _bn_twin),
    "gpt2-conv1d": Spec(TorchGPT2Block, _gpt2_twin, refused=r"attn\.c_proj\.weight"),
    "custom-names": Spec(TorchCustom),
}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
CASES = [(name, "f32") for name in SPECS] + [
    (name, dt)
    for name in ("lstm2-bidir", "mha", "bn-cnn", "gpt2-conv1d", "conv-transpose")
    for dt in ("f16", "bf16", "f64")
]


def prune_realistic(model: torch.nn.Module) -> None:
    """l1 on several tensors, ln_structured, global across modules, remove one, re-prune one."""
    tensors = [(m, n) for m in model.modules() for n, _ in m.named_parameters(recurse=False)]
    weights = [(m, n) for m, n in tensors if getattr(m, n).ndim >= 2]
    vectors = [(m, n) for m, n in tensors if getattr(m, n).ndim == 1]
    for m, n in weights[:3]:
        prune.l1_unstructured(m, n, amount=0.3)
    prune.ln_structured(*weights[-1], amount=0.25, n=2, dim=0)
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=0.2)
    prune.remove(*weights[0])  # baked in, then pruned again on top
    prune.l1_unstructured(*weights[0], amount=0.4)
    if len(weights) > 2:
        prune.remove(*weights[1])  # baked in and left plain
    prune.random_unstructured(*vectors[-1], amount=0.5)
    if len(vectors) > 1:
        prune.l1_unstructured(*vectors[0], amount=1)


def build_pruned(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """The same pruned model for the same (name, dtype), every call."""
    torch.manual_seed(sum(map(ord, name)))
    model = SPECS[name].build().to(dtype)
    if name == "bn-cnn":
        with torch.no_grad():  # running stats move, num_batches_tracked counts
            model(torch.randn(4, 3, 8, 8, dtype=dtype))
    prune_realistic(model)
    return model.eval()


@dataclasses.dataclass
class Case:
    name: str
    spec: Spec
    model: torch.nn.Module
    sd: dict
    dtype: torch.dtype


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{d}" for n, d in CASES])
def case(request):
    name, dt = request.param
    model = build_pruned(name, DTYPES[dt])
    return Case(name, SPECS[name], model, model.state_dict(), DTYPES[dt])


def _flax_template(spec):
    x, flax_model, fx, _ = spec.twin()
    return jax.eval_shape(flax_model.init, jax.random.key(0), fx)


# ------------------------------------------------------------------------------ properties


def test_corpus_prunes_something_of_every_kind(case):
    """The sequence left several pruned tensors, some with exact zeros from prune.remove."""
    masks = masks_of(case.sd)
    assert len(masks) >= 3 and all(m.dtype == case.dtype for m in masks.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) > 0


def test_round_trip_bit_exact(case):
    assert_identical(to_torch(from_torch(case.model)), case.sd)
    assert_identical(to_torch(from_torch(case.sd, template=case.model)), case.sd)
    if case.spec.refused is None:
        assert_identical(to_torch(from_torch(case.sd)), case.sd)
    else:  # the layout is not knowable from shapes alone: refused, naming the tensor
        with pytest.raises(ValueError, match=case.spec.refused + ".*(template|from_torch)"):
            from_torch(case.sd)


def test_no_mask_lost(case):
    """Every mask stays on its tensor: Flax's masked weights are torch's after prune.remove."""
    ckpt = from_torch(case.model)
    # torch's effective weight, orig * mask, in numpy (JAX would narrow float64 without x64)
    params = jax.tree.map(
        lambda p, m: p if m is None else p * m.astype(p.dtype), ckpt["params"], ckpt["masks"]
    )
    unmasked = jax.tree.map(lambda _: None, params)
    got = to_torch({**ckpt, "params": params, "masks": unmasked})
    ref = build_pruned(case.name, case.dtype)
    for m in ref.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
    assert_identical(got, ref.state_dict(), ordered=False)  # torch re-registers in remove order


def test_summaries_count_torch_zeros(case):
    masks = masks_of(case.sd)
    rows = {r["name"]: r["pruned"] for r in summarize(case.sd)["tensors"]}
    assert rows == {k[:-5]: int((m == 0).sum()) for k, m in masks.items()}
    torch_summary = summarize(case.sd)
    for ckpt in (from_torch(case.model), from_torch(case.sd, template=case.model)):
        flax_summary = summarize(ckpt)
        for field in ("pruned", "numel_pruned_tensors", "numel_params", "sparsity"):
            assert flax_summary[field] == torch_summary[field], field


def test_every_file_format(case, tmp_path):
    total = sum(int((m == 0).sum()) for m in masks_of(case.sd).values())
    save(case.sd, tmp_path / "a.pt")
    save(case.sd, tmp_path / "a.safetensors")
    convert(tmp_path / "a.pt", tmp_path / "b.msgpack", template=case.model)
    convert(tmp_path / "a.safetensors", tmp_path / "b.orbax", template=case.model)
    convert(tmp_path / "b.msgpack", tmp_path / "c.safetensors")
    convert(tmp_path / "b.orbax", tmp_path / "c.pt")
    for name in ("a.pt", "a.safetensors", "b.msgpack", "b.orbax", "c.safetensors", "c.pt"):
        assert summarize(tmp_path / name)["pruned"] == total, name
    assert_identical(load(tmp_path / "c.safetensors"), case.sd)
    assert_identical(load(tmp_path / "c.pt"), case.sd)
    if case.spec.refused is None:
        convert(tmp_path / "a.pt", tmp_path / "d.msgpack")
        convert(tmp_path / "d.msgpack", tmp_path / "d.pt")
        assert_identical(load(tmp_path / "d.pt"), case.sd)
    else:
        with pytest.raises(ValueError, match=case.spec.refused):
            convert(tmp_path / "a.pt", tmp_path / "d.msgpack")
        assert not os.path.exists(tmp_path / "d.msgpack")


TWINS = [(n, "f32") for n, spec in SPECS.items() if spec.twin is not None]


@pytest.mark.parametrize("name", [n for n, _ in TWINS])
def test_flax_twin_gives_torch_logits(name):
    spec, model = SPECS[name], build_pruned(name, torch.float32)
    x, flax_model, fx, to_flax_layout = spec.twin()
    with torch.no_grad():
        want = to_flax_layout(model(x).numpy())
    ckpts = [from_torch(model)]
    if spec.refused is None:  # the same by a Flax template
        ckpts.append(from_torch(model.state_dict(), template=_flax_template(spec)))
    for ckpt in ckpts:
        variables = {"params": jp.apply_masks(ckpt["params"], ckpt["masks"])}
        if "batch_stats" in ckpt:
            variables["batch_stats"] = ckpt["batch_stats"]
        np.testing.assert_allclose(np.asarray(flax_model.apply(variables, fx)), want, atol=2e-5)


# ------------------------------------------------------------------------------ targeted


def _named_error(fn, *names):
    with pytest.raises(ValueError) as e:
        fn()
    for name in names:
        assert re.search(name, str(e.value)), str(e.value)
    return str(e.value)


def test_pruned_tensors_without_a_flax_layer_keep_torch_name_and_layout():
    """The documented place: params/<module>/<torch name>, torch's layout, mask alongside."""
    model = build_pruned("custom-names", torch.float32)
    prune.l1_unstructured(model, "alpha", amount=2)
    prune.l1_unstructured(model.fc, "gate", amount=1)
    ckpt = from_torch(model.state_dict())
    for path, orig, mask in [
        (("alpha",), model.alpha_orig, model.alpha_mask),
        (("fc", "gate"), model.fc.gate_orig, model.fc.gate_mask),
    ]:
        p, m = ckpt["params"], ckpt["masks"]
        for c in path:
            p, m = p[c], m[c]
        assert np.array_equal(p, orig.detach().numpy()) and np.array_equal(m, mask.numpy() != 0)
    lstm = build_pruned("lstm2-bidir", torch.float32)
    ckpt = from_torch(lstm)
    pruned = {k[:-5] for k in masks_of(lstm.state_dict())}
    assert pruned <= set(ckpt["params"]) and all(ckpt["masks"][k] is not None for k in pruned)
    assert not pruned & set(ckpt["torch"]["extra"])


def test_flax_attention_exports_to_torch_multihead_attention():
    """Flax's (embed, heads, head_dim) kernels become in_proj_weight/out_proj, not conv weights."""
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    flax_model = FlaxAttnNet()
    params = jax.tree.map(np.asarray, flax_model.init(jax.random.key(1), x)["params"])
    masks = jp.l1_unstructured(params, 0.5, select=["attn/query/kernel", "attn/out/kernel"])
    want = np.asarray(flax_model.apply({"params": jp.apply_masks(params, masks)}, x))
    sd = to_torch({"params": params, "masks": masks})
    assert sd["attn.in_proj_weight_mask"].shape == (24, 8)
    assert bool(sd["attn.in_proj_weight_mask"][8:].all())  # key and value are unpruned
    torch_model = TorchAttnNet()
    load_pruned_state_dict(torch_model, sd)
    with torch.no_grad():
        got = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    back = from_torch(torch_model)  # and back: the same Flax leaves, bit for bit
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        got_leaf = back["params"]
        for k in path:
            got_leaf = got_leaf[k.key]
        assert np.array_equal(got_leaf, leaf), path


def test_kernels_with_no_torch_layout_are_refused():
    dense_general = {"q": {"kernel": np.ones((8, 2, 4), np.float32), "bias": np.ones((2, 4), np.float32)}}
    _named_error(lambda: to_torch({"params": dense_general}), "q/kernel", r"\(8, 2, 4\)")
    mha = FlaxAttnNet(heads=2)
    params = jax.eval_shape(mha.init, jax.random.key(0), np.zeros((1, 3, 8), np.float32))["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    params["attn"]["key"]["bias"] = np.zeros((4, 2), np.float32)  # not torch's packed projection
    _named_error(lambda: to_torch({"params": params}), "attention 'attn'", "no torch counterpart")


def test_colliding_names_are_refused():
    one = np.ones((3, 2), np.float32)
    _named_error(
        lambda: to_torch({"params": {"m": {"kernel": one, "scale": np.ones(2, np.float32)}}}),
        "m/kernel",
        "m/scale",
        "'m.weight'",
    )
    _named_error(
        lambda: to_torch({"params": {"a.b": {"kernel": one}, "a": {"b": {"bias": np.ones(2, np.float32)}}}}),
        "'a.b'",
        "'a/b'",
    )
    lin = torch.nn.Linear(2, 3)
    lin.register_parameter("kernel", torch.nn.Parameter(torch.ones(2)))
    prune.l1_unstructured(lin, "kernel", amount=1)
    _named_error(lambda: from_torch(lin.state_dict()), "'weight'", "'kernel_orig'", "params leaf 'kernel'")
    norm = torch.nn.Module()
    norm.a = torch.nn.LayerNorm(3)
    norm.a.scale = torch.nn.Linear(3, 3)  # a/scale is both the norm's weight and a module
    _named_error(lambda: from_torch(norm.state_dict()), "'a.weight'", "a/scale")


def test_partial_template_covers_what_the_defaults_cannot():
    from interop_models import FlaxTinyLM, TorchTinyLM

    torch.manual_seed(0)
    model = TorchTinyLM()
    prune.l1_unstructured(model.tok, "weight", 0.3)
    prune.l1_unstructured(model.blocks[1].q, "weight", 0.4)
    sd = model.state_dict()
    ids = np.arange(14).reshape(2, 7) % 50
    full = jax.eval_shape(FlaxTinyLM().init, jax.random.key(0), ids)["params"]
    partial = {"tok": full["tok"], "head": full["head"]}  # the two 2-D weights without bias
    ckpt, ref = from_torch(sd, template=partial), from_torch(sd, template=full)
    for leaf in ("tok/embedding", "head/kernel", "blocks/1/q/kernel", "blocks/0/fc2/kernel"):
        here, there = ckpt["params"], ref["params"]
        for c in leaf.split("/"):
            here = here[c]
        for c in leaf.replace("blocks/", "blocks_").split("/"):  # the template names Flax's list
            there = there[c]
        assert np.array_equal(here, there), leaf
    assert np.array_equal(
        ckpt["masks"]["blocks"]["1"]["q"]["kernel"], ref["masks"]["blocks_1"]["q"]["kernel"]
    )
    assert_identical(to_torch(ckpt), sd)
    _named_error(lambda: from_torch(sd, template={"tok": full["tok"]}), r"'head\.weight'", "template")


def test_conv_transpose_layouts_agree_with_torch():
    """torch (I, O, *k) -> Flax ConvTranspose (*k, I, O) spatially flipped (the default), or
    (*k, O, I) unflipped with transpose_kernel=True, whichever layout the template has."""
    import flax.linen as nn

    torch.manual_seed(0)
    up = torch.nn.ConvTranspose2d(3, 5, 3, stride=2)
    prune.l1_unstructured(up, "weight", 0.4)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = up(x).numpy().transpose(0, 2, 3, 1)
    for flip in (False, True):
        flax_up = nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding="VALID", transpose_kernel=flip)
        template = jax.eval_shape(flax_up.init, jax.random.key(0), _nhwc(x))["params"]
        ckpt = from_torch(up.state_dict(), template=template)
        got = flax_up.apply({"params": jp.apply_masks(ckpt["params"], ckpt["masks"])}, _nhwc(x))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
        assert_identical(to_torch(ckpt), up.state_dict())
    assert from_torch(up)["params"]["kernel"].shape == (3, 3, 3, 5)  # by class: Flax's default


def test_square_conv1d_needs_the_torch_model():
    """A Flax template cannot tell a square Conv1D from a Linear (both fit); the class can."""
    model = build_pruned("gpt2-conv1d", torch.float32)
    sd = model.state_dict()
    template = _flax_template(SPECS["gpt2-conv1d"])
    _named_error(lambda: from_torch(sd, template=template), r"attn\.c_proj\.weight", "from_torch\\(model\\)")
    by_class = from_torch(sd, template=model)
    assert np.array_equal(by_class["params"]["attn"]["c_proj"]["kernel"], model.attn.c_proj.weight.detach())


# ------------------------------------------------------------------------------ load_pruned_state_dict


def _snapshot(module: torch.nn.Module):
    """Everything load_pruned_state_dict could touch: tensors (by identity and bytes), hooks,
    attributes and the state_dict."""
    out = []
    for name, sub in module.named_modules():
        hooks = [(k, type(h).__name__) for k, h in sub._forward_pre_hooks.items()]
        tensors = {
            k: (id(v), None if v is None else raw(v).clone())
            for k, v in [*sub._parameters.items(), *sub._buffers.items()]
        }
        attrs = sorted(k for k, v in vars(sub).items() if isinstance(v, torch.Tensor))
        out.append((name, hooks, tensors, attrs, sorted(sub._non_persistent_buffers_set)))
    sd = module.state_dict()
    return out, list(sd), [raw(v).clone() for v in sd.values()]


def _eq(x, y) -> bool:
    return x is None and y is None or x is not None and y is not None and torch.equal(x, y)


def _same(a, b) -> bool:
    (mods_a, keys_a, vals_a), (mods_b, keys_b, vals_b) = a, b
    if keys_a != keys_b or not all(torch.equal(x, y) for x, y in zip(vals_a, vals_b, strict=True)):
        return False
    for (na, ha, ta, aa, pa), (nb, hb, tb, ab, pb) in zip(mods_a, mods_b, strict=True):
        if (na, ha, aa, pa) != (nb, hb, ab, pb) or ta.keys() != tb.keys():
            return False
        if any(ta[k][0] != tb[k][0] or not _eq(ta[k][1], tb[k][1]) for k in ta):
            return False
    return True


@pytest.mark.parametrize("name", ["bn-cnn", "lstm2-bidir", "mha"])
@pytest.mark.parametrize("broken", ["missing", "unexpected", "shape"])
@pytest.mark.parametrize("copyable", [True, False])
def test_failed_load_pruned_state_dict_changes_nothing(name, broken, copyable):
    """Rehearsed on a data-less copy first; a module deepcopy cannot copy (here: it holds a lock)
    is loaded for real and put back as it was when the load fails."""

    sd = dict(build_pruned(name, torch.float32).state_dict())
    if broken == "missing":
        del sd[next(k for k in sd if not k.endswith(("_orig", "_mask")))]
    elif broken == "unexpected":
        sd["surplus"] = torch.zeros(1)
    else:
        last = list(sd)[-1]
        sd[last] = torch.zeros(*sd[last].shape, 2)
    target = SPECS[name].build()
    if not copyable:
        target.lock = threading.Lock()
    before = _snapshot(target)
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
        load_pruned_state_dict(target, sd)
    assert _same(_snapshot(target), before)
    assert not prune.is_pruned(target)


def test_recipe_layouts_are_checked_not_guessed():
    """A recorded layout this version does not know (or a malformed entry) is refused; it is
    never read as "no layout"."""
    import json

    model = build_pruned("mha", torch.float32)
    ckpt = from_torch(model)
    meta = json.loads(ckpt["torch"]["recipe"])
    layouts = [lay for _, _, lay, _ in meta["keys"]]
    assert "qkv:2" in layouts and "heads_out:2" in layouts
    for bad in ("qkv_packed:2", "qkv:0", "conv_t"):
        keys = [[k, t, bad if lay == "qkv:2" else lay, dt] for k, t, lay, dt in meta["keys"]]
        broken = {**ckpt, "torch": {**ckpt["torch"], "recipe": json.dumps({**meta, "keys": keys})}}
        _named_error(lambda b=broken: to_torch(b), "malformed entry", "in_proj_weight")
    first = meta["keys"][0]
    truncated = {**ckpt, "torch": {"recipe": json.dumps({**meta, "keys": [first[:3]]})}}
    _named_error(lambda: to_torch(truncated), "malformed entry")
    old = {**ckpt, "torch": {**ckpt["torch"], "recipe": json.dumps({**meta, "version": 1})}}
    assert_identical(to_torch(old), model.state_dict())  # version 1 recipes read as before


@pytest.mark.parametrize("name", ["mha", "conv-transpose", "gpt2-conv1d"])
def test_flax_params_export_by_a_torch_template(name):
    """Flax-trained params -> torch names and layouts from the torch model (its classes decide),
    or from a bare state_dict, which must refuse what its shapes cannot tell."""
    spec = SPECS[name]
    x, flax_model, fx, to_flax_layout = spec.twin()
    params = jax.tree.map(np.asarray, flax_model.init(jax.random.key(2), fx)["params"])
    masks = jp.l1_unstructured(params, 0.3, select="*kernel")
    want = np.asarray(flax_model.apply({"params": jp.apply_masks(params, masks)}, fx))
    torch_model = spec.build()
    sd = to_torch({"params": params, "masks": masks}, template=torch_model)
    load_pruned_state_dict(torch_model, sd)
    with torch.no_grad():
        np.testing.assert_allclose(to_flax_layout(torch_model(x).numpy()), want, atol=2e-5)
    bare = spec.build().state_dict()
    if spec.refused is None:
        assert_identical(to_torch({"params": params, "masks": masks}, template=bare), sd)
    else:
        _named_error(lambda: to_torch({"params": params, "masks": masks}, template=bare), spec.refused)


@pytest.mark.parametrize(
    "recipe, match",
    [
        ("5", "int JSON, expected an object"),
        ("{", "is not JSON"),
        ('{"version": 3, "keys": []}', "version 3"),
        ('{"version": 2, "keys": 7}', "malformed entry 7"),
        ('{"version": 2, "keys": [], "metadata": [1]}', "metadata"),
    ],
)
def test_malformed_recipe_is_named(recipe, match):
    ckpt = {"params": {"w": np.ones(2, np.float32)}, "torch": {"recipe": recipe}}
    with pytest.raises(ValueError, match=r"ckpt\['torch'\]\['recipe'\].*" + match):
        to_torch(ckpt)


def test_bias_less_conv_transpose_is_read_by_the_norm_after_it():
    """A DCGAN generator's bias-less ConvTranspose layers, each followed by a BatchNorm of its
    output channels (dim 1): read as ConvTranspose from the state_dict alone (before: as Conv).
    Its last layer has no norm after it, so its shape fits both: refused, naming it."""
    gen = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(10, 6, 4, bias=False),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(6, 4, 4, 2, 1, bias=False),
        torch.nn.BatchNorm2d(4),
    )
    by_model = from_torch(gen)
    by_shapes = from_torch(gen.state_dict())
    for a, b in zip(jax.tree.leaves(by_model["params"]), jax.tree.leaves(by_shapes["params"])):
        np.testing.assert_array_equal(a, b)
    assert json.loads(by_shapes["torch"]["recipe"]) == json.loads(by_model["torch"]["recipe"])
    gen.append(torch.nn.ConvTranspose2d(4, 3, 4, 2, 1, bias=False))  # no norm after it
    with pytest.raises(ValueError, match=r"'5\.weight' .* may be a Conv or ConvTranspose"):
        from_torch(gen.state_dict())
    assert from_torch(gen)["params"]["5"]["kernel"].shape == (4, 4, 4, 3)


def test_torch_module_metadata_is_kept_exactly_or_refused():
    """torch's per-module versions travel in the recipe; metadata JSON would change (a tuple would
    come back a list) is refused, not dropped."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    sd = model.state_dict()
    assert dict(to_torch(from_torch(sd))._metadata) == dict(sd._metadata)
    sd._metadata["0"]["extra"] = (1, 2)
    with pytest.raises(ValueError, match="_metadata of module '0'"):
        from_torch(sd)
    sd._metadata = None
    assert to_torch(from_torch(sd)).keys() == model.state_dict().keys()
