"""Buffers a model's forward writes in place (a call counter, a running mean, a cache).

Eager PyTorch updates such a buffer on every call, and so do bitmix's copies of the model (the exported
program keeps the in-place ops). The compile runs those copies many times (calibration, range search, bias
correction, the fidelity check), so without a reset the compiled model's first call would start from the
state after dozens of internal passes instead of the user's: a counter added to the output was off by 9 on a
3-layer net. `mutated_buffers` finds the written buffers in the exported graph and keeps their values as
exported; `restore` puts them back into a bitmix copy, so `cm(x)` and `cm.fake_quant(x)` start where the
user's model is.
"""

from __future__ import annotations

import torch
from torch import fx, nn


def mutated_buffers(exported: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """{buffer name: value as exported} for each buffer the graph writes, directly or through a view."""
    signature = exported.graph_signature
    owner = dict(signature.inputs_to_buffers)  # node name -> the buffer it is or views
    written = set(signature.buffers_to_mutate.values())
    for node in exported.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        for arg, spec in zip(node.args, schema.arguments, strict=False):
            if isinstance(arg, fx.Node) and arg.name in owner and spec.alias_info is not None \
                    and spec.alias_info.is_write:
                written.add(owner[arg.name])
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and first.name in owner and any(r.alias_info is not None
                                                                     for r in schema.returns):
            owner[node.name] = owner[first.name]  # a view or an in-place result: the same storage
    values = {**exported.state_dict, **exported.constants}
    return {name: values[name].detach().clone() for name in sorted(written)
            if isinstance(values.get(name), torch.Tensor)}


def restore(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write `state` into `module`'s buffers of the same names (those it still has)."""
    with torch.no_grad():
        for name, value in state.items():
            try:
                buffer = module.get_buffer(name)
            except AttributeError:
                continue
            buffer.copy_(value)
