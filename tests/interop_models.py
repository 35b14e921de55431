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


# ----------------------------------------------------------------------------- the corpus
# (test_interop_corpus): layers outside the default rules, each with a Flax twin where Flax has one.


class Conv1D(torch.nn.Module):
    """GPT-2's Conv1D (as in transformers.pytorch_utils): weight (in, out), forward x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class _GPT2Attn(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)  # square: a Linear has the same shapes


class _GPT2MLP(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)


def _torch_causal(q, k, v, heads: int):
    b, t, d = q.shape
    q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    att = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    att = att.masked_fill(torch.ones(t, t).tril() == 0, float("-inf"))
    return (torch.softmax(att, -1) @ v).transpose(1, 2).reshape(b, t, d)


def _flax_causal(q, k, v, heads: int):
    b, t, d = q.shape
    q, k, v = (z.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3) for z in (q, k, v))
    att = q @ k.transpose(0, 1, 3, 2) / (d // heads) ** 0.5
    att = jnp.where(jnp.tril(jnp.ones((t, t))) == 0, -jnp.inf, att)
    return (nn.softmax(att, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)


class TorchGPT2Block(torch.nn.Module):
    """A GPT-2 block built from Conv1D layers (weights stored (in, out))."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln_1 = torch.nn.LayerNorm(d)
        self.attn = _GPT2Attn(d)
        self.ln_2 = torch.nn.LayerNorm(d)
        self.mlp = _GPT2MLP(d)

    def forward(self, x):
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(x.shape[-1], dim=-1)
        x = x + self.attn.c_proj(_torch_causal(q, k, v, self.heads))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class _FlaxGPT2Attn(nn.Module):
    d: int

    def setup(self):
        self.c_attn = nn.Dense(3 * self.d)
        self.c_proj = nn.Dense(self.d)


class _FlaxGPT2MLP(nn.Module):
    d: int

    def setup(self):
        self.c_fc = nn.Dense(4 * self.d)
        self.c_proj = nn.Dense(self.d)


class FlaxGPT2Block(nn.Module):
    """The same block with Flax Dense layers: a Dense kernel is (in, out), as Conv1D stores it."""

    d: int = 8
    heads: int = 2

    def setup(self):
        self.ln_1 = nn.LayerNorm(epsilon=1e-5)
        self.attn = _FlaxGPT2Attn(self.d)
        self.ln_2 = nn.LayerNorm(epsilon=1e-5)
        self.mlp = _FlaxGPT2MLP(self.d)

    def __call__(self, x):
        q, k, v = jnp.split(self.attn.c_attn(self.ln_1(x)), 3, axis=-1)
        x = x + self.attn.c_proj(_flax_causal(q, k, v, self.heads))
        return x + self.mlp.c_proj(nn.gelu(self.mlp.c_fc(self.ln_2(x))))


class TorchAttnNet(torch.nn.Module):
    """nn.MultiheadAttention (packed in_proj_weight) then a Linear head."""

    def __init__(self, d: int = 8, heads: int = 2, out: int = 4):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc = torch.nn.Linear(d, out)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


class FlaxAttnNet(nn.Module):
    heads: int = 2
    out: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(x)
        return nn.Dense(self.out, name="fc")(x)


class TorchEmbedNet(torch.nn.Module):
    """Embedding + LayerNorm + Linear: the embedding is a 2-D weight without bias."""

    def __init__(self, vocab: int = 20, d: int = 8, out: int = 5):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, out)

    def forward(self, ids):
        return self.fc(self.norm(self.emb(ids)))


class FlaxEmbedNet(nn.Module):
    vocab: int = 20
    d: int = 8
    out: int = 5

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d, name="emb")(ids)
        return nn.Dense(self.out, name="fc")(nn.LayerNorm(epsilon=1e-5, name="norm")(x))


class TorchUpNet(torch.nn.Module):
    """Conv, then two ConvTranspose2d: (I, O) = (4, 6) with bias, and a square bias-less (6, 6)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.up1 = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
        self.up2 = torch.nn.ConvTranspose2d(6, 6, 2, stride=2, bias=False)

    def forward(self, x):
        return self.up2(F.relu(self.up1(F.relu(self.conv(x)))))


class FlaxUpNet(nn.Module):
    """The same on NHWC. Flax's ConvTranspose pads differently: torch's padding p crops p from
    each side of the full ("VALID") output."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x))
        x = nn.ConvTranspose(6, (3, 3), strides=(2, 2), padding="VALID", name="up1")(x)[:, 1:-1, 1:-1]
        return nn.ConvTranspose(6, (2, 2), strides=(2, 2), padding="VALID", use_bias=False, name="up2")(
            nn.relu(x)
        )


def raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, to compare bit patterns (NaN payloads, -0.0) exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_identical(a, b, ordered=True):
    """Same keys (in the same order), and per key the same dtype, shape and bytes."""
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert torch.equal(raw(a[k]), raw(b[k])), k
