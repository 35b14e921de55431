"""Cross-framework tests: real torch models, pruned in torch or in jprune, converted both ways."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from interop_models import (
    FlaxBNNet,
    FlaxLeNet,
    FlaxTinyLM,
    TorchBNNet,
    TorchLeNet,
    TorchTinyLM,
    assert_identical,
    raw,
    seed_pruned_lenet,
)
from jprune.interop import (
    convert,
    from_torch,
    load,
    load_pruned_state_dict,
    save,
    summarize,
    to_torch,
)
from jprune.interop._cli import main as cli
from torch.nn.utils import prune

import jprune as jp


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


def flax_logits(model, ckpt, x, **kw):
    variables = {"params": jp.apply_masks(ckpt["params"], ckpt["masks"])}
    if "batch_stats" in ckpt:
        variables["batch_stats"] = ckpt["batch_stats"]
    return np.asarray(model.apply(variables, x, **kw))


@pytest.fixture(scope="module")
def lenet():
    model = seed_pruned_lenet()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x).numpy()
    return model, x, logits


# ------------------------------------------------------------------------------------ LeNet


def test_lenet_seed_round_trip(lenet):
    model, x, logits = lenet
    sd = model.state_dict()
    ckpt = from_torch(sd)
    assert set(ckpt) == {"params", "masks", "torch"}
    assert ckpt["params"]["fc1"]["kernel"].shape == (400, 120)
    assert ckpt["params"]["conv1"]["kernel"].shape == (3, 3, 1, 6)
    assert ckpt["masks"]["conv1"]["bias"].dtype == np.bool_
    assert ckpt["masks"]["fc1"]["bias"] is None
    np.testing.assert_allclose(flax_logits(FlaxLeNet(), ckpt, nhwc(x)), logits, atol=1e-5)

    back = to_torch(ckpt)
    assert_identical(back, sd)
    model.load_state_dict(back)
    assert_identical(model.state_dict(), sd)


def test_lenet_effective_weights_bit_exact(lenet):
    model, _, _ = lenet
    ckpt = from_torch(model.state_dict())
    eff = jp.apply_masks(ckpt["params"], ckpt["masks"])
    w = np.asarray(eff["fc1"]["kernel"]).T
    assert np.array_equal(w.view(np.uint32), model.fc1.weight.detach().numpy().view(np.uint32))
    k = np.asarray(eff["conv2"]["kernel"]).transpose(3, 2, 0, 1)
    assert np.array_equal(k.view(np.uint32), model.conv2.weight.detach().numpy().view(np.uint32))


def test_lenet_fresh_module_accepts_pruned_state_dict(lenet):
    model, x, logits = lenet
    sd = to_torch(from_torch(model.state_dict()))
    fresh = TorchLeNet()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(sd)
    load_pruned_state_dict(fresh, sd)
    assert prune.is_pruned(fresh)
    assert_identical(fresh.state_dict(), sd)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), logits)

    baked = TorchLeNet()
    load_pruned_state_dict(baked, sd, reparametrize=False)
    assert not prune.is_pruned(baked)
    assert torch.equal(baked.fc1.weight, model.fc1.weight)
    with torch.no_grad():
        np.testing.assert_array_equal(baked(x).numpy(), logits)


@pytest.mark.parametrize("torch_ext", [".pt", ".safetensors"])
@pytest.mark.parametrize("flax_ext", [".msgpack", ".orbax"])
def test_lenet_files_round_trip(lenet, tmp_path, torch_ext, flax_ext):
    model, x, logits = lenet
    sd = model.state_dict()
    src, mid, out = (
        tmp_path / f"a{torch_ext}",
        tmp_path / f"b{flax_ext}",
        tmp_path / f"c{torch_ext}",
    )
    save(sd, src)
    convert(src, mid)
    ckpt = load(mid)
    np.testing.assert_allclose(flax_logits(FlaxLeNet(), ckpt, nhwc(x)), logits, atol=1e-5)
    convert(mid, out)
    assert_identical(load(out), sd)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (src, mid, out))


# ------------------------------------------------------------------ jprune -> torch (reverse)


def test_prune_in_jprune_then_torch(lenet):
    _, x, _ = lenet
    xf = nhwc(x)
    torch.manual_seed(3)  # weights from an unpruned torch LeNet (Flax's init compiles for ~15 s)
    params = from_torch(TorchLeNet().state_dict())["params"]
    masks = jp.l1_unstructured(params, 0.2, select="conv*/kernel")
    masks = jp.ln_structured(params, 0.4, 2, -1, masks=masks, select="fc*/kernel")  # torch dim=0
    masks = jp.global_unstructured(params, 0.2, masks=masks)
    every_other = {**jax.tree.map(lambda _: None, params)}
    every_other["fc3"] = {"kernel": None, "bias": np.arange(10) % 2 == 1}
    masks = jp.custom_from_mask(params, every_other, masks=masks)
    params = jax.tree.map(jnp.asarray, params)  # JAX arrays, as after training in JAX
    ckpt = {"params": params, "masks": masks}  # no recipe: torch names come from Flax names
    flax_out = flax_logits(FlaxLeNet(), ckpt, xf)

    sd = to_torch(ckpt)
    assert list(sd)[:4] == ["conv1.bias", "conv1.weight_orig", "conv1.weight_mask", "conv2.bias"]
    assert sd["fc1.weight_mask"].dtype == torch.float32 and "fc3.bias_mask" in sd
    # Structured along the last axis of a Dense kernel = torch's dim 0: whole rows pruned.
    rows = sd["fc1.weight_mask"].sum(dim=1)
    assert int((rows == 0).sum()) == round(0.4 * 120)
    torch_model = TorchLeNet()
    load_pruned_state_dict(torch_model, sd)
    assert prune.is_pruned(torch_model)
    with torch.no_grad():
        np.testing.assert_allclose(torch_model(x).numpy(), flax_out, atol=1e-5)
    # and back again, exactly
    assert_identical(to_torch(from_torch(torch_model.state_dict())), torch_model.state_dict())


def test_masks_added_and_removed_after_conversion(lenet):
    unpruned = TorchLeNet().state_dict()
    ckpt = from_torch(unpruned)
    masks = jp.l1_unstructured(ckpt["params"], 0.5, select="fc2/kernel", masks=ckpt["masks"])
    sd = to_torch({**ckpt, "masks": masks})
    fc2 = [k for k in sd if k.startswith("fc2.")]
    assert fc2 == ["fc2.bias", "fc2.weight_orig", "fc2.weight_mask"]  # as torch orders them
    assert float(sd["fc2.weight_mask"].mean()) == 0.5

    pruned = lenet[0].state_dict()
    ckpt = from_torch(pruned)
    params = jp.remove(ckpt["params"], ckpt["masks"])
    sd = to_torch({**ckpt, "params": params, "masks": jax.tree.map(lambda _: None, params)})
    assert list(sd) == [k.removesuffix("_orig") for k in pruned if not k.endswith("_mask")]
    assert torch.equal(sd["fc1.weight"], lenet[0].fc1.weight)


# ------------------------------------------------------------------ BatchNorm, Transformer


def test_batchnorm_cnn(tmp_path):
    torch.manual_seed(0)
    model = TorchBNNet()
    with torch.no_grad():
        for _ in range(3):  # train-mode forwards: running stats move, num_batches_tracked = 3
            model(torch.randn(4, 3, 8, 8))
    prune.l1_unstructured(model.conv1, "weight", 0.3)
    prune.ln_structured(model.conv2, "weight", 0.25, n=1, dim=0)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        logits = model(x).numpy()
    sd = model.state_dict()
    ckpt = from_torch(sd)
    assert set(ckpt["batch_stats"]["bn1"]) == {"mean", "var"}
    assert ckpt["torch"]["extra"]["bn1.num_batches_tracked"] == 3
    np.testing.assert_allclose(flax_logits(FlaxBNNet(), ckpt, nhwc(x)), logits, atol=1e-5)
    assert_identical(to_torch(ckpt), sd)
    save(ckpt, tmp_path / "bn.orbax")
    assert_identical(to_torch(load(tmp_path / "bn.orbax")), sd)


def test_transformer_block_needs_template_then_agrees():
    torch.manual_seed(0)
    model = TorchTinyLM()
    prune.l1_unstructured(model.tok, "weight", 0.3)
    for block in model.blocks:
        prune.ln_structured(block.fc1, "weight", 0.5, n=2, dim=0)
        prune.l1_unstructured(block.q, "weight", 0.4)
    prune.l1_unstructured(model.head, "weight", 0.2)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).numpy()
    sd = model.state_dict()
    with pytest.raises(ValueError, match=r"'tok\.weight_orig'.*ambiguous.*template="):
        from_torch(sd)

    flax_model = FlaxTinyLM()
    template = jax.eval_shape(flax_model.init, jax.random.key(0), ids.numpy())["params"]
    ckpt = from_torch(sd, template=template)
    assert ckpt["params"]["tok"]["embedding"].shape == (50, 16)  # Embedding: same layout
    assert ckpt["params"]["head"]["kernel"].shape == (16, 50)  # Linear: transposed
    assert ckpt["masks"]["blocks_1"]["fc1"]["kernel"].shape == (16, 64)
    assert ckpt["params"]["blocks_0"]["ln1"]["scale"].shape == (16,)
    np.testing.assert_allclose(flax_logits(flax_model, ckpt, ids.numpy()), logits, atol=1e-5)
    assert_identical(to_torch(ckpt), sd)

    # Flax -> torch without a recipe: the torch module names the keys.
    bare = {"params": ckpt["params"], "masks": ckpt["masks"]}
    sd2 = to_torch(bare, template=TorchTinyLM())
    fresh = TorchTinyLM()
    load_pruned_state_dict(fresh, sd2)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(ids).numpy(), logits)


@pytest.mark.parametrize(
    "param_dtype, scores_dtype",
    [
        (torch.float32, torch.float64),  # Ln with float64 scores: a float64 mask on fp32 weights
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.float64, None),
    ],
)
def test_mask_and_param_dtypes_survive(param_dtype, scores_dtype, tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).to(param_dtype)
    scores = None if scores_dtype is None else torch.randn(4, 6, dtype=scores_dtype)
    prune.ln_structured(lin, "weight", 0.5, n=2, dim=0, importance_scores=scores)
    prune.l1_unstructured(lin, "bias", 1)
    sd = lin.state_dict()
    assert sd["weight_mask"].dtype == (scores_dtype or param_dtype)
    ckpt = from_torch(sd)
    assert_identical(to_torch(ckpt), sd)
    for ext in (".msgpack", ".orbax"):
        save(ckpt, tmp_path / f"c{ext}")
        assert_identical(to_torch(load(tmp_path / f"c{ext}")), sd)
    save(sd, tmp_path / "c.safetensors")
    assert_identical(load(tmp_path / "c.safetensors"), sd)
    fresh = torch.nn.Linear(6, 4).to(param_dtype)
    load_pruned_state_dict(fresh, to_torch(ckpt))
    assert_identical(fresh.state_dict(), sd)
    assert torch.equal(raw(fresh.weight), raw(lin.weight_orig * lin.weight_mask.to(param_dtype)))


def test_unknown_keys_are_kept():
    sd = {
        "pos_embedding": torch.randn(1, 4, 8),
        "attn.causal_mask": torch.tril(torch.ones(4, 4, dtype=torch.bool)),
        "ids": torch.arange(4),
        "fc.weight_orig": torch.randn(3, 8),
        "fc.weight_mask": torch.ones(3, 8),
        "fc.bias": torch.zeros(3),
    }
    ckpt = from_torch(sd)
    assert set(ckpt["torch"]["extra"]) == {"pos_embedding", "attn.causal_mask", "ids"}
    assert_identical(to_torch(ckpt), sd)


def test_default_torch_names_without_recipe():
    params = {
        "conv": {"kernel": np.ones((3, 3, 2, 4), np.float32), "bias": np.zeros(4, np.float32)},
        "norm": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)},
        "fc": {"kernel": np.ones((4, 5), np.float32)},
    }
    stats = {"norm": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}
    sd = to_torch({"params": params, "batch_stats": stats})
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "conv.weight": (4, 2, 3, 3),
        "conv.bias": (4,),
        "norm.weight": (4,),
        "norm.bias": (4,),
        "norm.running_mean": (4,),
        "norm.running_var": (4,),
        "norm.num_batches_tracked": (),
        "fc.weight": (5, 4),
    }


# ------------------------------------------------------------------------------ CLI, summaries


def test_cli_inspect_torch_and_flax_agree(lenet, tmp_path, capsys):
    sd = lenet[0].state_dict()
    save(sd, tmp_path / "m.pt")
    assert cli(["convert", str(tmp_path / "m.pt"), str(tmp_path / "m.msgpack")]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "m.pt"), "--json"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert cli(["inspect", str(tmp_path / "m.msgpack"), "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert t["format"] == "torch" and f["format"] == "flax"
    assert (t["pruned"], t["numel_pruned_tensors"], t["numel_params"]) == (
        f["pruned"],
        f["numel_pruned_tensors"],
        f["numel_params"],
    )
    assert [r["name"] for r in t["tensors"]][:3] == ["conv1.weight", "conv1.bias", "conv2.weight"]
    fc1 = next(r for r in t["tensors"] if r["name"] == "fc1.weight")
    assert fc1["pruned"] == int((lenet[0].fc1.weight_mask == 0).sum())
    assert summarize(sd)["sparsity"] == t["sparsity"]
    assert cli(["inspect", str(tmp_path / "m.pt")]) == 0
    assert "global sparsity:" in capsys.readouterr().out


def test_console_script(tmp_path):
    exe = shutil.which("jprune", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("jprune is not installed (pip install -e .)")
    sd = {
        "fc.bias": torch.ones(2),
        "fc.weight_orig": torch.ones(2, 2),
        "fc.weight_mask": torch.eye(2),
    }
    save(sd, tmp_path / "m.pt")
    r = subprocess.run(
        [exe, "convert", str(tmp_path / "m.pt"), str(tmp_path / "m.msgpack")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "m.msgpack")["masks"]["fc"]["kernel"].tolist() == [[1, 0], [0, 1]]


# ------------------------------------------------------------------------------ bad inputs


def _cli_fails(capsys, *args, match):
    assert cli(list(map(str, args))) == 1
    err = capsys.readouterr().err
    assert err.startswith("jprune: error:") and err.count("\n") == 1 and match in err, err


@pytest.mark.parametrize("ext", [".pt", ".safetensors", ".msgpack"])
def test_truncated_file(lenet, tmp_path, capsys, ext):
    good = tmp_path / f"good{ext}"
    sd = lenet[0].state_dict()
    save(from_torch(sd) if ext == ".msgpack" else sd, good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{ext}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(bad)
    dst = tmp_path / ("out.pt" if ext == ".msgpack" else "out.msgpack")
    _cli_fails(capsys, "convert", bad, dst, match="truncated")
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == sorted([good.name, bad.name])


def test_damaged_orbax_directory(tmp_path, capsys):
    save({"params": {"w": np.ones(3, np.float32)}}, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "state")
    with pytest.raises(ValueError, match="not an orbax checkpoint written by jprune"):
        load(tmp_path / "ckpt")
    _cli_fails(capsys, "convert", tmp_path / "ckpt", tmp_path / "m.pt", match="not an orbax")
    assert os.listdir(tmp_path) == ["ckpt"]


def test_wrong_extension(tmp_path, capsys):
    save({"w": torch.ones(2)}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="unsupported extension '.txt'"):
        convert(tmp_path / "m.pt", tmp_path / "m.txt")
    with pytest.raises(ValueError, match="from_torch reads .pt, .pth or .safetensors"):
        from_torch(tmp_path / "m.msgpack")
    (tmp_path / "m.npz").write_bytes(b"x")
    _cli_fails(capsys, "inspect", tmp_path / "m.npz", match="unsupported extension")
    _cli_fails(capsys, "inspect", tmp_path / "missing.pt", match="no such file")
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "m.pt"]


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_never_run(tmp_path, capsys, how):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"w": torch.ones(2), "x": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(pickle.UnpicklingError, match="refused to unpickle.*nothing in it was executed"):
        load(path)
    _cli_fails(capsys, "convert", path, tmp_path / "out.msgpack", match="refused to unpickle")
    assert not marker.exists() and not (tmp_path / "out.msgpack").exists()


def test_mask_shape_differs_from_weight(tmp_path, capsys):
    sd = {"fc.weight_orig": torch.ones(3, 4), "fc.weight_mask": torch.ones(4, 3)}
    with pytest.raises(ValueError, match=r"mask 'fc.weight_mask' has shape \(4, 3\), expected \(3, 4\)"):
        from_torch(sd)
    save(sd, tmp_path / "m.pt")
    _cli_fails(capsys, "convert", tmp_path / "m.pt", tmp_path / "m.msgpack", match="has shape")
    assert not (tmp_path / "m.msgpack").exists()
    params = {"fc": {"kernel": np.ones((4, 3), np.float32)}}
    with pytest.raises(ValueError, match="mask at fc/kernel has shape"):
        to_torch({"params": params, "masks": {"fc": {"kernel": np.ones((3, 4), bool)}}})


def test_mask_without_orig(tmp_path):
    with pytest.raises(ValueError, match="'fc.weight_mask' has no matching 'fc.weight_orig'"):
        from_torch({"fc.weight": torch.ones(3, 4), "fc.weight_mask": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="'fc.bias_orig' has no matching 'fc.bias_mask'"):
        from_torch({"fc.weight": torch.ones(3, 4), "fc.bias_orig": torch.ones(3)})


@pytest.mark.parametrize("bad", [0.5, 2.0, float("nan"), -0.0])
def test_non_binary_mask_refused(bad):
    mask = torch.ones(3, 4)
    mask[1, 2] = bad
    with pytest.raises(ValueError, match=r"mask 'fc.weight_mask' is not binary: entry 6"):
        from_torch({"fc.weight_orig": torch.ones(3, 4), "fc.weight_mask": mask, "fc.bias": torch.ones(3)})


def test_template_that_does_not_match(lenet, tmp_path, capsys):
    sd = lenet[0].state_dict()
    template = jax.eval_shape(FlaxLeNet().init, jax.random.key(0), np.zeros((1, 28, 28, 1)))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template["params"])
    wrong_shape = {**template, "fc2": {"kernel": np.zeros((120, 80)), "bias": np.zeros(80)}}
    with pytest.raises(
        ValueError, match=r"template does not match at 'fc2': 'fc2.bias' \(84,\).*has \(80,\)"
    ):
        from_torch(sd, template=wrong_shape)
    extra_module = {**template, "fc4": {"kernel": np.zeros((10, 10))}}
    with pytest.raises(ValueError, match="template modules fc4 have no torch tensors"):
        from_torch(sd, template=extra_module)
    renamed = {("dense" if k == "fc3" else k): v for k, v in template.items()}
    ckpt = from_torch(sd, template=renamed)  # a unique shape match is no guess
    assert "dense" in ckpt["params"]
    missing = {k: v for k, v in template.items() if k != "fc3"}
    ckpt = from_torch(sd, template=missing)  # a partial template: fc3 follows the default rules
    assert ckpt["params"]["fc3"]["kernel"].shape == (84, 10)
    save({"params": wrong_shape}, tmp_path / "t.msgpack")
    save(sd, tmp_path / "m.pt")
    _cli_fails(
        capsys,
        "convert",
        tmp_path / "m.pt",
        tmp_path / "m.msgpack",
        "--template",
        tmp_path / "t.msgpack",
        match="template does not match",
    )
    assert not (tmp_path / "m.msgpack").exists()


def test_template_matches_flax_sequential_names():
    import flax.linen as nn

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    prune.l1_unstructured(seq[0], "weight", 0.5)
    flax_seq = nn.Sequential([nn.Dense(4, use_bias=False), nn.relu, nn.Dense(2)])
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    template = jax.eval_shape(flax_seq.init, jax.random.key(0), x)["params"]
    assert set(template) == {"layers_0", "layers_2"}  # torch: "0", "2"
    ckpt = from_torch(seq.state_dict(), template=template)
    with torch.no_grad():
        expected = seq(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(flax_logits(flax_seq, ckpt, x), expected, atol=1e-6)
    assert_identical(to_torch(ckpt), seq.state_dict())


def test_ambiguous_template_refused():
    sd = {f"{n}.weight": torch.ones(4, 4) for n in ("a", "b")}
    sd.update({f"{n}.bias": torch.ones(4) for n in ("a", "b")})
    template = {n: {"kernel": np.zeros((4, 4)), "bias": np.zeros(4)} for n in ("x", "y")}
    with pytest.raises(ValueError, match="template is ambiguous for torch module 'a'"):
        from_torch(sd, template=template)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    save({"w": torch.ones(2)}, tmp_path / "old.pt")
    before = (tmp_path / "old.pt").read_bytes()

    def broken_save(obj, f, *a, **k):  # save hands torch.save an open file
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save({"w": torch.zeros(2)}, tmp_path / "old.pt")
    with pytest.raises(OSError, match="disk full"):
        save({"w": torch.zeros(2)}, tmp_path / "new.pt")
    assert os.listdir(tmp_path) == ["old.pt"] and (tmp_path / "old.pt").read_bytes() == before


def test_convert_checkpoint_example(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
    import convert_checkpoint

    result = convert_checkpoint.main(["--smoke", "--out", str(tmp_path)])
    assert result["diff"] < 1e-5 and result["back_diff"] < 1e-5 and result["agreement"] == 1.0
    out = capsys.readouterr().out
    assert "conv1/bias    (6,)" in out and "fc1.weight    (120, 400)" in out


def test_orbax_overwrite_is_atomic(tmp_path):
    a = {"params": {"w": np.ones(3, np.float32)}, "masks": {"w": np.array([1, 0, 1], bool)}}
    b = {"params": {"w": np.zeros(2, np.float16)}, "masks": {"w": None}}
    save(a, tmp_path / "ckpt")
    save(b, tmp_path / "ckpt")
    got = load(tmp_path / "ckpt")
    assert got["params"]["w"].dtype == np.float16 and got["masks"] == {"w": None}
    assert os.listdir(tmp_path) == ["ckpt"]
    (tmp_path / "file.orbax").write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save(a, tmp_path / "file.orbax")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "file.orbax"]
