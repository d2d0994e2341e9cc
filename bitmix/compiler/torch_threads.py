"""Torch's own ops on one thread while the lowered layers' kernels run (``torch_on_one_thread``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from bitmix import kernels


class _TorchThreads:
    """Bookkeeping for ``torch_on_one_thread`` (see there): nesting per thread, windows across threads."""

    lock = threading.Lock()
    open_windows = 0  # threads currently inside one-thread mode
    base = 1  # torch's thread count seen by the first of them
    local = threading.local()  # .depth: 1 inside this thread's outermost block


@contextlib.contextmanager
def torch_on_one_thread(enabled: bool | None = None) -> Iterator[None]:
    """Run torch's own ops (ReLU, adds, pooling, ...) on one thread while lowered layers run.

    The kernels' TBB threads and torch's OpenMP pool share the cores, and after each torch
    op torch's threads spin waiting for the next one, taking CPU time from the kernel that
    follows. Measured on the 2-vCPU VM: resnet50 batch 1 49.8 -> 41.7 ms, digits-cnn batch 256
    11.8 -> 8.1 ms, mobilenetv2 125 -> 102 ms; resnet18 and minilm unchanged.

    On when ``enabled`` is True, or when None and ``kernels.dispatch.settings.torch_one_thread``
    (the default; ``kernels.dispatch.use(torch_one_thread=False)`` turns it off for a block).
    torch keeps a thread count per Python thread, copied from a process-wide value when a thread
    first runs a torch op, and ``torch.set_num_threads`` sets both; so the calling thread's count
    is restored on exit (the outermost block of nested ones), also on error. A thread that first
    touches torch while another is inside this block starts from 1: torch gives no way to set the
    process-wide value alone, which is why this is a switch. Threads entering while another's
    block is open and seeing 1 restore the count seen by the first of them.
    """
    state = _TorchThreads
    on = kernels.dispatch.settings.torch_one_thread if enabled is None else enabled
    if not on or getattr(state.local, "depth", 0):  # off, or an outer block of this thread holds the mode
        yield
        return
    with state.lock:
        own = torch.get_num_threads()
        if state.open_windows == 0:
            state.base = own
        restore = own if state.open_windows == 0 or own != 1 else state.base
        state.open_windows += 1
        if own != 1:
            torch.set_num_threads(1)
    state.local.depth = 1
    try:
        yield
    finally:
        state.local.depth = 0
        with state.lock:
            state.open_windows -= 1
            if torch.get_num_threads() != restore:
                torch.set_num_threads(restore)
