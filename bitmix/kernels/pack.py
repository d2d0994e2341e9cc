"""Bit-packed weight layout shared by every kernel path.

Codes are signed ``b``-bit integers in ``[-2^(b-1), 2^(b-1)-1]``. Each row of ``K`` codes is
zero-padded to ``k_pad`` (a multiple of the block) and stored as 32-byte blocks:

* ``bits=4``: stored unsigned ``u = code + 8`` (0..15); a block holds 64 codes, byte ``j``
  = ``u[j] | u[j+32] << 4`` ("planar nibbles").
* ``bits=2``: ``u = code + 2`` (0..3); a block holds 128 codes, byte ``j`` =
  ``u[j] | u[j+32] << 2 | u[j+64] << 4 | u[j+96] << 6``.
* ``bits=8``: the signed codes themselves (offset 0); a block holds 32 codes.

Why: one 32-byte load plus ``(v >> bits*p) & mask`` yields 32 consecutive codes (bit-plane
``p``) as unsigned bytes, which is the unsigned operand ``vpmaddubsw``/``vpdpbusd`` want,
with the matching 32 activations contiguous in memory. The offset is removed afterwards
with ``- offset * sum(a)``; ``row_sums`` (sum of codes per row) lets kernels shift
activations by a constant (unsigned 8-bit activations become signed bytes) and correct
with ``+ shift * row_sums``. Padding stores code 0, so pad lanes contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitmix.errors import BitmixError
from bitmix.kernels.scratch import aligned_copy

BLOCK_BYTES = 32
SUPPORTED_BITS = (2, 4, 8)


def codes_per_block(bits: int) -> int:
    """Codes held by one 32-byte block at this width."""
    return BLOCK_BYTES * 8 // bits


def code_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """Inclusive code range of a ``bits``-bit integer."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """Weights of one layer packed for the kernels (layout in the module docstring).

    ``data`` is ``(n, k_pad * bits // 8)`` uint8; ``row_sums`` is the int32 sum of each
    row's codes.
    """

    data: np.ndarray
    bits: int
    n: int
    k: int
    k_pad: int
    offset: int
    row_sums: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams (packed codes only)."""
        return int(self.data.nbytes)


def _check_bits(bits: int, name: str = "bits") -> None:
    if bits not in SUPPORTED_BITS:
        raise BitmixError(f"{name}={bits!r}: supported widths are 2, 4 and 8")


def pack_weights(codes: np.ndarray, bits: int) -> PackedWeight:
    """Pack an (N, K) integer array of signed ``bits``-bit codes."""
    _check_bits(bits)
    if not isinstance(codes, np.ndarray) or codes.ndim != 2 or codes.dtype.kind not in "iu":
        raise BitmixError("codes: expected a 2-D integer numpy array (N, K)")
    n, k = codes.shape
    if n < 1 or k < 1:
        raise BitmixError(f"codes: empty shape {codes.shape}")
    lo, hi = code_range(bits)
    if int(codes.min()) < lo or int(codes.max()) > hi:
        raise BitmixError(f"codes: values must lie in [{lo}, {hi}] for {bits}-bit weights")
    cpb = codes_per_block(bits)
    k_pad = -(-k // cpb) * cpb
    offset = 0 if bits == 8 else 1 << (bits - 1)
    u = np.full((n, k_pad), offset, dtype=np.uint8)
    # in the codes' own dtype (in range, so code + offset <= 15 fits any integer type), no wide temporary: a
    # 8192 x 8192 layer took 11 s and ~10 bytes of copies per weight through int64
    np.add(codes, offset, out=u[:, :k], casting="unsafe")
    if bits == 8:
        data = u
    else:
        planes = 8 // bits
        blocks = u.reshape(n, k_pad // cpb, planes, BLOCK_BYTES)
        data = np.zeros((n, k_pad // cpb, BLOCK_BYTES), dtype=np.uint8)
        for p in range(planes):
            data |= blocks[:, :, p, :] << np.uint8(bits * p)
        data = data.reshape(n, -1)
    row_sums = codes.sum(axis=1, dtype=np.int64).astype(np.int32)
    return PackedWeight(aligned_copy(data), bits, n, k, k_pad, offset, row_sums)


def unpack_weights(p: PackedWeight) -> np.ndarray:
    """Inverse of ``pack_weights``: the (N, K) int8 codes."""
    if p.bits == 8:
        return p.data[:, : p.k].view(np.int8).copy()
    planes = 8 // p.bits
    mask = np.uint8((1 << p.bits) - 1)
    blocks = p.data.reshape(p.n, -1, 1, BLOCK_BYTES)
    shifts = (np.arange(planes, dtype=np.uint8) * np.uint8(p.bits)).reshape(1, 1, planes, 1)
    u = (blocks >> shifts) & mask
    codes = u.reshape(p.n, p.k_pad)[:, : p.k].astype(np.int16) - p.offset
    return codes.astype(np.int8)
