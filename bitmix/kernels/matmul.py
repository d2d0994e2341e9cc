"""``gemm``: exact int32 ``a_codes (M, K) @ codes(w).T`` on bit-packed 2/4/8-bit weights, and the input checks
the other kernel entries share.

The entry validates, shifts activations to the signed bytes the engines read (``_prep_rows``:
range, row sums and the copy in one pass) and hands the product to ``launch.run_core``, which
runs it on the engine ``dispatch`` chooses: the tiled SIMD driver (``tiling``, over the
micro-kernels in ``isa``) or the AMX tile engine (``amx``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bitmix.errors import BitmixError
from bitmix.kernels import simd
from bitmix.kernels.launch import activation_layout, run_core
from bitmix.kernels.limits import MAX_K_PAD
from bitmix.kernels.pack import SUPPORTED_BITS, PackedWeight, code_range, codes_per_block
from bitmix.kernels.routing import dispatch


def _prep_rows_py(a, shift, kp, a8, asum, mins, maxs, write, need_sum):
    """Shift activations to signed bytes in the padded (mp, kp) buffer, with row range and (for the
    vpdpbusd kernels, ``need_sum``) row sums; the AMX engine corrects with weight sums only.

    Separate plain loops in narrow types so LLVM vectorises each. The int32 sum may wrap
    only for out-of-range input, which the min/max (kept in the input dtype, reported as
    float64 so huge uint64 values stay out of range) rejects before any kernel runs.
    """
    m, k = a.shape
    sh = np.int32(shift)
    for i in prange(m):
        row = a[i]
        lo = row[0]
        for j in range(k):
            lo = min(lo, row[j])
        hi = row[0]
        for j in range(k):
            hi = max(hi, row[j])
        if need_sum:
            s = np.int32(0)
            for j in range(k):
                s += np.int32(row[j])
            asum[i] = np.int64(s) - shift * k
        mins[i] = np.float64(lo)
        maxs[i] = np.float64(hi)
        if write:
            dst = a8[i * kp : i * kp + k]
            for j in range(k):
                dst[j] = np.int32(row[j]) - sh


@njit(cache=True)
def _flat_range(x):
    """(min, max) of a 1-D int8 array, one vectorised loop each (3136x64: 3 us vs 27 us row by row)."""
    lo = x[0]
    for v in x:
        lo = min(lo, v)
    hi = x[0]
    for v in x:
        hi = max(hi, v)
    return np.float64(lo), np.float64(hi)


# A parallel launch costs 2-150 us depending on the threading layer (see threads): small inputs are prepared serially.
PREP_SERIAL_MAX = 1 << 18
_prep_rows = njit(parallel=True, cache=True)(simd.cache_variant(_prep_rows_py, "parallel"))
_prep_rows_serial = njit(cache=True)(simd.cache_variant(_prep_rows_py, "serial"))


def check_activation_spec(a_bits: int, a_signed: bool) -> tuple[int, int, int]:
    """Validate (a_bits, a_signed); return (lo, hi, shift to signed bytes)."""
    if a_bits not in SUPPORTED_BITS:
        raise BitmixError(f"a_bits={a_bits!r}: supported widths are 2, 4 and 8")
    if not isinstance(a_signed, bool | np.bool_):
        raise BitmixError(f"a_signed={a_signed!r}: expected a bool")
    lo, hi = code_range(a_bits, bool(a_signed))
    return lo, hi, 128 if (a_bits == 8 and not a_signed) else 0


def check_packed(w: object, name: str = "w") -> PackedWeight:
    """Reject anything that is not a well-formed ``PackedWeight``."""
    if not isinstance(w, PackedWeight):
        raise BitmixError(f"{name}: expected a PackedWeight from bitmix.kernels.pack_weights, got {type(w).__name__}")
    if w.bits not in SUPPORTED_BITS or w.k_pad % codes_per_block(w.bits) or w.k_pad > MAX_K_PAD:
        raise BitmixError(f"{name}: unsupported layout (bits={w.bits}, k_pad={w.k_pad}; k_pad must be <= {MAX_K_PAD})")
    row_bytes = w.k_pad * w.bits // 8
    if (
        not isinstance(w.data, np.ndarray)
        or w.data.dtype != np.uint8
        or w.data.shape != (w.n, row_bytes)
        or not w.data.flags.c_contiguous
        or w.row_sums.shape != (w.n,)
        or w.row_sums.dtype != np.int32
    ):
        raise BitmixError(f"{name}: corrupted PackedWeight (data must be C-contiguous uint8 {(w.n, row_bytes)})")
    return w


def check_range(lo_seen: float, hi_seen: float, lo: int, hi: int, a_bits: int, a_signed: bool) -> None:
    """Raise naming ``a_codes`` when observed codes leave the declared range."""
    if lo_seen < lo or hi_seen > hi:
        kind = "signed" if a_signed else "unsigned"
        want = f"{kind} {a_bits}-bit codes must lie in [{lo}, {hi}]"
        raise BitmixError(f"a_codes: values span [{lo_seen:.0f}, {hi_seen:.0f}] but {want}")


def gemm(a_codes: np.ndarray, w: PackedWeight, a_bits: int, a_signed: bool) -> np.ndarray:
    """Exact int32 ``a_codes (M, K) @ codes(w).T`` -> (M, N)."""
    w = check_packed(w)
    lo, hi, shift = check_activation_spec(a_bits, a_signed)
    if not isinstance(a_codes, np.ndarray) or a_codes.dtype.kind not in "iu":
        raise BitmixError(f"a_codes: expected an integer numpy array, got {getattr(a_codes, 'dtype', type(a_codes))}")
    if a_codes.ndim != 2 or a_codes.shape[1] != w.k or a_codes.shape[0] < 1:
        want = f"expected (M>=1, {w.k}) for weights with N={w.n}, K={w.k}"
        raise BitmixError(f"a_codes: shape {a_codes.shape} does not match; {want}")
    m = a_codes.shape[0]
    settings = dispatch.settings
    mp, kp = activation_layout(w, m, 1, settings)
    on_amx = settings.uses_amx(w, m, 1)
    a = np.ascontiguousarray(a_codes)
    direct = a.dtype == np.int8 and shift == 0 and w.k == kp and mp == m
    a8 = a.reshape(-1) if direct else (np.empty if on_amx else np.zeros)(mp * kp, dtype=np.int8)
    asum = np.zeros(mp, dtype=np.int64)
    if direct and on_amx:  # nothing to copy or sum: only the range check remains
        lo_seen, hi_seen = _flat_range(a8)
    else:
        mins = np.empty(m, dtype=np.float64)
        maxs = np.empty(m, dtype=np.float64)
        prep = _prep_rows_serial if m * w.k <= PREP_SERIAL_MAX else _prep_rows
        prep(a, shift, kp, a8, asum, mins, maxs, not direct, not on_amx)
        lo_seen, hi_seen = mins.min(), maxs.max()
    check_range(float(lo_seen), float(hi_seen), lo, hi, a_bits, a_signed)
    out = np.empty((m, w.n), dtype=np.int32)
    run_core(a8, asum, w, shift, 1, m, mp, out, settings=settings)
    return out
