"""jprune: ``torch.nn.utils.prune`` for JAX/Flax pytrees — exact, jitted, and fast.

Masks are pytrees mirroring the params: a bool array (False = pruned) for a pruned leaf, ``None``
for a leaf that is not pruned. Every function takes a single array or a whole params pytree (Linen
params dicts, ``nnx.State``) and returns new masks; nothing is mutated.
"""

from ._custom import custom_from_mask as custom_from_mask
from ._custom import custom_method as custom_method
from ._custom import identity as identity
from ._masks import SparsityReport as SparsityReport
from ._masks import apply_masks as apply_masks
from ._masks import is_pruned as is_pruned
from ._masks import remove as remove
from ._masks import sparsity as sparsity
from ._structured import ln_structured as ln_structured
from ._structured import random_structured as random_structured
from ._unstructured import global_unstructured as global_unstructured
from ._unstructured import l1_unstructured as l1_unstructured
from ._unstructured import random_unstructured as random_unstructured

__version__ = "0.1.0"

__all__ = [
    "SparsityReport",
    "apply_masks",
    "custom_from_mask",
    "custom_method",
    "global_unstructured",
    "identity",
    "is_pruned",
    "l1_unstructured",
    "ln_structured",
    "random_structured",
    "random_unstructured",
    "remove",
    "sparsity",
]
