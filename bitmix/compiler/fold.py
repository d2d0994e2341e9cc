"""prepare: the captured graph -> a float GraphModule with BN folded and one QuantLayer per layer.

Built from `graph.exported.module()`, never from the user's model. Eval-mode
BatchNorm that is the only consumer of a conv is folded into the conv's weight and
bias (in float64, then cast back), because the integer kernels see one weight per
layer; every conv2d / linear / matmul node of `graph.layers` becomes a `call_module`
to a `QuantLayer`, which with `bits=None` computes exactly the original float op.
"""

from __future__ import annotations

import copy
import operator
import re

import torch
from torch import fx, nn

from bitmix.compiler import transposed
from bitmix.compiler.capture import weight_second_operands
from bitmix.compiler.qlayer import QuantLayer
from bitmix.compiler.signs import nonneg_nodes
from bitmix.errors import BitmixError
from bitmix.ir.graph import Layer, LayerGraph

aten = torch.ops.aten
PRESERVED = "_user_preserved_attributes"

BN_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def prepare(graph: LayerGraph, share_weights: bool = False) -> fx.GraphModule:
    """A new float module equivalent to the captured model, ready for per-layer quantization.

    The result has `bitmix_layers: dict[layer_name, attribute]`; `quant_layers(gm)`
    gives the `QuantLayer` modules themselves. With `share_weights` the QuantLayers' weights and biases are
    the exported program's tensors where the layer uses them unchanged (no BatchNorm folded, no transpose),
    which are the user's own (`frozen_copy`): a model nothing may write into, for a caller that only reads it
    or copies it first (`compile`'s float model: one copy of the weights fewer for the whole compile).
    """
    source = graph.exported.module()
    gm = fx.GraphModule(source, source.graph)
    drop_guards(gm)
    drop_inference_noops(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [layer.name for layer in graph.layers if layer.node not in nodes]
    if missing:
        raise BitmixError(f"layer {missing[0]!r} is not in the exported graph; re-run capture on the model")
    nonneg = nonneg_nodes(gm.graph)
    folded = _fold_batchnorms(gm, graph, nodes)
    attrs: dict[str, str] = {}
    for layer in graph.layers:
        attrs[layer.name] = _insert_quant_layer(gm, layer, nodes[layer.node], nonneg, folded, attrs, share_weights)
    gm.graph.eliminate_dead_code()
    _drop_unused_state(gm)
    gm.graph.lint()
    gm.recompile()
    # own every tensor: fine-tuning must not write into graph.exported; the QuantLayers' own already
    # (`QuantLayer` clones its weight), so a second copy of every weight would only raise the peak
    gm = copy.deepcopy(gm, {id(t): t for m in gm.modules() if isinstance(m, QuantLayer)
                            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))})
    gm.bitmix_layers = attrs
    gm.bitmix_fixed_batch = _fixed_batch(graph.exported)
    # GraphModule.__deepcopy__ re-attaches these
    gm.meta[PRESERVED] = {"bitmix_layers": attrs, "bitmix_fixed_batch": gm.bitmix_fixed_batch}
    return gm.eval()


def _fixed_batch(exported: torch.export.ExportedProgram) -> int | None:
    """The traced batch if no input's dim 0 is symbolic (a static export, e.g. a torch.compile piece on its
    first call, whose views bake the batch in): the quantize stage then runs calibration only whole."""
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[name].meta.get("val") for name in exported.graph_signature.user_inputs]
    dims = [v.shape[0] for v in vals if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not dims or any(isinstance(d, torch.SymInt) for d in dims):
        return None
    return int(dims[0])


def drop_guards(gm: fx.GraphModule) -> None:
    """torch.export's input guards pin the example batch size; prepared models take any batch."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    for name, _ in list(gm.named_children()):
        if name.startswith("_guards"):
            delattr(gm, name)


def drop_inference_noops(gm: fx.GraphModule) -> None:
    """Erase what computes nothing in the exported (eval-mode) graph: ``dropout(x, p, train=False)`` is ``x``, and
    ``_assert_tensor_metadata`` only re-checks an input's dtype. A MiniLM forward made 23 such calls, ~4 us each
    through the GraphModule's Python."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.dropout.default and _dropout_off(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.target is aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)


def _dropout_off(node: fx.Node) -> bool:
    """``aten.dropout(x, p, train)`` with ``train`` False or ``p`` 0: the identity."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    return train is False or p == 0


def _fetch(gm: nn.Module, node: object) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise BitmixError(f"expected a parameter in the exported graph, found {node}; re-run capture on the model")
    obj: object = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj


def _fold_batchnorms(
    gm: fx.GraphModule, graph: LayerGraph, nodes: dict[str, fx.Node]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rewire conv -> eval BN to conv alone; return the folded (weight, bias) per conv layer."""
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in graph.layers:
        if layer.kind != "conv2d":
            continue
        conv = nodes[layer.node]
        users = list(conv.users)
        if len(users) != 1 or users[0].target not in BN_OPS:
            continue
        bn = users[0]
        if bn.target == aten.batch_norm.default and bn.args[5]:
            continue  # training-mode BN: batch statistics, nothing to fold
        gamma, beta, mean, var = (_fetch(gm, a) for a in bn.args[1:5])
        eps = float(bn.args[7] if bn.target == aten.batch_norm.default else bn.args[6])
        assert mean is not None and var is not None
        weight = _fetch(gm, conv.args[1])
        assert weight is not None
        bias = _fetch(gm, conv.args[2] if len(conv.args) > 2 else None)
        scale = torch.rsqrt(var.double() + eps)
        if gamma is not None:
            scale = scale * gamma.double()
        shift = -mean.double() * scale
        if bias is not None:
            shift = shift + bias.double() * scale
        if beta is not None:
            shift = shift + beta.double()
        if transposed.is_transposed(conv):  # weight (C_in, C_out / G, ...): output channel g * C_out / G + j
            g = layer.groups
            grouped = weight.double().reshape(g, weight.shape[0] // g, *weight.shape[1:])
            w = (grouped * scale.reshape(g, 1, -1, *[1] * (weight.dim() - 2))).reshape(weight.shape)
        else:
            w = weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))  # conv2d or conv1d
        folded[layer.name] = (w.to(weight.dtype), shift.to(weight.dtype))
        if bn.target == aten.batch_norm.default:
            bn.replace_all_uses_with(conv)
        else:
            for user in list(bn.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(conv)
                elif user.users:
                    raise BitmixError(f"batch norm after {layer.name!r} exposes its statistics; cannot fold it")
                gm.graph.erase_node(user)
        gm.graph.erase_node(bn)
    return folded


def _attr_name(gm: nn.Module, name: str, taken: dict[str, str]) -> str:
    base = "bitmix_" + re.sub(r"[^0-9a-zA-Z_]", "_", name)
    attr, k = base, 1
    while hasattr(gm, attr) or attr in taken.values():
        attr, k = f"{base}_{k}", k + 1
    return attr


def _insert_quant_layer(
    gm: fx.GraphModule,
    layer: Layer,
    node: fx.Node,
    nonneg: set[fx.Node],
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]],
    taken: dict[str, str],
    share_weights: bool = False,
) -> str:
    a = node.args[0]
    if layer.kind == "matmul":
        b = node.args[1]
        module = QuantLayer(layer.name, "matmul", a_nonneg=a in nonneg, b_nonneg=b in nonneg)
        return _replace(gm, node, layer.name, module, (a, b), taken)
    weight_second = weight_second_operands(node) if layer.kind == "linear" else None
    if weight_second is not None:  # x @ W (+ b), W (in, out): the linear's weight is W^T (x @ V.t(): V itself)
        a, w_node, b_node, as_linear = weight_second
        w = _fetch(gm, w_node)
        assert w is not None
        weight, bias = (w.clone() if as_linear else w.T.contiguous()), _fetch(gm, b_node)
    elif layer.name in folded:
        weight, bias = folded[layer.name]
    else:
        weight = _fetch(gm, node.args[1])
        bias = _fetch(gm, node.args[2] if len(node.args) > 2 else None)
    assert weight is not None
    # a conv1d (or conv_transpose1d) is a conv2d of height 1 to `capture`: the same sums in the same order
    unit_height = layer.kind == "conv2d" and weight.dim() == 3
    if unit_height:
        weight = weight.unsqueeze(2)
    post = None
    if transposed.is_transposed(node):  # its equivalent conv2d, then the pixel shuffle and crop as float ops
        g = transposed.node_geometry(node, layer.input_shape)
        assert g is not None  # capture made it a layer
        weight, bias = transposed.equivalent_weight(weight, g), transposed.equivalent_bias(bias, g)
        post = (transposed.shuffle_and_crop, *transposed.shuffle_args(g))
    module = QuantLayer(layer.name, layer.kind, weight, bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups, a_nonneg=a in nonneg)
    if share_weights:  # the tensors themselves, not QuantLayer's clones
        module.weight = nn.Parameter(weight.detach())
        module.bias = None if bias is None else nn.Parameter(bias.detach())
    return _replace(gm, node, layer.name, module, (a,), taken, unit_height, post)


def _replace(gm: fx.GraphModule, node: fx.Node, name: str, module: QuantLayer, args: tuple, taken: dict[str, str],
             unit_height: bool = False, post: tuple | None = None) -> str:
    """Swap `node` for a call of `module` on `args`; with `unit_height` an `unsqueeze(2)` before it and a
    `squeeze(2)` after, with `post` (a function, then its further arguments) applied to its output before that."""
    attr = _attr_name(gm, name, taken)
    gm.add_submodule(attr, module)
    created = []
    with gm.graph.inserting_before(node):
        if unit_height:
            args = (gm.graph.call_function(aten.unsqueeze.default, (args[0], 2)),)
            created.append(args[0])
        out = gm.graph.call_module(attr, args=args)
        created.append(out)
        if post is not None:
            out = gm.graph.call_function(post[0], (out, *post[1:]))
            created.append(out)
        if unit_height:
            out = gm.graph.call_function(aten.squeeze.dims, (out, [2]))
            created.append(out)
    # the node's shape metadata describes only the last result when nothing was inserted around the call
    meta = dict(node.meta) if len(created) == 1 else {k: v for k, v in node.meta.items() if k != "val"}
    for new in created:
        new.meta = dict(meta)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return attr


def _drop_unused_state(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers no node reads any more (the pre-fold weights, BN stats)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    quant_attrs = {name for name, m in gm.named_children() if isinstance(m, QuantLayer)}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [
        n for n, _ in gm.named_buffers(remove_duplicate=False)
    ]
    for name in names:
        if name in used or name.split(".")[0] in quant_attrs:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)
