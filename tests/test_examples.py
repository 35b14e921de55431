"""Every example runs end to end in smoke mode (tiny sizes), in process."""

import importlib
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
sys.path.insert(0, EXAMPLES)


def _run(name, argv):
    module = importlib.import_module(name)
    return module.main(argv)


def test_seed_walkthrough(capsys):
    _run("seed_walkthrough", ["--smoke"])
    out = capsys.readouterr().out
    for step in (
        "random_unstructured",
        "ln_structured",
        "remove",
        "global_unstructured",
        "foobar_unstructured",
    ):
        assert step in out
    assert "fc3/bias               5          10    50.00%" in out


def test_demo(tmp_path, capsys):
    result = _run("demo", ["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 1000
    assert (tmp_path / "lenet_pruned90.pt").exists()
    assert result["agreement"] == 1.0
    assert result["exact_zero"]
    assert result["gradual"][0] == pytest.approx(0.9, abs=0.01)
    assert "torch vs jprune: 100.00 %" in out and "Done in" in out


def test_nnx_finetune(capsys):
    _run("nnx_finetune", ["--smoke"])
    out = capsys.readouterr().out
    assert "pruned weights exactly 0: True; train_step compiled 1 time(s)" in out


def test_bench_train_smoke(capsys):
    sys.path.insert(0, os.path.join(EXAMPLES, os.pardir, "bench"))
    _run("bench_train", ["--smoke"])
    assert "wrapper-only" in capsys.readouterr().out
