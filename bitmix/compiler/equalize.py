"""Cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization", §4.1; reference/quantization.md).

For two layers joined by a positively homogeneous op (ReLU, or nothing) where the first
layer's output feeds only the second, `relu(x / s) * s = relu(x)` for `s > 0`: dividing output
channel `i` of the first layer (weight row and bias) by `s_i` and multiplying the second layer's
input channel `i` by `s_i` leaves the float function unchanged. DFQ's
`s_i = sqrt(r1_i / r2_i)` (r = the channel's weight range) gives both the same range
`sqrt(r1_i r2_i)`, so neither layer's quantization grid is set by one wide channel. All of it is
folded into weights and biases: the deployed model does the same integer work.
ReLU6 / hardtanh clip at a fixed value, which the scale would move, so those pairs are left alone.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from bitmix.compiler.qlayer import QuantLayer

HOMOGENEOUS = {"relu", "relu_"}
ITERATIONS = 4  # DFQ iterates over chains until the ranges settle; a few sweeps suffice
SCALE_LIMIT = 1e3


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _is_layer(root: nn.Module, node: fx.Node) -> QuantLayer | None:
    if node.op != "call_module":
        return None
    module = root.get_submodule(str(node.target))
    return module if isinstance(module, QuantLayer) and module.kind == "conv2d" else None


def _in_channel_view(layer: QuantLayer) -> torch.Tensor | None:
    """The second layer's weight as (in_channels, ...) : columns for groups=1, rows for depthwise."""
    assert layer.weight is not None
    if layer.groups == 1:
        return layer.weight.transpose(0, 1)
    if layer.groups == layer.weight.shape[0] and layer.weight.shape[1] == 1:
        return layer.weight
    return None


def pairs(model: fx.GraphModule) -> list[tuple[QuantLayer, QuantLayer]]:
    """(first, second) conv pairs joined directly or by a ReLU, the first's output used nowhere else."""
    found = []
    for node in model.graph.nodes:
        first = _is_layer(model, node)
        if first is None or len(node.users) != 1:
            continue
        nxt = next(iter(node.users))
        if nxt.op == "call_function" and _target_name(nxt) in HOMOGENEOUS and len(nxt.users) == 1:
            nxt = next(iter(nxt.users))
        second = _is_layer(model, nxt)
        if second is None or second is first or _in_channel_view(second) is None:
            continue
        if _in_channel_view(second).shape[0] == first.weight.shape[0]:  # type: ignore[union-attr]
            found.append((first, second))
    return found


@torch.no_grad()
def equalize(model: fx.GraphModule) -> int:
    """Equalise every pair of a prepared float model in place; returns the number of pairs."""
    found = pairs(model)
    for _ in range(ITERATIONS):
        for first, second in found:
            assert first.weight is not None
            columns = _in_channel_view(second)
            assert columns is not None
            r1 = first.weight.abs().reshape(first.weight.shape[0], -1).amax(dim=1)
            r2 = columns.abs().reshape(columns.shape[0], -1).amax(dim=1)
            s = torch.sqrt(r1 / r2.clamp(min=1e-12)).clamp(1 / SCALE_LIMIT, SCALE_LIMIT)
            s = torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))
            first.weight.div_(s.reshape(-1, *([1] * (first.weight.dim() - 1))))
            if first.bias is not None:
                first.bias.div_(s)
            columns.mul_(s.reshape(-1, *([1] * (columns.dim() - 1))))
    return len(found)
