"""The longest reductions (K) the integer kernels take, in plain Python: the compiler leaves a longer layer in
FP32 at capture, without loading Numba, instead of failing in a kernel at its first call.

Every s32 lane of the packed-weight kernels stays below 2^31 while a weight row, padded to whole blocks
(``pack.pack_weights``), is at most ``MAX_K_PAD`` codes: 65536 * 255 * 128 < 2^31. ``batched.bmm`` sums
products of two activation codes (at most 255 each) in int32: exact up to ``MAX_BMM_K`` terms.
"""

from __future__ import annotations

from bitmix.kernels.pack import SUPPORTED_BITS, codes_per_block

MAX_K_PAD = 65536
MAX_BMM_K = (2**31 - 1) // (255 * 255)


def max_weight_k() -> int:
    """The longest weight row (K) that pads (to a multiple of its width's block) within ``MAX_K_PAD`` at every
    weight width."""
    return min(MAX_K_PAD // codes_per_block(bits) * codes_per_block(bits) for bits in SUPPORTED_BITS)
