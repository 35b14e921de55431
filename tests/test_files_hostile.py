"""Checkpoint files and the `jprune` CLI under hostile conditions: destinations that are not
checkpoints, malformed or special files, killed writers, a full disk, and fuzzed bytes."""

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jprune.interop import _files, convert, load, save
from jprune.interop._cli import main as cli

# ------------------------------------------------------------------------------------- helpers


def state_dict():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g)
    return {"fc.bias": torch.randn(4, generator=g), "fc.weight_orig": w, "fc.weight_mask": (w > 0).float()}


def flax_ckpt():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    return {
        "params": {"fc": {"kernel": w, "bias": np.ones(4, np.float32)}},
        "masks": {"fc": {"kernel": w > 0, "bias": None}},
    }


def write(fmt, path):
    save(flax_ckpt() if fmt in ("msgpack", "orbax") else state_dict(), path)
    return path


EXT = {"pt": ".pt", "safetensors": ".safetensors", "msgpack": ".msgpack", "orbax": ""}


def snapshot(root):
    """Every path under root (root included) with its type and content hash."""
    out = {}
    for dirpath, _, files in os.walk(root):
        out[os.path.relpath(dirpath, root)] = "dir"
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):  # links, FIFOs: never opened
                out[os.path.relpath(full, root)] = (
                    f"link to {os.readlink(full)}" if os.path.islink(full) else "special"
                )
                continue
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@contextlib.contextmanager
def no_hang(seconds=10):
    def fail(*_):
        raise AssertionError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cli_refuses(capsys, *args, match="", code=1):
    """The CLI exits `code` with exactly one line on stderr naming the problem."""
    with no_hang():
        assert cli([str(a) for a in args]) == code
    err = capsys.readouterr().err
    assert err.startswith("jprune: error:") and err.count("\n") == 1, err
    assert match in err, err
    return err


def same_tree(a, b):
    """Same nested keys (in the same order for a state_dict; orbax sorts Flax dicts), and per leaf
    the same dtype, shape and values (None where None)."""
    if isinstance(a, dict):
        ordered = any(isinstance(v, torch.Tensor) for v in a.values())
        assert isinstance(b, dict) and (list(a) == list(b) if ordered else sorted(a) == sorted(b))
        for k in a:
            same_tree(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif a is None or isinstance(a, str):
        assert a == b
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def run_python(code, timeout=60):
    """Runs `code` in a fresh interpreter (cwd: the repo, so `jprune` imports as in the tests)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def test_cli_with_relative_paths_is_quiet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write("pt", tmp_path / "m.pt")
    assert cli(["convert", "m.pt", "ckpt"]) == 0
    assert cli(["convert", "ckpt", "again.safetensors"]) == 0
    assert capsys.readouterr().err == ""
    assert cli(["inspect", "ckpt", "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and json.loads(out.out)["format"] == "flax"
    same_tree(load("again.safetensors"), load("m.pt"))


# ----------------------------------------------------------------- 1. never destroy what is there


@pytest.mark.parametrize("dst", ["out", ".", "..", "", "./"])
def test_convert_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, monkeypatch, capsys, dst):
    work = tmp_path / "work"
    work.mkdir()
    write("pt", work / "m.pt")
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("mine")
    (work / "data.csv").write_text("1,2")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    cli_refuses(capsys, "convert", "m.pt", dst, match="refusing to replace" if dst == "out" else "names no")
    with pytest.raises(ValueError):
        convert("m.pt", dst)
    with pytest.raises(ValueError):
        save(flax_ckpt(), dst)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "dst, content, match",
    [
        ("m.pt", b"my notes", "is not a pt checkpoint"),
        ("m.safetensors", None, "is not a safetensors checkpoint"),  # a .pt file named .safetensors
        ("m.msgpack", b"", "is not a msgpack checkpoint"),
        ("m.pt", "dir", "is a directory"),
        ("ckpt.orbax", b"x", "is not a directory"),
        ("m.pt", "link", "symbolic link"),
    ],
)
def test_existing_path_of_another_kind_is_refused(tmp_path, capsys, dst, content, match):
    src = write("pt", tmp_path / "src.pt")
    target = tmp_path / dst
    if content == "dir":
        target.mkdir()
        (target / "keep").write_text("x")
    elif content == "link":
        write("pt", tmp_path / "real.pt")
        target.symlink_to(tmp_path / "real.pt")
    else:
        target.write_bytes(src.read_bytes() if content is None else content)
    before = snapshot(tmp_path)
    cli_refuses(capsys, "convert", src, target, match=match)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", list(EXT))
def test_a_checkpoint_of_the_same_format_is_replaced(tmp_path, fmt):
    dst = tmp_path / f"m{EXT[fmt]}"
    write(fmt, dst)
    new = flax_ckpt() if fmt in ("msgpack", "orbax") else state_dict()
    if fmt in ("msgpack", "orbax"):
        new["params"]["fc"]["bias"] = np.zeros(4, np.float32)
    else:
        new["fc.bias"] = torch.zeros(4)
    save(new, dst)
    got = load(dst)
    if fmt in ("msgpack", "orbax"):
        assert not got["params"]["fc"]["bias"].any()
    else:
        assert not got["fc.bias"].any()
    assert os.listdir(tmp_path) == [dst.name]


def test_an_empty_directory_takes_an_orbax_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    save(flax_ckpt(), tmp_path / "ckpt")
    same_tree(load(tmp_path / "ckpt"), flax_ckpt())


def test_orbax_overwrite_failing_exchange_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    dst = write("orbax", tmp_path / "ckpt")
    before = snapshot(tmp_path)

    def broken(a, b):
        raise OSError(5, "I/O error", b)

    monkeypatch.setattr(_files, "_rename_exchange", broken)
    with pytest.raises(OSError):
        save({"params": {"w": np.zeros(2, np.float32)}}, dst)
    assert snapshot(tmp_path) == before


def test_orbax_overwrite_without_exchange(tmp_path, monkeypatch):
    """Where renameat2 is missing, the old checkpoint is renamed aside, and back on failure."""
    dst = write("orbax", tmp_path / "ckpt")
    monkeypatch.setattr(_files, "_rename_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if os.fspath(b) == str(dst) and not os.fspath(a).endswith(_files._ASIDE):
            raise OSError(28, "No space left on device")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    before = snapshot(tmp_path)
    with pytest.raises(OSError, match="No space"):
        save({"params": {"w": np.zeros(2, np.float32)}}, dst)
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(os, "rename", real_rename)
    save({"params": {"w": np.zeros(2, np.float32)}}, dst)
    assert load(dst)["params"]["w"].shape == (2,) and os.listdir(tmp_path) == ["ckpt"]

    def rename_only_aside(a, b):  # moving back fails too: the old checkpoint must survive
        if os.fspath(b) == str(dst):
            raise OSError(5, "I/O error")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename_only_aside)
    with pytest.raises(OSError, match="I/O error"):
        save(flax_ckpt(), dst)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not dst.exists()
    monkeypatch.setattr(_files, "_alive", lambda pid: False)  # as after this process ended
    _files._clean_orphans(str(dst))
    assert load(dst)["params"]["w"].shape == (2,) and os.listdir(tmp_path) == ["ckpt"]


# The writer is SIGKILLed at the worst moment: right after the swap (exchange), or (fallback
# without exchange) between moving the old checkpoint aside and moving the new one in.
_KILL_DURING_SAVE = """
    import os, signal
    import numpy as np
    from jprune.interop import _files, save
    dst, mode = {dst!r}, {mode!r}
    if mode == "exchange":
        real = _files._rename_exchange
        def swap(a, b):
            assert real(a, b)
            os.kill(os.getpid(), signal.SIGKILL)
        _files._rename_exchange = swap
    else:
        _files._rename_exchange = lambda a, b: False
        real = os.rename
        def rename(a, b):
            real(a, b)
            if os.fspath(b).endswith(_files._ASIDE):
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
    save({{"params": {{"w": np.zeros(2, np.float32)}}}}, dst)
"""


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_killed_orbax_overwrite_leaves_a_checkpoint_and_the_next_save_cleans_up(tmp_path, mode):
    dst = write("orbax", tmp_path / "ckpt")
    old = load(dst)
    r = run_python(_KILL_DURING_SAVE.format(dst=str(dst), mode=mode))
    assert r.returncode == -signal.SIGKILL, r.stderr
    orphans = [n for n in os.listdir(tmp_path) if n.startswith(".ckpt.") and n.endswith(".tmp")]
    assert len(orphans) == 1
    if mode == "exchange":  # no window: the new checkpoint is complete at dst
        assert load(dst)["params"]["w"].shape == (2,)
    else:  # the fallback's window: dst is missing; the next save puts the old one back first
        assert not dst.exists()
        _files._clean_orphans(str(dst))
        same_tree(load(dst), old)
    save(flax_ckpt(), dst)
    assert os.listdir(tmp_path) == ["ckpt"]


# --------------------------------------------------------------------------- 3. orphaned temps


def test_orphans_of_dead_writers_are_removed_others_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {
        "dead": f".m.pt.{dead.pid}@{host}.abc123.tmp",
        "live": f".m.pt.{os.getppid()}@{host}.def456.tmp",
        "other_host": f".m.pt.{dead.pid}@{host}x.ghi789.tmp",
        "other_file": f".n.pt.{dead.pid}@{host}.jkl012.tmp",
        "user": ".m.pt.notes.tmp",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.pt").write_bytes(b"partial")
    save(state_dict(), tmp_path / "m.pt")
    left = set(os.listdir(tmp_path))
    assert names["dead"] not in left
    assert left == {"m.pt"} | {v for k, v in names.items() if k != "dead"}


_KILL_DURING_CONVERT = """
    import os, signal, torch
    from jprune.interop import convert
    real = torch.save
    def save_then_die(obj, f, *a, **k):
        real(obj, f, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_then_die
    convert({src!r}, {dst!r})
"""


def test_killed_convert_leaves_an_orphan_the_next_convert_removes(tmp_path, capsys):
    src = write("msgpack", tmp_path / "m.msgpack")
    dst = write("pt", tmp_path / "m.pt")
    before = dst.read_bytes()
    r = run_python(_KILL_DURING_CONVERT.format(src=str(src), dst=str(dst)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert dst.read_bytes() == before and len(os.listdir(tmp_path)) == 3  # + the orphan
    assert cli(["convert", str(src), str(dst)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.msgpack", "m.pt"]


# --------------------------------------------------------------------------------- 4. disk full

_DISK_FULL = """
    import contextlib, io, json, os, resource, signal, sys
    import numpy as np, torch
    from jprune.interop import save
    from jprune.interop._cli import main
    root = {root!r}
    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 400)).astype(np.float32)  # 480 kB, incompressible
    big_flax = {{"params": {{"fc": {{"kernel": w}}}}, "masks": {{"fc": {{"kernel": w > 0}}}}}}
    save(big_flax, os.path.join(root, "big.msgpack"))
    big_torch = {{"fc.weight": torch.from_numpy(w.T.copy()), "fc.bias": torch.zeros(400)}}
    save(big_torch, os.path.join(root, "big.pt"))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
    out = {{}}
    for dst in sys.argv[1:]:
        src = "big.msgpack" if dst.endswith((".pt", ".safetensors")) else "big.pt"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["convert", os.path.join(root, src), os.path.join(root, dst), "--no-progress"])
        out[dst] = [rc, err.getvalue()]
    print(json.dumps(out))
"""


def test_disk_full_on_every_format(tmp_path):
    """A real write failure (RLIMIT_FSIZE: EFBIG) on every format: one clear line, nothing changed."""
    dsts = {f"old{EXT[fmt]}" if fmt != "orbax" else "old_ckpt": fmt for fmt in EXT}
    dsts.update({f"new{EXT[fmt]}" if fmt != "orbax" else "new_ckpt": fmt for fmt in EXT})
    for name, fmt in dsts.items():
        if name.startswith("old"):
            write(fmt, tmp_path / name)
    before = snapshot(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DISK_FULL.format(root=str(tmp_path))), *dsts],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    for name in dsts:
        rc, err = results[name]
        assert rc == 1 and err.count("\n") == 1, (name, err)
        assert f"{tmp_path / name}: could not write the checkpoint: File too large" in err, err
        assert "nothing was changed" in err
    for name, fmt in dsts.items():  # the old ones load as before (byte-identical: snapshot below)
        if name.startswith("old"):
            same_tree(load(tmp_path / name), flax_ckpt() if fmt in ("msgpack", "orbax") else state_dict())
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("big.")} == before


# ------------------------------------------------------------- 2. malformed inputs: no traceback


def _safetensors_with(tmp_path, names=("a", "b"), **meta):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({names[0]: torch.ones(2), names[1]: torch.zeros(3)}, str(path), metadata=meta)
    return path


def _msgpack_with(tmp_path, change):
    from flax import serialization

    ckpt = flax_ckpt()
    ckpt["torch"] = {"recipe": json.dumps({"version": 1, "keys": []})}
    change(ckpt)
    path = tmp_path / "m.msgpack"
    path.write_bytes(serialization.msgpack_serialize(ckpt))
    return path


def _set(tree, path, value):
    *parents, last = path
    for k in parents:
        tree = tree[k]
    tree[last] = value


def _orbax_with(tmp_path, relpath, data):
    path = write("orbax", tmp_path / "ckpt")
    (path / relpath).write_bytes(data)
    return path


def _pt_archive(tmp_path, compress=False, entry_size=None):
    path = write("pt", tmp_path / "m.pt")
    if compress:
        with zipfile.ZipFile(path) as z:
            entries = [(i.filename, z.read(i)) for i in z.infolist()]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in entries:
                z.writestr(name, data)
    if entry_size is not None:  # a central-directory record declaring a size past the file's end
        data = bytearray(path.read_bytes())
        at = data.index(b"PK\x01\x02")
        data[at + 20 : at + 28] = entry_size.to_bytes(4, "little") * 2
        path.write_bytes(bytes(data))
    return path


def _pt_storage_size(tmp_path, nbytes):
    """A .pt whose pickle declares a storage of `nbytes` bytes for a 48-byte record."""
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(12.0)}, path)
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            if name.endswith("data.pkl"):
                data = data.replace(b"cpuq\x06K\x0c", b"cpuq\x06J" + nbytes.to_bytes(4, "little"))
            z.writestr(name, data)
    return path


def _legacy_pt(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def _quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors
        return torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)


def _quantized_pt(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": _quantized()}, path)
    return path


def _complex32_pt(tmp_path):
    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: complex32 is experimental
        torch.save({"w": torch.zeros(2, dtype=torch.complex32)}, path)
    return path


def _raw(path, data):
    path.write_bytes(data)
    return path


def _special(tmp_path, name, how):
    path = tmp_path / name
    if how == "fifo":
        os.mkfifo(path)
    elif how == "zero":
        path.symlink_to("/dev/zero")
    elif how == "dir":
        path.mkdir()
        (path / "x").write_bytes(b"1")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "orbax_fifo":
        write("orbax", path)
        os.mkfifo(path / "state" / "fifo")
    return path


MALFORMED = {
    "st key_order not a list": (
        lambda t: _safetensors_with(t, **{"jprune.key_order": '{"a": 1}'}),
        "key_order",
    ),
    "st key_order ints": (
        lambda t: _safetensors_with(t, names=("1", "2"), **{"jprune.key_order": "[1, 2]"}),
        "key_order",
    ),
    "st key_order missing a name": (
        lambda t: _safetensors_with(t, **{"jprune.key_order": '["a"]'}),
        "key_order",
    ),
    "st key_order not JSON": (lambda t: _safetensors_with(t, **{"jprune.key_order": "[a, b"}), "key_order"),
    "st torch_metadata garbage": (
        lambda t: _safetensors_with(t, **{"jprune.torch_metadata": "\x00garbage"}),
        "torch_metadata",
    ),
    "st torch_metadata list": (
        lambda t: _safetensors_with(t, **{"jprune.torch_metadata": "[1]"}),
        "torch_metadata",
    ),
    "mp params not a dict": (lambda t: _msgpack_with(t, lambda c: c.update(params=5)), "'params' dict"),
    "mp params leaf a string": (
        lambda t: _msgpack_with(t, lambda c: _set(c, ("params", "fc", "bias"), "x")),
        "params/fc/bias is str",
    ),
    "mp mask not bool": (
        lambda t: _msgpack_with(t, lambda c: _set(c, ("masks", "fc", "kernel"), np.ones((3, 4), np.float32))),
        "expected a bool array",
    ),
    "mp mask wrong shape": (
        lambda t: _msgpack_with(t, lambda c: _set(c, ("masks", "fc", "kernel"), np.ones((4, 3), bool))),
        "has shape (4, 3), expected (3, 4)",
    ),
    "mp mask without param": (
        lambda t: _msgpack_with(t, lambda c: _set(c, ("masks", "fc2"), {"kernel": np.ones(2, bool)})),
        "masks/fc2/kernel has no params array",
    ),
    "mp masks not a dict": (lambda t: _msgpack_with(t, lambda c: c.update(masks=[1])), "masks is a list"),
    "mp recipe not a string": (
        lambda t: _msgpack_with(t, lambda c: _set(c, ("torch", "recipe"), 5)),
        "recipe",
    ),
    "mp recipe bad JSON": (lambda t: _msgpack_with(t, lambda c: _set(c, ("torch", "recipe"), "{")), "recipe"),
    "mp recipe wrong types": (
        lambda t: _msgpack_with(t, lambda c: _set(c, ("torch", "recipe"), '{"keys": [[1, 2, 3, 4]]}')),
        "recipe",
    ),
    "mp recipe keys not a list": (
        lambda t: _msgpack_with(t, lambda c: _set(c, ("torch", "recipe"), '{"keys": 7}')),
        "recipe",
    ),
    "mp unknown entry": (lambda t: _msgpack_with(t, lambda c: c.update(opt_state={})), "opt_state"),
    "mp not a dict": (
        lambda t: _raw(t / "m.msgpack", b"\x93\x01\x02\x03"),
        "'params'",
    ),
    "orbax metadata garbage": (lambda t: _orbax_with(t, "jprune/metadata", b"\x00\xff garbage"), "metadata"),
    "orbax metadata wrong format": (
        lambda t: _orbax_with(t, "jprune/metadata", b'{"format": "other/2"}'),
        "expected jprune metadata",
    ),
    "orbax metadata bad recipe": (
        lambda t: _orbax_with(
            t, "jprune/metadata", json.dumps({"format": _files._FORMAT, "recipe": 3}).encode()
        ),
        "recipe",
    ),
    "orbax state metadata garbage": (lambda t: _orbax_with(t, "state/_METADATA", b"{not json"), "orbax"),
    "orbax fifo inside": (lambda t: _special(t, "ckpt", "orbax_fifo"), "is a FIFO"),
    "pt quantized": (_quantized_pt, "quantized"),
    "pt legacy format": (_legacy_pt, "pre-1.6"),
    "pt complex32": (_complex32_pt, "no numpy/JAX counterpart"),
    "pt compressed entry": (lambda t: _pt_archive(t, compress=True), "compressed"),
    "pt entry past the end": (lambda t: _pt_archive(t, entry_size=2**31 - 1), "past the end"),
    # torch checks a record's size when it reads it (load), not when it maps it (inspect, convert)
    "pt storage larger than its record": (lambda t: _pt_storage_size(t, 10**6), "record"),
    "pt not a zip": (lambda t: _raw(t / "m.pt", b"hello"), "not a torch checkpoint"),
    **{
        f"{how} {ext}": (lambda t, ext=ext, how=how: _special(t, f"f{ext}", how), match)
        for ext in (".pt", ".safetensors", ".msgpack")
        for how, match in (
            ("fifo", "is a FIFO"),
            ("zero", "is a character device"),
            ("dir", "is a directory"),
            ("empty", "is empty"),
        )
    },
    **{
        f"truncated {fmt}": (
            lambda t, fmt=fmt: (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]) and p)(
                write(fmt, t / f"m{EXT[fmt]}")
            ),
            "truncated",
        )
        for fmt in ("pt", "safetensors", "msgpack")
    },
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_one_line_naming_the_file(tmp_path, capsys, case):
    make, match = MALFORMED[case]
    path = make(tmp_path)
    flax_src = path.suffix == ".msgpack" or path.is_dir() and not path.suffix
    dst = tmp_path / ("out.pt" if flax_src else "out.msgpack")
    before = snapshot(tmp_path)
    for args in (["inspect", path], ["convert", path, dst]):
        err = cli_refuses(capsys, *args, match=match)
        assert str(path) in err, err
    with (
        no_hang(),
        pytest.raises(
            (ValueError, OSError, pickle.UnpicklingError), match=match.replace("(", r"\(").replace(")", r"\)")
        ),
    ):
        load(path)
    assert snapshot(tmp_path) == before


def test_save_refuses_what_load_would_refuse(tmp_path):
    bad = flax_ckpt()
    bad["masks"]["fc"]["kernel"] = bad["masks"]["fc"]["kernel"].astype(np.float32)
    with pytest.raises(ValueError, match="masks/fc/kernel is dtype float32, expected a bool array"):
        save(bad, tmp_path / "m.msgpack")
    with pytest.raises(ValueError, match="quantized"):
        save({"w": _quantized()}, tmp_path / "m.pt")
    assert os.listdir(tmp_path) == []


def test_unexpected_error_is_one_line_with_its_type(tmp_path, capsys, monkeypatch):
    from jprune.interop import _inspect

    path = write("pt", tmp_path / "m.pt")

    def bug(obj):
        raise KeyError("boom")

    monkeypatch.setattr(_inspect, "summarize", bug)
    err = cli_refuses(capsys, "inspect", path, match="unexpected KeyError: 'boom'", code=3)
    assert "a bug in jprune" in err
    monkeypatch.setenv("JPRUNE_TRACEBACK", "1")
    with pytest.raises(KeyError):
        cli(["inspect", str(path)])


def test_library_warnings_never_add_lines_to_an_error(tmp_path, capsys, monkeypatch):
    from jprune.interop import _inspect

    path = write("pt", tmp_path / "m.pt")
    real = _inspect.summarize

    def noisy(obj, fail):
        warnings.warn("something\nodd", UserWarning, stacklevel=1)
        if fail:
            raise ValueError(f"{obj}: refused")
        return real(obj)

    monkeypatch.setattr(_inspect, "summarize", lambda obj: noisy(obj, fail=True))
    cli_refuses(capsys, "inspect", path, match="refused")
    monkeypatch.setattr(_inspect, "summarize", lambda obj: noisy(obj, fail=False))
    assert cli(["inspect", str(path)]) == 0
    assert capsys.readouterr().err == "jprune: warning: something odd\n"


# ------------------------------------------------------------------------- 5. fuzzed file bytes

_FUZZ_SOURCES = {}


# The compact formats: a 90 %-pruned tensor (deflated mask, kept values), a mostly-zero one.
FUZZ = {**{fmt: (fmt, False) for fmt in EXT}, "msgpack-compact": ("msgpack", True)}
FUZZ.update({"safetensors-compact": ("safetensors", True), "orbax-compact": ("orbax", True)})


def _compact_source(fmt, path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 50, generator=g)
    mask = (w.abs() > 1.6).float()
    zeros = torch.randn(400, generator=g) * (torch.arange(400) % 9 == 0)
    if fmt == "safetensors":
        save({"fc.weight_orig": w, "fc.weight_mask": mask, "z": zeros}, path, compact=True)
    else:
        params = {"fc": {"kernel": w.T.numpy(), "bias": np.ones(40, np.float32)}, "z": zeros.numpy()}
        masks = {"fc": {"kernel": mask.T.numpy() > 0, "bias": None}, "z": None}
        save({"params": params, "masks": masks}, path, compact=True)
    return path


def _fuzz_source(tmp_path_factory, fuzz):
    """A real small checkpoint per format, made once; for orbax, the file to damage is drawn."""
    fmt, compact = FUZZ[fuzz]
    if fuzz not in _FUZZ_SOURCES:
        root = tmp_path_factory.mktemp(f"fuzz_{fuzz}")
        path = root / f"m{EXT[fmt]}"
        path = _compact_source(fmt, path) if compact else write(fmt, path)
        files = (
            sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
            if fmt == "orbax"
            else [""]
        )
        _FUZZ_SOURCES[fuzz] = (path, files)
    return _FUZZ_SOURCES[fuzz]


def _mutate(data: bytes, how: str, at: int, byte: int) -> bytes:
    at = at % (len(data) + 1)
    if how == "flip":
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ (byte or 1)]) + data[at + 1 :]
    if how == "truncate":
        return data[:at]
    return data[:at] + bytes([byte]) * 3 + data[at:]


@pytest.mark.parametrize("fuzz", list(FUZZ))
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    how=st.sampled_from(["flip", "truncate", "insert"]),
    at=st.integers(0, 2**16),
    byte=st.integers(0, 255),
    which=st.integers(0, 100),
)
def test_fuzzed_files_load_or_are_refused_cleanly(tmp_path_factory, capsys, fuzz, how, at, byte, which):
    src, files = _fuzz_source(tmp_path_factory, fuzz)
    fmt = FUZZ[fuzz][0]
    root = tmp_path_factory.mktemp("case")
    path = root / src.name
    if fmt == "orbax":
        shutil.copytree(src, path)
        target = path / files[which % len(files)]
    else:
        shutil.copy(src, path)
        target = path
    target.write_bytes(_mutate(target.read_bytes(), how, at, byte))
    try:
        with no_hang(20):
            got = load(path)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        assert str(path) in str(e), repr(e)
    else:  # whatever loads must save and load again unchanged
        again = root / f"again{EXT[fmt]}"
        save(got, again)
        same_tree(load(again), got)
    other = root / ("out.msgpack" if fmt in ("pt", "safetensors") else "out.pt")
    for args in (["inspect", path], ["convert", path, other]):
        with no_hang(20):
            rc = cli([str(a) for a in args])
        out = capsys.readouterr()
        assert rc in (0, 1), out.err
        if rc == 1:
            assert out.err.count("\n") == 1 and str(path) in out.err, out.err
