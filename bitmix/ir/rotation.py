"""Which layers read their input through an online Hadamard rotation, and over what block.

At 4-bit and narrower activations a transformer's hidden states carry per-channel outliers that one
per-tensor step cannot serve. Rotating a linear layer's input by a randomized block Hadamard transform,
`x -> (x * s) H_b` (s = d / sqrt(b), d a fixed +-1 vector, H_b the block-diagonal Walsh-Hadamard matrix of
b x b blocks), with `W -> (W * s) H_b` folded into the weight, keeps the float function (H_b H_b^T = b I) and spreads
each outlier over b channels (QuaRot, Ashkboos et al. 2024, arXiv 2404.00456). MiniLM with every free
linear at 4/4, PTQ: 66.5 % cosine to FP32 without, 92.3 % with (docs/quality.md). A post-LN encoder has
no LayerNorm the rotation could be folded into, so it is run-time work: one sign flip and log2(b)
add/subtract butterflies per input element, priced by the simulator as vector-unit operations of the
layer and run by the kernels' host code before the activations are quantized.

The rule depends only on the layer and its precision, so the allocator's costs know it before any
data is seen: linears whose activations are at most MAX_ACTIVATION_BITS wide or whose precision asks
for the rotation ("4/8r": beside 8-bit activations it serves the narrow weights, spreading each row's
large entries over the block, QuIP's incoherence processing, arXiv 2307.13304), whose input the graph
does not prove non-negative, and whose input width has a power-of-two factor of at least MIN_BLOCK
(b = the largest such factor).
"""

from __future__ import annotations

from bitmix.ir.precision import Precision

MAX_ACTIVATION_BITS = 4
MIN_BLOCK = 16  # below this the transform spreads an outlier over too few channels to matter


def rotation_block(kind: str, in_features: int, bits: Precision, input_nonneg: bool = False) -> int | None:
    """The Hadamard block size of a `kind` layer with `in_features` inputs at `bits`, or None (no rotation).

    An input the graph proves non-negative (after ReLU, softmax) keeps its unsigned quantizer instead: a
    rotation would make it signed, costing one of its few levels, and such inputs carry no sign-symmetric
    outliers to spread (digits-mlp with its post-ReLU fc2 at 2/2: 97.5 % top-1 rotated vs 97.8 % not, and
    96.4 % rotated after 2 epochs of fine-tuning)."""
    if kind != "linear" or (bits.a > MAX_ACTIVATION_BITS and not bits.rotated) or in_features <= 0 or input_nonneg:
        return None
    block = in_features & -in_features
    return block if block >= MIN_BLOCK else None


def rotation_ops_per_element(block: int) -> int:
    """Vector operations per input element: the sign flip and one add or subtract per butterfly stage."""
    return 1 + block.bit_length() - 1
