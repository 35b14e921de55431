"""jprune on a GPU: the same masks as on the CPU, and speed beside torch CUDA, a sort and the floor.

1. Tests: runs the selection tests and the torch parity suite's core files on the GPU backend with
   pytest, once on the XLA path and once with the Pallas kernels switched on (``JPRUNE_PALLAS=1``).
2. Bit for bit: core cases (ties, NaN/inf, bfloat16, re-pruning with masks, zeros after
   ``remove``, per-leaf, random keys) pruned on the GPU (XLA path, Pallas path) and on the CPU
   (``jax.device_put`` to the CPU device, computed there): the masks must be identical.
3. Speed: 50 % global L1 over 48 layers at 1e7, 1e8 and 1e9 weights: jprune (XLA path), jprune
   (Pallas), torch CUDA ``prune.global_unstructured``, ``jnp.sort`` of all |w|, and the one-pass
   floor (a jitted ``sum(|w|)``), medians, with the speed-up over torch (torch / jprune) and the
   cost over the floor (jprune / floor); the Pallas and XLA masks are compared at every size. Without torch
   CUDA it says so and prints the JAX figures.

Without a GPU it stops with a message; ``--cpu`` is a dry run on the CPU at small sizes (the Pallas
kernels in interpret mode) that checks the script itself.

Usage: python bench/gpu_check.py [--sizes 1e7 1e8 1e9] [--layers 48] [--repeat 7] [--skip-tests]
       python bench/gpu_check.py --cpu [--sizes 2e3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jprune as jp
from jprune import _pallas

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TESTS = ["tests/test_select.py", "tests/test_parity_torch.py", "tests/test_pallas.py"]


@contextlib.contextmanager
def pallas(on: bool, interpret: bool):
    """The Pallas kernels switched on (or off); with ``interpret``, on this CPU in interpret mode.
    Counts the calls, so a timing of the Pallas path that did not take it fails."""
    env, platform, prune = os.environ.get("JPRUNE_PALLAS"), _pallas._PLATFORM, _pallas.prune
    calls = []

    def counted(*args, **kw):
        calls.append(1)
        return prune(*args, **kw, interpret=interpret)

    os.environ["JPRUNE_PALLAS"] = "1" if on else "0"
    _pallas.prune = counted
    if interpret:
        _pallas._PLATFORM = "cpu"
    try:
        yield calls
    finally:
        _pallas.prune, _pallas._PLATFORM = prune, platform
        if env is None:
            os.environ.pop("JPRUNE_PALLAS")
        else:
            os.environ["JPRUNE_PALLAS"] = env


def run_tests(args):
    """The selection and parity test files under pytest, XLA path then Pallas path."""
    ok = True
    for on in (False, True):
        env = dict(os.environ, JPRUNE_PALLAS="1" if on else "0")
        cmd = [sys.executable, "-m", "pytest", "-q", *TESTS]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"  pytest {' '.join(TESTS)} [{'Pallas' if on else 'XLA'} path]: {last}")
        if out.returncode:
            print(out.stdout[-3000:], out.stderr[-3000:], sep="\n")
            ok = False
    return ok


def cases(rng, small):
    """name -> (params, call): the core cases of the parity suite, larger (unless ``small``)."""
    a = rng.standard_normal((40, 33) if small else (300, 257)).astype(np.float32)
    a[::5, ::3] = 0.25  # ties at the cut
    b = rng.standard_normal((17, 64) if small else (129, 64)).astype(np.float32)
    b[0, :6] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0]
    b[1, :3] = [1e-45, -1e-40, 1e-38]
    removed = np.where(np.abs(a) < np.median(np.abs(a)), np.float32(0), a)  # after `remove`: 50 % zeros
    f32 = {"a": {"kernel": a}, "b": {"kernel": b, "bias": np.ones(64, np.float32)}}
    bf16 = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), f32)
    key = jax.random.key(3)
    return {
        "global, float32": (f32, lambda p: jp.global_unstructured(p, 0.5)),
        "global, bfloat16": (bf16, lambda p: jp.global_unstructured(p, 0.5)),
        "global, mixed float32 + bfloat16": (
            {"a": f32["a"], "b": bf16["b"]},
            lambda p: jp.global_unstructured(p, 0.3),
        ),
        "global, re-pruned with masks": (
            f32,
            lambda p: jp.global_unstructured(p, 0.4, masks=jp.global_unstructured(p, 0.3)),
        ),
        "global, after remove (zeros)": (
            {"a": {"kernel": removed}},
            lambda p: jp.global_unstructured(p, 0.3),
        ),
        "l1 per leaf": (f32, lambda p: jp.l1_unstructured(p, 0.3)),
        "random, global": (f32, lambda p: jp.global_unstructured(p, 0.5, method="random", key=key)),
        "ln_structured n=2": (f32, lambda p: jp.ln_structured(p, 0.5, n=2, axis=-1)),
    }


def check_masks(args):
    """Every case on the accelerator (XLA, Pallas; jitted and eager) vs the CPU device, bit for bit."""
    cpu = jax.devices("cpu")[0]
    ok = True
    for name, (params, call) in cases(np.random.default_rng(0), small=args.cpu).items():
        if not any(c in name for c in args.cases):
            continue
        with pallas(False, args.cpu):
            want = jax.device_get(call(jax.device_put(params, cpu)))
        results = []
        for on in (True,) if args.cpu else (False, True):  # --cpu: the XLA path is the reference
            for wrap in (jax.jit, lambda f: f):
                with pallas(on, args.cpu) as calls:  # a new function each time: a new jit trace
                    got = jax.device_get(
                        wrap(lambda p, call=call: call(p))(jax.device_put(params, jax.devices()[0]))
                    )
                same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got, want))
                path = ("Pallas" if calls else "XLA, Pallas not applicable") if on else "XLA"
                results.append(
                    f"{path}{' jit' if wrap is jax.jit else ''}: {'same' if same else 'DIFFERENT'}"
                )
                ok &= same
        print(f"  {name:<34} " + "; ".join(dict.fromkeys(results)))
    return ok


def median_time(fn, repeat, sync):
    fn()
    sync()  # warm-up: compilation
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def torch_cuda():
    """``(torch, None)`` if torch with CUDA is usable here, else ``(None, why)``."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} has no CUDA device (built for {torch.version.cuda or 'CPU'})"
    return torch, None


def bench(n, args, torch):
    """Medians (seconds) for one size: name -> time."""
    n_in = min(1000, max(1, int(n) // args.layers))
    n_out = max(1, int(n) // (args.layers * n_in))
    keys = jax.random.split(jax.random.key(0), args.layers)
    params = {
        f"dense_{i}": {"kernel": jax.random.normal(k, (n_in, n_out), jnp.float32)} for i, k in enumerate(keys)
    }
    total = args.layers * n_in * n_out
    sync = lambda: None  # noqa: E731 - every JAX timing blocks on its own result
    run = lambda f: jax.block_until_ready(f())  # noqa: E731
    leaves = jax.tree.leaves
    floor = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in leaves(p)))
    sort = jax.jit(lambda p: jnp.sort(jnp.concatenate([jnp.abs(x).ravel() for x in leaves(p)])))
    times = {"floor": median_time(partial(run, lambda: floor(params)), args.repeat, sync)}
    times["jnp.sort"] = median_time(partial(run, lambda: sort(params)), args.repeat, sync)
    with pallas(False, args.cpu):
        times["jprune XLA"] = median_time(
            partial(run, lambda: jp.global_unstructured(params, 0.5)), args.repeat, sync
        )
        xla_masks = jp.global_unstructured(params, 0.5)
    with pallas(True, args.cpu) as calls:
        times["jprune Pallas"] = median_time(
            partial(run, lambda: jp.global_unstructured(params, 0.5)), args.repeat, sync
        )
        assert calls, "the Pallas path was not taken"
        same = jax.tree.all(jax.tree.map(jnp.array_equal, jp.global_unstructured(params, 0.5), xla_masks))
    if torch is not None:
        import torch.nn.utils.prune as tprune

        weights = [torch.from_dlpack(x) for x in leaves(params)]  # the same GPU memory

        def torch_global():
            layers = []
            for w in weights:
                m = torch.nn.Module()
                m.weight = torch.nn.Parameter(w, requires_grad=False)
                layers.append((m, "weight"))
            tprune.global_unstructured(layers, tprune.L1Unstructured, amount=0.5)

        times["torch CUDA"] = median_time(torch_global, args.repeat, torch.cuda.synchronize)
    return total, times, same


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (Pallas in interpret mode)")
    ap.add_argument("--sizes", type=float, nargs="+", help="total weights (default 1e7 1e8 1e9; --cpu: 2e3)")
    ap.add_argument("--layers", type=int, help="layers (default 48; --cpu: 4)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest runs")
    ap.add_argument(
        "--cases", nargs="+", default=[""], help="only the mask cases whose name has one of these"
    )
    args = ap.parse_args()
    if jax.default_backend() != "gpu" and not args.cpu:
        sys.exit(
            f"gpu_check: no GPU backend here (jax.default_backend() is {jax.default_backend()!r}). "
            "Run it on a machine with a CUDA GPU and jax[cuda], or pass --cpu for a dry run at small sizes."
        )
    args.sizes = args.sizes or ([2e3] if args.cpu else [1e7, 1e8, 1e9])
    args.layers = args.layers or (4 if args.cpu else 48)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    torch, why = torch_cuda()
    if torch is None:
        print(f"torch CUDA: not available ({why}); JAX figures only")
    else:
        print(f"torch CUDA: torch {torch.__version__} on {torch.cuda.get_device_name()}")

    ok = True
    if not args.skip_tests and not args.cpu:
        print("1. tests on this backend")
        ok &= run_tests(args)
    print("2. masks on this device vs the CPU device, bit for bit")
    ok &= check_masks(args)

    print(f"3. speed: 50 % global L1, {args.layers} layers, medians of {args.repeat}")
    names = ["jprune XLA", "jprune Pallas", "torch CUDA", "jnp.sort", "floor"]
    print(
        f"  {'N':>8} " + " ".join(f"{n:>14}" for n in names) + "   torch/jprune (XLA, Pallas)   jprune/floor"
    )
    for n in args.sizes:
        total, times, same = bench(n, args, torch)
        ok &= same
        cells = [f"{times[k] * 1e3:11.3f} ms" if k in times else f"{'-':>14}" for k in names]
        t = times.get("torch CUDA")
        vs_torch = f"{t / times['jprune XLA']:.1f}x, {t / times['jprune Pallas']:.1f}x" if t else "-"
        vs_floor = (
            f"{times['jprune XLA'] / times['floor']:.1f}x, {times['jprune Pallas'] / times['floor']:.1f}x"
        )
        print(f"  {total:8.2g} " + " ".join(cells) + f"   {vs_torch:>26}   {vs_floor}")
        if not same:
            print("  ^ the Pallas and XLA masks DIFFER at this size")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
