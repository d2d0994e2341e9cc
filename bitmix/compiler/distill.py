"""Layer-wise distillation for quantization-aware fine-tuning.

With one short epoch, the end-to-end loss alone gives each of dozens of quantized layers a
weak, noisy signal. Pulling every quantized layer's output toward the float model's output
of the same layer gives each its own (the hidden-state / layer-wise KD of TernaryBERT and
ZeroQuant, reference/quantization.md §5). The layers are matched by name: `fake_quantize`
keeps the prepared model's layer names, so the float prepared model is the teacher.
Each layer's squared error is normalised by the teacher output's mean square, so layers of
any scale weigh the same.

A linear layer's rows that cannot reach the model's output (a padded sentence's padding
positions: the attention mask hides them from every real token and the pooling drops them)
are left out of its term: MiniLM's batches are about two-thirds padding, whose hidden states
would otherwise set most of the loss while serving nothing. The live rows are found as
`bitmix.compiler.live` finds them for calibration, from the teacher: the gradient of a random
projection of its output reaches exactly those rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bitmix.compiler.live import MIN_LIVE, random_projection
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
        self.teacher_model = teacher
        self.linears = {n for n in self.names if t_layers[n].kind == "linear"}
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self.live: dict[str, torch.Tensor] = {}
        self._layers = [(s_layers[n], self.student) for n in self.names] + [(t_layers[n], self.teacher)
                                                                             for n in self.names]

    @contextmanager
    def recording(self) -> Iterator[LayerDistiller]:
        def hook(store: dict[str, torch.Tensor]):
            def record(layer: QuantLayer, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
                if store is self.teacher and layer.name in self.linears and torch.is_grad_enabled():
                    out = out if out.requires_grad else out.detach().requires_grad_()  # frozen weights: rows still
                    store[layer.name] = out
                    return out
                store[layer.name] = out
                return None
            return record

        handles = [layer.register_forward_hook(hook(store)) for layer, store in self._layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._clear()

    def teach(self, *inputs: torch.Tensor) -> None:
        """Run the teacher on `inputs` (inside `recording()`): its layers' outputs, and each linear layer's live
        rows (those the gradient of a random projection of the teacher's output reaches)."""
        with torch.enable_grad():
            out = self.teacher_model(*inputs)
            names = [n for n in self.linears if n in self.teacher and self.teacher[n].dim() > 1]
            loss = random_projection(out, torch.Generator().manual_seed(0))
            if names and loss.requires_grad:
                grads = torch.autograd.grad(loss, [self.teacher[n] for n in names], allow_unused=True)
                for name, grad in zip(names, grads, strict=True):
                    live = grad.ne(0).any(dim=-1) if grad is not None else None
                    if live is not None and not bool(live.all()) and int(live.sum()) >= MIN_LIVE:
                        self.live[name] = live
        for name in list(self.teacher):
            self.teacher[name] = self.teacher[name].detach()

    def loss(self) -> torch.Tensor:
        """Mean over layers of ||y_q - y||^2 / ||y||^2 over the live rows, for the last recorded forward passes."""
        terms = []
        for name in self.names:
            if name in self.student and name in self.teacher:
                y, q = self.teacher[name].detach(), self.student[name]
                live = self.live.get(name)
                if live is not None and live.shape == y.shape[:-1] == q.shape[:-1]:
                    y, q = y[live], q[live]
                terms.append((q - y).pow(2).mean() / y.pow(2).mean().clamp(min=1e-12))
        self._clear()
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def _clear(self) -> None:
        self.student.clear()
        self.teacher.clear()
        self.live.clear()
