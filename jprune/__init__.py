"""jprune: ``torch.nn.utils.prune`` for JAX/Flax pytrees — exact, jitted, and fast.

Masks are pytrees mirroring the params: a bool array (False = pruned) for a pruned leaf, ``None``
for a leaf that is not pruned. Every function takes a single array or a whole params pytree (Linen
params dicts, ``nnx.State``) and returns new masks; nothing is mutated.
"""

from . import testing as testing  # jprune.testing: masks compared across frameworks (no torch)
from ._custom import custom_from_mask as custom_from_mask
from ._custom import custom_method as custom_method
from ._custom import identity as identity
from ._group_prune import group_structured as group_structured
from ._groups import Group as Group
from ._groups import Groups as Groups
from ._groups import Member as Member
from ._groups import channel_groups as channel_groups
from ._masks import SparsityReport as SparsityReport
from ._masks import apply_masks as apply_masks
from ._masks import is_pruned as is_pruned
from ._masks import remove as remove
from ._masks import sparsity as sparsity
from ._nm import n_m_unstructured as n_m_unstructured
from ._shrink import shrink as shrink
from ._structured import ln_structured as ln_structured
from ._structured import random_structured as random_structured
from ._unstructured import global_unstructured as global_unstructured
from ._unstructured import l1_unstructured as l1_unstructured
from ._unstructured import random_unstructured as random_unstructured

__version__ = "0.1.0"

__all__ = [
    "Group",
    "Groups",
    "Member",
    "SparsityReport",
    "apply_masks",
    "channel_groups",
    "custom_from_mask",
    "custom_method",
    "global_unstructured",
    "group_structured",
    "identity",
    "is_pruned",
    "l1_unstructured",
    "ln_structured",
    "n_m_unstructured",
    "random_structured",
    "random_unstructured",
    "remove",
    "shrink",
    "sparsity",
    "testing",
]

# --- training: the optax wrapper (_optim), schedules (_schedules), gradual pruning (_gradual) ---
from ._gradual import prune_to_sparsity as prune_to_sparsity
from ._gradual import update_masks as update_masks
from ._optim import KeepPrunedState as KeepPrunedState
from ._optim import get_masks as get_masks
from ._optim import keep_pruned as keep_pruned
from ._optim import set_masks as set_masks
from ._schedules import one_shot_sparsity as one_shot_sparsity
from ._schedules import polynomial_sparsity as polynomial_sparsity

__all__ += [
    "KeepPrunedState",
    "get_masks",
    "keep_pruned",
    "nnx",
    "one_shot_sparsity",
    "polynomial_sparsity",
    "prune_to_sparsity",
    "set_masks",
    "update_masks",
]


def __getattr__(name):
    if name == "nnx":  # jprune.nnx imports flax.nnx: loaded on first use, not with jprune
        import importlib

        return importlib.import_module(".nnx", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
