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
    assert "gradual" in (tmp_path / "accuracy_vs_sparsity.txt").read_text()
    assert result["agreement"] == 1.0
    assert result["exact_zero"]
    assert result["gradual"][0] == pytest.approx(0.9, abs=0.01)
    text = (tmp_path / "accuracy_vs_sparsity.txt").read_text()
    assert "one-shot ERK 90%" in text and "one-shot N:M 2:4 (fc layers)" in text
    assert result["extra"]["one-shot ERK 90%"][0] == pytest.approx(0.9, abs=1e-4)
    assert result["nm_layers"] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]  # still 2:4 after fine-tuning
    assert "torch vs jprune: 100.00 %" in out and "Done in" in out
    structured = result["structured"]
    assert structured["rel"] <= 1e-5  # the shrunk LeNet computes what the masked one does
    (params, flops, _), (small_params, small_flops, _) = structured["dense"], structured["shrunk"]
    assert small_params < params and small_flops < flops


def test_structured_speed(capsys):
    results = _run("structured_speed", ["--smoke"])
    assert set(results) == {"LeNet", "ResNet-18-style CNN", "ViT"}
    for name, r in results.items():
        assert r["rel"] <= 1e-5, name
        # params and FLOPs of the shrunk model are smaller than the dense one's
        assert r["shrunk"][0] < r["dense"][0] and r["shrunk"][1] < r["dense"][1], name
    assert "layers resized" in capsys.readouterr().out


def test_nnx_finetune(capsys):
    _run("nnx_finetune", ["--smoke"])
    out = capsys.readouterr().out
    assert "pruned weights exactly 0: True; train_step compiled 1 time(s)" in out
    assert "2:4 layers: ['fc1/kernel', 'fc2/kernel', 'fc3/kernel']; gradual_step compiled 1 time(s)" in out


def test_bench_train_smoke(capsys):
    sys.path.insert(0, os.path.join(EXAMPLES, os.pardir, "bench"))
    _run("bench_train", ["--smoke"])
    assert "keep-pruned" in capsys.readouterr().out


def test_bench_structured_smoke(capsys):
    """The ResNet-18 bench runs at a tiny size: both XLA configurations compile the shrunk model, which
    computes what the masked one does, beside Torch-Pruning's pruned torch model."""
    sys.path.insert(0, os.path.join(EXAMPLES, os.pardir, "bench"))
    j, t = _run(
        "bench_structured", ["--batch", "2", "--size", "32", "--repeats", "1", "--convs", "--round-to", "8"]
    )
    assert j["rel"] <= 1e-5
    assert set(j["latency"]) == {"XLA default", "YNNPACK off"}
    assert j["flops"][1] < j["flops"][0] and j["params"] == t["params"]  # same channels as Torch-Pruning
    assert "latency, YNNPACK off" in capsys.readouterr().out


def test_load_mnist_reads_idx_files(tmp_path):
    import gzip
    import struct

    import numpy as np
    from lenet import load_mnist

    rng = np.random.default_rng(0)

    def write(name, arr, gz):
        header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        opener = gzip.open if gz else open
        with opener(tmp_path / (name + (".gz" if gz else "")), "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    write("train-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)), gz=True)
    write("train-labels-idx1-ubyte", np.arange(5), gz=False)
    write("t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)), gz=False)
    write("t10k-labels-idx1-ubyte", np.arange(3), gz=True)
    x_tr, y_tr, x_te, y_te = load_mnist(str(tmp_path))
    assert x_tr.shape == (5, 28, 28, 1) and x_te.shape == (3, 28, 28, 1)
    assert x_tr.dtype == np.float32 and 0 <= x_tr.min() and x_tr.max() <= 1
    assert y_tr.tolist() == [0, 1, 2, 3, 4] and y_te.tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_mnist(str(tmp_path / "missing"))
