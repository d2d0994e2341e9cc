"""capture: nn.Module + example inputs -> LayerGraph, via torch.export.

torch.export (not fx.symbolic_trace, which fails on Hugging Face BERT) gives an ATen
graph with shapes on every node. We walk it once: each conv2d / linear /
activation x activation matmul becomes a `Layer`; every other compute op becomes a
`VectorOp`; data dependencies between layers are traced through everything else.
The caller's model is never touched: we export a copy (`bitmix.compiler.frozen`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch._dynamo.convert_frame import compile_lock

from bitmix.compiler import decompose, transposed
from bitmix.compiler.frozen import frozen_copy
from bitmix.compiler.shapes import AUTO, export_error, normalize, traced_inputs
from bitmix.compiler.signs import nonneg_nodes
from bitmix.errors import BitmixError, NoQuantizableLayers
from bitmix.ir.graph import Layer, LayerGraph, VectorOp
from bitmix.kernels.limits import MAX_BMM_K, max_weight_k
from bitmix.kernels.registries import numba_compiles_held

aten = torch.ops.aten

# torch (2.13 here) deprecates its pytree `LeafSpec` class yet still builds every exported module's input/output
# specs from it, so each deep copy of such a module (we copy so the caller's model is never touched) warns from
# inside torch (torch/utils/_pytree.py, `class LeafSpec`). bitmix never uses LeafSpec: hide exactly that message.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

CONV_OPS = {aten.conv1d.default, aten.conv1d.padding, aten.conv2d.default, aten.conv2d.padding,
            aten.convolution.default}
LINEAR_OPS = {aten.linear.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.mm.default}
# Ops that multiply by weights but have no bitmix kernel: they stay FP32 and are reported.
# PyTorch's fused inference kernels (nn.TransformerEncoderLayer / nn.MultiheadAttention in eval mode under
# no_grad, as TorchDynamo captures them): one op, linears inside
FUSED_INFERENCE_OPS = {"_transformer_encoder_layer_fwd", "_native_multi_head_attention"}
NO_KERNEL_OPS = {"conv1d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
                 "addmm", "matmul", "mm", "bmm", "einsum", "baddbmm", "conv2d", "lstm", "gru", "rnn_tanh", "rnn_relu",
                 *FUSED_INFERENCE_OPS}

# Ops that only move or relabel data: free on the vector unit, not worth a VectorOp.
LAYOUT_OPS = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "numpy_T", "mT", "expand", "contiguous",
    "unsqueeze", "squeeze", "flatten", "getitem", "clone", "alias", "detach", "dropout", "_assert_tensor_metadata",
    "to", "_to_copy", "slice", "select", "sym_size", "lift_fresh_copy", "arange", "zeros", "ones",
    "new_ones", "new_zeros", "full", "scalar_tensor", "empty",
}


def input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """`example_inputs` given as a tensor or tuple, as one tensor per forward argument, or a one-line error."""
    inputs = ((example_inputs,) if isinstance(example_inputs, torch.Tensor)
              else tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else ())
    if not inputs:
        raise BitmixError("example_inputs must be a tensor, a tuple of tensors (one per forward argument) or a dict "
                          f"of forward argument name -> tensor, got {type(example_inputs).__name__}")
    other = next(((i, a) for i, a in enumerate(inputs) if not isinstance(a, torch.Tensor)), None)
    if other is not None:
        raise _not_a_tensor(f"example_inputs element {other[0]}", other[1])
    return _check_examples(inputs)


@dataclass(frozen=True)
class Examples:
    """The example inputs bound to the forward's signature: their tensors in the order of the forward's parameters
    (the order the captured graph, the compiled model's positional call and calibration take them), their argument
    names, and how many trailing ones torch.export is given by name (keyword-only, or after an argument left out
    at its default)."""

    tensors: tuple[torch.Tensor, ...]
    names: tuple[str, ...] = ()  # empty: the forward does not name them all (forward(*args))
    by_name: int = 0

    def split(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """`tensors` (in this order) as torch.export's (args, kwargs)."""
        cut = len(tensors) - self.by_name
        return tensors[:cut], dict(zip(self.names[cut:], tensors[cut:], strict=True))


def bind_examples(model: nn.Module, example_inputs: Any) -> Examples:
    """`example_inputs` (a tensor, a tuple in the forward's order, or a Mapping such as a tokenizer's BatchEncoding
    of argument name -> tensor, as `model(**enc)` takes it) bound to `model.forward`'s signature. Arguments a
    Mapping leaves out keep their defaults, fixed at compile time as non-tensor arguments are."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (AttributeError, TypeError, ValueError):
        params = None
    if not isinstance(example_inputs, Mapping):
        inputs = input_tuple(example_inputs)
        positional = [p.name for p in params or () if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(inputs) <= len(positional):
            return Examples(inputs, tuple(positional[: len(inputs)]))
        keyword = [p.name for p in params or () if p.kind is p.KEYWORD_ONLY]
        if keyword and not any(p.kind is p.VAR_POSITIONAL for p in params or ()):
            raise BitmixError(f"forward takes {', '.join(map(repr, keyword))} by keyword only; pass example_inputs "
                              f"as a dict of argument name -> tensor, e.g. {{{keyword[0]!r}: x}}")
        return Examples(inputs)  # more than the forward names: forward(*args), or the model's own error in capture
    if params is None:
        raise BitmixError(f"example_inputs is a dict, but the signature of {type(model).__name__}.forward cannot be "
                          "read; pass a tuple of tensors in the forward's order")
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    known = {p.name for p in named}
    unknown = [k for k in example_inputs if k not in known]
    if unknown and any(p.kind is p.VAR_KEYWORD for p in params):
        raise BitmixError(f"example_inputs has {unknown[0]!r}, which {type(model).__name__}.forward takes only through "
                          "**kwargs: bitmix binds inputs to named arguments; compile a wrapper whose forward names "
                          f"them (def forward(self, {', '.join(example_inputs)}): return model({unknown[0]}=..., ...))")
    if unknown:
        raise BitmixError(f"example_inputs has {unknown[0]!r}, which is not an argument of "
                          f"{type(model).__name__}.forward ({', '.join(p.name for p in named) or 'it names none'}); "
                          "key the dict by the forward's named arguments (not **kwargs), or pass a tuple")
    tensors, names, by_name, left_out = [], [], 0, False
    for p in named:
        value = example_inputs.get(p.name, p.default)
        if value is p.empty:
            raise BitmixError(f"example_inputs has no {p.name!r}, an argument of {type(model).__name__}.forward "
                              f"without a default; add it to the dict")
        if p.name not in example_inputs or not isinstance(value, torch.Tensor) and _is_default(value, p.default):
            left_out = True  # the arguments after it reach torch.export by name
            continue
        if not isinstance(value, torch.Tensor):
            raise _not_a_tensor(f"example_inputs[{p.name!r}]", value)
        if p.kind is p.POSITIONAL_ONLY and left_out:
            raise BitmixError(f"positional-only argument {p.name!r} of {type(model).__name__}.forward follows one "
                              "left at its default; give the arguments before it too")
        by_name += left_out or p.kind is p.KEYWORD_ONLY
        tensors.append(value)
        names.append(p.name)
    return Examples(_check_examples(tuple(tensors)), tuple(names), by_name)


def forward_arguments(model: nn.Module, names: tuple[str, ...]) -> tuple[tuple[str, bool, str, Any], ...]:
    """`InputSpec.arguments`: the forward's named arguments, `names` (the compiled inputs) among them and the others
    at the defaults the compile fixed; empty where the forward's signature cannot be read or does not name them all."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (AttributeError, TypeError, ValueError):
        return ()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return ()
    out: list[tuple[str, bool, str, Any]] = []
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            continue
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if p.name in names:
            out.append((p.name, positional, "input", None))
        elif p.default is None or isinstance(p.default, bool | int | float | str):
            out.append((p.name, positional, "fixed", p.default))
        else:
            out.append((p.name, positional, "opaque", repr(p.default)))
    return tuple(out) if sum(kind == "input" for _, _, kind, _ in out) == len(names) else ()


def _is_default(value: Any, default: Any) -> bool:
    """A non-tensor value that is its argument's default (None, a flag, a number): the same as leaving it out."""
    return value is default or (type(value) is type(default) and isinstance(value, bool | int | float | str)
                                and value == default)


def _not_a_tensor(what: str, arg: Any) -> BitmixError:
    return BitmixError(f"{what} is a {type(arg).__name__} ({arg!r:.40}), not a tensor: bitmix compiles the tensor "
                       "arguments only, and a non-tensor forward argument keeps its default; leave it out, or wrap "
                       "the model in a module that passes the value you want")


def _check_examples(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if not inputs:
        raise BitmixError("example_inputs hold no tensor; pass at least one input of the model")
    batched = [t for t in inputs if t.dim() > 0]
    if batched and all(t.shape[0] == 0 for t in batched):
        raise BitmixError(f"example_inputs hold no examples (shape {tuple(batched[0].shape)}: an empty batch); "
                          "pass at least one example")
    return inputs


def capture(model: nn.Module, example_inputs: tuple | torch.Tensor | Mapping[str, torch.Tensor],
            name: str | None = None, dynamic_shapes: Any = AUTO) -> LayerGraph:
    """Export `model` on `example_inputs` (`bind_examples`; dynamic dimensions: `bitmix.compiler.shapes`) and index
    its layers."""
    if not isinstance(model, nn.Module):
        raise BitmixError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    examples = bind_examples(model, example_inputs)
    inputs = examples.tensors
    _check_float32(model)
    exported = export(model, examples, dynamic_shapes)
    layers, vector_ops, deps, unsupported = _index(exported)
    if not layers:
        without = f" (ops without a bitmix kernel: {', '.join(unsupported)})" if unsupported else ""
        raise NoQuantizableLayers(
            f"the model has no quantizable layers (conv2d, linear, matmul/bmm); nothing for bitmix to do{without}"
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


def export(model: nn.Module, examples: Examples, dynamic_shapes: Any = AUTO) -> torch.export.ExportedProgram:
    """torch.export a deep copy in eval mode with symbolic dimensions (`bitmix.compiler.shapes`).

    A symbolic batch lets calibration, training and evaluation run batches of any size, and
    one compiled model serve any batch and sequence length. Shapes are read back at the
    example's sizes (`_shape`). If the inferred dimensions cannot be exported the model is
    exported for the example shapes only, with a warning; a spec given by the user is never
    replaced: its problems are reported as a one-line error.
    """
    inputs = examples.tensors
    dims = normalize(examples.names, inputs, dynamic_shapes)
    if dims is not None and any(dims):
        try:
            exported = _export(model, examples.split(traced_inputs(inputs, dims)), dims)
            _bind_symbols(exported, inputs)
            return exported
        except BitmixError as exc:
            if dynamic_shapes != AUTO:
                raise
            warnings.warn(f"bitmix: the model does not export with a symbolic batch/sequence ({exc}); "
                          "it is compiled for the example shapes only", stacklevel=3)
    return _export(model, examples.split(inputs), None)


EXPORT_LOCK = compile_lock  # Dynamo's lock around tracing a frame: an export beside a Dynamo trace breaks the trace


def export_program(module: nn.Module, inputs: tuple[Any, ...], dims: Any, kwargs: dict[str, Any] | None = None
                   ) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict), one at a time in this process, Numba's compiles held off.

    Non-strict export patches process globals while it traces (``torch/_export/non_strict_utils.py``): two
    exports at once (threads compiling two models, or two pieces of a ``torch.compile`` model) trip over each
    other's patches, a Dynamo trace in another thread breaks (so exports take Dynamo's tracing lock), and see
    `bitmix.kernels.registries` for what it does to Numba.
    """
    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs each failed trace's traceback
    with EXPORT_LOCK, numba_compiles_held():
        level = fake_tensor_log.level
        fake_tensor_log.setLevel(logging.CRITICAL)  # bitmix says what failed in one line (or retries static)
        try:
            return torch.export.export(module, inputs, kwargs, dynamic_shapes=dims, strict=False)
        finally:
            fake_tensor_log.setLevel(level)


def _export(model: nn.Module, call: tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]], dims: Any
            ) -> torch.export.ExportedProgram:
    """Export on `call` (args, kwargs); `dims` has one entry per tensor, in the order args then kwargs."""
    args, kwargs = call
    frozen = frozen_copy(model)
    params = list(inspect.signature(frozen.forward).parameters.values())
    if dims is not None and len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        dims = (dims,)  # forward(*args): torch.export wants one entry for the varargs
    try:
        with torch.no_grad():
            return decompose.decompose(export_program(frozen, args, dims, kwargs))
    except Exception as exc:  # torch raises many types here; all mean "cannot capture"
        shape_error = export_error(exc) if dims is not None else None
        if shape_error is not None:
            raise shape_error from None
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        eager = _eager_error(frozen, args, kwargs)
        if eager is not None:
            raise BitmixError(f"the model does not run on the example inputs ({eager}); "
                              "pass inputs it accepts (shapes, dtypes, one tensor per forward argument)") from None
        raise BitmixError(
            f"torch.export could not capture the model ({type(exc).__name__}: {first[:200]}); "
            "make control flow independent of tensor values (or use torch.cond) and avoid "
            "Python-side data conversions such as .item() or .tolist() in forward"
        ) from None


def _eager_error(model: nn.Module, inputs: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]) -> str | None:
    """Why a plain forward pass on `inputs` fails (first line), or None if it runs: an export failure the model
    itself would raise is the user's input, not something torch.export cannot trace. Run on a copy: the frozen
    model's parameters are the user's (`frozen_copy`), which a forward writing one in place must not change."""
    try:
        with torch.no_grad():
            copy.deepcopy(model)(*inputs, **kwargs)
    except Exception as exc:  # whatever the model raises
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        return f"{type(exc).__name__}: {first[:200]}"
    return None


def _check_float32(model: nn.Module) -> None:
    """The quantizers, kernels and simulator read float32 weights; a half / bfloat16 / double model fails deep in
    calibration otherwise."""
    names = getattr(model, "bitmix_state_names", None)  # a torch.compile piece: its names -> the user's, if known
    for name, t in model.named_parameters():
        if t.is_floating_point() and t.dtype != torch.float32:
            user = name if names is None else names.get(name)
            what = "a model parameter" if user is None else f"model parameter {user!r}"
            raise BitmixError(f"{what} is {t.dtype}; bitmix compiles float32 models: "
                              "pass model.float() and float32 example inputs")


def _bind_symbols(exported: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...]) -> None:
    """Record each input symbol's size in the user's example, to price shapes as traced."""
    user_inputs = exported.graph_signature.user_inputs
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    symbols = {}
    for name, t in zip(user_inputs, inputs, strict=False):
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, size in zip(val.shape, t.shape, strict=True):
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                symbols[d.node.expr] = int(size)
    exported.graph.meta = {**getattr(exported.graph, "meta", {}), "bitmix_batch": symbols}


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return ()
    symbols = node.graph.meta.get("bitmix_batch", {}) if hasattr(node.graph, "meta") else {}
    return tuple(_concrete(d, symbols) for d in val.shape)


def _concrete(d: int | torch.SymInt, symbols: dict) -> int:
    if isinstance(d, torch.SymInt):
        value = d.node.expr.subs(symbols)
        return int(value) if value.is_number else int(d.node.hint)  # a symbol no input binds: as traced
    return int(d)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path)


def weight_second_operands(node: torch.fx.Node) -> tuple[object, object, object, bool] | None:
    """(input, weight, bias, as_linear) of `x @ W (+ b)` written as mm / matmul / addmm with the weight (in, out)
    second, as GPT-2's `Conv1D` and hand-written layers do, or as `F.linear(x, W.t(), b)` (a decoder tied to its
    encoder's weight); None for any other node. `x @ V.t()` (`F.linear(x, V)` written out) gives V with
    `as_linear` True: V is the linear's weight (out, in) itself, where W is transposed to it. The weight and bias
    are graph nodes here; the caller checks they are parameters."""
    if node.target in LINEAR_OPS and len(node.args) >= 2:
        w = _transposed_2d(node.args[1])
        return None if w is None else (node.args[0], w, node.args[2] if len(node.args) > 2 else None, False)
    if node.target in (aten.mm.default, aten.matmul.default) and len(node.args) == 2:
        x, w, bias = node.args[0], node.args[1], None
    elif node.target == aten.addmm.default and len(node.args) == 3 and node.kwargs.get("beta", 1) == 1 \
            and node.kwargs.get("alpha", 1) == 1:
        x, w, bias = node.args[1], node.args[2], node.args[0]
    else:
        return None
    v = _transposed_2d(w)
    return (x, w, bias, False) if v is None else (x, v, bias, True)


def _transposed_2d(node: object) -> torch.fx.Node | None:
    """`W` where `node` is a 2-D `W` transposed (`W.t()`, `W.T`, `W.transpose(0, 1)`, `W.permute(1, 0)`), else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.args
            and isinstance(node.args[0], torch.fx.Node) and len(_shape(node.args[0])) == 2):
        return None
    if node.target in (aten.t.default, aten.numpy_T.default, aten.mT.default):
        return node.args[0]
    if node.target == aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]:
        return node.args[0]
    if node.target == aten.permute.default and [int(d) % 2 for d in node.args[1]] == [1, 0]:
        return node.args[0]
    return None


def _weight_second_layer(node: torch.fx.Node, params: dict[str, str], module: str,
                         nonneg: set[torch.fx.Node]) -> Layer | None:
    """`x @ W (+ b)` with a 2-D weight parameter W (in, out): a linear layer of weight W^T (`fold.prepare` inserts
    it so); `x @ V.t() (+ b)`: a linear layer of weight V."""
    operands = weight_second_operands(node)
    if operands is None:
        return None
    x, w, bias, as_linear = operands
    if not (isinstance(w, torch.fx.Node) and w.name in params and isinstance(x, torch.fx.Node)) or x.name in params:
        return None
    w_shape = _shape(w)
    if len(w_shape) != 2 or len(_shape(x)) < 1:
        return None
    if as_linear:
        w_shape = (w_shape[1], w_shape[0])
    has_bias = bias is not None
    if has_bias and not (isinstance(bias, torch.fx.Node) and bias.name in params and _shape(bias) == (w_shape[1],)):
        return None
    out_shape = _shape(node)
    return Layer(
        name=module or node.name, kind="linear", node=node.name, module=module,
        weight_shape=(w_shape[1], w_shape[0]), input_shape=_shape(x), output_shape=out_shape,
        macs=math.prod(out_shape) * w_shape[0], params=math.prod(w_shape) + (w_shape[1] if has_bias else 0),
        has_bias=has_bias, weight_param=params[w.name],
        bias_param=params[bias.name] if has_bias else None,  # type: ignore[union-attr]
        input_nonneg=x in nonneg,
    )


def _transposed_layer(node: torch.fx.Node, params: dict[str, str], module: str) -> Layer | None:
    """A transposed conv as its equivalent conv2d (`bitmix.compiler.transposed`): weight, shapes and MACs are
    those of the conv the kernels run; a dilation other than 1 has no equivalent here (None)."""
    x, w = node.args[0], node.args[1]
    if not isinstance(w, torch.fx.Node) or w.name not in params:
        return None
    w_shape, in_shape = _shape(w), _shape(x)
    if len(w_shape) not in (3, 4) or len(in_shape) != len(w_shape):
        return None
    if len(w_shape) == 3:  # conv_transpose1d: height 1
        w_shape, in_shape = _unit_height(w_shape), _unit_height(in_shape)
    g = transposed.node_geometry(node, in_shape)
    if g is None:
        return None
    c_in, c_out = w_shape[0], w_shape[1] * g.groups * g.stride[0] * g.stride[1]
    eq_shape = (c_out, c_in // g.groups, *g.taps)
    out_shape = (in_shape[0], c_out, *g.conv_out)
    bias = node.args[2] if len(node.args) > 2 else None
    has_bias = isinstance(bias, torch.fx.Node)
    return Layer(
        name=module or node.name, kind="conv2d", node=node.name, module=module,
        weight_shape=eq_shape, input_shape=in_shape, output_shape=out_shape,
        macs=math.prod(out_shape) * math.prod(eq_shape[1:]), params=math.prod(eq_shape) + (c_out if has_bias else 0),
        has_bias=has_bias, stride=(1, 1), padding=(g.pad[0], g.pad[1]), dilation=(1, 1), groups=g.groups,
        weight_param=params[w.name], bias_param=params.get(bias.name) if has_bias else None,
    )


def _explicit_padding(mode: str, kernel: tuple[int, ...], dilation: object) -> list[int] | None:
    """torch's `padding="valid"` / `"same"` as explicit symmetric padding per spatial dimension; None where
    "same" pads one side more than the other (an odd total `dilation * (k - 1)`), which a layer cannot express."""
    dil = [int(d) for d in dilation] if isinstance(dilation, list | tuple) else [int(dilation)]  # type: ignore[call-overload]
    dil = dil * len(kernel) if len(dil) == 1 else dil
    if mode == "valid":
        return [0] * len(kernel)
    totals = [d * (k - 1) for d, k in zip(dil, kernel, strict=True)]
    if mode != "same" or any(t % 2 for t in totals):
        return None
    return [t // 2 for t in totals]


def _unit_height(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A conv1d shape (N, C, L) or weight (C_out, C_in/g, k) as its conv2d of height 1."""
    return (*shape[:2], 1, *shape[2:])


def _pair(v: object) -> tuple[int, int]:
    if isinstance(v, list | tuple):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))  # type: ignore[call-overload]


def _behind_layout(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor a chain of layout ops (a transpose, a view) starts from: a linear fed `weight.t()` (weights
    tied transposed) still reads a parameter."""
    while (node.op == "call_function" and node.all_input_nodes
           and getattr(node.target, "__name__", "").split(".")[0] in LAYOUT_OPS):
        node = node.all_input_nodes[0]
    return node


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
    nonneg = nonneg_nodes(exported.graph)
    last_layer: str | None = None

    for node in exported.graph.nodes:
        inputs = [a for a in node.all_input_nodes]
        sources = frozenset().union(*(reach.get(a, frozenset()) for a in inputs)) if inputs else frozenset()
        if node.op != "call_function":
            reach[node] = sources
            continue
        layer = _layer_for(node, params, nonneg)
        if layer is not None and (too_long := _reduction_too_long(layer)) is not None:
            reach[node] = sources
            unsupported.append(f"{layer.name} ({layer.kind}, {too_long})")  # host FP32, as the ops below
            continue
        if layer is None:
            reach[node] = sources
            op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if (op in NO_KERNEL_OPS or op == "linear") and any(_behind_layout(a).name in params for a in inputs):
                unsupported.append(f"{_module_path(node) or node.name} ({op})")  # host FP32: not priced (nor as
                continue  # a vector op at one operation per output, as a conv3d's 113 M MACs once were)
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
    layers, vector_ops, deps = _live(exported.graph, layers, vector_ops, deps)
    return _with_crossing(exported.graph, layers), vector_ops, deps, unsupported


def _reduction_too_long(layer: Layer) -> str | None:
    """Why `layer`'s reduction (K) is longer than its kernel takes (`bitmix.kernels.limits`), or None if it fits.

    Such a layer stays FP32 with the unsupported ops: quantized, its first kernel call would fail.
    """
    if layer.kind == "matmul":
        k, limit = layer.input_shape[-1], MAX_BMM_K
    else:
        k, limit = math.prod(layer.weight_shape[1:]), max_weight_k()  # linear (out, in); conv (out, in/g, kh, kw)
    return f"reduction {k} > {limit}" if k > limit else None


def _live(
    graph: torch.fx.Graph, layers: list[Layer], vector_ops: list[VectorOp], deps: nx.DiGraph
) -> tuple[list[Layer], list[VectorOp], nx.DiGraph]:
    """Only the work whose result reaches the model's output (a sentence encoder drops BERT's pooler).

    Dead ops are never run by a deployed model, so they are neither priced nor quantized, and the
    last layer (the one targets pin) is the last that reaches the output.
    """
    live = _live_nodes(graph)
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


def _live_nodes(graph: torch.fx.Graph) -> set[str]:
    """Names of the nodes whose result reaches the model's output."""
    live: set[str] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node.name not in live:
            live.add(node.name)
            stack.extend(node.all_input_nodes)
    return live


def _with_crossing(graph: torch.fx.Graph, layers: list[Layer]) -> list[Layer]:
    """`Layer.crossing` for each layer: what a multi-chip pipeline's PCIe link carries beyond the layer's inputs.

    Every op runs on the chip of the layer it follows (chip 0 before any layer). A tensor made on chip
    before the boundary that an op at or after it reads must cross; layout ops (a view, a transpose) read
    the tensor they relabel. Model inputs and constants are not counted: the host hands them to any chip.
    """
    index = {layer.node: i for i, layer in enumerate(layers)}
    live = _live_nodes(graph)
    source: dict[torch.fx.Node, torch.fx.Node | None] = {}
    made_at: dict[torch.fx.Node, int] = {}
    read_until: dict[torch.fx.Node, int] = {}
    own: list[set[torch.fx.Node]] = [set() for _ in layers]
    at = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.name not in live:
            source[node] = None  # inputs, parameters, constants: the host's (dead ops never run)
            continue
        at = index.get(node.name, at)
        inputs = node.all_input_nodes
        op = getattr(node.target, "__name__", "").split(".")[0]
        if op in LAYOUT_OPS and (not inputs or _shape(inputs[0])):
            # an alias of its input's tensor; a layout op without inputs (arange, zeros) makes a constant
            source[node] = source[inputs[0]] if inputs else None
            continue
        source[node] = node  # a new tensor (a getitem of a tuple result is one too)
        made_at[node] = at
        for a in inputs:
            t = source[a]
            if t is not None and _shape(t):
                read_until[t] = max(read_until.get(t, at), at)
                if node.name in index:
                    own[at].add(t)
    per_boundary = [0] * (len(layers) + 1)
    for t, last in read_until.items():
        if last > made_at[t]:  # read on a later layer's chip: crosses every boundary in (made, last]
            n = math.prod(_shape(t))
            per_boundary[made_at[t] + 1] += n
            per_boundary[last + 1] -= n
    out, carried = [], 0
    for i, layer in enumerate(layers):
        carried += per_boundary[i]
        inputs = sum(math.prod(_shape(t)) for t in own[i] if made_at[t] < i)
        out.append(replace(layer, crossing=carried - inputs) if carried > inputs else layer)
    return out


def _renamed(layer: Layer, name: str) -> Layer:
    fields = {f: getattr(layer, f) for f in layer.__dataclass_fields__}
    fields["name"] = name
    return Layer(**fields)


def _layer_for(node: torch.fx.Node, params: dict[str, str], nonneg: set[torch.fx.Node]) -> Layer | None:
    target = node.target
    out_shape = _shape(node)
    module = _module_path(node)
    if transposed.is_transposed(node):
        return _transposed_layer(node, params, module)
    if target in CONV_OPS:
        x, w = node.args[0], node.args[1]
        if not isinstance(w, torch.fx.Node) or w.name not in params:
            return None
        w_shape, in_shape = _shape(w), _shape(x)
        if len(w_shape) not in (3, 4) or len(in_shape) != len(w_shape):  # conv3d; an unbatched input
            return None
        bias = node.args[2] if len(node.args) > 2 else None
        if target == aten.convolution.default:
            stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
        else:
            stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]) :])
        if isinstance(padding, str):
            padding = _explicit_padding(padding, w_shape[2:], dilation)
            if padding is None:
                return None
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        if len(w_shape) == 3:  # conv1d: a conv2d of height 1 (`fold.prepare` inserts the unit dimension)
            w_shape, in_shape, out_shape = (_unit_height(s) for s in (w_shape, in_shape, out_shape))
            stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
        c_out, c_in_g, kh, kw = w_shape
        macs = math.prod(out_shape) * c_in_g * kh * kw
        has_bias = isinstance(bias, torch.fx.Node)
        return Layer(
            name=module or node.name, kind="conv2d", node=node.name, module=module,
            weight_shape=w_shape, input_shape=in_shape, output_shape=out_shape, macs=macs,
            params=math.prod(w_shape) + (c_out if has_bias else 0), has_bias=has_bias,
            stride=stride, padding=padding, dilation=dilation, groups=int(groups),
            weight_param=params[w.name], bias_param=params.get(bias.name) if has_bias else None,
        )
    if target in LINEAR_OPS:
        x, w = node.args[0], node.args[1]
        if not isinstance(w, torch.fx.Node) or w.name not in params:
            return _weight_second_layer(node, params, module, nonneg)
        bias = node.args[2] if len(node.args) > 2 else None
        w_shape = _shape(w)
        has_bias = isinstance(bias, torch.fx.Node)
        return Layer(
            name=module or node.name, kind="linear", node=node.name, module=module,
            weight_shape=w_shape, input_shape=_shape(x), output_shape=out_shape,
            macs=math.prod(out_shape) * w_shape[1],
            params=math.prod(w_shape) + (w_shape[0] if has_bias else 0), has_bias=has_bias,
            weight_param=params[w.name], bias_param=params.get(bias.name) if has_bias else None,
            input_nonneg=x in nonneg,
        )
    weight_second = _weight_second_layer(node, params, module, nonneg)
    if weight_second is not None:
        return weight_second
    if target in MATMUL_OPS:
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            return None
        # a weight first (`W @ x`, also through a view: `W.t().t() @ x`) has no kernel: FP32, "no kernel" in `_index`
        if _behind_layout(a).name in params or b.name in params or len(_shape(a)) < 2 or len(_shape(b)) < 2:
            return None
        k = _shape(a)[-1]
        prefix = f"{module}." if module else ""
        return Layer(
            name=f"{prefix}{node.name}", kind="matmul", node=node.name, module=module,
            weight_shape=_shape(b), input_shape=_shape(a), output_shape=out_shape,
            macs=math.prod(out_shape) * k, params=0,
        )
    return None
