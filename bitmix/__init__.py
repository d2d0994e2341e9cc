"""bitmix: choose 2/4/8-bit precision per layer, price it on a NorthPole-style chip, run it on packed kernels.

Public surface: `compile`, `load` (a model written by `cm.save`), `Target`, `targets`, `load_report`, `capture`.
"""

from bitmix.compiler.capture import capture
from bitmix.compiler.pipeline import CompiledModel, FinetuneConfig, compile
from bitmix.compiler.saving import load
from bitmix.errors import BitmixError
from bitmix.ir.targets import TARGETS as targets
from bitmix.ir.targets import Target
from bitmix.report import Report, load_report

__all__ = [
    "BitmixError", "CompiledModel", "FinetuneConfig", "Report", "Target",
    "capture", "compile", "load", "load_report", "targets",
]
__version__ = "0.1.0"
