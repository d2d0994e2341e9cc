"""capture: nn.Module + example inputs -> LayerGraph, via torch.export.

torch.export (not fx.symbolic_trace, which fails on Hugging Face BERT) gives an ATen
graph with shapes on every node. We walk it once: each conv2d / linear /
activation x activation matmul becomes a `Layer`; every other compute op becomes a
`VectorOp`; data dependencies between layers are traced through everything else.
The caller's model is never touched: we export a deep copy in eval mode.
"""

from __future__ import annotations

import copy
import math

import networkx as nx
import torch
from torch import nn

from bitmix.errors import BitmixError, NoQuantizableLayers
from bitmix.ir.graph import Layer, LayerGraph, VectorOp

aten = torch.ops.aten

CONV_OPS = {aten.conv2d.default, aten.convolution.default}
LINEAR_OPS = {aten.linear.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.mm.default}
# Ops that multiply by weights but have no bitmix kernel: they stay FP32 and are reported.
NO_KERNEL_OPS = {"conv1d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
                 "addmm", "matmul", "mm", "bmm", "einsum", "baddbmm", "conv2d", "lstm", "gru", "rnn_tanh", "rnn_relu"}

# Ops that only move or relabel data: free on the vector unit, not worth a VectorOp.
LAYOUT_OPS = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "contiguous", "unsqueeze",
    "squeeze", "flatten", "getitem", "clone", "alias", "detach", "dropout", "_assert_tensor_metadata",
    "to", "_to_copy", "slice", "select", "sym_size", "lift_fresh_copy", "arange", "zeros", "ones",
    "new_ones", "new_zeros", "full", "scalar_tensor", "empty",
}


def capture(model: nn.Module, example_inputs: tuple | torch.Tensor, name: str | None = None) -> LayerGraph:
    """Export `model` on `example_inputs` and index its quantizable layers."""
    if not isinstance(model, nn.Module):
        raise BitmixError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise BitmixError("example_inputs must be a tensor or a tuple of tensors (one per forward argument)")
    exported = export(model, inputs)
    layers, vector_ops, deps, unsupported = _index(exported)
    if not layers:
        raise NoQuantizableLayers(
            "the model has no quantizable layers (conv2d, linear, matmul/bmm); nothing for bitmix to do"
        )
    return LayerGraph(
        model_name=name or type(model).__name__,
        layers=tuple(layers),
        vector_ops=tuple(vector_ops),
        deps=deps,
        exported=exported,
        input_shapes=tuple(tuple(t.shape) for t in inputs),
        unsupported=tuple(unsupported),
    )


def export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export a deep copy in eval mode, batch dimension dynamic where the model allows.

    A dynamic batch lets the prepared and lowered models run calibration, training and
    evaluation batches of any size. torch.export specialises size-1 dimensions, so the
    dynamic export traces a batch of 2 built from the example; shapes are read back at the
    user's batch size (`_shape`). Models that pin their batch size get a static export.
    """
    frozen = copy.deepcopy(model).eval()
    if all(t.dim() > 0 for t in inputs):
        doubled = tuple(torch.cat([t, t])[: max(2, t.shape[0])] for t in inputs)
        dims = tuple({0: torch.export.Dim.AUTO} for _ in inputs)
        try:
            with torch.no_grad():
                exported = torch.export.export(frozen, doubled, dynamic_shapes=dims, strict=False)
            _bind_batch(exported, inputs[0].shape[0])
            return exported
        except Exception:  # fall back to a static export, which reports the real problem if any
            frozen = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            return torch.export.export(frozen, inputs, strict=False)
    except Exception as exc:  # torch raises many types here; all mean "cannot capture"
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise BitmixError(
            f"torch.export could not capture the model ({type(exc).__name__}: {first[:200]}); "
            "make control flow independent of tensor values (or use torch.cond) and avoid "
            "Python-side data conversions such as .item() or .tolist() in forward"
        ) from None


def _bind_batch(exported: torch.export.ExportedProgram, batch: int) -> None:
    """Record which symbols are batch dimensions, to evaluate shapes at the user's batch size."""
    user_inputs = set(exported.graph_signature.user_inputs)
    symbols = {}
    for node in exported.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
                for sym in val.shape[0].node.expr.free_symbols:
                    symbols[sym] = batch
    exported.graph.meta = {**getattr(exported.graph, "meta", {}), "bitmix_batch": symbols}


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return ()
    symbols = node.graph.meta.get("bitmix_batch", {}) if hasattr(node.graph, "meta") else {}
    return tuple(_concrete(d, symbols) for d in val.shape)


def _concrete(d: int | torch.SymInt, symbols: dict) -> int:
    if isinstance(d, torch.SymInt):
        return int(d.node.expr.subs(symbols))
    return int(d)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path)


def _pair(v: object) -> tuple[int, int]:
    if isinstance(v, list | tuple):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))  # type: ignore[call-overload]


def _index(
    exported: torch.export.ExportedProgram,
) -> tuple[list[Layer], list[VectorOp], nx.DiGraph, list[str]]:
    params = dict(exported.graph_signature.inputs_to_parameters)
    unsupported: list[str] = []
    layers: list[Layer] = []
    vector_ops: list[VectorOp] = []
    deps = nx.DiGraph()
    reach: dict[torch.fx.Node, frozenset[str]] = {}
    used_names: dict[str, int] = {}
    last_layer: str | None = None

    for node in exported.graph.nodes:
        inputs = [a for a in node.all_input_nodes]
        sources = frozenset().union(*(reach.get(a, frozenset()) for a in inputs)) if inputs else frozenset()
        if node.op != "call_function":
            reach[node] = sources
            continue
        layer = _layer_for(node, params)
        if layer is None:
            reach[node] = sources
            op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if op in NO_KERNEL_OPS and any(a.name in params for a in inputs):
                unsupported.append(f"{_module_path(node) or node.name} ({op})")
            if op not in LAYOUT_OPS and _shape(node):
                in_elems = sum(math.prod(_shape(a)) for a in inputs if _shape(a))
                vector_ops.append(VectorOp(node.name, op, math.prod(_shape(node)), in_elems, last_layer))
            continue
        base = layer.name
        count = used_names.get(base, 0)
        used_names[base] = count + 1
        if count:
            layer = _renamed(layer, f"{base}:{count}")
        layers.append(layer)
        deps.add_node(layer.name, kind=layer.kind)
        for src in sources:
            deps.add_edge(src, layer.name)
        reach[node] = frozenset({layer.name})
        last_layer = layer.name
    return _live(exported.graph, layers, vector_ops, deps) + (unsupported,)


def _live(
    graph: torch.fx.Graph, layers: list[Layer], vector_ops: list[VectorOp], deps: nx.DiGraph
) -> tuple[list[Layer], list[VectorOp], nx.DiGraph]:
    """Only the work whose result reaches the model's output (a sentence encoder drops BERT's pooler).

    Dead ops are never run by a deployed model, so they are neither priced nor quantized, and the
    last layer (the one targets pin) is the last that reaches the output.
    """
    live: set[str] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node.name not in live:
            live.add(node.name)
            stack.extend(node.all_input_nodes)
    dead = {layer.name for layer in layers if layer.node not in live}
    if not dead:
        return layers, vector_ops, deps
    order = [layer.name for layer in layers]
    kept_ops = []
    for op in vector_ops:
        if op.name not in live:
            continue
        after = op.after
        while after in dead:
            i = order.index(after)
            after = order[i - 1] if i else None
        kept_ops.append(VectorOp(op.name, op.kind, op.elements, op.input_elements, after))
    return [layer for layer in layers if layer.name not in dead], kept_ops, deps.subgraph(
        [n for n in deps.nodes if n not in dead]).copy()


def _renamed(layer: Layer, name: str) -> Layer:
    fields = {f: getattr(layer, f) for f in layer.__dataclass_fields__}
    fields["name"] = name
    return Layer(**fields)


def _layer_for(node: torch.fx.Node, params: dict[str, str]) -> Layer | None:
    target = node.target
    out_shape = _shape(node)
    module = _module_path(node)
    if target in CONV_OPS:
        x, w = node.args[0], node.args[1]
        if not isinstance(w, torch.fx.Node) or w.name not in params or len(_shape(w)) != 4:
            return None
        bias = node.args[2] if len(node.args) > 2 else None
        if target == aten.conv2d.default:
            stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]) :])
        else:
            if node.args[6]:  # transposed convolution: not a supported layer kind
                return None
            stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
        if isinstance(padding, str):
            return None
        w_shape = _shape(w)
        c_out, c_in_g, kh, kw = w_shape
        macs = math.prod(out_shape) * c_in_g * kh * kw
        has_bias = isinstance(bias, torch.fx.Node)
        return Layer(
            name=module or node.name, kind="conv2d", node=node.name, module=module,
            weight_shape=w_shape, input_shape=_shape(x), output_shape=out_shape, macs=macs,
            params=math.prod(w_shape) + (c_out if has_bias else 0), has_bias=has_bias,
            stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=int(groups),
            weight_param=params[w.name], bias_param=params.get(bias.name) if has_bias else None,
        )
    if target in LINEAR_OPS:
        x, w = node.args[0], node.args[1]
        if not isinstance(w, torch.fx.Node) or w.name not in params:
            return None
        bias = node.args[2] if len(node.args) > 2 else None
        w_shape = _shape(w)
        has_bias = isinstance(bias, torch.fx.Node)
        return Layer(
            name=module or node.name, kind="linear", node=node.name, module=module,
            weight_shape=w_shape, input_shape=_shape(x), output_shape=out_shape,
            macs=math.prod(out_shape) * w_shape[1],
            params=math.prod(w_shape) + (w_shape[0] if has_bias else 0), has_bias=has_bias,
            weight_param=params[w.name], bias_param=params.get(bias.name) if has_bias else None,
        )
    if target in MATMUL_OPS:
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            return None
        if a.name in params or b.name in params or len(_shape(a)) < 2 or len(_shape(b)) < 2:
            return None
        k = _shape(a)[-1]
        prefix = f"{module}." if module else ""
        return Layer(
            name=f"{prefix}{node.name}", kind="matmul", node=node.name, module=module,
            weight_shape=_shape(b), input_shape=_shape(a), output_shape=out_shape,
            macs=math.prod(out_shape) * k, params=0,
        )
    return None
