"""One process of ``tests/test_multiprocess.py``: jprune on params sharded over two processes.

Run as ``python _multiprocess_worker.py PROCESS_ID PORT OUTDIR`` (twice, ids 0 and 1) with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: 8 CPU devices in all, gloo collectives. Each
process builds only its own shards of the params (``params_block``), runs the pruning calls under
``jit``, checks their compiled programs, saves and restores them with orbax, and writes the shards
it holds of every result to ``OUTDIR/shards<ID>.npz`` for the test to assemble and compare.
Not a test module: everything runs under ``main``.
"""

from __future__ import annotations

import re
import sys

import numpy as np

# name -> (shape, the mesh axes of its PartitionSpec): shards of 131072 entries for the kernels
SHAPES = {"a/kernel": (1024, 1024), "b/kernel": (2048, 512), "b/bias": (512,), "c/kernel": (64, 512)}
SPECS = {
    "a/kernel": ("data", "model"),
    "b/kernel": ("model", "data"),
    "b/bias": ("model",),
    "c/kernel": ("data", "model"),
}
SHARD = 131072  # entries of one device's shard of each kernel


def params_block(name, index):
    """The entries ``index`` (a tuple of slices) of param ``name``, without building the others.

    Integers in [-1000, 1000] over 1024 (exact in float32, so channel L1 norms are exact sums in any
    order; many ties, so tie-breaking by flat index runs), from a hash of the flat index.
    """
    shape = SHAPES[name]
    grids = np.meshgrid(*(np.arange(n)[s] for n, s in zip(shape, index)), indexing="ij")
    flat = np.ravel_multi_index(grids, shape).astype(np.uint64)
    seed = np.uint64(sum(map(ord, name)))
    h = (flat * np.uint64(2654435761) + seed * np.uint64(40503)) % np.uint64(2**32)
    return (((h >> np.uint64(7)) % np.uint64(2001)).astype(np.float32) - 1000.0) / 1024.0


def nest(flat):
    out = {}
    for name, v in flat.items():
        a, b = name.split("/")
        out.setdefault(a, {})[b] = v
    return out


def steps():
    """The calls the workers run and the test repeats on one device: name -> f(params)."""
    import jax
    import optax

    import jprune as jp

    schedule = jp.polynomial_sparsity(0.6, begin_step=0, end_step=4)

    def train_step(params):
        """One keep_pruned SGD step from 25 % global masks, then update_masks at step 2 of a cubic
        schedule to 60 % at step 4: global pruning to 52.5 %."""
        masks = jp.global_unstructured(params, 0.25)  # arrays on the kernels, None on the bias
        tx = jp.keep_pruned(optax.sgd(0.5, momentum=0.9), masks)
        state = tx.init(params)
        grads = jax.grad(lambda p: sum(0.5 * (x * x).sum() for x in jax.tree.leaves(p)))(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        params, masks = jp.update_masks(params, jp.get_masks(state), 2, schedule)
        return {"params": params, "masks": masks}

    return {
        "global": lambda p: jp.global_unstructured(p, 0.3),
        "global_again": lambda p: jp.global_unstructured(p, 0.5, masks=jp.global_unstructured(p, 0.3)),
        "ln": lambda p: jp.ln_structured(p, 0.4, n=1, axis=-1),
        "train": train_step,
    }


def collectives(hlo):
    """``(op, [(dtype, entries), ...])`` of every collective of a compiled program (its result types)."""
    ops = r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|collective-broadcast)"
    out = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s" + ops + r"(-start)?\(", line)
        if m:
            types = [
                (t, int(np.prod([int(d) for d in dims.split(",") if d])))
                for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))
            ]
            out.append((m.group(2), types))
    return out


def check_no_gather(name, hlo):
    """No process ever holds more of the weights than its own shards: every collective in the
    program is an all-reduce of int32 counts (scalars, 65536-bin histograms), or, for
    ``ln_structured``, of float32 partial channel norms (at most one per channel). No all-gather,
    all-to-all, collective-permute or reduce-scatter; no all-reduce of keys or weights."""
    channels = max(shape[-1] for shape in SHAPES.values())
    found = collectives(hlo)
    assert found, f"{name}: no collectives at all: is the program really sharded?"
    for op, types in found:
        assert op == "all-reduce", f"{name}: {op} {types}"
        for dtype, n in types:
            ok = dtype == "s32" or (name == "ln" and dtype == "f32" and n <= channels)
            assert ok, f"{name}: all-reduce of {dtype}[{n}]: {types}"
    return len(found)


def main(process_id, port, outdir):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    shardings = {n: NamedSharding(mesh, P(*SPECS[n])) for n in SHAPES}
    flat = {
        n: jax.make_array_from_callback(SHAPES[n], shardings[n], lambda idx, n=n: params_block(n, idx))
        for n in SHAPES
    }
    params = nest(flat)
    for n in ("a/kernel", "b/kernel"):  # this process holds half of each kernel, one shard per device
        assert not flat[n].is_fully_addressable
        assert [s.data.size for s in flat[n].addressable_shards] == [SHARD] * 4

    results, report = {}, []
    for name, f in steps().items():
        fn = jax.jit(f)
        hlo = fn.lower(params).compile().as_text()
        report.append(f"{name}: {check_no_gather(name, hlo)} all-reduces of counts")
        out = fn(params)
        for path, leaf in jax.tree_util.tree_flatten_with_path(out, is_leaf=lambda x: x is None)[0]:
            key = name + ":" + "/".join(str(getattr(p, "key", p)) for p in path)
            results[key] = leaf
        if name == "global":
            for n in ("a/kernel", "b/kernel"):  # masks keep the params' sharding
                a, b = flat[n].sharding, nest_get(out, n).sharding
                assert b.is_equivalent_to(a, 2), (n, a, b)
        if name == "global_again":  # eagerly (separate dispatches, host syncs): the same masks
            for x, y in zip(jax.tree.leaves(f(params)), jax.tree.leaves(out)):
                for s, t in zip(x.addressable_shards, y.addressable_shards):
                    assert s.index == t.index, name
                    np.testing.assert_array_equal(np.asarray(s.data), np.asarray(t.data), err_msg=name)

    # orbax: the sharded params and the train step's masks, saved and restored by both processes
    tree = {"params": results_tree(results, "train:params/"), "masks": results_tree(results, "train:masks/")}
    ckpt = ocp.StandardCheckpointer()
    path = f"{outdir}/ckpt"
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    restored = ckpt.restore(path, abstract)
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(restored)):
        assert y.sharding.is_equivalent_to(x.sharding, x.ndim), p
        for s, t in zip(x.addressable_shards, y.addressable_shards):
            assert s.index == t.index
            np.testing.assert_array_equal(np.asarray(s.data), np.asarray(t.data))
            assert np.asarray(s.data).dtype == np.asarray(t.data).dtype

    shards = {}
    for key, leaf in results.items():
        if leaf is None:
            shards[key + "|none"] = np.zeros(0)
            continue
        for s in leaf.addressable_shards:
            if s.replica_id == 0:
                where = ";".join(
                    f"{i.start or 0}:{i.stop if i.stop is not None else d}"
                    for i, d in zip(s.index, leaf.shape)
                )
                shards[f"{key}|{where}"] = np.asarray(s.data)
    np.savez(f"{outdir}/shards{process_id}.npz", **shards)
    print("\n".join(report))
    jax.distributed.shutdown()
    print("WORKER OK")


def nest_get(tree, name):
    a, b = name.split("/")
    return tree[a][b]


def results_tree(results, prefix):
    return nest({k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix) and v is not None})


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
