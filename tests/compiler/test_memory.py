"""Memory of a compile, without timing: which weight-sized copies exist at the peak and after it returns.

Compiling one 8192 x 8192 Linear (268 MB of weights) peaked at ~3.8 GB and the compiled model kept three
copies of the weights. These tests count bytes of tensor storage (deduplicated by storage), not RSS: what a
compiled model holds, and the peak of the tensors one step of the compile creates.
"""

from __future__ import annotations

import torch
from torch import nn

import bitmix
from bitmix.compiler.capture import capture

WIDTH = 384  # 4 layers: 2.4 MB of float32 weights


def _stack() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]).eval()
    return model, torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(1))


def test_the_exported_program_reads_the_users_weights_without_a_copy():
    """The exported copy deep-copied every parameter (1x the weights, held by the compiled model for good);
    it now reads the user's own tensors, and compiling still changes nothing in the user's model."""
    model, x = _stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    graph = capture(model, (x,))
    shared = [k for k, v in graph.exported.state_dict.items()
              if v.untyped_storage().data_ptr() == params[k].untyped_storage().data_ptr()]
    assert sorted(shared) == sorted(params)
    cm = bitmix.compile(model, (x,), "int4int2-npu", data=x)
    assert dict(model.named_parameters()) == params and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(cm(x), cm.fake_quant(x))
