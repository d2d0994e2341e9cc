"""`torch.compile(model, backend="bitmix")`: the compile pipeline as a TorchDynamo backend.

Registered through the `torch_dynamo_backends` entry point. Options
(`torch.compile(m, backend="bitmix", options={...})`):

- `target` (default `"int8-npu"`): a bitmix target name or `Target`;
- `budget` (default `1.0`): simulated cost allowed, as a fraction of the all-highest assignment
  (below the cheapest assignment of a graph piece the cheapest is used, with a warning);
- `method` (default `"eagl"`): a sensitivity method that needs no labeled data (`sqnr` scores on the
  calibration inputs, which the backend always has);
- `calibration`: unlabeled inputs of the model for activation step sizes (a tensor, a tuple
  of tensors or an iterable of batches); by default the real inputs of the first call;
- `chip_config`: a chip TOML file overriding the target's chip.

The defaults are safe without user data: W8A8 everywhere. Any other option is a one-line
error. Dynamo hands the backend a graph whose parameters *and* buffers (e.g. BatchNorm's
running statistics) are inputs; they are put back into a module as state, so export and BN
folding see them. The piece is compiled on its first real call, calibrated on that call's
tensors (never on invented data); Dynamo's recompiles of it (a new batch size, a grad-mode
change) calibrate on those same tensors where they fit, so an answer does not depend on the
requests served before it (a static piece at a new shape calibrates on its own call).
Dynamo decides which sizes vary: a static piece is exported for its shapes (Dynamo
recompiles on a new shape, then with symbolic sizes), and
Dynamo's symbolic sizes (also with `dynamic=True`) become symbolic dimensions of the export. A piece with no
conv/linear/matmul (e.g. the glue between two graph breaks) runs eagerly.

Limits: Dynamo itself skips a frame that calls `nn.RNN`/`nn.GRU`/`nn.LSTM` unless
`torch._dynamo.config.allow_rnn = True` (such a forward runs in eager FP32 and never reaches
this backend; with it set, the recurrent op stays FP32 with a warning and the rest is quantized);
graph breaks compile each piece separately (first/last pinning applies per piece,
and `calibration` only fits a model that is one piece); the packed weights are those of the
first call: changing the model's weights afterwards needs `torch._dynamo.reset()`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch._dynamo.source import AttrSource
from torch.export import Dim
from torch.nn import functional as F  # noqa: N812

from bitmix.errors import BitmixError

OPTIONS = ("target", "method", "budget", "calibration", "chip_config")
DEFAULTS: dict[str, Any] = {"target": "int8-npu", "method": "eagl", "budget": 1.0}


def parse_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The backend's options with defaults; unknown ones and labeled-data methods are one-line errors."""
    from bitmix.compiler import sensitivity

    if options is not None and not isinstance(options, dict):
        raise BitmixError(f"options for torch.compile(backend='bitmix') must be a dict such as "
                          f"{{'target': 'int8-npu'}}, got {type(options).__name__}")
    given = dict(options or {})
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise BitmixError(f"unknown option {unknown[0]!r} for torch.compile(backend='bitmix'); "
                          f"known options: {', '.join(OPTIONS)}")
    merged = {**DEFAULTS, **given}
    free = sensitivity.label_free()
    if sensitivity.resolve(merged["method"])[0].name not in free:
        raise BitmixError(f"method {merged['method']!r} needs labeled data, which torch.compile cannot pass; "
                          f"use one of {', '.join(free)} (or bitmix.compile with data=...)")
    return merged


class _Lifted(nn.Module):
    """A Dynamo graph piece as a module: lifted parameters and buffers back as state, sizes from the inputs.

    `forward` takes only the piece's user tensors; Dynamo's symbolic-size arguments are read
    off those tensors' shapes, so export traces them as symbolic dimensions.
    """

    def __init__(self, gm: fx.GraphModule, slots: list[tuple[str, Any]], state: list[torch.Tensor],
                 names: list[str | None]) -> None:
        super().__init__()
        self.gm = gm
        self.slots = slots
        # what errors call `state{i}`: the user's name for it (None: not known)
        self.bitmix_state_names = {f"state{i}": name for i, name in enumerate(names)}
        for i, t in enumerate(state):
            if isinstance(t, nn.Parameter):
                self.register_parameter(f"state{i}", nn.Parameter(t.detach(), requires_grad=False))
            else:
                self.register_buffer(f"state{i}", t.detach())

    def forward(self, *args: torch.Tensor) -> Any:
        full = []
        for kind, ref in self.slots:
            if kind == "state":
                full.append(getattr(self, f"state{ref}"))
            elif kind == "user":
                full.append(args[ref])
            elif kind == "scalar":
                full.append(torch.tensor(ref, dtype=torch.float64))  # unused: the graph holds its value
            else:
                k, method, index = ref
                value = getattr(args[k], method)
                full.append(value() if index is None else value(index))
        return self.gm(*full)


def bitmix_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
    options = kwargs.get("options")
    scalars = _attribute_floats(gm, example_inputs)
    eager = copy.deepcopy(gm) if scalars else gm  # as traced, before `_write_floats` changes `gm`
    _write_floats(gm, scalars)
    slots = _slots(gm, example_inputs, scalars)
    compiled: dict[str, _Piece] = {}

    def run(*args: Any) -> Any:
        if any(float(args[i]) != value for i, value in scalars.items()):
            return eager(*args)  # a module float changed since it was compiled in: the graph as traced
        if "piece" not in compiled:
            compiled["piece"] = _shared_piece(gm, slots, args, options)
        return compiled["piece"].run(*args)

    return run


_COMPILING = threading.Lock()


@dataclasses.dataclass(eq=False)
class _Piece:
    """A compiled graph piece and the weight tensor it was compiled over (looked up by id, checked by identity)."""

    run: Callable[..., Any]
    owner: weakref.ref | None


# Compiled pieces, held alive only by the Dynamo cache entries whose `run` uses them (`torch._dynamo.reset()` frees
# them); keyed by graph, shapes, weights (ids and in-place versions) and options.
_PIECES: weakref.WeakValueDictionary[tuple, _Piece] = weakref.WeakValueDictionary()
# id of a piece's first weight -> per piece (`_tensor_ops`) the user tensors of its first call; freed with the weight.
_FIRST_CALLS: dict[int, dict[tuple[str, ...], tuple[torch.Tensor, ...]]] = {}


def _shared_piece(gm: fx.GraphModule, slots: list[tuple[str, Any]] | str, args: tuple[Any, ...],
                  options: dict[str, Any] | None) -> _Piece:
    """One compile per graph piece and shapes, however many threads call it first at once, all calibrated alike.

    Dynamo traces a frame again in every thread that entered it before the first trace was installed, and
    hands each trace to the backend: the same graph over the same weights. Each compiling its own copy exported
    them concurrently and calibrated each on another request's tensors, so answers depended on which copy
    Dynamo later picked. Dynamo also recompiles a piece on a new batch size or grad mode; calibrating each
    recompile on its own call's tensors made the answer to a request depend on the requests before it, so
    recompiles calibrate on the piece's first call wherever those tensors fit the new graph.
    """
    if isinstance(slots, str):  # runs eagerly (`_compile_piece` says why): nothing to share or calibrate
        return _Piece(_compile_piece(gm, slots, args, options), None)
    kinds = [kind for kind, _ in slots]
    state = [a for kind, a in zip(kinds, args, strict=True) if kind == "state"]
    key = (gm.code, tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args),
           tuple((id(t), t._version) for t in state), id(options))
    from bitmix.compiler.capture import EXPORT_LOCK

    # `capture.EXPORT_LOCK` (Dynamo's tracing lock) for the whole compile, not only its export: torch.export in one
    # thread while Dynamo traced in another broke Dynamo, which then ran the frame in eager FP32 (torch 2.13)
    with EXPORT_LOCK, _COMPILING:
        piece = _PIECES.get(key)
        if piece is not None and (not state or piece.owner is not None and piece.owner() is state[0]):
            return piece
        user = tuple(a.detach().clone() for kind, a in zip(kinds, args, strict=True) if kind == "user")
        first = user
        if state:
            if id(state[0]) not in _FIRST_CALLS:
                weakref.finalize(state[0], _FIRST_CALLS.pop, id(state[0]), None)
            first = _FIRST_CALLS.setdefault(id(state[0]), {}).setdefault(_tensor_ops(gm), user)
        piece = _PIECES[key] = _Piece(_compile_piece(gm, slots, args, options, first),
                                      weakref.ref(state[0]) if state else None)
        return piece


def _tensor_ops(gm: fx.GraphModule) -> tuple[str, ...]:
    """The piece's tensor ops in order, sizes left out: alike for Dynamo's recompiles of one piece at other shapes
    or grad mode, different for two pieces over the same weights (the two branches of a data-dependent `if`)."""
    return tuple(str(node.target) for node in gm.graph.nodes
                 if node.op in ("call_function", "call_method", "call_module")
                 and isinstance(node.meta.get("example_value"), torch.Tensor))


def _attribute_floats(gm: fx.GraphModule, example_inputs: list[Any]) -> dict[int, float]:
    """{input index: value} of the attribute floats Dynamo passes as 0-d tensors only to read them back with
    `.item()` (with `dynamic=True`, a LayerNorm's or BatchNorm's `eps` and `momentum`). Export cannot trace an
    op whose argument is a tensor's value, so `_write_floats` puts them into the graph. A float computed in
    the model (a `.item()` before a graph break) is no attribute: it changes every call and stays an input."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {i: float(example) for i, (node, example) in enumerate(zip(placeholders, example_inputs, strict=True))
            if getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False)
            and isinstance(_source(node), AttrSource) and isinstance(example, torch.Tensor)
            and example.dim() == 0 and example.is_floating_point() and node.users
            and all(u.op == "call_method" and u.target == "item" for u in node.users)}


def _write_floats(gm: fx.GraphModule, values: dict[int, float]) -> None:
    """Replace each `.item()` of the inputs `values` names by the value itself, in place."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, value in values.items():
        for item in list(placeholders[i].users):
            for use in list(item.users):
                use.args = tuple(value if a is item else a for a in use.args)
                use.kwargs = {k: value if v is item else v for k, v in use.kwargs.items()}
            gm.graph.erase_node(item)
    if values:
        gm.recompile()


def _slots(gm: fx.GraphModule, example_inputs: list[Any], scalars: dict[int, float] | None = None
           ) -> list[tuple[str, Any]] | str:
    """Per graph input: ("state", k), ("user", k), ("size", (user k, method, index)) or ("scalar", value)
    (`_attribute_floats`).

    A "size" is a size, stride or storage offset Dynamo passes for a symbolic input: it is
    read off the user tensor it came from. Returns why the piece cannot be lifted, if so.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    slots: list[tuple[str, Any]] = []
    state = user = 0
    users: dict[str, int] = {}
    for i, (node, example) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if i in (scalars or {}):
            slots.append(("scalar", scalars[i]))
        elif _is_state(node, example):
            slots.append(("state", state))
            node.meta["bitmix_name"] = _state_name(node)  # Dynamo drops the source before the first call
            state += 1
        elif isinstance(example, torch.Tensor):
            slots.append(("user", user))
            node.meta["bitmix_user"] = user
            users[_source_name(_source(node))] = user
            user += 1
        else:
            slots.append(("size", node))
    for i, (kind, ref) in enumerate(slots):
        if kind == "size":
            source = _source(ref)
            base = _source_name(getattr(source, "base", None))
            prop = getattr(source, "prop", None)
            if base not in users or prop is None:
                return f"input {ref.name} is not a size of a tensor input"
            slots[i] = ("size", (users[base], prop.method_name(), getattr(source, "idx", None)))
    return slots


def _source(node: fx.Node) -> Any:
    return getattr(node.meta.get("grapharg"), "source", None)


_STEP = r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.(\w+)"  # one step of a Dynamo source into a module


def _state_name(node: fx.Node) -> str | None:
    """The user's name of a lifted parameter or buffer ('0.weight') from Dynamo's source
    (`L['fn']._modules['0']._parameters['weight']`), None if the source is not such a chain. The module
    torch.compile was given (L['self'], L['fn']) is left out, as `named_parameters` leaves it out; any other
    root (a global, a function's argument) is kept."""
    text = _source_name(_source(node))
    root = re.match(r"([LG])\['([^']+)'\]", text)
    if root is None or re.fullmatch(f"(?:{_STEP})+", text[root.end():]) is None:
        return None
    parts = [] if root[1] == "L" and root[2] in ("self", "fn") else [root[2]]
    return ".".join(parts + [key or attr for key, attr in re.findall(_STEP, text[root.end():])])


def _source_name(source: Any) -> str:
    return str(getattr(source, "name", "")) if source is not None else ""


def _is_state(node: fx.Node, example: Any) -> bool:
    """Parameters, and buffers that Dynamo lifted from a module (BN running statistics)."""
    if isinstance(example, nn.Parameter):
        return True
    guard = getattr(_source(node), "guard_source", None)
    return guard is not None and (guard.is_unspecialized_nn_module() or guard.is_specialized_nn_module())


def _compile_piece(gm: fx.GraphModule, slots: list[tuple[str, Any]] | str, args: tuple[Any, ...],
                   options: dict[str, Any] | None, first_call: tuple[torch.Tensor, ...] | None = None
                   ) -> Callable[..., Any]:
    """bitmix.compile one graph piece on its first real call. Calibration: the `calibration` option, else
    `first_call` (the user tensors of the piece's first call) where they fit this graph, else this call's."""
    from bitmix.budget import Budget
    from bitmix.compiler.pipeline import CompileOptions
    from bitmix.compiler.pipeline import compile as bitmix_compile
    from bitmix.errors import NoQuantizableLayers
    from bitmix.ir.targets import get_target

    opts = parse_options(options)
    from bitmix.compiler.capture import FUSED_INFERENCE_OPS

    fused = sorted({name for node in gm.graph.nodes
                    if (name := getattr(node.target, "__name__", "")) in FUSED_INFERENCE_OPS})
    if fused:
        warnings.warn(f"bitmix: this graph piece calls PyTorch's fused transformer inference op ({', '.join(fused)}: "
                      "nn.TransformerEncoderLayer / nn.MultiheadAttention in eval mode under no_grad), whose linears "
                      "bitmix cannot reach, so it stays FP32; call torch.backends.mha.set_fastpath_enabled(False) "
                      "before torch.compile to have them quantized", stacklevel=3)
    training = _training_ops(gm)
    if training:
        warnings.warn(f"bitmix: this graph piece was traced in training mode ({training}); bitmix compiles it "
                      "as traced, but quantizes for inference and never updates BatchNorm running statistics (eager "
                      "training mode would): call model.eval() before torch.compile", stacklevel=3)
    if isinstance(slots, str):
        warnings.warn(f"bitmix: a graph piece runs in eager PyTorch ({slots}); pass dynamic=False to "
                      "torch.compile to keep it on the bitmix kernels", stacklevel=3)
        return gm.forward
    state = [a for (kind, _), a in zip(slots, args, strict=True) if kind == "state"]
    user = tuple(a for (kind, _), a in zip(slots, args, strict=True) if kind == "user")
    batched = [t for t in user if t.dim() > 0]
    if batched and all(t.shape[0] == 0 for t in batched):  # an empty request (Dynamo specialises size 0)
        return gm.forward  # nothing to calibrate on; eager gives the empty answer
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [node.meta.get("bitmix_name") for node, (kind, _) in zip(placeholders, slots, strict=True)
             if kind == "state"]
    lifted = _Lifted(_fold_computed_weights(gm, slots, state), slots, state, names)
    calibration = opts.pop("calibration", None)
    dims = _dims(gm, user)
    if calibration is None:
        calibration = first_call if first_call is not None and _fits(first_call, user, dims) else user
    try:
        budget = Budget.of(opts["budget"])
        if budget.fraction is not None and budget.fraction < 1.0:  # may be under a small piece's cheapest
            budget = dataclasses.replace(budget, clamp=True)
        cm = bitmix_compile(lifted, user, get_target(opts["target"], opts.get("chip_config")), method=opts["method"],
                            budget=budget, data=calibration,
                            options=CompileOptions(frontier_points=0, dynamic_shapes=dims))
    except NoQuantizableLayers:
        return gm.forward  # e.g. the glue between two graph breaks: nothing to quantize
    kinds = [kind for kind, _ in slots]

    def run(*call_args: Any) -> Any:
        return cm(*[a for a, kind in zip(call_args, kinds, strict=True) if kind == "user"])

    return run


# ops whose second argument (or `weight=`) is a layer's weight: bitmix quantizes it when it is a parameter
_WEIGHTED = (torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
             torch.conv_transpose3d, F.linear)
_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "poisson")


def _fold_computed_weights(gm: fx.GraphModule, slots: list[tuple[str, Any]], state: list[torch.Tensor]
                           ) -> fx.GraphModule:
    """`gm`, or a copy in which each conv's or linear's weight that Dynamo computes from parameters alone (weight norm,
    spectral norm, any `torch.nn.utils.parametrize` parametrization: Dynamo inlines them) is one parameter, computed
    here once. `bitmix.compile` bakes parametrizations into the weights (`frozen`); the backend sees only the
    computation, and a layer whose weight is not a parameter stayed FP32. The packed weights are those of the first
    call anyway (the module docstring), so this adds no new staleness."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    known = dict(zip([n for n, (kind, _) in zip(placeholders, slots, strict=True) if kind == "state"], state,
                     strict=True))
    weights = []
    for node in gm.graph.nodes:
        w = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
        if (node.op == "call_function" and node.target in _WEIGHTED and isinstance(w, fx.Node)
                and w.op != "placeholder" and w not in weights and _from_state(w, known)):
            weights.append(w)
    if not weights:
        return gm
    folded = copy.deepcopy(gm)
    twin = dict(zip(gm.graph.nodes, folded.graph.nodes, strict=True))
    with torch.no_grad():
        for i, w in enumerate(weights):
            name = f"bitmix_weight{i}"
            folded.register_parameter(name, nn.Parameter(_evaluate(w, known).detach().clone(), requires_grad=False))
            node = twin[w]
            with folded.graph.inserting_before(node):
                constant = folded.graph.get_attr(name)
            for use in list(node.users):
                if use.op == "call_function" and use.target in _WEIGHTED:
                    use.replace_input_with(node, constant)
    folded.graph.eliminate_dead_code()
    folded.recompile()
    return folded


def _from_state(node: fx.Node, state: dict[fx.Node, torch.Tensor]) -> bool:
    """Whether `node` is computed from parameters and buffers alone, by ops that draw no random numbers and write
    nothing in place."""
    if node in state:
        return True
    name = getattr(node.target, "__name__", str(node.target))
    if node.op not in ("call_function", "call_method") or name.endswith("_") or any(r in name for r in _RANDOM):
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(_from_state(n, state) for n in inputs)


def _evaluate(node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    """The value of a `_from_state` node (its inputs' values memoised in `values`)."""
    if node not in values:
        args = fx.node.map_arg(node.args, lambda n: _evaluate(n, values))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: _evaluate(n, values))
        target = node.target if node.op == "call_function" else getattr(args[0], node.target)
        values[node] = target(*args, **kwargs) if node.op == "call_function" else target(*args[1:], **kwargs)
    return values[node]


_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


def _training_ops(gm: fx.GraphModule) -> str:
    """The training-mode ops of a Dynamo graph ("" if none): batch statistics in batch_norm, live dropout."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is F.batch_norm and node.kwargs.get("training", len(node.args) > 5 and node.args[5]):
            found.append("batch_norm on batch statistics")
        elif node.target in _DROPOUTS and node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True):
            found.append("dropout")
    return ", ".join(dict.fromkeys(found))


def _fits(tensors: tuple[torch.Tensor, ...], user: tuple[torch.Tensor, ...],
          dims: tuple[dict[int, Any], ...] | None) -> bool:
    """Whether `tensors` can run through a piece traced on `user` (sizes differ only where `dims` are symbolic)."""
    if len(tensors) != len(user):
        return False
    for i, (t, u) in enumerate(zip(tensors, user, strict=True)):
        free = dims[i] if dims is not None else {}
        if t.dtype != u.dtype or t.dim() != u.dim() or any(
                a != b and d not in free for d, (a, b) in enumerate(zip(t.shape, u.shape, strict=True))):
            return False
    return True


def _dims(gm: fx.GraphModule, user: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...] | None:
    """The dimensions Dynamo made symbolic (a static piece bakes its sizes into views: nothing else can vary)."""
    dims: list[dict[int, Any]] = [{} for _ in user]
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.meta.get("bitmix_user") is not None:
            for d, size in enumerate(getattr(node.meta.get("example_value"), "shape", ())):
                if isinstance(size, torch.SymInt):
                    dims[node.meta["bitmix_user"]][d] = Dim.AUTO
    return tuple(dims) if any(dims) else None
