"""channels_last between lowered convs: same values as the fake-quant reference, contiguous where layout matters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.lower import KernelLayer, lower
from bitmix.compiler.quantize import fake_quantize


class _Net(nn.Module):
    """Stem, max-pool, a residual block with a depthwise conv, average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
        self.back = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 3, 2, 1)
        y = self.back(F.relu6(self.dw(F.relu(self.pw(x)))))
        x = F.relu(x + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_channels_last_between_convs_is_bit_exact() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 3, 33, 30)
    graph = capture(model, (x,), "layout-net")
    assignment = {name: ("8/8", "4/8", "4/4", "2/8", "8/8")[i % 5] for i, name in enumerate(graph.names)}
    fq = fake_quantize(prepare(graph), assignment, (torch.randn(8, 3, 33, 30),))
    lowered = lower(fq).module
    convs = [m for m in lowered.modules() if isinstance(m, KernelLayer) and m.kind == "conv2d"]
    assert len(convs) == 4 and all(m.channels_last for m in convs)
    copies = [n for n in lowered.graph.nodes if n.target == "contiguous"]
    # the block's output reaches average pooling (a reduction: order-dependent in float)
    assert copies and any("adaptive_avg_pool2d" in str(u.target) for n in copies for u in n.users)
    seen = {}
    handle = convs[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        ref, out = fq(x), lowered(x)
    handle.remove()
    assert seen["out"].is_contiguous(memory_format=torch.channels_last) and not seen["out"].is_contiguous()
    assert torch.equal(ref, out)
