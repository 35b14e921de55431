"""The seed's LeNet (torch's pruning tutorial) in Flax Linen and NNX, the digits data, and a Linen
train step that uses only public jprune helpers (NNX helpers: ``jprune.nnx``).

LeNet: conv1 6@3x3, conv2 16@3x3, fc1 16*5*5->120, fc2 120->84, fc3 84->10 on 28x28 inputs,
each conv followed by ReLU and 2x2 max-pooling. The Flax models flatten in torch's (C, H, W)
order, so the exported fc1 weight is just the transposed kernel and torch predicts exactly what
Flax does.

Data: scikit-learn's ``load_digits`` (1797 handwritten 8x8 digits, shipped with scikit-learn,
nothing downloaded), resized to 28x28; or MNIST idx files if you have them (``load_mnist``).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import jprune as jp

# --------------------------------------------------------------------------------------------
# Models


class LeNet(nn.Module):
    """The seed's LeNet in Linen; params are {"conv1": {"kernel", "bias"}, ..., "fc3": {...}}.

    ``widths`` (optional) overrides layers' output features, keyed by their path in the variables,
    as ``jp.shrink`` returns them after structured pruning: ``LeNet(widths={"params/conv1": 3})``.
    """

    widths: Mapping[str, int] | None = None

    @nn.compact
    def __call__(self, x):  # x: (N, 28, 28, 1)
        w = lambda name, default: (self.widths or {}).get(f"params/{name}", default)  # noqa: E731
        pool = lambda x: nn.max_pool(x, (2, 2), (2, 2))  # noqa: E731
        x = pool(nn.relu(nn.Conv(w("conv1", 6), (3, 3), padding="VALID", name="conv1")(x)))
        x = pool(nn.relu(nn.Conv(w("conv2", 16), (3, 3), padding="VALID", name="conv2")(x)))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch's (C, H, W) flatten
        x = nn.relu(nn.Dense(w("fc1", 120), name="fc1")(x))
        x = nn.relu(nn.Dense(w("fc2", 84), name="fc2")(x))
        return nn.Dense(10, name="fc3")(x)


class LeNetNNX(nnx.Module):
    """The same LeNet in NNX; ``nnx.state(model, nnx.Param)`` has the Linen paths."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 6, (3, 3), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (3, 3), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(16 * 5 * 5, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.fc3 = nnx.Linear(84, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        x = nnx.relu(self.fc2(x))
        return self.fc3(x)


def torch_lenet():
    """The seed's torch LeNet (imported lazily: only the export step needs torch)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class TorchLeNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(1, 6, 3)
            self.conv2 = tnn.Conv2d(6, 16, 3)
            self.fc1 = tnn.Linear(16 * 5 * 5, 120)
            self.fc2 = tnn.Linear(120, 84)
            self.fc3 = tnn.Linear(84, 10)

        def forward(self, x):  # x: (N, 1, 28, 28)
            x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            x = torch.flatten(x, 1)  # the seed has x.view(...); (N,1,H,W) input can come out channels_last
            x = F.relu(self.fc1(x))
            x = F.relu(self.fc2(x))
            return self.fc3(x)

    return TorchLeNet()


# --------------------------------------------------------------------------------------------
# Data


def load_digits_28(*, test_size: int = 500, seed: int = 0):
    """scikit-learn's digits resized to 28x28 in [0, 1]: ``(x_train, y_train, x_test, y_test)``.

    ``x`` has shape (N, 28, 28, 1) float32; the split is stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    x = np.asarray(jax.image.resize(jnp.asarray(x), (len(x), 28, 28), "bilinear"))[..., None]
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        _, _, ndim = struct.unpack(">HBB", f.read(4))  # zero, dtype (0x08: uint8), ndim
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), np.uint8).reshape(shape)


def load_mnist(folder: str):
    """MNIST from the four idx files in ``folder`` (``train-images-idx3-ubyte[.gz]`` etc.)."""

    def find(stem):
        for name in (stem, stem + ".gz"):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise FileNotFoundError(f"{stem}[.gz] not found in {folder}")

    def images(stem):
        return (_read_idx(find(stem)).astype(np.float32) / 255.0)[..., None]

    return (
        images("train-images-idx3-ubyte"),
        _read_idx(find("train-labels-idx1-ubyte")).astype(np.int32),
        images("t10k-images-idx3-ubyte"),
        _read_idx(find("t10k-labels-idx1-ubyte")).astype(np.int32),
    )


# --------------------------------------------------------------------------------------------
# Training (Linen): prune -> fine-tune with jp.keep_pruned


def init_params(seed: int = 0):
    return LeNet().init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def predict(params, masks, x):
    """Class predictions of the pruned LeNet (effective weights ``param * mask``)."""
    return jnp.argmax(LeNet().apply({"params": jp.apply_masks(params, masks)}, x), -1)


def accuracy(params, masks, x, y) -> float:
    return float(np.mean(np.asarray(predict(params, masks, x)) == y))


def make_train_step(tx, schedule=None, *, frequency=1, **prune):
    """A jitted Linen train step ``(params, opt_state, step, x, y) -> (params, opt_state, loss)``.

    ``tx`` must contain ``jp.keep_pruned``, and the params must start at 0 where pruned
    (``jp.apply_masks(params, masks)`` once): the wrapper then holds them at exactly 0, so the
    forward pass uses the params as they are, with no per-step masking. With a ``schedule`` the
    masks are re-pruned every ``frequency`` steps inside the step (``jp.update_masks`` zeroes the
    newly pruned params; traced sparsity: one compile for the whole run); ``prune`` takes
    ``jp.update_masks``'s ``scope``, ``pattern``, ``max_sparsity``, ``select``.
    """

    def loss_fn(params, x, y):
        return cross_entropy(LeNet().apply({"params": params}, x), y)

    @jax.jit
    def train_step(params, opt_state, step, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if schedule is not None:
            masks = jp.get_masks(opt_state)
            params, masks = jp.update_masks(params, masks, step, schedule, frequency=frequency, **prune)
            opt_state = jp.set_masks(opt_state, masks)
        return params, opt_state, loss

    return train_step


def batches(x, y, batch_size, *, key):
    """One epoch of shuffled minibatches (the last partial batch is dropped: one compiled shape)."""
    perm = np.asarray(jax.random.permutation(key, len(x)))
    for i in range(0, len(x) - batch_size + 1, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]
