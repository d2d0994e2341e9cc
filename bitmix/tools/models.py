"""What the CLI's MODEL argument names: a zoo model, or a program a user wrote with `torch.export.save`.

A `.pt2` program carries everything needed to compile it: its module (`ExportedProgram.module()`),
and example inputs — the ones saved with it, or, for programs saved without them, zeros/normals of
the shapes and dtypes its input placeholders record (a symbolic dimension at the size it was traced
with). `--input-shape` replaces those shapes; the program's own guards decide whether it accepts them.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from bitmix.compiler.saving import written_by_save
from bitmix.errors import BitmixError
from bitmix.task import TaskData

SAVE_HINT = "write it with torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for `capture`/`compile`: the module, example inputs, and zoo data if it has any."""

    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    data: TaskData | None


def is_program_path(spec: str) -> bool:
    """A MODEL argument that names a file (or ends in .pt2) is a program; anything else a zoo name."""
    return spec.endswith(".pt2") or Path(spec).is_file()


def load_model(spec: str, input_shapes: list[tuple[int, ...]] | None = None) -> LoadedModel:
    """The zoo model `spec`, or the exported program in the file `spec`."""
    if not is_program_path(spec):
        if input_shapes:
            raise BitmixError("--input-shape applies to .pt2 programs; zoo models come with their own inputs")
        from bitmix import zoo

        model, inputs, data = zoo.load(spec)
        return LoadedModel(spec, model, tuple(inputs), data)
    program = load_program(spec)
    module = program.module()
    placeholders = _user_input_values(program)
    if input_shapes:
        inputs = _inputs_of_shapes(placeholders, input_shapes)
        _check_accepts(module, inputs, input_shapes)
    else:
        inputs = _saved_inputs(program, len(placeholders)) or _inputs_of_shapes(placeholders, None)
    return LoadedModel(Path(spec).stem, module, inputs, None)


def load_program(path: str) -> torch.export.ExportedProgram:
    """`torch.export.load`, with every way a file can fail turned into one line."""
    if not Path(path).is_file():
        raise BitmixError(f"no such file {path!r}; give a zoo name (see `bitmix models`) or a .pt2 file ({SAVE_HINT})")
    if written_by_save(path):
        raise BitmixError(f"{path!r} is a model bitmix already compiled (cm.save wrote it); run it with "
                          f"bitmix.load, or give the original model ({SAVE_HINT})")
    torch_log = logging.getLogger("torch.export")  # logs the failure's traceback itself; ours is one line
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch raises zip, pickle, key and runtime errors for foreign files
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        detail = f"{type(exc).__name__}: {first[:100]}" if "warnings above" not in first else "no program inside"
        raise BitmixError(f"{path!r} is not a torch.export program ({detail}); {SAVE_HINT}") from None
    finally:
        torch_log.setLevel(level)
    if not isinstance(program, torch.export.ExportedProgram):
        raise BitmixError(f"{path!r} holds a {type(program).__name__}, not an ExportedProgram; {SAVE_HINT}")
    return program


def _user_input_values(program: torch.export.ExportedProgram) -> list[Any]:
    """The fake tensors torch.export recorded for the user inputs, in call order."""
    from torch.export.graph_signature import InputKind

    names = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    values = {node.name: node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder"}
    vals = [values.get(name) for name in names]
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        raise BitmixError("the program's inputs are not all tensors; bitmix compiles models called with tensors")
    return vals


def _saved_inputs(program: torch.export.ExportedProgram, n: int) -> tuple[torch.Tensor, ...] | None:
    saved = getattr(program, "example_inputs", None)
    if not saved:
        return None
    args, kwargs = saved
    if kwargs or len(args) != n or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return tuple(args)


def _inputs_of_shapes(values: list[Any], shapes: list[tuple[int, ...]] | None) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of the recorded dtypes: normals for floats, zeros (a valid index) otherwise."""
    if shapes is not None and len(shapes) != len(values):
        raise BitmixError(f"the program takes {len(values)} input(s) but --input-shape was given {len(shapes)} "
                          "time(s); give one --input-shape per input, in order")
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, val in enumerate(values):
        shape = shapes[i] if shapes is not None else tuple(_hint(d) for d in val.shape)
        try:
            if val.dtype.is_floating_point:
                out.append(torch.randn(shape, generator=gen).to(val.dtype))
            else:
                out.append(torch.zeros(shape, dtype=val.dtype))
        except (RuntimeError, MemoryError):  # the allocator's "can't allocate", or a byte count past int64
            raise BitmixError(f"input {i} of shape {'x'.join(map(str, shape))} needs {_size(shape, val.dtype)}, more "
                              "memory than this machine can allocate; give a smaller --input-shape") from None
    return tuple(out)


def _size(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """'1,599,999,999,984 float32 values (6.4 TB)': what a tensor of `shape` asks the allocator for."""
    n = math.prod(shape)
    size = float(n * dtype.itemsize)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if size < 1000 or unit == "EB":
            break
        size /= 1000
    return f"{n:,} {str(dtype).removeprefix('torch.')} values ({size:.3g} {unit})"


def _hint(dim: int | torch.SymInt) -> int:
    """A symbolic dimension's traced size (its hint); torch.export records one for every SymInt."""
    if isinstance(dim, torch.SymInt):
        hint = dim.node.hint
        if hint is None:
            raise BitmixError("the program has a dynamic dimension without a recorded size; pass --input-shape")
        return int(hint)
    return int(dim)


def _check_accepts(module: nn.Module, inputs: tuple[torch.Tensor, ...], shapes: list[tuple[int, ...]]) -> None:
    """Run the program once: a static dimension that --input-shape changed fails torch's own guard."""
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception as exc:  # the program's guards raise AssertionError/RuntimeError with the reason
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        shown = " ".join("x".join(map(str, s)) for s in shapes)
        raise BitmixError(f"the program does not accept --input-shape {shown} ({first[:120]}); export it with "
                          "dynamic_shapes for the dimensions you change, or drop --input-shape") from None


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' or '1,3,224,224' -> (1, 3, 224, 224)."""
    parts = text.replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected sizes like 1x3x224x224, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"sizes must be positive, got {text!r}")
    if any(d > torch.iinfo(torch.int64).max for d in shape):  # torch sizes are int64
        raise ValueError(f"sizes must fit in 64 bits, got {text!r}")
    return shape


def load_calibration(path: str, inputs: tuple[torch.Tensor, ...], model: nn.Module | None = None
                     ) -> tuple[torch.Tensor, ...]:
    """`--data FILE.pt`: a tensor (one input) or a tuple/list of tensors (one per input), batch first.

    With `model`, a few samples are run through it without its input guards (as calibration will be):
    a program exported with a static batch that bakes the batch into its ops fails here, in one line.
    """
    if not Path(path).is_file():
        raise BitmixError(f"no such file {path!r} for --data; save calibration inputs with torch.save(tensor, path)")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as exc:  # unpickling errors of every kind
        raise BitmixError(f"cannot read --data {path!r} ({type(exc).__name__}); save a tensor or a tuple of "
                          "tensors with torch.save") from None
    tensors = (data,) if isinstance(data, torch.Tensor) else tuple(data) if isinstance(data, list | tuple) else ()
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise BitmixError(f"--data {path!r} holds a {type(data).__name__}; save a tensor or a tuple of tensors "
                          "(one per model input, batch first)")
    if len(tensors) != len(inputs):
        raise BitmixError(f"--data {path!r} has {len(tensors)} tensor(s) but the model takes {len(inputs)} input(s)")
    for i, (t, x) in enumerate(zip(tensors, inputs, strict=True)):
        if t.dim() != x.dim() or t.shape[1:] != x.shape[1:]:
            raise BitmixError(f"--data tensor {i} has shape {tuple(t.shape)} but the model's input {i} is "
                              f"{tuple(x.shape)}; only the batch (first) dimension may differ")
        if t.dtype.is_floating_point != x.dtype.is_floating_point:
            raise BitmixError(f"--data tensor {i} is {t.dtype} but the model's input {i} is {x.dtype}")
    tensors = tuple(t.to(x.dtype) for t, x in zip(tensors, inputs, strict=True))
    if model is not None:
        _check_batch(model, tuple(t[:8] for t in tensors), path, inputs[0].shape[0])
    return tensors


def _check_batch(model: nn.Module, sample: tuple[torch.Tensor, ...], path: str, batch: int) -> None:
    """Run `sample`; on failure, tell a batch baked into the program's ops (the same rows at the example's
    `batch` run) from data the program cannot take at all (token ids past its vocabulary, say)."""
    from bitmix.compiler.fold import drop_guards

    module = copy.deepcopy(model)
    if isinstance(module, fx.GraphModule):
        drop_guards(module)
        module.recompile()
    failure = _failure(module, sample)
    if failure is None:
        return
    at_batch = tuple(t[torch.arange(batch) % t.shape[0]] for t in sample)  # the same rows, the example's count
    if sample[0].shape[0] != batch and _failure(module, at_batch) is None:
        raise BitmixError(f"the program does not run on --data {path!r} at batch {sample[0].shape[0]} "
                          f"({failure}); export it with dynamic_shapes={{0: torch.export.Dim('batch')}}")
    raise BitmixError(f"the program does not run on --data {path!r} ({failure}); pass inputs the program can "
                      "take, like its example inputs (e.g. token ids below the vocabulary size)")


def _failure(module: nn.Module, args: tuple[torch.Tensor, ...]) -> str | None:
    """The first line of what running `module` on `args` raises, or None if it runs."""
    try:
        with torch.no_grad():
            module(*args)
    except Exception as exc:  # whatever the program raises
        return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:100]
    return None
