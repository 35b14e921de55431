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

Files (`load`/`save`): jprune's own (`.msgpack`, orbax, and `.safetensors` it writes) store masks
at 1 bit per entry, losslessly; `save(..., compact=True)` (`jprune compact IN OUT`) stores only
the kept values of each pruned tensor plus its packed mask (the pruned entries' values load as
zeros: the same effective weights and outputs) and tensors at least half zeros as their nonzeros.

`"torch"` is what makes the round trip exact (key order, mask dtypes such as bf16/fp16/fp64,
unknown keys); drop it and `to_torch` derives torch names from the Flax names instead.

Names and layouts (without a template):

    torch (per module)                         Flax
    weight 2-D with bias (out,)                kernel = weight.T                  (Linear)
    weight 2-D (in, out) with bias (out,)      kernel, same layout                (GPT-2 Conv1D)
    weight 3-D..5-D (O, I, *k), bias (O,)      kernel (*k, I, O)                  (ConvNd)
    weight 3-D..5-D (I, O, *k), bias (O,)      kernel (*k, I, O), k reversed      (ConvTransposeNd:
                                                 Flax's ConvTranspose, transpose_kernel=False)
    weight with a same-shape bias, or 1-D      scale                              (norm layers)
    bias                                       bias
    running_mean / running_var                 batch_stats mean / var
    in_proj_weight (3E, E), in_proj_bias       query/key/value kernel (E, H, E/H), bias (H, E/H)
    out_proj of a MultiheadAttention           out kernel (H, E/H, E), bias
                                                 (Flax MultiHeadDotProductAttention; the head count
                                                 H comes from the module or a template; without
                                                 them the two rows below apply)
    any other pruned tensor (X_orig, X_mask)   params leaf X in torch's layout, mask beside it
                                                 (LSTM/GRU weight_ih_l0, custom parameters...)
    anything else                              kept verbatim in ckpt["torch"]["extra"]

Refused, with the tensor named and the way out: a 2-D weight without bias (Linear or Embedding?);
a square weight or a bias-less conv when the same state_dict holds Conv1D or ConvTranspose
weights (they are stored transposed, and the shape fits both); a weight whose bias fits neither
axis; two tensors that would land on one Flax leaf. The classes of torch's own layers decide the
first three: pass the model (`from_torch(model)`, or `template=model` with a state_dict or file). The
rules above read shapes only: a bias-less or square ConvTranspose in a state_dict with no other
ConvTranspose looks like a Conv; pass the model there too.

A template (Flax params, e.g. `jax.eval_shape(model.init, key, x)["params"]`) decides names and
layouts by matching instead: leaf names pick the layout (`embedding` keeps torch's layout,
`kernel` takes whichever of the layouts above gives the template's shape), torch's `blocks.0`
matches Flax's `blocks_0`, a module whose name differs matches only if exactly one template
module fits its shapes, and modules the template does not mention follow the rules above (so a
template may cover only the modules those rules refuse). Flax -> torch without a recorded recipe
reverses the table; a Flax kernel with a 2-D bias (DenseGeneral) is refused, and so are leaves
that would become one torch key or module (`m/kernel` and `m/scale`; `a.b/*` and `a/b/*`).

NHWC models: torch flattens (C, H, W) before the first Linear after convolutions; transpose
NHWC activations to (C, H, W) before the reshape and the converted kernel works as is.
"""

from ._api import apply_to_torch as apply_to_torch
from ._api import convert as convert
from ._api import from_torch as from_torch
from ._api import to_torch as to_torch
from ._files import load as load
from ._files import save as save
from ._inspect import summarize as summarize
from ._torch import load_pruned_state_dict as load_pruned_state_dict

__all__ = [
    "apply_to_torch",
    "convert",
    "from_torch",
    "load",
    "load_pruned_state_dict",
    "save",
    "summarize",
    "to_torch",
]
