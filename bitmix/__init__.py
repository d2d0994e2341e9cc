"""bitmix: choose 2/4/8-bit precision per layer, price it on a NorthPole-style chip, run it on packed kernels.

Public surface: `compile`, `Target`, `targets`, `load_report`, `capture`.
"""

from bitmix.compiler.capture import capture
from bitmix.compiler.targets import TARGETS as targets
from bitmix.compiler.targets import Target
from bitmix.errors import BitmixError

__all__ = ["BitmixError", "Target", "capture", "targets"]
__version__ = "0.1.0"
