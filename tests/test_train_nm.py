"""N:M sparsity in training: prune_to_sparsity / update_masks ramp to the pattern, the sparsity report
says which leaves have it, and an export to torch keeps the 2:4 pattern torch's semi-structured
sparse tensors take (checked on the torch weight itself: no GPU needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tie_free
from hypothesis import given, settings
from hypothesis import strategies as st

import jprune as jp


def _params(seed=0):
    rng = np.random.default_rng(seed)
    a, b, c = tie_free(rng, [(16, 8), (3, 3, 8, 4), (8, 6)])
    return {
        "fc1": {"kernel": jnp.asarray(a), "bias": jnp.zeros(8)},
        "conv": {"kernel": jnp.asarray(b), "bias": jnp.zeros(4)},
        "fc2": {"kernel": jnp.asarray(c), "bias": jnp.zeros(6)},
    }


def _groups(mask, m=4, axis=-2):
    g = np.moveaxis(np.asarray(mask), axis, -1)
    return g.reshape(-1, m)


def _kernels(tree):
    return {k: tree[k]["kernel"] for k in tree}


@settings(max_examples=12, deadline=None)
@given(sparsity=st.floats(0.0, 0.5), scope=st.sampled_from(["global", "layer"]))
def test_ramp_never_breaks_the_pattern_and_counts_exactly(sparsity, scope):
    """At any sparsity <= n/m: exactly round(s * N) pruned (globally or per leaf), never more than
    n in a group of m, and only entries n_m_unstructured would prune."""
    params = _params()
    masks = jp.prune_to_sparsity(params, sparsity, scope=scope, pattern=(2, 4))
    full = jp.n_m_unstructured(params, 2, 4)
    sizes = {k: v.size for k, v in _kernels(params).items()}
    pruned = {k: int((~np.asarray(m)).sum()) for k, m in _kernels(masks).items()}
    if scope == "global":
        assert sum(pruned.values()) == round(sparsity * sum(sizes.values()))
    else:
        assert pruned == {k: round(sparsity * n) for k, n in sizes.items()}
    for k, m in _kernels(masks).items():
        assert (_groups(~np.asarray(m)).sum(-1) <= 2).all()
        assert not (~np.asarray(m) & np.asarray(full[k]["kernel"])).any()  # a subset of the N:M set


def test_ramp_ends_at_the_n_m_pattern_itself():
    params = _params(1)
    schedule = jp.polynomial_sparsity(0.5, begin_step=0, end_step=12)
    step = jax.jit(lambda p, m, t: jp.update_masks(p, m, t, schedule, frequency=3, pattern=(2, 4)))
    masks, seen = jp.identity(params), []
    for t in range(13):
        _, masks = step(params, masks, jnp.int32(t))
        seen.append(jp.sparsity(masks).pruned)
    assert seen == sorted(seen) and seen[0] == 0
    want = jp.n_m_unstructured(params, 2, 4)  # the same weights: the pattern of the weights
    for k in params:
        np.testing.assert_array_equal(np.asarray(masks[k]["kernel"]), np.asarray(want[k]["kernel"]))
    report = jp.sparsity(masks)
    assert all(r.n_m for r in report.rows)
    assert all(line.endswith("2:4") for line in str(report).splitlines()[1:4])


def test_pattern_refusals_and_traced_cap():
    params = _params()
    with pytest.raises(ValueError, match="above 2/4: the N:M pattern prunes no more"):
        jp.prune_to_sparsity(params, 0.6, pattern=(2, 4))
    with pytest.raises(TypeError, match=r"pattern must be \(n, m\)"):
        jp.prune_to_sparsity(params, 0.5, pattern=2)
    with pytest.raises(ValueError, match="odd/kernel: length 6 along axis -2 is not a multiple of m=4"):
        jp.prune_to_sparsity({**params, "odd": {"kernel": jnp.ones((6, 4))}}, 0.5, pattern=(2, 4))
    capped = jax.jit(lambda p, s: jp.prune_to_sparsity(p, s, pattern=(2, 4)))(params, jnp.float32(0.9))
    assert jp.sparsity(capped).fraction == 0.5  # traced: capped at n/m


def test_report_n_m_column_only_where_the_pattern_holds():
    params = _params()
    masks = jp.n_m_unstructured(params, 2, 4, select="fc1/kernel")
    masks = jp.l1_unstructured(params, 0.5, masks=masks, select="fc2/kernel")  # 50 %, no pattern
    rows = {r.path: r for r in jp.sparsity(masks, params).rows}
    assert rows["fc1/kernel"].n_m is True
    assert rows["fc2/kernel"].n_m is False and rows["fc2/kernel"].fraction == 0.5
    assert rows["conv/kernel"].n_m is None  # not pruned
    assert rows["fc1/bias"].n_m is None  # 1-D: no groups
    text = str(jp.sparsity(masks, params))
    assert [line.endswith("2:4") for line in text.splitlines() if line.startswith("fc")] == [
        False,
        True,
        False,
        False,
    ]  # fc1/bias, fc1/kernel, fc2/bias, fc2/kernel


def test_export_to_torch_keeps_the_semi_structured_pattern():
    """torch.sparse.to_sparse_semi_structured takes a 2-D weight whose every row has at most 2
    nonzeros in each group of 4 consecutive columns (the input dim of a Linear). The exported
    torch mask and effective weight have it, after a 2:4 ramp on a Flax kernel (in, out)."""
    torch = pytest.importorskip("torch")
    from jprune.interop import load_pruned_state_dict, to_torch

    rng = np.random.default_rng(0)
    params = {"fc": {"kernel": jnp.asarray(tie_free(rng, (32, 16))), "bias": jnp.zeros(16)}}
    masks = jp.prune_to_sparsity(params, 0.25, pattern=(2, 4))  # a ramp: part way, then the pattern
    masks = jp.prune_to_sparsity(params, 0.5, masks=masks, pattern=(2, 4))
    sd = to_torch({"params": jax.tree.map(np.asarray, params), "masks": jax.tree.map(np.asarray, masks)})
    mask = sd["fc.weight_mask"].numpy()
    assert mask.shape == (16, 32)  # torch (out, in)
    for row in mask:
        assert (row.reshape(-1, 4).sum(-1) <= 2).all()
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(32, 16))
    load_pruned_state_dict(model, sd)
    weight = model.fc.weight.detach().numpy()
    assert ((weight.reshape(16, -1, 4) != 0).sum(-1) <= 2).all()
    np.testing.assert_array_equal(
        weight, (np.asarray(params["fc"]["kernel"]) * np.asarray(masks["fc"]["kernel"])).T
    )
