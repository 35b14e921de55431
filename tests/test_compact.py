"""Packed masks and compact checkpoints (`save(..., compact=True)`, `jprune compact`).

Lossless files give back exactly what was saved; compact files give back the same effective
weights (torch's `orig * mask`, computed by torch) and the same logits in Flax and in torch, over
the interop corpus. Hostile records are refused naming the tensor. Sizes are checked against
bounds computed here from the entry counts, never against stored numbers.
"""

import json
import math
import os
import struct
import zlib

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from interop_models import assert_identical
from jprune.interop import _packed, from_torch, load, load_pruned_state_dict, save, summarize, to_torch
from jprune.interop._cli import main as cli
from test_files_hostile import cli_refuses, same_tree, snapshot
from test_interop_corpus import CASES, DTYPES, SPECS, build_pruned, masks_of
from torch.nn.utils import prune

import jprune as jp

HEADER = 32  # the fixed header of a record, before the shape (u64 per axis)


def effective(sd) -> dict:
    """torch's effective tensors, `X_orig * X_mask` (by torch), and every other tensor as is."""
    out = {}
    for k, v in sd.items():
        if k.endswith("_mask") and f"{k[:-5]}_orig" in sd:
            continue
        if k.endswith("_orig") and f"{k[:-5]}_mask" in sd:
            out[k[:-5]] = v * sd[f"{k[:-5]}_mask"]
        else:
            out[k] = v
    return out


def assert_same_values(a, b):
    """Same keys, dtypes and shapes, equal values (== : 0.0 and -0.0 are the same number)."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert torch.equal(a[k], b[k]), k


def assert_identical_or_empty(a, b):
    """`assert_identical`, also for tensors with no entries (which have no bytes to compare)."""
    assert list(a) == list(b)
    empty = [k for k in a if a[k].numel() == 0]
    for k in empty:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
    assert_identical({k: a[k] for k in a if k not in empty}, {k: b[k] for k in b if k not in empty})


def _effective_flax(ckpt):
    """The masked params by jprune, as numpy leaves in order."""
    with jax.enable_x64(True):  # float64 leaves stay float64
        return [np.asarray(a) for a in jax.tree.leaves(jp.apply_masks(ckpt["params"], ckpt["masks"]))]


def fresh(name, dtype):
    torch.manual_seed(1)
    return SPECS[name].build().to(dtype).eval()


# ------------------------------------------------------------------------ the corpus, every way


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{d}" for n, d in CASES])
def case(request):
    name, dt = request.param
    model = build_pruned(name, DTYPES[dt])
    return name, DTYPES[dt], model, model.state_dict()


def test_lossless_files_are_bit_exact_and_masks_take_a_bit(case, tmp_path):
    name, _, model, sd = case
    save(sd, tmp_path / "a.safetensors")
    assert_identical(load(tmp_path / "a.safetensors"), sd)
    ckpt = from_torch(model)
    save(ckpt, tmp_path / "a.msgpack")
    back = load(tmp_path / "a.msgpack")
    same_tree(back, ckpt)
    assert_identical(to_torch(back), sd)
    # the masks add at most a bit per entry, plus a record header and the path per mask
    unmasked = {**ckpt, "masks": jax.tree.map(lambda _: None, ckpt["params"])}
    save(unmasked, tmp_path / "u.msgpack")
    masks = [m for m in jax.tree.leaves(ckpt["masks"]) if m is not None]
    bound = sum(math.ceil(m.size / 8) + HEADER + 8 * m.ndim + 128 for m in masks)
    assert 0 < os.path.getsize(tmp_path / "a.msgpack") - os.path.getsize(tmp_path / "u.msgpack") <= bound


def test_compact_gives_the_same_effective_weights(case, tmp_path):
    name, dtype, model, sd = case
    want = effective(sd)
    save(sd, tmp_path / "c.safetensors", compact=True)
    got = load(tmp_path / "c.safetensors")
    assert list(got) == list(sd)  # the same keys, masks included, in the same order
    assert_same_values(effective(got), want)
    for k, m in masks_of(sd).items():  # masks exact, dropped values zero
        assert_identical({k: got[k]}, {k: m})
        assert not got[k[:-5] + "_orig"][m == 0].any()
    # Flax: compact msgpack -> the same masked params -> torch again
    ckpt = from_torch(model)
    save(ckpt, tmp_path / "c.msgpack", compact=True)
    back = load(tmp_path / "c.msgpack")
    same_tree(back["masks"], ckpt["masks"])
    for a, b in zip(_effective_flax(back), _effective_flax(ckpt), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert_same_values(effective(to_torch(back)), want)
    # a fresh, unpruned torch model takes it and is pruned as the source
    target = fresh(name, dtype)
    load_pruned_state_dict(target, to_torch(back))
    assert_same_values(effective(target.state_dict()), want)
    assert os.path.getsize(tmp_path / "c.msgpack") < os.path.getsize(tmp_path / "c.safetensors") + 4096


TWINS = [n for n, spec in SPECS.items() if spec.twin is not None]


@pytest.mark.parametrize("fmt", [".msgpack", ".safetensors", ""])
@pytest.mark.parametrize("name", TWINS)
def test_compact_gives_the_same_logits_in_flax_and_torch(name, fmt, tmp_path):
    spec, model = SPECS[name], build_pruned(name, torch.float32)
    x, flax_model, fx, _ = spec.twin()
    with torch.no_grad():
        want_torch = model(x)
    ckpt = from_torch(model)
    path = tmp_path / f"c{fmt}"
    if fmt == ".safetensors":
        save(model.state_dict(), path, compact=True)
        back = from_torch(load(path), template=model)
    else:
        save(ckpt, path, compact=True)
        back = load(path)

    def flax_logits(c):
        variables = {
            "params": jp.apply_masks(c["params"], c["masks"]),
            **({"batch_stats": c["batch_stats"]} if "batch_stats" in c else {}),
        }
        return np.asarray(flax_model.apply(variables, fx))

    np.testing.assert_array_equal(flax_logits(back), flax_logits(ckpt))
    target = fresh(name, torch.float32)
    load_pruned_state_dict(
        target, to_torch(back, template=model) if fmt == ".safetensors" else to_torch(back)
    )
    with torch.no_grad():
        assert torch.equal(target(x), want_torch)


def test_removed_zeros_are_compacted_and_load_as_plain_params(tmp_path):
    """After remove, zeros are baked in: a compact file stores the nonzeros; no mask comes back."""
    model = build_pruned("bn-cnn", torch.float32)
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    prune.global_unstructured(
        [(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=0.9
    )
    for m in layers:
        prune.remove(m, "weight")
    sd = model.state_dict()
    save(sd, tmp_path / "d.safetensors")
    save(sd, tmp_path / "c.safetensors", compact=True)
    assert_same_values(load(tmp_path / "c.safetensors"), sd)
    ckpt = from_torch(model)
    save(ckpt, tmp_path / "c.msgpack", compact=True)
    back = load(tmp_path / "c.msgpack")
    assert not any(m is not None for _, m in _leaves(back["masks"]))
    got, want = dict(_leaves(back["params"])), dict(_leaves(ckpt["params"]))
    assert sorted(got) == sorted(want)
    for path, a in got.items():
        assert a.dtype == want[path].dtype and a.shape == want[path].shape, path
        np.testing.assert_array_equal(a, want[path])
    assert os.path.getsize(tmp_path / "c.safetensors") < os.path.getsize(tmp_path / "d.safetensors") / 2


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, tree


# --------------------------------------------------------------------------- property: records


DTYPE_NAMES = ["float32", "float16", "bfloat16", "float64", "int32", "int8", "uint8"]


def np_dtype(name):
    return np.dtype(getattr(ml_dtypes, name, None) or name)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPE_NAMES),
    density=st.sampled_from([0.0, 1.0, 0.1, 0.5, 0.93]),
    seed=st.integers(0, 2**31 - 1),
    fmt=st.sampled_from([".msgpack", ".safetensors"]),
)
def test_any_mask_any_dtype_round_trips(tmp_path_factory, shape, dtype, density, seed, fmt):
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    values = np.asarray(rng.standard_normal(shape) * 50).astype(np_dtype(dtype))
    mask = np.asarray(rng.random(shape) < density)
    root = tmp_path_factory.mktemp("p")
    # the record alone: at most one bit per entry beyond the header and shape
    rec = _packed.pack_mask(mask)
    assert len(rec) <= HEADER + 8 * len(shape) + math.ceil(mask.size / 8)
    assert np.array_equal(_packed.unpack(rec, "m")[1], mask)
    if fmt == ".msgpack":
        ckpt = {"params": {"a": {"w": values, "b": values}}, "masks": {"a": {"w": mask, "b": None}}}
        save(ckpt, root / "l.msgpack")
        same_tree(load(root / "l.msgpack"), ckpt)
        save(ckpt, root / "c.msgpack", compact=True)
        back = load(root / "c.msgpack")
        same_tree(back["masks"], ckpt["masks"])
        w = back["params"]["a"]["w"]
        assert w.dtype == values.dtype and w.shape == shape
        np.testing.assert_array_equal(w[mask], values[mask])
        assert not w[~mask].any()
    else:
        t = (
            torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
            if dtype == "bfloat16"
            else (torch.from_numpy(values))
        )
        for mask_dtype in (torch.float32, t.dtype if t.is_floating_point() else torch.bool):
            sd = {"w_orig": t, "w_mask": torch.from_numpy(mask).to(mask_dtype), "b": t}
            save(sd, root / "l.safetensors")
            assert_identical_or_empty(load(root / "l.safetensors"), sd)
            save(sd, root / "c.safetensors", compact=True)
            got = load(root / "c.safetensors")
            assert_identical_or_empty({"w_mask": got["w_mask"]}, {"w_mask": sd["w_mask"]})
            assert_same_values(effective(got), effective(sd))


# ------------------------------------------------------------------------------ hostile records


def _record(values=None, mask=None, **change):
    """A real record, with header fields (`magic`, `version`, `kind`, `dtype`, `ndim`, `encoding`,
    `kept`, `mask_nbytes`) replaced, or the bytes cut (`cut`) or extended (`extra`)."""
    values = np.arange(1, 41, dtype=np.float32).reshape(5, 8) if values is None else values
    mask = (values.astype(np.int64) % 3 == 0) if mask is None else mask
    rec = bytearray(_packed.pack_values(values, mask))
    fields = list(struct.unpack_from("<4sBBBBBxxxQQ", rec))
    for i, name in enumerate(
        ("magic", "version", "kind", "dtype", "ndim", "encoding", "kept", "mask_nbytes")
    ):
        if name in change:
            fields[i] = change[name]
    struct.pack_into("<4sBBBBBxxxQQ", rec, 0, *fields)
    if "shape" in change:
        for i, d in enumerate(change["shape"]):
            struct.pack_into("<Q", rec, HEADER + 8 * i, d)
    if "cut" in change:
        rec = rec[: change["cut"]]
    return bytes(rec) + change.get("extra", b"")


def _raw_record(bits: bytes, n: int, kept_values: np.ndarray, encoding=0, mangle=lambda p: p):
    """A "values" record of a 1-D tensor of `n` entries, written by hand from its parts (the
    mask payload changed by `mangle`)."""
    payload = mangle(zlib.compress(bits) if encoding else bits)
    head = struct.pack("<4sBBBBBxxxQQ", b"JPRB", 1, 1, 11, 1, encoding, kept_values.size, len(payload))
    return head + struct.pack("<Q", n) + payload + kept_values.astype(np.float32).tobytes()


HOSTILE = {
    "bad magic": (lambda: _record(magic=b"XXXX"), "bad magic"),
    "newer version": (lambda: _record(version=9), "version 9"),
    "unknown kind": (lambda: _record(kind=7), "bad packed record header"),
    "unknown dtype": (lambda: _record(dtype=200), "bad packed record header"),
    "too many axes": (lambda: _record(ndim=60), "bad packed record header"),
    "shape beyond memory": (lambda: _record(shape=(2**40, 2**20)), "more than this machine's memory"),
    "shape disagrees with the bytes": (lambda: _record(shape=(5, 9)), "declares"),
    "more kept than entries": (lambda: _record(kept=41), "41 kept entries of 40"),
    "kept disagrees with the values": (lambda: _record(kept=3), "declares"),
    "mask bytes disagree": (lambda: _record(mask_nbytes=2), "declares"),
    "truncated values": (lambda: _record(cut=-4), "truncated"),
    "trailing bytes": (lambda: _record(extra=b"\0\0\0\0"), "truncated"),
    "header cut": (lambda: _record(cut=10), "shorter than its header"),
    "shape cut": (lambda: _record(cut=HEADER + 4), "truncated in its shape"),
    "mask keeps more than the values": (
        lambda: _raw_record(bytes([0b11100000]), 8, np.ones(2)),
        "keeps more than the 2 entries",
    ),
    "mask keeps fewer than the values": (
        lambda: _raw_record(bytes([0b10000000]), 8, np.ones(2)),
        "keeps 1 entries, its record declares 2",
    ),
    "nonzero padding bits": (lambda: _raw_record(bytes([0b10000001]), 7, np.ones(2)), "padding"),
    "deflated mask cut short": (
        lambda: _raw_record(bytes(100), 800, np.ones(0), encoding=1, mangle=lambda p: p[:-4]),
        "mask stream",
    ),
    "deflated mask with bytes after its end": (
        lambda: _raw_record(bytes(100), 800, np.ones(0), encoding=1, mangle=lambda p: p + b"\0"),
        "mask stream",
    ),
    "deflated mask too long": (
        lambda: _raw_record(bytes(101), 800, np.ones(0), encoding=1),
        "mask stream",
    ),
    "deflated mask garbage": (
        lambda: _raw_record(bytes(100), 800, np.ones(0), encoding=1, mangle=lambda p: p[:2] + b"\xff" * 9),
        "mask stream",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_records_are_refused_naming_the_tensor(tmp_path, capsys, case):
    make, match = HOSTILE[case]
    record = make()
    with pytest.raises(ValueError, match=match):
        _packed.unpack(record, "fc/kernel")
    # in a file: one line naming the file and the tensor; nothing written
    stored = {
        "format": "jprune.interop/2",
        "params": {"fc": {"kernel": None}},
        "packed": {"fc": {"kernel": record}},
    }
    path = tmp_path / "m.msgpack"
    path.write_bytes(serialization.msgpack_serialize(stored))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"{path}: packed/fc/kernel"):
        load(path)
    err = cli_refuses(capsys, "convert", path, tmp_path / "out.pt", match="packed/fc/kernel")
    assert match in err
    assert snapshot(tmp_path) == before


def _st_file(tmp_path, tensors, packed, order=None):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    meta = {"jprune.packed": json.dumps(packed)}
    if order is not None:
        meta["jprune.key_order"] = json.dumps(order)
    save_file(tensors, str(path), metadata=meta)
    return path


def _u8(record):
    return torch.frombuffer(bytearray(record), dtype=torch.uint8)


HOSTILE_FILES = {
    "mp mask record of another shape": (
        lambda t: _mp(
            t,
            {
                "params": {"w": np.ones((4, 5), np.float32)},
                "packed": {"w": _packed.pack_mask(np.ones((5, 4), bool))},
            },
        ),
        "packed/w: a mask of shape (5, 4), its params array has shape (4, 5)",
    ),
    "mp values record over a params array": (
        lambda t: _mp(t, {"params": {"w": np.ones(3, np.float32)}, "packed": {"w": _record()}}),
        "packed/w: a values record where params also holds an entry",
    ),
    "mp record not bytes": (
        lambda t: _mp(t, {"params": {"w": np.ones(3, np.float32)}, "packed": {"w": np.ones(3, np.float32)}}),
        "packed/w is a float32 array",
    ),
    "mp float mask record": (
        lambda t: _mp(
            t,
            {
                "params": {"w": np.ones(3, np.float32)},
                "packed": {"w": _packed.pack_mask(np.ones(3, bool), np.float32)},
            },
        ),
        "dtype float32, expected bool",
    ),
    "mp unknown format": (lambda t: _mp(t, {"params": {}}, fmt="jprune.interop/9"), "jprune.interop/9"),
    "st record not uint8": (
        lambda t: _st_file(t, {"w_mask": torch.ones(3)}, {"w_mask": None}),
        "tensor 'w_mask' is torch.float32",
    ),
    "st packed names an unknown tensor": (
        lambda t: _st_file(t, {"w": torch.ones(3)}, {"v": None}),
        "jprune.packed",
    ),
    "st folded mask also in the file": (
        lambda t: _st_file(
            t, {"w_orig": _u8(_record()), "w_mask": torch.ones(3)}, {"w_orig": ["w_mask", "float32"]}
        ),
        "jprune.packed",
    ),
    "st values record without its mask": (
        lambda t: _st_file(t, {"w_orig": _u8(_record())}, {"w_orig": None}),
        "'values' record, but the metadata does not name",
    ),
    "st folded mask of no dtype": (
        lambda t: _st_file(t, {"w_orig": _u8(_record())}, {"w_orig": ["w_mask", "floaty"]}),
        "not a torch dtype",
    ),
    "st key_order without the folded mask": (
        lambda t: _st_file(t, {"w_orig": _u8(_record())}, {"w_orig": ["w_mask", "float32"]}, ["w_orig"]),
        "key_order",
    ),
    "st damaged record": (
        lambda t: _st_file(t, {"w_orig": _u8(_record(kept=3))}, {"w_orig": ["w_mask", "float32"]}),
        "tensor 'w_orig': packed record",
    ),
}


def _mp(tmp_path, stored, fmt="jprune.interop/2"):
    path = tmp_path / "m.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"format": fmt, **stored}))
    return path


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_compact_files_are_refused(tmp_path, capsys, case):
    make, match = HOSTILE_FILES[case]
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        load(path)
    err = cli_refuses(capsys, "inspect", path, match=match)
    assert str(path) in err
    assert snapshot(tmp_path) == before


def test_version_1_files_still_load(tmp_path):
    """Files written before packing (bool masks, no format entry) load as before."""
    ckpt = {"params": {"w": np.arange(6, dtype=np.float32)}, "masks": {"w": np.arange(6) % 2 == 0}}
    path = tmp_path / "old.msgpack"
    path.write_bytes(serialization.msgpack_serialize(ckpt))
    same_tree(load(path), ckpt)
    # an orbax directory as version 1 wrote it: bool masks under "masks"
    import orbax.checkpoint as ocp

    meta = {"format": "jprune.interop/1", "recipe": None}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        c.save(
            tmp_path / "old",
            ocp.args.Composite(state=ocp.args.PyTreeSave(ckpt), jprune=ocp.args.JsonSave(meta)),
        )
    same_tree(load(tmp_path / "old"), ckpt)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_compact_convert_and_inspect(tmp_path, capsys):
    model = build_pruned("bn-cnn", torch.float32)
    sd = model.state_dict()
    save(sd, tmp_path / "a.pt")
    assert cli(["compact", str(tmp_path / "a.pt"), str(tmp_path / "c.safetensors")]) == 0
    assert cli(["convert", str(tmp_path / "a.pt"), str(tmp_path / "c.msgpack"), "--compact"]) == 0
    assert cli(["convert", str(tmp_path / "a.pt"), str(tmp_path / "l.msgpack")]) == 0
    capsys.readouterr()
    assert_same_values(effective(load(tmp_path / "c.safetensors")), effective(sd))
    assert_same_values(effective(to_torch(load(tmp_path / "c.msgpack"))), effective(sd))
    sizes = {}
    for name in ("a.pt", "c.safetensors", "c.msgpack", "l.msgpack"):
        assert cli(["inspect", str(tmp_path / name), "--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert s["file_bytes"] == os.path.getsize(tmp_path / name)
        assert s["dense_bytes"] == sum(
            t.numel() * t.element_size() for k, t in sd.items() if k not in masks_of(sd)
        )
        assert s["ratio"] == s["file_bytes"] / s["dense_bytes"]
        sizes[name] = s["file_bytes"]
        assert cli(["inspect", str(tmp_path / name)]) == 0
        assert f"{100 * s['ratio']:.1f}% of dense" in capsys.readouterr().out
    assert sizes["c.msgpack"] < sizes["l.msgpack"] < sizes["a.pt"]
    assert summarize(tmp_path / "c.msgpack")["pruned"] == summarize(sd)["pruned"]
    # a .pt cannot be compact: refused before anything is read or written
    before = snapshot(tmp_path)
    cli_refuses(
        capsys, "compact", tmp_path / "a.pt", tmp_path / "x.pt", match="compact checkpoint is written as"
    )
    cli_refuses(capsys, "convert", tmp_path / "nope.pt", tmp_path / "x.pth", "--compact", match="x.pth")
    assert snapshot(tmp_path) == before


def test_compact_orbax_round_trip(tmp_path):
    model = build_pruned("mha", torch.bfloat16)
    ckpt = from_torch(model)
    save(ckpt, tmp_path / "c", compact=True)
    save(ckpt, tmp_path / "l")
    same_tree(load(tmp_path / "l"), ckpt)
    back = load(tmp_path / "c")
    same_tree(back["masks"], ckpt["masks"])
    assert_same_values(effective(to_torch(back)), effective(model.state_dict()))
