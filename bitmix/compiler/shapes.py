"""Dynamic shapes: which input dimensions a compiled model takes at any size.

`bitmix.compile` exports with symbolic dimensions so that one compiled model serves every
batch size and, for sequence models, every sequence length up to the model's maximum.
By default (`dynamic_shapes="auto"`) the batch dimension (dim 0) of every input and every
dimension past the batch of integer inputs (token ids, attention masks, positions) are
marked `Dim.AUTO`: torch.export keeps each one symbolic unless the model pins it, and
derives the ranges (e.g. sequence <= 512 from BERT's position table). A torch.export
`dynamic_shapes` spec (tuple per input, or dict keyed by forward argument) is used as
given; `None` exports static shapes.

torch.export specialises size-1 dimensions, so a symbolic dimension whose example size is
1 is traced at size 2 (the example repeated); shapes are priced at the example's sizes.
`InputSpec.check` turns a call at a shape the export did not allow into one line naming
the input and dimension, instead of a torch shape error deep inside the graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import Dim
from torch.utils._sympy.numbers import IntInfinity

from bitmix.errors import BitmixError

AUTO = "auto"


def normalize(names: tuple[str, ...], inputs: tuple[torch.Tensor, ...], spec: Any) -> tuple[dict[int, Any], ...] | None:
    """A torch.export spec as one {dim: Dim} dict per input, in the order of `inputs` (`names`: their forward
    argument names, for a spec keyed by name; None: static)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != AUTO:
            raise BitmixError(f"dynamic_shapes must be 'auto', None or a torch.export spec, got {spec!r}")
        return tuple(_inferred(t) for t in inputs)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise BitmixError(f"dynamic_shapes names {unknown[0]!r}, which is not one of the inputs "
                              f"({', '.join(names) or 'unnamed: give a tuple, one entry per input'})")
        spec = tuple(spec.get(n) for n in names)
    if not isinstance(spec, Sequence) or len(spec) != len(inputs):
        count = len(spec) if isinstance(spec, Sequence) else type(spec).__name__
        raise BitmixError(f"dynamic_shapes has {count} entries but the model takes {len(inputs)} input(s); "
                          "give one entry (a {dim: Dim} dict or None) per input")
    return tuple(_per_input(i, t, s) for i, (t, s) in enumerate(zip(inputs, spec, strict=True)))


def _inferred(t: torch.Tensor) -> dict[int, Any]:
    if t.dim() == 0:
        return {}
    dims = range(t.dim()) if not (t.dtype.is_floating_point or t.dtype.is_complex) else range(1)
    return {d: Dim.AUTO for d in dims}


def _per_input(i: int, t: torch.Tensor, s: Any) -> dict[int, Any]:
    if s is None:
        return {}
    if isinstance(s, list | tuple):
        s = {d: v for d, v in enumerate(s) if v is not None}
    if not isinstance(s, dict):
        raise BitmixError(f"dynamic_shapes entry {i} must be a {{dim: Dim}} dict, a list or None, "
                          f"got {type(s).__name__}")
    bad = [d for d in s if not isinstance(d, int) or not -t.dim() <= d < t.dim()]
    if bad:
        raise BitmixError(f"dynamic_shapes entry {i} names dim {bad[0]!r}, but input {i} has shape "
                          f"{tuple(t.shape)}")
    return {d % t.dim(): v for d, v in s.items() if v is not None and not isinstance(v, int)}


def traced_inputs(inputs: tuple[torch.Tensor, ...], dims: tuple[dict[int, Any], ...]) -> tuple[torch.Tensor, ...]:
    """Repeat size-1 symbolic dimensions to size 2 (torch.export specialises size 1)."""
    out = []
    for t, d in zip(inputs, dims, strict=True):
        for dim in d:
            if t.shape[dim] == 1:
                t = torch.cat([t, t], dim=dim)
        out.append(t)
    return tuple(out)


def export_error(exc: Exception) -> BitmixError | None:
    """One line for a dynamic_shapes spec torch.export rejects (None: not a shape-spec problem)."""
    text = str(exc)
    if "Constraints violated" not in text and "dynamic_shapes" not in text and "specialized" not in text:
        return None
    lines = [ln.strip(" -") for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if ln.startswith(("Not all values", "You marked", "Expected"))), lines[0])
    detail = detail.split(" If you're")[0]  # drop torch's advice about mark_dynamic, which bitmix users never call
    fixes = [ln for ln in lines if "= Dim(" in ln or ln.startswith("dynamic_shapes")]
    hint = f"; torch suggests {', '.join(fixes)}" if fixes else ""
    return BitmixError(f"dynamic_shapes does not match the model: {detail[:240]}{hint}")


def dtype_kind(dtype: torch.dtype) -> str:
    """What a call may change about an input's dtype: a float width, an integer width, never the kind.

    The compiled model computes in float32 whatever float width it gets (as its layers' steps are float32);
    an integer image or float token ids would be silently misread, and a complex input into a real model lose
    its imaginary part (eager PyTorch refuses it), so those are refused.
    """
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


@dataclass(frozen=True)
class InputSpec:
    """Per input: its name and, per dimension, a fixed size or a symbol with its allowed range."""

    names: tuple[str, ...]
    dims: tuple[tuple[int | str, ...], ...]
    ranges: tuple[tuple[str, int, int | None], ...]  # (symbol, min, max); None: unbounded
    kinds: tuple[str, ...] = ()  # per input: "float", "complex", "integer" or "bool" (empty: saved before kinds)
    dtypes: tuple[str, ...] = ()  # per input: its dtype as exported, "int64" (empty: files saved before dtypes)
    # the forward's named arguments in order, as (name, positional, kind, value): kind "input" (a compiled input),
    # "fixed" (left at `value`, a default None / bool / int / float / str) or "opaque" (another default, `value` its
    # repr); empty: not known (forward(*args), a torch.compile piece, files saved before them)
    arguments: tuple[tuple[str, bool, str, Any], ...] = ()

    def __post_init__(self) -> None:
        bad = [d for d in self.dtypes if not isinstance(getattr(torch, str(d), None), torch.dtype)]
        if bad:
            raise TypeError(f"{bad[0]!r} is not a torch dtype")

    @classmethod
    def of(cls, exported: torch.export.ExportedProgram) -> InputSpec:
        user = exported.graph_signature.user_inputs
        nodes = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
        names, dims, kinds, dtypes = [], [], [], []
        for name in user:
            val = nodes[name].meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            names.append(name)
            kinds.append(dtype_kind(val.dtype))
            dtypes.append(str(val.dtype).removeprefix("torch."))
            dims.append(tuple(str(d.node.expr) if isinstance(d, torch.SymInt) else int(d) for d in val.shape))
        ranges = []
        for sym, vr in exported.range_constraints.items():
            if not vr.is_int:  # a float a graph break passes in (torch.compile's unspecialised `.item()`): no size
                continue
            hi = None if isinstance(vr.upper, IntInfinity) else int(vr.upper)
            # export assumes >= 2 for a symbolic size (0/1 specialisation); size 1 runs the same graph
            ranges.append((str(sym), min(int(vr.lower), 1), hi))
        return cls(tuple(names), tuple(dims), tuple(ranges), tuple(kinds), tuple(dtypes))

    @property
    def dynamic(self) -> dict[str, dict[int, str]]:
        """{input: {dim: symbol}} for the report."""
        return {n: {i: d for i, d in enumerate(ds) if isinstance(d, str)} for n, ds in zip(self.names, self.dims,
                                                                                            strict=True)}

    def check(self, args: tuple[Any, ...], batch: bool = True) -> None:
        """One line for `args` the compiled model cannot take (`batch=False`: any size in dim 0, for
        calibration batches of a static export)."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        others = [f"{type(a).__module__}.{type(a).__name__}" for a in args
                  if not isinstance(a, torch.Tensor) and hasattr(a, "shape")]
        if others and len(tensors) != len(self.names):
            raise BitmixError(f"the compiled model takes torch tensors, got {others[0]}; convert it first "
                              "(torch.from_numpy(x) for a numpy array)")
        if len(tensors) != len(self.names) and len(args) == len(self.names):
            name, arg = next((n, a) for n, a in zip(self.names, args, strict=True) if not isinstance(a, torch.Tensor))
            raise BitmixError(f"input {name!r} must be a tensor, as in the example inputs, got {type(arg).__name__} "
                              f"{arg!r:.40}; pass torch.tensor(...)")
        extra = next(((i, a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor)), None)
        if extra is not None and len(tensors) == len(self.names):
            raise self.not_a_tensor(f"argument {extra[0]}", extra[1])
        if len(tensors) != len(self.names):
            raise BitmixError(f"the compiled model takes {len(self.names)} tensor input(s) "
                              f"({', '.join(self.names)}), got {len(tensors)}")
        bounds = {s: (lo, hi) for s, lo, hi in self.ranges}
        kinds = dict(zip(self.names, self.kinds, strict=True)) if self.kinds else {}
        seen: dict[str, tuple[int, str]] = {}
        for name, dims, t in zip(self.names, self.dims, tensors, strict=True):
            if t.dim() != len(dims):
                raise BitmixError(f"input {name!r} must have {len(dims)} dimensions, got shape {tuple(t.shape)}")
            if t.is_meta:  # the kernels read values: a meta tensor has none (torch's copy out of it is a raw error)
                raise BitmixError(f"input {name!r} is on the meta device (a shape without values); pass a tensor "
                                  "with data, e.g. x.to_empty(device='cpu') filled with your values")
            if kinds.get(name, dtype_kind(t.dtype)) != dtype_kind(t.dtype):
                convert = {"float": "x.real or x.abs(), as the model needs" if t.is_complex() else "x.float()",
                           "complex": "x.to(torch.complex64)", "integer": "x.long()", "bool": "x.bool()"}[kinds[name]]
                raise BitmixError(f"input {name!r} must be a {kinds[name]} tensor like the example input, got "
                                  f"{t.dtype}; convert it ({convert})")
            for i, (want, got) in enumerate(zip(dims, t.shape, strict=True)):
                if i == 0 and not batch:
                    continue
                where = f"input {name!r} dim {i}"
                if isinstance(want, int):
                    if want != got:
                        raise BitmixError(f"{where} is fixed at {want} by the model (got {got}); "
                                          "compile with example inputs of that shape or pass dynamic_shapes")
                    continue
                if want in seen and seen[want][0] != got:
                    raise BitmixError(f"{where} must equal {seen[want][1]} ({seen[want][0]}), got {got}")
                seen.setdefault(want, (got, where))
                lo, hi = bounds.get(want, (1, None))
                if i == 0 and got == 0 and lo <= 1:  # an empty batch: eager torch gives an empty output
                    continue
                if got < lo or (hi is not None and got > hi):
                    top = " or more" if hi is None else f" to {hi}"
                    raise BitmixError(f"{where} takes sizes {lo}{top}, got {got}")

    def cast(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Integer inputs in the integer dtype the model was exported with (after `check`): eager PyTorch takes
        int32 token ids where the example had int64, the exported program's input guard does not. Floats and
        other kinds are left as they are."""
        if not self.dtypes:
            return args
        dtypes = iter(self.dtypes)
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                want = getattr(torch, next(dtypes))
                if a.dtype != want and dtype_kind(a.dtype) == dtype_kind(want) == "integer":
                    a = a.to(want)
            out.append(a)
        return tuple(out)

    def not_a_tensor(self, what: str, arg: Any) -> BitmixError:
        """A non-tensor argument past the compiled inputs: the export fixed it (at its default)."""
        return BitmixError(f"{what} is a {type(arg).__name__} ({arg!r:.40}), not a tensor: the compiled model takes "
                           f"only its tensor inputs ({', '.join(self.names)}); non-tensor forward arguments were "
                           "fixed at compile time (to their defaults): compile a wrapper module that passes the value")

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Inputs given by name (`cm(input_ids=..., attention_mask=...)`) put in the compiled graph's order; a call
        that also passes arguments the compile fixed (`cm(x, None, t)` for `forward(x, mask=None, t=None)`) is bound
        as eager torch binds it, those arguments checked against their fixed values (`arguments`)."""
        if self.arguments and (len(args) > len(self.names) or any(k not in self.names for k in kwargs)
                               or not all(isinstance(a, torch.Tensor) for a in args)):
            return self._bind_forward(args, kwargs)
        if not kwargs:
            return args
        takes = f"the compiled model takes {', '.join(self.names)}"
        unknown = [k for k in kwargs if k not in self.names]
        if unknown and not isinstance(kwargs[unknown[0]], torch.Tensor):
            raise self.not_a_tensor(f"argument {unknown[0]!r}", kwargs[unknown[0]])
        if unknown:
            raise BitmixError(f"unexpected input {unknown[0]!r}; {takes} (the inputs it was compiled with)")
        twice = [k for k in kwargs if k in self.names[: len(args)]]
        if twice:
            raise BitmixError(f"input {twice[0]!r} is given by position and by name; {takes}")
        missing = [n for n in self.names[len(args):] if n not in kwargs]
        if missing:
            raise BitmixError(f"missing input {missing[0]!r}; {takes}")
        return (*args, *(kwargs[n] for n in self.names[len(args):]))

    def _bind_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """`args` and `kwargs` bound to the forward's arguments; the compiled inputs in their order."""
        takes = f"the compiled model takes {', '.join(self.names)}"
        positional = [name for name, by_position, _, _ in self.arguments if by_position]
        if len(args) > len(positional):
            raise BitmixError(f"the model's forward takes {len(positional)} positional argument(s) "
                              f"({', '.join(positional)}), got {len(args)}; {takes}")
        given = dict(zip(positional, args, strict=False))
        known = {name: (kind, value) for name, _, kind, value in self.arguments}
        for name, value in kwargs.items():
            if name in given:
                raise BitmixError(f"input {name!r} is given by position and by name; {takes}")
            if name not in known and not isinstance(value, torch.Tensor):
                raise self.not_a_tensor(f"argument {name!r}", value)
            if name not in known:
                raise BitmixError(f"unexpected input {name!r}; {takes} (the inputs it was compiled with)")
            given[name] = value
        for i, (name, value) in enumerate(given.items()):
            kind, fixed = known[name]
            if kind == "input" or _same(value, kind, fixed):
                continue
            shown = fixed if kind == "fixed" else f"<{fixed}>"
            if isinstance(value, torch.Tensor):
                raise BitmixError(f"argument {name!r} was fixed at compile time (to {shown!s:.40}, as the example "
                                  f"inputs left it out), got a tensor; compile with {name!r} in the example inputs "
                                  "to pass it")
            raise self.not_a_tensor(f"argument {i}" if i < len(args) else f"argument {name!r}", value)
        missing = [n for n in self.names if n not in given]
        if missing:
            raise BitmixError(f"missing input {missing[0]!r}; {takes}")
        return tuple(given[n] for n in self.names)

    @contextmanager
    def empty_batch_errors(self, args: tuple[Any, ...]) -> Iterator[None]:
        """A torch error on an empty batch (`x.view(x.shape[0], -1)`: eager torch fails there too) as one line."""
        try:
            yield
        except RuntimeError as exc:
            if not any(isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 0 for a in args):
                raise
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise BitmixError(f"the model cannot run an empty batch ({detail}); eager torch fails on it too: "
                              "skip empty batches or call it with at least one example") from None

    @contextmanager
    def index_errors(self, args: tuple[Any, ...]) -> Iterator[None]:
        """An IndexError inside the graph (a sequence past a learned position table, a token id past the
        vocabulary: eager torch fails there too) as one line naming the inputs' shapes."""
        try:
            yield
        except IndexError as exc:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            shapes = ", ".join(f"{n!r} {tuple(t.shape)}" for n, t in zip(self.names, tensors, strict=False))
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BitmixError(f"the model indexed out of range on inputs {shapes} ({detail}): e.g. a sequence "
                              "longer than its position table or a token id past its vocabulary; "
                              "call it with inputs it can take") from None


def _same(value: Any, kind: str, fixed: Any) -> bool:
    """An explicit value that is what the compile fixed an argument to: the same as leaving it out."""
    if kind == "opaque":
        return repr(value) == fixed
    return value is fixed or (type(value) is type(fixed) and isinstance(value, bool | int | float | str)
                              and value == fixed)
