"""Small torch models and their Flax twins for the interop tests (same names, same math)."""

import flax.linen as nn
import jax.numpy as jnp
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

# ----------------------------------------------------------------------------- LeNet (the seed's)


class TorchLeNet(torch.nn.Module):
    """The seed's LeNet: 1x28x28 -> conv1 6@3x3 -> pool -> conv2 16@3x3 -> pool -> 400 -> 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 3)
        self.conv2 = torch.nn.Conv2d(6, 16, 3)
        self.fc1 = torch.nn.Linear(16 * 5 * 5, 120)
        self.fc2 = torch.nn.Linear(120, 84)
        self.fc3 = torch.nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, int(x.nelement() / x.shape[0]))  # flattens C, H, W
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class FlaxLeNet(nn.Module):
    """The same LeNet on NHWC images.

    torch flattens (C, H, W) before fc1; NHWC activations flatten as (H, W, C), which would pair
    fc1's rows with the wrong pixels. Transposing to (C, H, W) before the reshape keeps fc1's
    kernel exactly as converted (no row permutation of kernel or mask, so the round trip stays
    bit-exact).
    """

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(6, (3, 3), padding="VALID", name="conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # flatten like torch: C, H, W
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(10, name="fc3")(x)


class FooBarPruningMethod(prune.BasePruningMethod):
    """The seed's custom method: prune every other entry of the flattened tensor."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


def seed_pruned_lenet(seed: int = 0) -> TorchLeNet:
    """A LeNet pruned with the seed's whole sequence."""
    torch.manual_seed(seed)
    model = TorchLeNet()
    prune.random_unstructured(model.conv1, name="weight", amount=0.3)
    prune.l1_unstructured(model.conv1, name="bias", amount=3)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=0.2)
        elif isinstance(module, torch.nn.Linear):
            prune.ln_structured(module, name="weight", amount=0.4, n=2, dim=0)
    prune.global_unstructured(
        [(getattr(model, n), "weight") for n in ("conv1", "conv2", "fc1", "fc2", "fc3")],
        pruning_method=prune.L1Unstructured,
        amount=0.2,
    )
    FooBarPruningMethod.apply(model.fc3, "bias")
    return model


# ----------------------------------------------------------------------------- CNN with BatchNorm


class TorchBNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class FlaxBNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(name):
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)

        x = nn.relu(bn("bn1")(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)))
        x = nn.relu(bn("bn2")(nn.Conv(8, (3, 3), padding="VALID", use_bias=False, name="conv2")(x)))
        return nn.Dense(4, name="fc")(x.mean(axis=(1, 2)))


# ----------------------------------------------------------------------------- Transformer block


class TorchBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        y = self.ln1(x)

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(y)), split(self.k(y)), split(self.v(y))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class TorchTinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, heads: int = 2, depth: int = 2):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(TorchBlock(d, heads) for _ in range(depth))
        self.ln_f = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class FlaxBlock(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        y = nn.LayerNorm(epsilon=1e-5, name="ln1")(x)

        def split(z):
            return z.reshape(b, t, self.heads, d // self.heads).transpose(0, 2, 1, 3)

        q, k, v = (split(nn.Dense(d, name=n)(y)) for n in ("q", "k", "v"))
        att = nn.softmax(q @ k.transpose(0, 1, 3, 2) / (d // self.heads) ** 0.5, axis=-1)
        x = x + nn.Dense(d, name="o")((att @ v).transpose(0, 2, 1, 3).reshape(b, t, d))
        y = nn.gelu(nn.Dense(4 * d, name="fc1")(nn.LayerNorm(epsilon=1e-5, name="ln2")(x)))
        return x + nn.Dense(d, name="fc2")(y)


class FlaxTinyLM(nn.Module):
    """Submodules in a list: Flax names them `blocks_0`, `blocks_1` (torch: `blocks.0`)."""

    vocab: int = 50
    d: int = 16
    heads: int = 2
    depth: int = 2

    def setup(self):
        self.tok = nn.Embed(self.vocab, self.d)
        self.blocks = [FlaxBlock(self.d, self.heads) for _ in range(self.depth)]
        self.ln_f = nn.LayerNorm(epsilon=1e-5)
        self.head = nn.Dense(self.vocab, use_bias=False)

    def __call__(self, ids):
        x = self.tok(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
