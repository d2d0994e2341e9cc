"""Which layers quantize their activations with one step per row (token), set at run time from the row's max.

At 4-bit activations one per-tensor step must serve every token, and a transformer's tokens
differ in scale by an order of magnitude; LLM W4A4 schemes therefore quantize activations per token with the
scale computed on the fly (QuaRot, Ashkboos et al. 2024, arXiv 2404.00456, §3: "per-token symmetric
quantization"). Here the step of row r is `s * max_k |x[r, k]|`, the max taken over the contraction
dimension, with s one learned (LSQ) float per operand, so the integer product stays exact and the scale
factors out of it: `y[m, n] = acc[m, n] * w_step[n] * step[m]` (linear), `acc[m, n] * a_step[m] * b_step[n]`
(activation x activation matmul: rows of the left operand, columns of the right one). For a softmax output
the row max is the softmax's own 1 / Z, which the softmax unit has anyway.
MiniLM, every free layer at 4/4 with the online rotation, PTQ, seed 0 (docs/quality.md): 92.70 % cosine to
FP32 with per-tensor steps, 93.85 % with row steps on linear inputs, 95.24 % on every linear and matmul operand.

Convolutions keep per-tensor steps: an im2col row is a patch, not a pixel, so a per-pixel step does not factor
out of the product. Cost, priced by the simulator: one max per input element on the vector unit and one
multiply per output element.

8-bit activations step per row only beside narrower weights (4/8, 2/8: `w4a8-npu`, `mixed-npu`), where the
weights' error dominates and every bit of the activations' share counts: MiniLM `w4a8-npu` after the recipe,
98.51 % per tensor, 98.78 % per row (3-seed medians, docs/quality.md), for +2.5 % simulated cycles. At 8/8 one
step per tensor already keeps MiniLM at 99.6 % and the per-row work would be priced on every int8 layer.

2-bit activations keep one step per tensor: there the row steps bought nothing and cost accuracy after
fine-tuning (MiniLM int4int2-npu at budget 0.95, PTQ, seed 0: 90.92 % with 2-bit rows, 90.87 % without;
digits-mlp with its post-ReLU fc2 at 2/2, PTQ 97.5 % either way, after 2 epochs of Adam, seeds 0/1/2:
96.39 / 96.94 / 97.22 % with, 96.94 / 97.22 / 97.50 % without), and their max would be priced on the
cheapest choice.
"""

from __future__ import annotations

from bitmix.ir.precision import Precision

ACTIVATION_BITS = 4
WIDE_ACTIVATION_BITS = 8  # per row only where the weights are narrower
KINDS = ("linear", "matmul")
ROW_MAX_OPS_PER_INPUT = 1  # the running max over each row
ROW_STEP_OPS_PER_OUTPUT = 1  # the row's step in the epilogue


def row_steps(kind: str, bits: Precision) -> bool:
    """A `kind` layer at `bits` quantizes its activations per row (both operands of a matmul)."""
    return kind in KINDS and (bits.a == ACTIVATION_BITS or (bits.a == WIDE_ACTIVATION_BITS and bits.w < bits.a))
