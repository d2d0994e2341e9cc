"""Fused attention and einsum written out as matmuls (`bitmix.compiler.decompose`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler.capture import capture
from bitmix.compiler.decompose import EINSUM, SDPA, attention_math, decompose


@pytest.mark.parametrize("case", ["plain", "causal", "bool mask", "float mask", "scale", "gqa", "cross"])
def test_attention_math_is_torch_sdpa(case):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=gen, dtype=torch.float64)
    kv_heads, s = (2 if case == "gqa" else 4), (5 if case == "cross" else 7)
    k = torch.randn(2, kv_heads, s, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_heads, s, 8, generator=gen, dtype=torch.float64)
    float_mask = torch.randn(2, 1, 7, s, generator=gen, dtype=torch.float64)
    kwargs: dict = {"causal": {"is_causal": True}, "scale": {"scale": 0.3}, "gqa": {"enable_gqa": True},
                    "bool mask": {"attn_mask": torch.rand(7, s, generator=gen) > 0.3},
                    "float mask": {"attn_mask": float_mask}}.get(case, {})
    if case == "bool mask":
        kwargs["attn_mask"][:, 0] = True  # every query keeps a key (an all-masked row is NaN in both)
    ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.allclose(attention_math(q, k, v, **kwargs), ref, rtol=0, atol=1e-12)


class Encoder(nn.Module):
    """torch's own transformer layer (its attention exports as one fused node) and a causal F.sdpa block."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        b, t, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, 32) + h)


def test_fused_attention_becomes_two_matmul_layers():
    model = Encoder().eval()
    x = torch.randn(2, 9, 32)
    graph = capture(model, (x,))
    assert not any(node.target == SDPA for node in graph.exported.graph.nodes)
    assert sum(layer.kind == "matmul" for layer in graph.layers) == 4  # Q K^T and P V of each attention
    qk = next(layer for layer in graph.layers if layer.kind == "matmul")
    assert qk.macs == 2 * 4 * 9 * 9 * 8
    y = torch.randn(5, 9, 32)  # another batch: the symbolic batch survives the rewrite
    with torch.no_grad():
        assert torch.allclose(graph.exported.module()(y), model(y), atol=1e-5)


def test_programs_without_fused_attention_are_left_alone():
    exported = torch.export.export(nn.Linear(4, 4), (torch.randn(2, 4),))
    assert decompose(exported) is exported


class EinsumAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(24, 72)
        self.out = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, 3, 8).unbind(2)
        p = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
        return self.out(torch.einsum("bhij,bjhd->bihd", p, v).reshape(b, t, 24))


def test_einsum_becomes_matmul_layers():
    model = EinsumAttention().eval()
    graph = capture(model, (torch.randn(2, 6, 24),))
    assert not any(node.target == EINSUM for node in graph.exported.graph.nodes)
    assert [layer.kind for layer in graph.layers] == ["linear", "matmul", "matmul", "linear"]
    y = torch.randn(3, 6, 24)
    with torch.no_grad():
        assert torch.allclose(graph.exported.module()(y), model(y), atol=1e-5)
