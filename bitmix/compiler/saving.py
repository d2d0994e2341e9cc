"""Keep a compiled model: `cm.save("model.pt2")` and `bitmix.load("model.pt2")`.

The file is a `torch.export` program of the lowered model whose quantized layers are
`bitmix::q*_packed` ops with their packed weights as constants (`portable.py`); the report
and the input specification ride in the same archive (`extra_files`), so the file alone
is enough. Loading needs only `import bitmix` (which registers the ops) and gives outputs
bit-identical to the compiled model's, in any process on the same kernel path.

A `CompiledModel` holds process-local kernel plans and the exported graph, and a loaded model its
program's graph module, which pickle cannot carry: `torch.save` of either raises one line pointing
here instead.
"""

from __future__ import annotations

import copy
import json
import logging
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from bitmix.compiler.shapes import InputSpec
from bitmix.errors import BitmixError
from bitmix.report.report import Report

REPORT_KEY = "bitmix/report.json"
INPUTS_KEY = "bitmix/inputs.json"


JIT = ("runs packed Numba kernels outside TorchScript (a trace would freeze them to the example's outputs); keep it "
       "with cm.save('model.pt2') and bitmix.load (a torch.export program), or script/trace the float model")


class KernelsOnCpu:
    """Mixed into the compiled and the loaded model: its kernels run in float32 on the CPU, outside TorchScript.

    `.to()`, `.half()`, `.cuda()`, `.to_empty()` ... all go through `_apply`: one that changes nothing (`.cpu()`,
    `.float()`, `.to("cpu")`, `.to(torch.float32)`) is taken, any other is one line instead of a model whose
    float twin (`cm.fake_quant`) or saved constants changed under the same kernels (`.half()`), a raw torch
    error (`.to("meta")`, `.cuda()`) or a model that silently lost its weights (`.to_empty()`). `.train()` and
    `.eval()` are taken: the kernels compute what the model's eval mode computes either way."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        probe = torch.zeros(1)
        try:
            moved = fn(probe)
        except Exception as exc:  # torch raises AssertionError for .cuda() without CUDA, RuntimeError for others
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise BitmixError(f"a compiled bitmix model runs on the CPU and cannot move ({first[:120]}); "
                              "keep it on the CPU") from None
        if moved is not probe:
            if moved.device != probe.device:
                why = f"cannot move to {moved.device}; keep it on the CPU"
            elif moved.dtype != probe.dtype:
                why = (f"computes in float32 whatever float width its inputs have, and cannot convert to "
                       f"{moved.dtype}; cast its outputs instead (cm(x).to({moved.dtype}))")
            else:
                why = "cannot have its tensors replaced (to_empty); compile the model again to change its weights"
            raise BitmixError(f"a compiled bitmix model runs packed integer kernels on the CPU: it {why}")
        return super()._apply(fn, recurse)  # type: ignore[misc]

    def __prepare_scriptable__(self) -> Any:
        raise BitmixError(f"torch.jit.script cannot compile a compiled bitmix model: it {JIT}")


def refuse_tracing() -> None:
    """torch.jit.trace of the compiled or loaded model: one line, not a module that returns the example's outputs."""
    if torch.jit.is_tracing():
        raise BitmixError(f"torch.jit.trace cannot record a compiled bitmix model: it {JIT}")


class Keepable(KernelsOnCpu):
    """Mixed into `CompiledModel`: save/load, the input check, and a clear torch.save error."""

    graph: Any
    lowered: nn.Module
    report: Report | None

    @cached_property
    def input_spec(self) -> InputSpec:
        return InputSpec.of(self.graph.exported)

    def save(self, path: str | Path) -> Path:
        """Write a torch.export program of the lowered model (report inside) to `path` (.pt2)."""
        return save(self, path)

    def __reduce_ex__(self, protocol: object) -> Any:
        raise BitmixError("a CompiledModel cannot be pickled (torch.save); use cm.save('model.pt2') and "
                          "bitmix.load('model.pt2')")

    def __deepcopy__(self, memo: dict) -> Any:
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


def save(cm: Any, path: str | Path) -> Path:
    from bitmix.compiler.capture import export_program
    from bitmix.compiler.lower import torch_on_one_thread
    from bitmix.compiler.portable import portable

    out = Path(path)
    if out.suffix != ".pt2":
        raise BitmixError(f"save to a .pt2 file (torch.export's format), got {str(out)!r}")
    spec: InputSpec = cm.input_spec
    module = portable(cm.lowered)
    examples = _examples(cm.graph.exported)
    dims = tuple({i: Dim.AUTO for i, d in enumerate(ds) if isinstance(d, str)} for ds in spec.dims)
    with torch.no_grad(), torch_on_one_thread():
        program = export_program(module, examples, dims)
    report = cm.report.to_dict() if cm.report is not None else {}
    extra = {REPORT_KEY: json.dumps(report, default=_json_default), INPUTS_KEY: json.dumps(asdict(spec))}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, out, extra_files=extra)
    except (OSError, RuntimeError) as exc:  # a read-only or special folder: torch's writer raises RuntimeError
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise BitmixError(f"cannot write {str(out)!r} ({first[:120]}); save to a writable folder") from None
    return out


def _examples(exported: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...]:
    """Zero tensors at the traced sizes: export only needs shapes and dtypes here (the graph has no data-
    dependent branches left: it was exported once already)."""
    nodes = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    out = []
    for name in exported.graph_signature.user_inputs:
        val = nodes[name].meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = tuple(int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in val.shape)
            out.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(out)


def _json_default(obj: object) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


class LoadedModel(KernelsOnCpu, nn.Module):
    """A compiled model read back from a .pt2: runs the saved program; `report` says what it was."""

    def __init__(self, program: torch.export.ExportedProgram, report: Report | None, spec: InputSpec) -> None:
        super().__init__()
        self.program = program
        self.module = program.module()
        _drop_guards(self.module)
        self.report = report
        self.input_spec = spec
        self.training = False  # the program computes the model's eval mode

    def __reduce_ex__(self, protocol: object) -> Any:
        raise BitmixError("a loaded bitmix model cannot be pickled (torch.save); keep the .pt2 file it was loaded "
                          "from and bitmix.load it again")

    __deepcopy__ = Keepable.__deepcopy__  # copy.deepcopy would otherwise go through __reduce_ex__

    def train(self, mode: bool = True) -> LoadedModel:
        """`.eval()` / `.train()` as on any module (torch.export's module raises NotImplementedError for both);
        the program computes what the model's eval mode computes either way."""
        self.training = mode
        return self

    def simulate(self, engine: str = "analytic") -> Any:
        """What `cm.simulate()` would be, said in one line: the file keeps the report, not the layer graph."""
        raise BitmixError("a loaded bitmix model cannot re-simulate (the .pt2 keeps the report, not the layer graph): "
                          "read the simulated cost from its .report (bitmix.print_report(m.report)), or price other "
                          "shapes with cm.simulate() on the compiled model before saving it")

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        from bitmix.compiler.lower import torch_on_one_thread, warn_without_autograd

        refuse_tracing()
        args = self.input_spec.bind(args, kwargs)
        self.input_spec.check(args)
        args = self.input_spec.cast(args)
        warn_without_autograd(self, args)
        with (torch.no_grad(), torch_on_one_thread(), self.input_spec.index_errors(args),
              self.input_spec.empty_batch_errors(args)):
            return self.module(*args)


def load(path: str | Path) -> LoadedModel:
    """Read a model written by `cm.save`; the result runs on the bitmix kernels and carries `.report`."""
    import bitmix.compiler.portable  # noqa: F401 - registers the ops the program calls

    p = Path(path)
    if not p.is_file():
        raise BitmixError(f"no saved model at {p}; write one with cm.save('model.pt2')")
    _check_archive(p)
    extra = {REPORT_KEY: "", INPUTS_KEY: ""}
    torch_log = logging.getLogger("torch.export")  # logs a bad archive's traceback itself; ours is one line
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        program = torch.export.load(p, extra_files=extra)
    except Exception as exc:  # torch raises many types for a bad archive
        raise BitmixError(f"{p} is not a torch.export program ({type(exc).__name__}); "
                          "save compiled models with cm.save") from None
    finally:
        torch_log.setLevel(level)
    if not extra[INPUTS_KEY]:
        raise BitmixError(f"{p} was not written by cm.save (no bitmix input spec); use torch.export.load for it")
    try:
        raw = json.loads(extra[INPUTS_KEY])
        spec = InputSpec(tuple(raw["names"]), tuple(tuple(d) for d in raw["dims"]),
                         tuple(tuple(r) for r in raw["ranges"]), tuple(raw.get("kinds", ())),
                         tuple(raw.get("dtypes", ())), tuple(tuple(a) for a in raw.get("arguments", ())))
    except (ValueError, KeyError, TypeError) as exc:
        raise BitmixError(f"{p} has an unreadable bitmix input spec ({type(exc).__name__}: {exc}); "
                          "save the model again with cm.save") from None
    if not spec.dtypes:  # saved before dtypes were: the program's inputs have them
        spec = replace(spec, dtypes=InputSpec.of(program).dtypes)
    try:
        report_dict = json.loads(extra[REPORT_KEY]) if extra[REPORT_KEY] else {}
        report = Report.from_dict(report_dict) if report_dict else None
    except (ValueError, KeyError, TypeError) as exc:
        raise BitmixError(f"{p} has an unreadable bitmix report ({type(exc).__name__}: {exc}); "
                          "save the model again with cm.save") from None
    return LoadedModel(program, report, spec)


def written_by_save(path: str | Path) -> bool:
    """Whether `path` is an archive `cm.save` wrote: torch.export keeps extra files under `<archive>/extra/`, and
    only `save` adds bitmix's input spec. Such a program calls the bitmix ops, so only `load` opens it."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{INPUTS_KEY}") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _check_archive(path: Path) -> None:
    """Every member's CRC-32: torch reads weight bytes without checking them, so bit rot in a saved model
    served different outputs without a word. Not a zip at all is left to torch.export.load's error."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            bad = f"a member cannot be read: {exc}"
    if bad is not None:
        raise BitmixError(f"{path} is damaged ({bad} fails its checksum); save the model again with cm.save")


def _drop_guards(gm: nn.Module) -> None:
    """torch.export's input guards assume sizes >= 2 for symbolic dims; `InputSpec.check` checks instead."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    for name, _ in list(gm.named_children()):
        if name.startswith("_guards"):
            delattr(gm, name)
    gm.recompile()  # type: ignore[operator]
