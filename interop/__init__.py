"""jprune.interop: pruned PyTorch checkpoints <-> Flax, bit-exact, plus the `jprune` CLI.

The only part of jprune that imports torch. A Flax checkpoint here is a dict
`{"params", "masks", "batch_stats" (if any), "torch" (how to rebuild the state_dict)}` of numpy
arrays; masks are bool where torch had `X_mask`, None elsewhere (the jprune mask convention).
"""

from ._convert import from_torch as from_torch
from ._convert import to_torch as to_torch
from ._files import convert as convert
from ._files import load as load
from ._files import save as save
from ._inspect import summarize as summarize
from ._torch import load_pruned_state_dict as load_pruned_state_dict

__all__ = [
    "convert",
    "from_torch",
    "load",
    "load_pruned_state_dict",
    "save",
    "summarize",
    "to_torch",
]
