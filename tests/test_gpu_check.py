"""bench/gpu_check.py runs: a dry run on the CPU at tiny sizes (the Pallas kernels in interpret
mode), and without a GPU and without --cpu it stops with a clear message."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "gpu_check.py")


def run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_dry_run_on_cpu():
    out = run("--cpu", "--sizes", "1e3", "--layers", "2", "--repeat", "1", "--cases", "mixed")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "torch CUDA: not available" in out.stdout  # this machine's torch is the CPU build
    checks = [line for line in lines if line.startswith("  global") or line.startswith("  l1")]
    assert len(checks) == 1 and all(line.endswith("Pallas jit: same; Pallas: same") for line in checks), (
        checks
    )
    assert "DIFFERENT" not in out.stdout
    assert out.stdout.strip().endswith("all checks passed")


def test_without_a_gpu_it_says_so():
    out = run()
    assert out.returncode != 0
    assert "no GPU backend here" in out.stderr and "--cpu" in out.stderr
