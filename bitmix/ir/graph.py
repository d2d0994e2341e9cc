"""The captured model: one `Layer` per quantizable op, `VectorOp`s for everything else.

`LayerGraph` is what every later stage consumes. It is a frozen record; the
networkx dependency graph and the exported program ride along but are never
modified after capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

QUANTIZABLE_KINDS = ("conv2d", "linear", "matmul")


@dataclass(frozen=True)
class Layer:
    """One quantizable op (conv2d, linear, or activation x activation matmul/bmm).

    Shapes follow PyTorch conventions: conv weight (C_out, C_in/groups, kh, kw),
    linear weight (out_features, in_features). For `matmul` there is no weight:
    `weight_shape` is the shape of the second activation operand and `params` is 0.
    """

    name: str  # unique: fully qualified module name (suffixed ":k" if a module is called twice)
    kind: str  # "conv2d" | "linear" | "matmul"
    node: str  # FX node name in the exported graph
    module: str  # fully qualified module name that owns the op ("" for top level)
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    params: int  # weight elements + bias elements
    has_bias: bool = False
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    weight_param: str | None = None  # state-dict key of the weight (None for matmul)
    bias_param: str | None = None
    input_nonneg: bool = False  # the graph proves the (first) input >= 0 (after ReLU, softmax, ...)
    # activation elements besides this layer's own inputs that a chip boundary just before it must carry:
    # tensors made earlier and read at or after it (a residual block's skip branch); see `capture._crossing`
    crossing: int = 0

    @property
    def weight_elements(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n if self.kind != "matmul" else 0

    @property
    def input_elements(self) -> int:
        return _prod(self.input_shape)

    @property
    def output_elements(self) -> int:
        return _prod(self.output_shape)


@dataclass(frozen=True)
class VectorOp:
    """A non-quantizable op that NorthPole runs on its vector unit (norm, softmax, add, pool, ...).

    `after` is the quantizable layer that most recently precedes it in topological order
    (None if it comes before any), so the simulator can schedule it between layers.
    """

    name: str
    kind: str  # aten op name without namespace, e.g. "relu", "add", "layer_norm", "softmax"
    elements: int  # output elements
    input_elements: int
    after: str | None


@dataclass(frozen=True)
class LayerGraph:
    """Result of `capture`: quantizable layers in execution order plus their dependencies."""

    model_name: str
    layers: tuple[Layer, ...]
    vector_ops: tuple[VectorOp, ...]
    deps: nx.DiGraph = field(compare=False, repr=False)  # edges between Layer names
    exported: Any = field(compare=False, repr=False)  # torch.export.ExportedProgram
    input_shapes: tuple[tuple[int, ...], ...] = ()
    unsupported: tuple[str, ...] = ()  # weight-bearing ops with no bitmix kernel ("node (op)"): stay FP32

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def frames(self) -> int | None:
        """Frames per run: dim 0 (the batch) of the model's first input of rank >= 2, else 1 (None: inputs
        unknown). Not a layer's dim 0, which is the sequence where a module runs sequence-first
        (nn.MultiheadAttention transposes a batch-first input)."""
        return frames_of(self.input_shapes) if self.input_shapes else None

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)


def frames_of(shapes: Sequence[Sequence[int]]) -> int:
    """The batch of a run's inputs: dim 0 of the first input of rank >= 2 (a rank-1 input is one frame)."""
    return next((int(s[0]) for s in shapes if len(s) >= 2), 1)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
