"""jprune.interop: pruned PyTorch checkpoints <-> Flax, bit-exact, plus the `jprune` CLI.

The only part of jprune that imports torch. A Flax checkpoint here is a dict
`{"params", "masks", "batch_stats" (if any), "torch" (how to rebuild the state_dict)}` of numpy
arrays; masks are bool where torch had `X_mask`, None elsewhere (the jprune mask convention).
"""

from ._convert import from_torch as from_torch
from ._convert import to_torch as to_torch

__all__ = ["from_torch", "to_torch"]
