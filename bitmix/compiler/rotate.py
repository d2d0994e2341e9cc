"""Online randomized block Hadamard rotation of linear layers' inputs (the rule: `bitmix.ir.rotation`).

`hadamard` is the transform both the fake-quant layers and the lowered kernels run, as elementwise
float32 add/subtract butterflies (no matmul), so the two compute the same bits whatever the thread count.
`rotate_linears` folds `(W * s) H_b` into the weights of the layers the rule picks and attaches `s`
(`s = d / sqrt(b)`, so both sides of the product are rotated by the same orthonormal matrix).
"""

from __future__ import annotations

import math
import zlib

import torch

from bitmix.compiler.hadamard import hadamard
from bitmix.compiler.qlayer import QuantLayer
from bitmix.ir.precision import PrecisionLike, chip_precision
from bitmix.ir.rotation import rotation_block


def signs_for(name: str, k: int, block: int) -> torch.Tensor:
    """The fixed vector `d / sqrt(b)` (d = +-1) of layer `name`, seeded by the name so every compile draws the
    same. The 1/sqrt(b) makes `diag(d) H_b / sqrt(b)` orthonormal: the folded weights keep their scale, so
    fine-tuning's per-parameter steps (Adam's ~lr) mean what they did (with +-1 the weights shrank by
    sqrt(b) and MiniLM's 1-epoch recipe fell 3.7 pp below PTQ instead of gaining)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randint(0, 2, (k,), generator=gen) * 2 - 1).to(torch.float64).div(math.sqrt(block)).float()


@torch.no_grad()
def rotate_linears(layers: dict[str, QuantLayer], assignment: dict[str, PrecisionLike]) -> int:
    """Rotate, in place (float model, before any step is set), every layer the rule picks at its assigned
    precision. Returns how many were rotated."""
    rotated = 0
    for name, layer in layers.items():
        bits = assignment.get(name)
        if bits is None or layer.weight is None or layer.rotation_signs is not None:
            continue
        k = layer.weight.shape[-1]
        block = rotation_block(layer.kind, k, chip_precision(bits, f"layer {name!r}: precision"), layer.a_nonneg)
        if block is None:
            continue
        signs = signs_for(name, k, block)
        folded = hadamard(layer.weight.double() * signs.double(), block)
        layer.weight.copy_(folded.to(layer.weight.dtype))
        layer.rotation_signs = signs
        rotated += 1
    return rotated
