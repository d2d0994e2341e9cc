"""Layer-wise distillation for quantization-aware fine-tuning.

With one short epoch, the end-to-end loss alone gives each of dozens of quantized layers a
weak, noisy signal. Pulling every quantized layer's output toward the float model's output
of the same layer gives each its own (the hidden-state / layer-wise KD of TernaryBERT and
ZeroQuant, reference/quantization.md §5). The layers are matched by name: `fake_quantize`
keeps the prepared model's layer names, so the float prepared model is the teacher.
Each layer's squared error is normalised by the teacher output's mean square, so layers of
any scale weigh the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bitmix.compiler.qlayer import QuantLayer, quant_layers
from bitmix.errors import BitmixError


class LayerDistiller:
    """Records quantized layers' outputs in a student and a float teacher; `loss()` compares them."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        s_layers, t_layers = quant_layers(student), quant_layers(teacher)
        self.names = [n for n, layer in s_layers.items() if layer.bits is not None and n in t_layers]
        if not self.names:
            raise BitmixError("layer distillation needs a teacher with the student's layer names "
                              "(the float model fake_quantize was given)")
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self._layers = [(s_layers[n], self.student) for n in self.names] + [(t_layers[n], self.teacher)
                                                                             for n in self.names]

    @contextmanager
    def recording(self) -> Iterator[LayerDistiller]:
        def hook(store: dict[str, torch.Tensor]):
            def record(layer: QuantLayer, args: tuple, out: torch.Tensor) -> None:
                store[layer.name] = out
            return record

        handles = [layer.register_forward_hook(hook(store)) for layer, store in self._layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.student.clear()
            self.teacher.clear()

    def loss(self) -> torch.Tensor:
        """Mean over layers of ||y_q - y||^2 / ||y||^2 for the last recorded forward passes."""
        terms = []
        for name in self.names:
            if name in self.student and name in self.teacher:
                y = self.teacher[name].detach()
                terms.append((self.student[name] - y).pow(2).mean() / y.pow(2).mean().clamp(min=1e-12))
        self.student.clear()
        self.teacher.clear()
        return torch.stack(terms).mean() if terms else torch.zeros(())
