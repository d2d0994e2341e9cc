"""channels_last activations between the lowered convolutions of a graph (issue 15).

The packed conv kernels read and write NHWC (``kernels.qconv2d_nhwc``); the eager ops between
two convs of a conv net (ReLU, residual adds, max-pooling, ...) give the same values in either
memory format. So each lowered conv returns a ``channels_last`` tensor and the next conv reads
it without a transpose. Ops whose result could depend on the layout -- reductions such as
average pooling sum in another order in ``channels_last`` (their float results differ in the
last bit), ``view`` needs contiguous strides, float convs pick other algorithms -- get a
``.contiguous()`` copy of their input, so every value still equals the fake-quant reference's.
"""

from __future__ import annotations

import operator

from torch import fx

# Ops that accept any strides and compute each output element from the elements at the same
# logical index (or a max over a window), so their values do not depend on the memory format.
LAYOUT_FREE = {
    "relu", "relu_", "hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_max", "add", "add_", "sub",
    "mul", "div", "neg", "sigmoid", "silu", "gelu", "hardswish", "hardsigmoid", "leaky_relu", "max_pool2d",
    "max_pool2d_with_indices", "cat", "clone", "alias", "detach", "dropout",
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
