"""Pruning with ``jax.distributed``: 2 processes x 4 CPU devices, params sharded over all 8.

The workers (``_multiprocess_worker.py``) build only their own shards of the params, run
``global_unstructured``, ``ln_structured`` and a ``keep_pruned`` + ``update_masks`` train step under
``jit``, check every compiled program moves only counts between devices (no all-gather of params),
save and restore the sharded params and masks with orbax, and write the shards they hold. This
test assembles the shards and compares them, bit for bit, with the same calls on one device here.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _multiprocess_worker as worker  # noqa: E402

TIMEOUT = 150  # seconds for both workers together (about 20 s on a 2-core machine)


def free_port():
    """A port the OS just handed out (bound then released: another process could still take it;
    the test retries once on a new port if the coordinator cannot bind)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(outdir):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_multiprocess_worker.py"), str(i), str(port), str(outdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate() for p in procs]
        raise AssertionError("workers timed out:\n" + describe(procs, outs)) from None
    return procs, outs


def describe(procs, outs):
    return "\n".join(
        f"--- worker {i} (exit {p.returncode}) stdout:\n{o[-3000:]}\n--- worker {i} stderr:\n{e[-6000:]}"
        for i, (p, (o, e)) in enumerate(zip(procs, outs))
    )


def assemble(outdir):
    """name -> the full array from both workers' shards (None for a None leaf)."""
    pieces = {}
    for i in range(2):
        with np.load(outdir / f"shards{i}.npz") as f:
            for key in f.files:
                name, where = key.split("|")
                pieces.setdefault(name, []).append((where, f[key]))
    out = {}
    for name, parts in pieces.items():
        if parts[0][0] == "none":
            out[name] = None
            continue
        bounds = [[tuple(map(int, r.split(":"))) for r in w.split(";")] for w, _ in parts]
        shape = tuple(max(b[d][1] for b in bounds) for d in range(len(bounds[0])))
        full = np.zeros(shape, parts[0][1].dtype)
        seen = np.zeros(shape, int)
        for b, (_, data) in zip(bounds, parts):
            idx = tuple(slice(lo, hi) for lo, hi in b)
            full[idx] = data
            seen[idx] += 1
        assert (seen == 1).all(), f"{name}: shards do not tile the array exactly once"
        out[name] = full
    return out


def reference():
    """The same calls on one device, on the full params."""
    full = {n: worker.params_block(n, tuple(slice(None) for _ in s)) for n, s in worker.SHAPES.items()}
    params = worker.nest(full)
    out = {}
    for name, f in worker.steps().items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            jax.jit(f)(params), is_leaf=lambda x: x is None
        )[0]:
            key = name + ":" + "/".join(str(getattr(p, "key", p)) for p in path)
            out[key] = None if leaf is None else np.asarray(leaf)
    return out


def test_two_processes_prune_like_one(tmp_path):
    for attempt in range(2):
        outdir = tmp_path / f"run{attempt}"
        outdir.mkdir()
        procs, outs = run_workers(outdir)
        bind_failed = any("address already in use" in e.lower() for _, e in outs)
        if not (bind_failed and attempt == 0):
            break
    assert all(p.returncode == 0 for p in procs), "a worker failed:\n" + describe(procs, outs)
    assert all("WORKER OK" in o for o, _ in outs), describe(procs, outs)

    got, want = assemble(outdir), reference()
    assert set(got) == set(want)
    assert any(k.startswith("ln:") for k in got) and any(k.startswith("train:params") for k in got)
    for key, w in want.items():
        g = got[key]
        if w is None:
            assert g is None, key
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, key
        np.testing.assert_array_equal(g, w, err_msg=key)
        if w.dtype == np.bool_:
            assert 0 < (~w).sum() < w.size, f"{key}: nothing or everything pruned, a weak check"
