"""Kernel dispatch as an object: which path and engine run a product, on one thread or many.

``bitmix.kernels.dispatch`` is the one instance. Nothing is decided at import: the path is
chosen from the CPU's features at the first kernel call (or the first look at
``dispatch.path``), unless ``BITMIX_KERNEL_PATH`` forces one. ``dispatch.use(...)`` overrides
settings for a ``with`` block; the override lives in a context variable, so it applies to the
calling thread only and other threads keep their own. ``dispatch.configure(...)`` changes the
process-wide defaults. This module imports no Numba.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bitmix.errors import BitmixError
from bitmix.kernels import cpu
from bitmix.kernels.pack import PackedWeight

AMX_MIN_M = 16  # fewer activation rows than a tile holds: the vpdpbusd micro-kernels win
AMX_MIN_MACS = 1 << 20  # below ~1-2 M MACs the engine's fixed cost loses to them (measured 16-256 x 32-4096)
# A lowered linear on avx512amx: the engine takes it from the fused vpdpbusd linear only from these sizes. Through
# quant.qlinear's separate passes it lost below 64 rows and 2^26 MACs; fused (``linear_amx``: quantize, tile GEMM
# and epilogue in one call) it wins from 16 rows. Sapphire Rapids class, 2 threads, 2026-12-07, vpdpbusd / AMX
# time: 16x384x1536 1.19-1.36x, 32x384x384 1.05-1.08x, 33x64x80 1.00-1.13x, 64x384x384 1.02-1.24x, 64x384x1536
# 1.34-1.82x, 128x768x768 1.86-1.97x, 256x1024x1024 1.78-2.13x; 8x384x384 0.83-1.03x.
AMX_FUSED_MIN_M = 16
AMX_FUSED_MIN_MACS = AMX_MIN_MACS
# A stride-1 conv with whole tile rows of channels on avx512amx (``conv_amx``, on its padded codes) against the
# vpdpbusd implicit GEMM, same machine and day, AMX / vpdpbusd speed in the model: resnet50's 3x3 convs
# 1.29-1.86x, its 1x1 convs 0.90-1.24x, MobileNetV2's 1x1 convs of 7.5-20 M MACs 1.12-1.36x and of 2.4-4.8 M MACs
# (14x14 -> 64 channels) 0.84-0.92x: so from 6 M MACs.
AMX_CONV_MIN_MACS = 6 << 20


@dataclass(frozen=True)
class DispatchSettings:
    """How products run.

    ``path``: the SIMD path (``cpu.PATHS``). ``serial``: True runs every product on one thread,
    False always on the parallel drivers, None chooses by size against the measured cost of a
    parallel launch. ``amx_min_m``/``amx_min_macs``: the smallest product (rows, MACs) the AMX
    tile engine takes on ``avx512amx``; ``amx_conv_min_macs``: the smallest conv it takes (``conv_amx``);
    ``amx_fused_min_m``/``amx_fused_min_macs``: the smallest it takes
    from a lowered linear, whose alternative is the fused vpdpbusd kernel. ``torch_one_thread``: while a
    compiled model runs, torch's own ops use one thread of the calling thread
    (``bitmix.compiler.lower.torch_on_one_thread``).
    """

    path: str
    serial: bool | None = None
    amx_min_m: int = AMX_MIN_M
    amx_min_macs: int = AMX_MIN_MACS
    torch_one_thread: bool = True
    amx_fused_min_m: int = AMX_FUSED_MIN_M
    amx_fused_min_macs: int = AMX_FUSED_MIN_MACS
    amx_conv_min_macs: int = AMX_CONV_MIN_MACS

    def uses_amx(self, w: PackedWeight, m: int, groups: int) -> bool:
        """Whether a product runs on the AMX tile engine (its path, enough rows, one group)."""
        return (self.path == "avx512amx" and groups == 1 and m >= self.amx_min_m
                and m * w.n * w.k >= self.amx_min_macs)

    def engine(self, w: PackedWeight, m: int, groups: int, fused: bool = False) -> str:
        """What runs a product: ``amx``, or the vpdpbusd/vpmaddubsw/scalar kernels of the path; ``fused``: a
        product that has the fused vpdpbusd linear as its alternative (``amx_fused_min_*``)."""
        if self.uses_amx(w, m, groups) and (not fused or (m >= self.amx_fused_min_m
                                                          and m * w.n * w.k >= self.amx_fused_min_macs)):
            return "amx"
        return "avx512vnni" if self.path == "avx512amx" else self.path


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP  # "leave this setting as it is" where None is a meaningful value


def _changed(base: DispatchSettings, path: str | None, serial: bool | None | _Keep, amx_min_m: int | None,
             amx_min_macs: int | None, torch_one_thread: bool | None, amx_fused_min_m: int | None = None,
             amx_fused_min_macs: int | None = None, amx_conv_min_macs: int | None = None) -> DispatchSettings:
    """``base`` with the given fields replaced, each validated (one-line ``BitmixError``)."""
    changes: dict[str, object] = {}
    if path is not None:
        changes["path"] = cpu.check_path(path)
    if serial is not KEEP:
        if serial not in (True, False, None):
            raise BitmixError(f"serial={serial!r}: expected True (one thread), False (parallel) or None (by size)")
        changes["serial"] = serial
    for name, value in (("amx_min_m", amx_min_m), ("amx_min_macs", amx_min_macs),
                        ("amx_fused_min_m", amx_fused_min_m), ("amx_fused_min_macs", amx_fused_min_macs),
                        ("amx_conv_min_macs", amx_conv_min_macs)):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BitmixError(f"{name}={value!r}: expected a non-negative int")
            changes[name] = value
    if torch_one_thread is not None:
        if not isinstance(torch_one_thread, bool):
            raise BitmixError(f"torch_one_thread={torch_one_thread!r}: expected a bool")
        changes["torch_one_thread"] = torch_one_thread
    return dataclasses.replace(base, **changes)


class KernelDispatch:
    """Process-wide defaults chosen lazily, plus per-context overrides (module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._defaults: DispatchSettings | None = None
        self._override: contextvars.ContextVar[DispatchSettings | None] = contextvars.ContextVar(
            "bitmix_kernel_dispatch", default=None)

    @property
    def settings(self) -> DispatchSettings:
        """The settings in force here: an active ``use`` block's, else the defaults."""
        current = self._override.get()
        if current is not None:
            return current
        return self._defaults if self._defaults is not None else self._default_settings()

    def _default_settings(self) -> DispatchSettings:
        with self._lock:
            if self._defaults is None:
                self._defaults = DispatchSettings(path=cpu.select_path())
            return self._defaults

    @property
    def path(self) -> str:
        """The SIMD path kernels run on here (chosen on first use)."""
        return self.settings.path

    @staticmethod
    def available_paths() -> tuple[str, ...]:
        """Paths this CPU can execute, slowest first."""
        return cpu.available_paths()

    def configure(self, path: str | None = None, *, serial: bool | None | _Keep = KEEP, amx_min_m: int | None = None,
                  amx_min_macs: int | None = None, torch_one_thread: bool | None = None,
                  amx_fused_min_m: int | None = None, amx_fused_min_macs: int | None = None,
                  amx_conv_min_macs: int | None = None) -> DispatchSettings:
        """Change the process-wide defaults (fields of ``DispatchSettings``); returns the new defaults."""
        base = self._default_settings()
        with self._lock:
            self._defaults = _changed(base, path, serial, amx_min_m, amx_min_macs, torch_one_thread,
                                      amx_fused_min_m, amx_fused_min_macs, amx_conv_min_macs)
            return self._defaults

    @contextmanager
    def use(self, path: str | None = None, *, serial: bool | None | _Keep = KEEP, amx_min_m: int | None = None,
            amx_min_macs: int | None = None, torch_one_thread: bool | None = None, amx_fused_min_m: int | None = None,
            amx_fused_min_macs: int | None = None, amx_conv_min_macs: int | None = None
            ) -> Iterator[DispatchSettings]:
        """Run the block with these settings in the calling thread, e.g. ``use("avx2", serial=True)``;
        the previous settings come back on exit, also on error."""
        settings = _changed(self.settings, path, serial, amx_min_m, amx_min_macs, torch_one_thread,
                            amx_fused_min_m, amx_fused_min_macs, amx_conv_min_macs)
        token = self._override.set(settings)
        try:
            yield settings
        finally:
            self._override.reset(token)

    def __repr__(self) -> str:
        return f"KernelDispatch({self.settings})"


dispatch = KernelDispatch()
