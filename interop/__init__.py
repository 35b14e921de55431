"""jprune.interop: pruned PyTorch checkpoints <-> Flax, bit-exact, plus the `jprune` CLI.

The only part of jprune that imports torch.

    from jprune.interop import from_torch, to_torch, load_pruned_state_dict
    ckpt = from_torch("pruned.pt")                     # or a state_dict / nn.Module
    logits = model.apply({"params": jp.apply_masks(ckpt["params"], ckpt["masks"])}, x)
    sd = to_torch(ckpt)                                # to_torch(from_torch(sd)) == sd, bit for bit
    load_pruned_state_dict(torch_model, sd)            # an unpruned nn.Module accepts it

The Flax checkpoint dict (numpy leaves; what `.msgpack` files and orbax directories hold):

    {"params":      {...},  # Flax names and layouts; the `X_orig` values where torch pruned X
     "masks":       {...},  # like params: bool (False = pruned) where torch had X_mask, else None
     "batch_stats": {...},  # only if the state_dict has BatchNorm running stats
     "torch": {"recipe": str,   # JSON: every torch key in order -> Flax place, layout, torch dtype
               "extra": {...}}} # tensors with no Flax place, verbatim (num_batches_tracked...)

`"torch"` is what makes the round trip exact (key order, mask dtypes such as bf16/fp16/fp64,
unknown keys); drop it and `to_torch` derives torch names from the Flax names instead.

Default names and layouts (no template):

    torch (per module)                         Flax
    weight 2-D with bias (out,)                kernel = weight.T                  (Linear)
    weight 3-D..5-D (O, I, *spatial)           kernel (*spatial, I, O)            (ConvNd)
    weight with a same-shape bias, or 1-D      scale                              (norm layers)
    bias                                       bias
    running_mean / running_var                 batch_stats mean / var
    2-D weight without bias                    refused: Linear or Embedding? pass a template
    anything else                              kept verbatim in ckpt["torch"]["extra"]

A template (Flax params, e.g. `jax.eval_shape(model.init, key, x)["params"]`) decides names and
layouts by matching instead: leaf names pick the layout (`embedding` keeps torch's layout,
`kernel` is transposed), torch's `blocks.0` matches Flax's `blocks_0`, and a module whose name
differs matches only if exactly one template module fits its shapes; anything else is refused.

NHWC models: torch flattens (C, H, W) before the first Linear after convolutions; transpose
NHWC activations to (C, H, W) before the reshape and the converted kernel works as is.
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
