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
_ARCH_GET_XCOMP_PERM = 0x1022  # Linux arch_prctl: the extended-state components this process may use
_ARCH_REQ_XCOMP_PERM = 0x1023  # Linux arch_prctl: request an extended-state component
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86_64 syscall number
_SYS_SECCOMP = 317
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


def amx_granted() -> bool:
    """Whether some code in this process already holds the AMX tile state (granted once, it stays)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    mask = ctypes.c_uint64(0)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        return False
    return bool(mask.value >> _XFEATURE_XTILEDATA & 1)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _refuse_amx_program() -> list[tuple[int, int, int, int]]:
    """Classic BPF over ``struct seccomp_data`` (nr at 0, arch at 4, args[0] at 16): ``arch_prctl(ARCH_REQ_XCOMP_PERM,
    ..)`` on x86_64 fails with EPERM, every other call is allowed (linux/seccomp.h, linux/filter.h)."""
    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    audit_arch_x86_64, allow, eperm = 0xC000003E, 0x7FFF0000, 0x00050000 | 1
    return [
        (ld_abs, 0, 0, 4),
        (jeq, 0, 5, audit_arch_x86_64),
        (ld_abs, 0, 0, 0),
        (jeq, 0, 3, _SYS_ARCH_PRCTL),
        (ld_abs, 0, 0, 16),
        (jeq, 0, 1, _ARCH_REQ_XCOMP_PERM),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]


def deny_amx() -> None:
    """Make this process a CPU without AMX: every later request for the tile state -- bitmix's, oneDNN's in torch,
    MLAS's in ONNX Runtime -- fails as on a CPU that lacks it, so each library takes its AVX-512 code and
    ``avx512vnni`` becomes bitmix's fastest path. A seccomp filter on all threads; it cannot be lifted, and it cannot
    take back a grant already made, so call it before anything runs."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise BitmixError("denying AMX needs Linux on x86_64; this machine has no AMX to deny")
    if amx_granted():
        raise BitmixError("AMX is already in use in this process; deny it before any kernel or baseline runs "
                          "(in a fresh process)")
    libc = ctypes.CDLL(None, use_errno=True)
    code = _refuse_amx_program()
    filters = (_SockFilter * len(code))(*code)
    prog = _SockFprog(len(code), filters)
    pr_set_no_new_privs, seccomp_set_mode_filter, seccomp_filter_flag_tsync = 38, 1, 1
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or libc.syscall(
            _SYS_SECCOMP, seccomp_set_mode_filter, seccomp_filter_flag_tsync, ctypes.byref(prog)) != 0:
        raise BitmixError(f"could not deny AMX (seccomp: {os.strerror(ctypes.get_errno())}); run without --no-amx")
    amx_permitted.cache_clear()


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
