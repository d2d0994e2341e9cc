"""Per-ISA micro-kernels, registered by dispatch path.

Each module here builds, per weight width, the three micro-kernels the tiled driver
(``tiling``) calls on the packed layout (``pack``):

* ``dot1x1(w, wo, a, ao, nblk)`` -- one weight row against one activation row;
* ``dot1x4(w, wo0..wo3, a, ao, nblk, pf)`` -- four weight rows against one activation row (GEMV),
  software-prefetching weights at byte ``pf`` when ``pf >= 0``;
* ``dot4x2(w, wo0, wo1, a, ao0..ao3, nblk)`` -- two weight rows against four activation rows, so each
  weight block is unpacked once for four rows (GEMM);

each returning ``dot(u, a8)`` of the stored unsigned weights ``u`` and the signed activation bytes,
plus ``wcorr``, a multiple of the weight row sums the kernel leaves in its result (the driver
subtracts ``wcorr * row_sums``). A module exposes ``micro_kernels(bits) -> ((dot1x1, dot1x4, dot4x2),
wcorr)``. A new ISA is one module plus its line in ``KERNELS``; modules load on first use.
"""

from __future__ import annotations

import functools
import importlib

KERNELS = {  # dispatch path -> module whose micro-kernels it runs (AMX's small products run VNNI's)
    "portable": "bitmix.kernels.isa.portable",
    "avx2": "bitmix.kernels.isa.avx2",
    "avx512vnni": "bitmix.kernels.isa.avx512vnni",
    "avx512amx": "bitmix.kernels.isa.avx512vnni",
}


@functools.cache
def isa_of(path: str) -> str:
    """The micro-kernel set a dispatch path runs (its module's short name)."""
    return KERNELS[path].rsplit(".", 1)[1]


def micro_kernels(path: str, bits: int) -> tuple[tuple, int]:
    """``((dot1x1, dot1x4, dot4x2), wcorr)`` for one (path, weight bits); built once per process."""
    return importlib.import_module(KERNELS[path]).micro_kernels(bits)
