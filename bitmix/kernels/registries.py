"""Numba kept clear of ``torch.export``'s patched builtins: registries loaded first, compiles held off.

Non-strict ``torch.export`` replaces ``math.pow``, ``min`` and ``max`` process-wide while it traces
(``torch/_export/non_strict_utils.py``). Numba fills its registries on its first compile, and its math typing
(``numba/core/typing/mathdecl.py``) checks that ``math.pow`` is the module's own: a first kernel call in one
thread while another thread exports broke Numba for the rest of the process ("module
'torch._export.non_strict_utils' has no attribute '<lambda>'"). Loading them costs ~0.2 s once. A compile of a
signature not in the cache types ``min`` as the patched ``functools.partial`` (TypingError), so exports hold
Numba's compiler lock: another thread's compile waits for the export to end.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator


@functools.cache
def load_numba_registries() -> None:
    """Fill Numba's CPU typing and target registries now (idempotent)."""
    from numba.core.registry import cpu_target

    cpu_target.typing_context.refresh()
    cpu_target.target_context.refresh()


@contextlib.contextmanager
def numba_compiles_held() -> Iterator[None]:
    """Registries loaded, and no Numba compile in another thread until the block ends (the lock is re-entrant:
    this thread may still compile)."""
    from numba.core.compiler_lock import global_compiler_lock

    load_numba_registries()
    with global_compiler_lock:
        yield
