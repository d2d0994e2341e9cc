"""Fused ops written out as the matmuls they are, so every matmul is a quantizable layer.

`scaled_dot_product_attention` (what `nn.MultiheadAttention`, `nn.TransformerEncoderLayer` and Hugging Face's
default "sdpa" attention export to) and `einsum` are single graph nodes: captured as-is they would stay FP32
and the simulator would see one elementwise op where `Q K^T` and `P V` do `2 * L * S * E` MACs per head.
`decompose` rewrites them in the exported program: attention into the reference math of torch's documentation
(`F.scaled_dot_product_attention`), `softmax(Q K^T * scale + mask) V`, the causal and boolean masks as `-inf`
fills, grouped-query attention by repeating the key/value heads (the float result matches the fused op to float
rounding; dropout is left out, an exported model is compiled for inference); einsum into torch's own
decomposition (permutes, views and `bmm`).
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
EINSUM = aten.einsum.default


def attention_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> torch.Tensor:
    """torch's documented reference for `scaled_dot_product_attention`, without dropout."""
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.matmul(scores.softmax(-1), value)


def decompose(exported: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`exported` with every fused attention and einsum node written out; unchanged if it has none."""
    found = {node.target for node in exported.graph.nodes} & {SDPA, EINSUM}
    if not found:
        return exported
    table = {SDPA: attention_math, EINSUM: torch.export.default_decompositions()[EINSUM]}
    return exported.run_decompositions({op: table[op] for op in found})
