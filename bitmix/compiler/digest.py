"""Content hashes of tensors for the per-process and on-disk caches (one definition of "same bytes")."""

from __future__ import annotations

from typing import Protocol

import torch


class Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


def update_with_tensor(digest: Digest, tensor: torch.Tensor) -> None:
    """Feed `tensor`'s raw bytes (any dtype, bfloat16 and bool too) to a hashlib `digest`; the bytes are read
    in place when the tensor is contiguous on the CPU (no copy: the caches hash every weight of a model)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy())

