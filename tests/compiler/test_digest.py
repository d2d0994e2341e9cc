import hashlib

import torch

from bitmix.compiler.digest import update_with_tensor


def _sha(tensor: torch.Tensor) -> str:
    digest = hashlib.sha1()
    update_with_tensor(digest, tensor)
    return digest.hexdigest()


def test_a_tensor_is_hashed_as_its_raw_bytes_whatever_its_layout():
    x = torch.randn(5, 7)
    assert _sha(x) == hashlib.sha1(x.numpy().tobytes()).hexdigest()
    assert _sha(x.t()) == _sha(x.t().contiguous())  # a strided view hashes its values in logical order
    assert _sha(x.t()) != _sha(x)
    y = x.clone()
    y[4, 6] = torch.nextafter(y[4, 6], torch.tensor(1e9))
    assert _sha(y) != _sha(x)


def test_dtypes_numpy_cannot_hold_are_hashed_too():
    b = torch.randn(3, 4).to(torch.bfloat16)
    assert _sha(b) == hashlib.sha1(b.view(torch.int16).numpy().tobytes()).hexdigest()
    assert _sha(torch.tensor([True, False])) == hashlib.sha1(bytes([1, 0])).hexdigest()
    assert _sha(torch.tensor(2.5)) == hashlib.sha1(torch.tensor([2.5]).numpy().tobytes()).hexdigest()
