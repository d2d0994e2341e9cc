"""Cross-layer equalisation against plain torch: same float function, equal channel ranges, ReLU6 left alone."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bitmix.compiler.capture import capture
from bitmix.compiler.equalize import equalize, pairs
from bitmix.compiler.fold import prepare
from bitmix.compiler.qlayer import quant_layers
from bitmix.compiler.quantize import fake_quantize


def _net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        net[0].weight[:2] *= 20.0  # two wide output channels: what DFQ equalises away
    return net


def test_equalised_net_computes_the_same_function_with_balanced_ranges():
    net = _net(nn.ReLU())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gm = prepare(capture(net, (x[:1],)))
    eq = copy.deepcopy(gm)
    assert equalize(eq) == 2  # conv -> relu -> depthwise, depthwise -> relu -> 1x1
    with torch.no_grad():
        torch.testing.assert_close(eq(x), net(x), rtol=1e-4, atol=1e-5)
    first = list(quant_layers(eq).values())[0].weight
    r1 = first.abs().reshape(8, -1).amax(1)
    before = list(quant_layers(gm).values())[0].weight.abs().reshape(8, -1).amax(1)
    assert float(before.max() / before.min()) > 5 * float(r1.max() / r1.min())  # measured 23.6 vs 4.0


def test_relu6_pairs_are_not_equalised():
    net = _net(nn.ReLU6())
    x = torch.randn(1, 3, 8, 8)
    assert len(pairs(prepare(capture(net, (x,))))) == 1  # only depthwise -> relu -> 1x1


def test_fake_quantize_keeps_equalisation_only_if_it_helps():
    net = _net(nn.ReLU())
    calib = (torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)),)
    gm = prepare(capture(net, (calib[0][:2],)))
    assignment = {n: 4 for n in quant_layers(gm)}
    with torch.no_grad():
        ref = net(*calib)
        errors = [float((fake_quantize(gm, assignment, calib, equalization=e)(*calib) - ref).pow(2).sum())
                  for e in (False, True)]
    assert errors[1] <= errors[0]
