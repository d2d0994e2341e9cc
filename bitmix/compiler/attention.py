"""`scaled_dot_product_attention` as the two matmuls it is, so both are quantizable layers.

torch's fused attention op (what `nn.MultiheadAttention`, `nn.TransformerEncoderLayer` and Hugging Face's
default "sdpa" attention export to) is one graph node: captured as-is it would stay FP32 and the simulator
would see one elementwise op where `Q K^T` and `P V` do `2 * L * S * E` MACs per head. `decompose` rewrites it
in the exported program into the reference math of torch's documentation (`F.scaled_dot_product_attention`):
`softmax(Q K^T * scale + mask) V`, the causal and boolean masks as `-inf` fills, grouped-query attention by
repeating the key/value heads. The float result matches the fused op to float rounding. Dropout is left out:
an exported model is compiled for inference.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


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
    """`exported` with every fused attention node written out (`attention_math`); unchanged if it has none."""
    if not any(node.target == SDPA for node in exported.graph.nodes):
        return exported
    return exported.run_decompositions({SDPA: attention_math})
