"""channels_last activations between the lowered convolutions of a graph, and the adds and
ReLUs after a conv (the adds after a linear) fused into its epilogue (issue 15).

The packed conv kernels read and write NHWC (``kernels.qconv2d_nhwc``); the eager ops between
two convs of a conv net (ReLU, residual adds, max-pooling, ...) give the same values in either
memory format. So each lowered conv returns a ``channels_last`` tensor and the next conv reads
it without a transpose. Ops whose result could depend on the layout -- reductions such as
average pooling sum in another order in ``channels_last`` (their float results differ in the
last bit), ``view`` needs contiguous strides, float convs pick other algorithms -- get a
``.contiguous()`` copy of their input, so every value still equals the fake-quant reference's.
"""

from __future__ import annotations

import math
import operator
from collections import Counter

import torch
from torch import fx

# Ops that accept any strides and compute each output element from the elements at the same
# logical index (or a max over a window), so their values do not depend on the memory format.
LAYOUT_FREE = {
    "relu", "relu_", "relu6", "relu6_", "hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_max", "add",
    "add_", "sub", "mul", "div", "neg", "sigmoid", "silu", "gelu", "hardswish", "hardsigmoid", "leaky_relu",
    "max_pool2d", "max_pool2d_with_indices", "cat", "clone", "alias", "detach", "dropout",
}
SHAPE_ONLY = {"sym_size", "sym_numel"}  # read sizes, which are the same in both layouts


def _op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def channels_last_between_convs(gm: fx.GraphModule) -> int:
    """Turn on ``channels_last`` results of every lowered conv of ``gm`` and insert ``.contiguous()``
    before each consumer outside ``LAYOUT_FREE`` that may see one; returns the number inserted."""
    modules = dict(gm.named_modules())

    def conv(node: fx.Node) -> bool:
        mod = modules.get(str(node.target)) if node.op == "call_module" else None
        return mod is not None and getattr(mod, "kind", None) == "conv2d" and hasattr(mod, "channels_last")

    maybe: set[fx.Node] = set()  # values that may be channels_last
    for node in gm.graph.nodes:
        if conv(node):
            maybe.add(node)
        elif (node.op == "call_function" and _op_name(node) in LAYOUT_FREE | {"getitem"}
              and any(n in maybe for n in node.all_input_nodes)):
            maybe.add(node)
    copies: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node in maybe or (node.op == "call_function" and _op_name(node) in SHAPE_ONLY):
            continue  # convs read either layout; layout-free ops pass it on
        for source in [n for n in node.all_input_nodes if n in maybe]:
            if source not in copies:
                with gm.graph.inserting_after(source):
                    copies[source] = gm.graph.call_method("contiguous", (source,))
            node.replace_input_with(source, copies[source])
    for node in maybe:
        if conv(node):
            modules[str(node.target)].channels_last = True
    gm.graph.lint()
    gm.recompile()
    return len(copies)



def code_chains(gm: fx.GraphModule) -> int:
    """Let each lowered conv whose result feeds a lowered conv hand it input codes instead of floats
    (``kernels.padded``): a depthwise or one-group conv into a one-group conv, or a one-group conv into a
    depthwise one (MobileNet's expansion -> depthwise -> projection runs on codes throughout). The first
    layer's ``codes_for`` becomes the next layer's plan, and its kernel quantizes for that layer in its
    epilogue where the kernels can (else floats, as before). Both must return ``channels_last`` (the NHWC
    kernels) and be called once. Where other ops read the result too (a residual stream: a ResNet block's
    output is the next block's input and its shortcut), a one-group conv into a one-group conv keeps its floats
    as well (``floats_too``): it returns ``(floats, codes)``, the next conv reads ``[1]`` and the others ``[0]``,
    provided none of them writes in place. Values are unchanged. Returns the number of chains."""
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")

    def nhwc_conv(node: fx.Node):
        mod = modules.get(str(node.target)) if node.op == "call_module" else None
        if (mod is None or getattr(mod, "kind", None) != "conv2d" or not getattr(mod, "channels_last", False)
                or not hasattr(mod, "codes_for") or calls[str(node.target)] != 1):
            return None
        return mod

    chains = 0
    for node in list(gm.graph.nodes):
        first = nhwc_conv(node)
        if first is None or first.plan.groups not in (1, first.plan.out_features):  # one group or depthwise
            continue
        takers = [u for u in node.users
                  if nhwc_conv(u) is not None and u.args == (node,) and node not in u.kwargs.values()]
        if len(node.users) == 1 and takers and not node.kwargs:
            second = nhwc_conv(takers[0])
            depthwise_next = first.plan.groups == 1 and second.plan.groups == second.plan.out_features > 1
            if second.plan.groups == 1 or depthwise_next:
                first.codes_for = second.plan
                chains += 1
            continue
        takers = [u for u in takers if nhwc_conv(u).plan.groups == 1]
        if first.plan.groups != 1 or not takers or not all(_reads_only(u, modules) for u in node.users):
            continue
        taker = takers[0]
        with gm.graph.inserting_after(node):
            codes = gm.graph.call_function(operator.getitem, (node, 1))
        with gm.graph.inserting_after(node):
            floats = gm.graph.call_function(operator.getitem, (node, 0))
        floats.meta = dict(node.meta)
        for user in list(node.users):
            if user is not floats and user is not codes:
                user.replace_input_with(node, codes if user is taker else floats)
        first.codes_for, first.floats_too = nhwc_conv(taker).plan, True
        chains += 1
    gm.graph.lint()
    gm.recompile()
    return chains


def _reads_only(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` certainly leaves its inputs unchanged: a lowered layer, the graph's output, or an op or
    method that is not in place (no trailing ``_``, no ``out=``)."""
    if node.op == "output":
        return True
    if node.op == "call_module":
        return hasattr(modules.get(str(node.target)), "plan")
    name = node.target if node.op == "call_method" else _op_name(node)
    return (node.op in ("call_function", "call_method") and isinstance(name, str) and not name.endswith("_")
            and "out" not in node.kwargs)


def _clamp_of(node: fx.Node) -> tuple[float, float] | None:
    """``(lo, hi)`` of a ReLU / ReLU6 / hardtanh node on one tensor, else None."""
    name = _op_name(node) if node.op == "call_function" else ""
    if name in {"relu", "relu_"} and len(node.args) == 1 and not node.kwargs:
        return 0.0, math.inf
    if name in {"relu6", "relu6_"} and len(node.args) == 1 and not node.kwargs:
        return 0.0, 6.0
    if name in {"hardtanh", "hardtanh_"} and not node.kwargs and 1 <= len(node.args) <= 3:
        lo = node.args[1] if len(node.args) > 1 else -1.0  # aten.hardtanh's defaults
        hi = node.args[2] if len(node.args) > 2 else 1.0
        if isinstance(lo, int | float) and isinstance(hi, int | float):
            return float(lo), float(hi)
    return None


def _f32_shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor) and val.dtype == torch.float32:
        return tuple(val.shape)
    return None


def fuse_epilogues(gm: fx.GraphModule) -> int:
    """Fold ``relu(conv(x) + r)``, ``conv(x) + r`` and ``relu(conv(x))`` (ReLU or hardtanh, e.g. ReLU6)
    into the lowered conv: its kernel adds ``r`` and clamps in the GEMM epilogue, so the float output
    is written once instead of three times. Likewise ``linear(x) + r``, a transformer block's residual
    (MiniLM: 12 a forward). Only where the layer's value has no other user and ``r`` has its shape (no
    broadcast); the float ops and their order are the graph's, so values are unchanged. Returns the
    number of layers that took an epilogue."""
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    fused = 0
    for node in list(gm.graph.nodes):
        mod = modules.get(str(node.target)) if node.op == "call_module" else None
        kind = getattr(mod, "kind", None)
        if (mod is None or kind not in ("conv2d", "linear") or not hasattr(mod, "clamp") or node.kwargs
                or calls[str(node.target)] != 1 or len(node.users) != 1):
            continue  # a module called twice would carry one call's epilogue into the other
        user = next(iter(node.users))
        residual, ops = None, []  # the fused add / clamp nodes, in graph order
        shape = _f32_shape(node)
        if (user.op == "call_function" and _op_name(user) in {"add", "add_"} and len(user.args) == 2
                and not user.kwargs and shape is not None):
            a, b = user.args
            other = b if a is node else a if b is node and _op_name(user) == "add" else None  # add_ writes arg 0
            if isinstance(other, fx.Node) and other is not node and _f32_shape(other) == shape == _f32_shape(user):
                residual = other
                ops.append(user)
        last = ops[-1] if ops else node
        if kind == "conv2d" and len(last.users) == 1:
            nxt = next(iter(last.users))
            clamp = _clamp_of(nxt)
            if clamp is not None and nxt.args[0] is last:
                mod.clamp = clamp
                ops.append(nxt)
        if not ops:
            continue
        if residual is not None:
            user.prepend(node)  # after the residual's producer
            node.kwargs = {"residual": residual}
        ops[-1].replace_all_uses_with(node)
        for op in reversed(ops):
            gm.graph.erase_node(op)
        fused += 1
    gm.graph.lint()
    gm.recompile()
    return fused


def _pair(v: object) -> tuple[int, int]:
    return (int(v[0]), int(v[-1])) if isinstance(v, list | tuple) else (int(v), int(v))


def max_pool2d(x: torch.Tensor, kernel_size: object, stride: object = (), padding: object = 0,
               dilation: object = 1, ceil_mode: bool = False) -> torch.Tensor:
    """``aten.max_pool2d`` with ``kernels.pool_nhwc`` for the channels_last float32 activations of a
    lowered conv net (same maxima, NaN propagated; see there); anything else, and tracers, get aten's."""
    k, d, p = _pair(kernel_size), _pair(dilation), _pair(padding)
    s = _pair(stride) if stride not in ((), []) else k
    if (ceil_mode or torch.compiler.is_dynamo_compiling() or type(x) is not torch.Tensor or x.dim() != 4
            or x.dtype != torch.float32 or x.requires_grad or not x.permute(0, 2, 3, 1).is_contiguous()
            or min(*k, *s, *d) < 1 or p[0] > k[0] // 2 or p[1] > k[1] // 2):
        return torch.ops.aten.max_pool2d.default(x, kernel_size, stride, padding, dilation, ceil_mode)
    out_hw = tuple((n + 2 * pi - di * (ki - 1) - 1) // si + 1
                   for n, ki, si, pi, di in zip(x.shape[2:], k, s, p, d, strict=True))
    if min(out_hw) < 1:
        return torch.ops.aten.max_pool2d.default(x, kernel_size, stride, padding, dilation, ceil_mode)
    from bitmix.kernels.pool_nhwc import max_pool2d_nhwc  # loads Numba: only once a pool runs

    y = max_pool2d_nhwc(x.permute(0, 2, 3, 1).numpy(), k, s, p, d, out_hw)
    return torch.from_numpy(y).permute(0, 3, 1, 2)


def nhwc_max_pools(gm: fx.GraphModule) -> int:
    """Point every ``aten.max_pool2d`` of ``gm`` at ``max_pool2d`` above; returns how many."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.max_pool2d.default]
    for node in nodes:
        node.target = max_pool2d
    gm.recompile()
    return len(nodes)
