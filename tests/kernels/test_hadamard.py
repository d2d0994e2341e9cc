import pytest
import torch

from bitmix.compiler.hadamard import hadamard, rotate_input
from bitmix.kernels.hadamard import rotate_rows


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("k", [16, 32, 64, 96, 256, 384, 1536, 8, 24, 40, 4, 12, 2, 1])  # vector (block >= 8), scalar
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_kernel_equals_torch_butterflies_bit_for_bit(k: int, rows: int) -> None:
    g = torch.Generator().manual_seed(k * rows)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-4, 4, k)
    s = torch.randn(k, generator=g)
    want = hadamard(x * s, k & -k)
    got = torch.from_numpy(rotate_rows(x.numpy(), s.numpy(), k & -k))
    assert torch.equal(_bits(got), _bits(want))


def test_rotate_input_takes_the_kernel_without_grad_and_torch_with_it() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 384, generator=g)
    s = torch.randn(384, generator=g)
    want = hadamard(x * s, 128)
    with torch.no_grad():
        assert torch.equal(_bits(rotate_input(x, s)), _bits(want))
    xt = x[:, :, :].transpose(0, 1)  # a non-contiguous view
    with torch.no_grad():
        assert torch.equal(_bits(rotate_input(xt, s)), _bits(hadamard(xt * s, 128)))
    xg = x.clone().requires_grad_(True)
    y = rotate_input(xg, s)
    assert y.requires_grad
    y.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_nonfinite_values_propagate_like_torch() -> None:
    x = torch.zeros(3, 16)
    x[0, 3], x[1, 5], x[2, 0] = float("inf"), float("nan"), float("-inf")
    s = torch.ones(16)
    want = hadamard(x * s, 16)
    got = torch.from_numpy(rotate_rows(x.numpy(), s.numpy(), 16))
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite], want[finite])
