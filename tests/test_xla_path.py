"""The torch parity and exactness suites again, with the native CPU kernel switched off (``JPRUNE_NATIVE=0``).

On CPU the kernel of ``jprune/_cpu.py`` answers the parity tests; the XLA selection it replaces is
what runs on GPU/TPU, on sharded params and where the kernel was not built, so it must give torch's
answers too. The environment variable is read once per process: the suites run in a fresh one.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_parity_suites_on_the_xla_path():
    env = dict(os.environ, JPRUNE_NATIVE="0")
    suites = ["tests/test_parity_torch.py", "tests/test_peer_suite.py", "tests/test_exactness.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *suites]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
