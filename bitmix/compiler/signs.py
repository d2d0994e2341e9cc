"""Which values of an FX graph are provably non-negative: from the graph alone, before any data.

Quantization uses it to make a layer's activation quantizer unsigned (one more level for the same
bits: `bitmix.compiler.fold`), and capture records it on each layer (`Layer.input_nonneg`) because
the online rotation's rule (`bitmix.ir.rotation`) leaves such inputs alone, and the simulator prices
the rule before anything is quantized.
"""

from __future__ import annotations

from torch import fx

# Ops whose output is >= 0 whatever their input (hardtanh / clamp only with a lower bound >= 0).
NONNEG_SOURCES = {"relu", "relu_", "relu6", "softmax", "_softmax", "_safe_softmax", "sigmoid", "exp"}
BOUNDED_BELOW = {"hardtanh", "hardtanh_", "clamp", "clamp_min"}
# Ops that keep "every input >= 0" true (scalar operands must be >= 0 too).
NONNEG_PRESERVING = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "contiguous", "unsqueeze",
    "squeeze", "flatten", "getitem", "clone", "alias", "detach", "dropout", "to", "_to_copy", "slice",
    "select", "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "mean", "sum",
    "cat", "add", "mul", "div", "pad", "constant_pad_nd", "repeat",
}
LAYOUT_INT_ARGS = NONNEG_PRESERVING - {"add", "mul", "div", "pad", "constant_pad_nd"}


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def nonneg_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is provably >= 0 (after ReLU-like ops, softmax, and sign-preserving ops)."""
    nonneg: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        op = _op_name(node)
        if op in NONNEG_SOURCES:
            nonneg.add(node)
        elif op in BOUNDED_BELOW:
            low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min", node.kwargs.get("min_val"))
            if isinstance(low, int | float) and low >= 0:
                nonneg.add(node)
        elif op in NONNEG_PRESERVING:
            tensors = node.all_input_nodes
            scalars_ok = op in LAYOUT_INT_ARGS or all(
                a >= 0 for a in _flat(node.args[1:]) if isinstance(a, int | float) and not isinstance(a, bool)
            )
            if tensors and scalars_ok and all(t in nonneg for t in tensors):
                nonneg.add(node)
    return nonneg


def _flat(args: object) -> list[object]:
    if isinstance(args, list | tuple):
        return [x for a in args for x in _flat(a)]
    return [args]
