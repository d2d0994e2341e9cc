"""A prepared model that can travel to another process or machine.

GraphModules built from a torch.export program do not pickle (their tracer cannot be
rebuilt), so a job that needs one cannot be sent to a Ray worker as it is. A
`PortableModel` pickles as what `torch.export.save` writes for the captured program, the
`LayerGraph` without it, and the module's children (QuantLayers with their weights and
quantizers, the containers holding the other parameters). The receiver re-runs
`fold.prepare` on the loaded program, checks that it generated the same code, and puts the
shipped children in: the same module, bit for bit. In-process and across `fork` it is
just a reference. Ship it once per run (`ray.put`), as Ray copies large arguments per call
(reference/quantization.md §7, RAY-PUT).
"""

from __future__ import annotations

import dataclasses
import io
import weakref
from typing import Any

import torch
from torch import nn

from bitmix.errors import BitmixError
from bitmix.ir.graph import LayerGraph

_SAVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ExportedProgram -> torch.export.save bytes


class PortableModel:
    """`graph` and a module that `fold.prepare(graph)` built (then quantized or fine-tuned in place)."""

    def __init__(self, graph: LayerGraph, module: nn.Module) -> None:
        self.graph = graph
        self.module = module

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        gm = self.module
        if not isinstance(gm, torch.fx.GraphModule):
            raise BitmixError(f"only modules built by fold.prepare can be shipped, got {type(gm).__name__}")
        children = dict(gm.named_children())
        direct = {k: v for k, v in [*gm._parameters.items(), *gm._buffers.items()] if v is not None}
        if direct:
            raise BitmixError(f"cannot ship a prepared model with top-level tensors ({', '.join(direct)})")
        spec = dataclasses.replace(self.graph, exported=None)
        return _rebuild, (saved_program(self.graph.exported), spec, children, gm.training, gm.code)


def saved_program(exported: torch.export.ExportedProgram) -> bytes:
    """`torch.export.save` bytes, computed once per program."""
    if exported not in _SAVED:
        buffer = io.BytesIO()
        torch.export.save(exported, buffer)
        _SAVED[exported] = buffer.getvalue()
    return _SAVED[exported]


def _rebuild(program: bytes, spec: LayerGraph, children: dict[str, nn.Module], training: bool,
             code: str) -> PortableModel:
    from bitmix.compiler.fold import prepare

    graph = dataclasses.replace(spec, exported=torch.export.load(io.BytesIO(program)))
    gm = prepare(graph)
    if gm.code != code or set(dict(gm.named_children())) != set(children):
        raise BitmixError(f"the shipped model of {graph.model_name!r} does not match fold.prepare's graph on "
                          "this worker; run the same bitmix and torch versions on every Ray node")
    for name, child in children.items():
        setattr(gm, name, child)
    gm.training = training
    return PortableModel(graph, gm)
