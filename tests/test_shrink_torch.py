"""Groups against Torch-Pruning's DepGraph on the same CNN, and a shrunk model exported to torch."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch
import torch_pruning as tp  # make installs it (--no-deps); missing, this file fails rather than skips
from group_models import _init
from jprune.interop import to_torch

import jprune as jp


class TorchNet(torch.nn.Module):
    def __init__(self, c=8, m=6, f=10):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.BatchNorm2d(c)
        self.conv2, self.bn2 = torch.nn.Conv2d(c, m, 3, padding=1), torch.nn.BatchNorm2d(m)
        self.conv3, self.bn3 = torch.nn.Conv2d(m, c, 3, padding=1), torch.nn.BatchNorm2d(c)
        self.fc1, self.fc2 = torch.nn.Linear(c * 16, f), torch.nn.Linear(f, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(x + self.bn3(self.conv3(y)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class FlaxNet(nn.Module):
    c: int = 8
    m: int = 6
    f: int = 10

    @nn.compact
    def __call__(self, x):
        bn = lambda name: nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)  # noqa: E731
        x = nn.relu(bn("bn1")(nn.Conv(self.c, (3, 3), name="conv1")(x)))
        y = nn.relu(bn("bn2")(nn.Conv(self.m, (3, 3), name="conv2")(x)))
        x = nn.relu(x + bn("bn3")(nn.Conv(self.c, (3, 3), name="conv3")(y)))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch's flatten order (C, H, W)
        return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(self.f, name="fc1")(x)))


def torch_groups():
    net = TorchNet().eval()
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 4, 4))
    names = {m: n for n, m in net.named_modules() if n}
    out = []
    for group in graph.get_all_groups(
        ignored_layers=[net.fc2], root_module_types=[torch.nn.Conv2d, torch.nn.Linear]
    ):
        items = set()
        for dep, _ in group:
            if dep.target.module in names:
                kind = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
                items.add((names[dep.target.module], kind))
        out.append(sorted(items))
    return sorted(out)


def test_groups_match_torch_pruning_depgraph():
    x = jnp.ones((1, 4, 4, 3))
    v = _init(FlaxNet(), x)
    ours = []
    for g in jp.channel_groups(FlaxNet().apply, v, x).prunable:
        ours.append(sorted({(m.path.split("/")[1], "in" if m.role == "in" else "out") for m in g.members}))
    assert sorted(ours) == torch_groups()


def test_shrunk_model_exports_to_torch():
    """Shrink in Flax, convert with jprune.interop.to_torch, load into the smaller torch model:
    same names, smaller shapes, the masked model's outputs."""
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    v = _init(FlaxNet(), x)
    groups = jp.channel_groups(FlaxNet().apply, v, x)
    masks = jp.group_structured(v, 0.5, groups)
    small, widths = jp.shrink(v, masks, groups)
    c, m, f = widths["params/conv1"], widths["params/conv2"], widths["params/fc1"]
    assert (c, m, f) != (8, 6, 10)
    sd = to_torch({"params": small["params"], "batch_stats": small["batch_stats"]})
    net = TorchNet(c, m, f).eval()
    net.load_state_dict(sd)
    with torch.no_grad():
        got = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    want = np.asarray(FlaxNet().apply(jp.apply_masks(v, masks), x))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
