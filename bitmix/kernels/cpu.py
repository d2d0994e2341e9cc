"""Which kernel paths this CPU can run (no Numba: the dispatch object asks here before any kernel loads).

Paths, slowest first:

* ``portable`` -- plain Numba loops, any CPU.
* ``avx2`` -- ``vpmaddubsw`` (u8 x s8 -> s16 pairs) + ``vpmaddwd`` (-> s32).
* ``avx512vnni`` -- needs avx512f/bw/vl + avx512vnni; ``vpdpbusd`` on zmm (u8 x s8 -> s32).
* ``avx512amx`` -- the ``avx512vnni`` kernels, plus the AMX tile engine (``amx``) for
  products with many activation rows; needs amx-tile/amx-int8 and the kernel's permission.

CPU features come from ``NUMBA_CPU_FEATURES`` when set (that is what Numba compiles for),
else from LLVM's host query. ``BITMIX_KERNEL_PATH`` forces a path; forcing one the CPU
cannot run raises ``BitmixError`` instead of dying on SIGILL later.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

from bitmix.errors import BitmixError

PATHS = ("portable", "avx2", "avx512vnni", "avx512amx")
_NEEDS = {
    "portable": frozenset(),
    "avx2": frozenset({"avx2"}),
    "avx512vnni": frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}),
    "avx512amx": frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "amx-tile", "amx-int8"}),
}
_ARCH_REQ_XCOMP_PERM = 0x1023  # Linux arch_prctl: request an extended-state component
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86_64 syscall number
ENV_VAR = "BITMIX_KERNEL_PATH"


@functools.cache
def amx_permitted() -> bool:
    """Ask Linux for the AMX tile state (off until requested, else tile instructions are SIGILL)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def cpu_features() -> frozenset[str]:
    """Features Numba will compile for: ``NUMBA_CPU_FEATURES`` if set, else the host's."""
    forced = os.environ.get("NUMBA_CPU_FEATURES")
    if forced:
        return frozenset(f[1:] for f in forced.split(",") if f.startswith("+"))
    import llvmlite.binding as llvm  # loads LLVM: only when a path is first chosen

    return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)


def available_paths(features: frozenset[str] | None = None) -> tuple[str, ...]:
    """Paths this CPU can execute, slowest first."""
    feats = cpu_features() if features is None else features
    return tuple(p for p in PATHS if _NEEDS[p] <= feats and (p != "avx512amx" or amx_permitted()))


def check_path(path: object, source: str = "path", features: frozenset[str] | None = None) -> str:
    """``path`` normalised, if it names a path this CPU runs; else a one-line ``BitmixError`` naming ``source``."""
    name = path.strip().lower() if isinstance(path, str) else path
    if name not in PATHS:
        raise BitmixError(f"{source}={path!r}: expected one of {', '.join(PATHS)}")
    avail = available_paths(features)
    if name not in avail:
        feats = cpu_features() if features is None else features
        missing = ", ".join(sorted(_NEEDS[name] - feats)) or "the kernel's AMX permission"
        raise BitmixError(f"{source}={path!r}: this CPU lacks {missing}; it runs {', '.join(avail)}")
    return name


def select_path(features: frozenset[str] | None = None) -> str:
    """The fastest available path, or the one forced by ``BITMIX_KERNEL_PATH``."""
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        return check_path(forced, ENV_VAR, features)
    return available_paths(features)[-1]
