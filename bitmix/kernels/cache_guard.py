"""Drop Numba's cached kernels when any kernel source changed since they were written.

Numba keys a cached kernel by its own source file's time stamp only. A kernel that calls kernels of
another file (the fused linears call ``gemm_vnni``'s GEMM; every core inlines ``broadcast``'s pixel
walk) carries its own compiled copy of them, so after a change to the callee's file (a ``git pull``,
an edit) it kept running the old callee: measured here, the per-tensor fused linear kept a GEMM
epilogue from three edits before, 40 % slower than the current one. This digest of every kernel
source makes such a change drop the whole cache once (the next calls compile afresh).
Imports no Numba; runs when ``bitmix.kernels`` is imported, before any kernel loads from the cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).parent
STAMP = "bitmix-kernels.digest"


def source_digest(root: Path = ROOT) -> str:
    """SHA-1 of every ``.py`` file under ``root`` (relative paths and contents, in path order)."""
    h = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def drop_stale(root: Path = ROOT) -> int:
    """Delete the cached kernels under ``root``'s ``__pycache__`` folders if the sources' digest differs
    from the one stamped there; returns how many files went. Skipped where the cache lives elsewhere
    (``NUMBA_CACHE_DIR``) or the folder cannot be written (a read-only install)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return 0
    stamp = root / "__pycache__" / STAMP
    try:
        digest = source_digest(root)
        if stamp.is_file() and stamp.read_text() == digest:
            return 0
        dropped = 0
        for cached in [*root.rglob("__pycache__/*.nbi"), *root.rglob("__pycache__/*.nbc")]:
            cached.unlink(missing_ok=True)
            dropped += 1
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        return 0
    return dropped
