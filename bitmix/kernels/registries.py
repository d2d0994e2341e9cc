"""Numba's typing and lowering registries, loaded before bitmix runs ``torch.export``.

Non-strict ``torch.export`` replaces ``math.pow`` process-wide while it traces
(``torch/_export/non_strict_utils.py``). Numba fills its registries on its first compile, and its math typing
(``numba/core/typing/mathdecl.py``) checks that ``math.pow`` is the module's own: a first kernel call in one
thread while another thread exports broke Numba for the rest of the process ("module
'torch._export.non_strict_utils' has no attribute '<lambda>'"). Loading them costs ~0.2 s once.
"""

from __future__ import annotations

import functools


@functools.cache
def load_numba_registries() -> None:
    """Fill Numba's CPU typing and target registries now (idempotent)."""
    from numba.core.registry import cpu_target

    cpu_target.typing_context.refresh()
    cpu_target.target_context.refresh()
