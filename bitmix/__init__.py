"""bitmix: choose 2/4/8-bit precision per layer, price it on a NorthPole-style chip, run it on packed kernels.

Public surface: `compile` (with `Budget`, `Data`, `TaskData` / `Split`, `CompileOptions` and a method's
config), `Target`, `targets`, `load_report` / `save_report` / `print_report`, `capture`, `load` (a model written
by `cm.save`).
"""

from bitmix.budget import Budget
from bitmix.compiler.capture import capture
from bitmix.compiler.pipeline import CompiledModel, CompileOptions, compile
from bitmix.compiler.saving import load
from bitmix.compiler.sensitivity import ALPSConfig, EAGLConfig, HAWQConfig, LIMPQConfig, MethodConfig, SQNRConfig
from bitmix.errors import BitmixError
from bitmix.ir.targets import TARGETS as targets
from bitmix.ir.targets import Target
from bitmix.report import Report, load_report, print_report, save_report
from bitmix.task import Data, FinetuneConfig, Split, TaskData

__all__ = [
    "ALPSConfig", "BitmixError", "Budget", "CompileOptions", "CompiledModel", "Data", "EAGLConfig",
    "FinetuneConfig", "HAWQConfig", "LIMPQConfig", "MethodConfig", "Report", "SQNRConfig", "Split", "TaskData",
    "Target", "capture", "compile", "load", "load_report", "print_report", "save_report", "targets",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`bitmix.zoo` (reference models and data sets) on first use, so `import bitmix` does not load it."""
    if name == "zoo":
        import importlib

        return importlib.import_module("bitmix.zoo")
    raise AttributeError(f"module 'bitmix' has no attribute {name!r}")
