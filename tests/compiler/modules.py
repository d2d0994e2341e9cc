"""Small torch modules more than one test file compiles."""

from __future__ import annotations

import torch
from torch import nn


class CallCounter(nn.Module):
    """A forward that counts its calls in a buffer and adds the count: eager torch answers fc(x) + n on call n."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x) + self.calls
