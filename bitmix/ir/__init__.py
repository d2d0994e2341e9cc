"""The ground floor: data types every stage shares (layers, graphs, targets, costs).

Nothing here imports another bitmix package except `bitmix.errors`.
"""

from bitmix.ir.cost import CostModel, Evaluation, LayerCost
from bitmix.ir.graph import QUANTIZABLE_KINDS, Layer, LayerGraph, VectorOp
from bitmix.ir.precision import Precision, as_precision
from bitmix.ir.targets import SUPPORTED_BITS, TARGETS, Target, get_target

__all__ = [
    "QUANTIZABLE_KINDS", "SUPPORTED_BITS", "TARGETS", "CostModel", "Evaluation", "Layer", "LayerCost", "LayerGraph",
    "Precision", "Target", "VectorOp", "as_precision", "get_target",
]
