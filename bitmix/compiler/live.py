"""Which rows of a linear layer's input can change the model's output.

A padded sequence (a batch of sentences padded to one length) computes hidden states at its padding
positions that the attention mask hides from every real token and the output pooling drops: they
cannot reach the output. Calibration statistics that count them fit the layer to inputs it never
serves (MiniLM's calibration batches are 68 % padding). A row is live when the gradient of a random
projection of the model's output reaches it: padded rows get exactly zero (the mask's -inf scores
give softmax weights of exactly 0), every row that matters a non-zero value almost surely. Found
from the float model, without knowing which input is the mask, so it holds for any graph.
"""

from __future__ import annotations

import torch
from torch import nn

from bitmix.compiler.qlayer import QuantLayer, fixed_batch
from bitmix.compiler.ranges import examples_of

CHUNK = 16  # calibration examples per backward pass (bounds the memory of the autograd graph)
MIN_LIVE = 2  # fewer live rows than this: keep every row (smoothing's fit/judge split needs two)


def random_projection(out: object, gen: torch.Generator) -> torch.Tensor:
    """A random projection of a model output (tensor, or tuple / list / dict of them) to a scalar."""
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point():
            return torch.zeros(())
        return (out.float() * torch.randn(out.shape, generator=gen)).sum()
    if isinstance(out, list | tuple):
        return sum((random_projection(o, gen) for o in out), torch.zeros(()))
    if isinstance(out, dict):
        return sum((random_projection(v, gen) for v in out.values()), torch.zeros(()))
    return torch.zeros(())


def live_rows(model: nn.Module, layers: dict[str, QuantLayer], calibration: tuple[torch.Tensor, ...]
              ) -> dict[str, torch.Tensor]:
    """Per linear layer of `layers` that the float model runs once per forward pass, a bool mask over its
    input's rows (every dimension but the last, all calibration examples) that is True where the row can
    change the output. Layers whose every row is live are left out: nothing to drop. So are layers with
    fewer than MIN_LIVE live rows: a layer the output does not depend on (behind a ReLU that never fires,
    or whose gradient underflows in a deep float32 net) still gets its statistics from all its rows."""
    targets = {name: layer for name, layer in layers.items() if layer.kind == "linear"}
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    calls: dict[str, int] = {}

    outputs: list[torch.Tensor] = []

    def hook(layer: QuantLayer, args: tuple, out: torch.Tensor) -> None:
        calls[layer.name] = calls.get(layer.name, 0) + 1
        if out.requires_grad and out.dim() > 1:  # a 1-D output (an unbatched input) is one row: nothing to drop
            out.register_hook(lambda g, name=layer.name: parts[name].append(g.ne(0).any(dim=-1)))
            outputs.append(out)

    saved = {name: layer.bits for name, layer in layers.items()}
    handles = [layer.register_forward_hook(hook) for layer in targets.values()]
    # A static graph runs only its traced batch; inputs without one shared leading batch dimension (an
    # EmbeddingBag's 1-D ids beside its offsets, a scalar) cannot be cut into examples either.
    n = examples_of(calibration)
    starts = [0] if n is None or fixed_batch(model) is not None else list(range(0, n, CHUNK))
    try:
        for layer in layers.values():
            layer.bits = None
        with torch.enable_grad():
            for i in starts:
                calls.clear()
                gen = torch.Generator().manual_seed(i)
                part = calibration if len(starts) == 1 else tuple(t[i : i + CHUNK] for t in calibration)
                loss = random_projection(model(*part), gen)
                if loss.requires_grad and outputs:
                    try:  # to the layers' outputs only: the weights' gradients were a copy of every weight
                        loss.backward(inputs=outputs)
                    except RuntimeError:  # an op without a derivative (a fused inference kernel): no masks
                        return {}
                    model.zero_grad(set_to_none=True)
                outputs.clear()
    finally:
        for h in handles:
            h.remove()
        for name, layer in layers.items():
            layer.bits = saved[name]
    chunks = len(starts)
    masks = {name: torch.cat(p) for name, p in parts.items() if len(p) == chunks and calls.get(name) == 1}
    return {name: m for name, m in masks.items() if not bool(m.all()) and int(m.sum()) >= MIN_LIVE}
