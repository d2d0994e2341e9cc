"""`torch.compile(model, backend="bitmix")`: the compile pipeline as a TorchDynamo backend.

Registered through the `torch_dynamo_backends` entry point. Dynamo hands us an FX
GraphModule and example inputs but no calibration data, so the backend uses data-free
EAGL scores and data-free activation step sizes on the default target (int4int2-npu,
budget 0.75). Options pass through: `torch.compile(m, backend="bitmix",
options={"target": ..., "budget": ..., "method": "eagl"})`.

If the default budget is below the cheapest assignment of a graph piece (small pieces are
latency-bound on the simulated chip), the cheapest assignment is used with a warning.

Limits: graph breaks compile each piece separately (first/last pinning then applies per
piece); a piece with no conv/linear/matmul runs eagerly; only the registry's data-free
methods work (`sensitivity.data_free()`: eagl, uniform, random). When Dynamo recompiles with
dynamic shapes it passes symbolic sizes (SymInt) into the piece, which torch.export of a fixed
piece cannot take: such pieces run in eager PyTorch with a warning;
`torch.compile(..., dynamic=False)` keeps every piece on the kernels (one compile per input shape).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn


class _Lifted(nn.Module):
    """Dynamo lifts parameters to graph inputs; give them back to a module so export sees weights."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> None:
        super().__init__()
        self.gm = gm
        self.slots = [isinstance(t, nn.Parameter) for t in example_inputs]
        self.weights = nn.ParameterList([t for t in example_inputs if isinstance(t, nn.Parameter)])

    def forward(self, *args: torch.Tensor) -> Any:
        params, user = iter(self.weights), iter(args)
        return self.gm(*[next(params) if is_param else next(user) for is_param in self.slots])


def bitmix_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
    from bitmix.budget import Budget
    from bitmix.compiler import sensitivity
    from bitmix.compiler.pipeline import CompileOptions
    from bitmix.compiler.pipeline import compile as bitmix_compile
    from bitmix.errors import BitmixError, NoQuantizableLayers

    options = dict(kwargs.get("options") or {})
    method = options.pop("method", "eagl")
    if sensitivity.resolve(method)[0].name not in sensitivity.data_free():
        raise BitmixError(f"the torch.compile backend has no data; use one of {', '.join(sensitivity.data_free())}")
    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        warnings.warn("bitmix: a graph piece takes symbolic sizes (Dynamo's dynamic shapes) and runs in eager "
                      "PyTorch; pass dynamic=False to torch.compile to keep it on the bitmix kernels", stacklevel=2)
        return gm.forward
    lifted = _Lifted(gm, example_inputs)
    user_inputs = tuple(_real(t) for t in example_inputs if not isinstance(t, nn.Parameter))
    budget = Budget.of(options.pop("budget", 0.75))
    if budget.fraction is not None:  # small graph pieces may not reach 0.75: never break the user's model
        budget = dataclasses.replace(budget, clamp=True)
    try:
        cm = bitmix_compile(lifted, user_inputs, method=method, budget=budget,
                            options=CompileOptions(frontier_points=0), **options)
    except NoQuantizableLayers:
        return gm.forward  # e.g. the glue between two graph breaks: nothing to quantize
    slots = lifted.slots

    def run(*args: Any) -> Any:
        return cm(*[a for a, is_param in zip(args, slots, strict=True) if not is_param])

    return run


def _real(t: Any) -> Any:
    """Export needs real tensors; replace fake ones with random data of the same shape and dtype."""
    if isinstance(t, torch.Tensor) and isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
        if t.dtype.is_floating_point:
            return torch.randn(tuple(t.shape), dtype=t.dtype)
        return torch.zeros(tuple(t.shape), dtype=t.dtype)
    return t.detach() if isinstance(t, torch.Tensor) else t
