"""Shared small models for the sensitivity tests (digits-mlp and a tiny attention-like net)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitmix import zoo
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.sensitivity import ScoreContext
from bitmix.ir.targets import get_target

torch.set_num_threads(1)


class TinyAttention(nn.Module):
    """linear -> softmax(q k^T) @ v -> linear: exercises matmul layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.reshape(x.shape[0], 8, 8))
        attn = torch.softmax(torch.matmul(h, h.transpose(1, 2)) / 4.0, dim=-1)
        return self.out(torch.matmul(attn, h).mean(1))


@pytest.fixture(scope="session")
def mlp_ctx() -> ScoreContext:
    model, example, data = zoo.load("digits-mlp")
    graph = capture(model, example, "digits-mlp")
    return ScoreContext(graph, get_target("mixed-npu"), prepare(graph), data)


@pytest.fixture(scope="session")
def attention_ctx() -> ScoreContext:
    torch.manual_seed(0)
    model = TinyAttention().eval()
    _, _, data = zoo.load("digits-mlp")
    graph = capture(model, (data.calibration(1)[0],), "tiny-attention")
    return ScoreContext(graph, get_target("mixed-npu"), prepare(graph), None, calibration=data.calibration(32))
