"""Pruning sharded params on a mesh of 8 CPU devices: no gather of the weights, masks keep sharding;
structured groups, masks and shrink on sharded params equal the unsharded ones.

XLA reads the device count once, at start-up, so the check runs in a fresh interpreter.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jprune as jp

    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    params = {
        "a": {"kernel": rng.standard_normal((256, 512)).astype(np.float32)},
        "b": {"kernel": rng.standard_normal((512, 256)).astype(np.float32)},
        "c": {"bias": np.zeros(128, np.float32)},
    }
    specs = {"a": {"kernel": P("data", "model")}, "b": {"kernel": P("model", "data")},
             "c": {"bias": P()}}
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    # (Leaves above 65536 entries use histograms; smaller ones are sorted, which may gather them.)
    # Ties on purpose: a block of equal weights straddles the cut, so tie-breaking runs too.
    params["a"]["kernel"][:8] = 0.5
    sharded_ties = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    for fn in (
        lambda p, a: jp.global_unstructured(p, a),
        lambda p, a: jp.l1_unstructured(p, a),
        lambda p, a: jp.global_unstructured(p, a, masks=jp.global_unstructured(p, 0.2)),
    ):
        f = jax.jit(fn)
        for p in (sharded, sharded_ties):
            got = f(p, 0.3)
            want = f(jax.device_get(p), 0.3)  # the same program on one device
            for k in ("a", "b"):
                assert got[k]["kernel"].sharding.is_equivalent_to(p[k]["kernel"].sharding, 2)
                np.testing.assert_array_equal(got[k]["kernel"], want[k]["kernel"])
            assert got["c"]["bias"] is None
        hlo = f.lower(sharded, 0.3).compile().as_text()
        gathers = re.findall(r"all-gather[^\\n]*", hlo)
        assert not gathers, gathers  # counts are reductions: only histograms cross devices
        assert re.search(r"all-reduce[^\\n]*s32\\[65536\\]", hlo)

    # identity's all-True masks keep the params' sharding (a jitted step then compiles once).
    ident = jp.identity(sharded)
    for k in ("a", "b"):
        assert ident[k]["kernel"].sharding.is_equivalent_to(sharded[k]["kernel"].sharding, 2)

    # Eagerly, sharded params take the XLA path; on one device, the native CPU kernel: same masks.
    from jprune import _cpu
    assert not _cpu.usable([sharded_ties["a"]["kernel"]])
    assert _cpu.usable([jnp.asarray(params["a"]["kernel"])])
    for fn in (jp.global_unstructured, jp.l1_unstructured):
        got, want = fn(sharded_ties, 0.3), fn(jax.device_put(params, jax.devices()[0]), 0.3)
        for k in ("a", "b"):
            np.testing.assert_array_equal(got[k]["kernel"], want[k]["kernel"])

    # Structured: groups, group masks and the shrunk params of a sharded MLP equal the unsharded ones.
    import flax.linen as nn
    mlp = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
    x = jnp.ones((2, 8))
    v = jax.device_get(mlp.init(jax.random.key(0), x))
    vs = jax.device_put(v, jax.tree.map(
        lambda a: NamedSharding(mesh, P(*[None] * (a.ndim - 1), "data")), v))
    groups = jp.channel_groups(mlp.apply, vs, x)
    gm, gm0 = jp.group_structured(vs, 0.5, groups), jp.group_structured(v, 0.5, groups)
    small, widths = jp.shrink(vs, gm, groups)
    small0, widths0 = jp.shrink(v, gm0, groups)
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(
        lambda p, q: bool(np.array_equal(np.asarray(p), np.asarray(q))), a, b)))
    assert same(gm, gm0) and same(small, small0) and widths == widths0 and widths["params/layers_0"] == 8
    small_mlp = nn.Sequential([nn.Dense(widths["params/layers_0"]), nn.relu, nn.Dense(8)])
    y, y0 = small_mlp.apply(small, x), mlp.apply(jp.apply_masks(vs, gm), x)
    assert np.allclose(y, y0, rtol=1e-5, atol=1e-6)
    r, r0 = (jp.group_structured(t, 0.7, groups, scope="layer", round_to=4) for t in (vs, v))
    assert same(r, r0) and np.asarray(r["params"]["layers_2"]["kernel"]).any(axis=1).sum() == 8  # 5 -> 8
    print("OK")
    """
)


def test_sharded_pruning_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("OK")
