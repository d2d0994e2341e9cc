"""The block Walsh-Hadamard transform of the online input rotation (`bitmix.ir.rotation`).

Elementwise float32 add/subtract butterflies, not a matmul: the fake-quant layers and the lowered
kernels run this same function on the same tensor, and elementwise ops give the same bits at any
thread count (a BLAS product need not), which keeps kernels == fake quant bit for bit.
"""

from __future__ import annotations

import torch


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """`x` (..., K) times the block-diagonal unnormalised Hadamard matrix of `block` x `block` blocks (Sylvester
    order); `block` is a power of two dividing K. Applying it twice multiplies by `block`."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    half = 1
    while half < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * half), 2, half)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        half *= 2
    return y.reshape(shape)


def rotate_input(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The online rotation of a linear's input: `hadamard(x * s, b)`, b the largest power of two dividing K.
    Without autograd, plain float32 CPU tensors go through `bitmix.kernels.hadamard` (same bits, one pass);
    tracers (torch.export of a saved model) see the torch ops."""
    k = signs.numel()
    block = k & -k
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or signs.requires_grad)
    traced = torch.compiler.is_dynamo_compiling() or type(x) is not torch.Tensor or type(signs) is not torch.Tensor
    if needs_grad or traced or x.dtype != torch.float32 or signs.dtype != torch.float32 or x.device.type != "cpu":
        return hadamard(x * signs, block)
    from bitmix.kernels.hadamard import rotate_rows  # loads Numba: only once a rotated layer runs

    return torch.from_numpy(rotate_rows(x.detach().numpy(), signs.detach().numpy(), block))
