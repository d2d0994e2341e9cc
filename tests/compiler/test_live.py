"""Live rows: padded positions that cannot reach the output are found from gradients alone and are
dropped from GPTQ's Hessians and smoothing's statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitmix
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.gptq import round_layer
from bitmix.compiler.live import live_rows
from bitmix.compiler.qlayer import QuantLayer, quant_layers


class _Padded(nn.Module):
    """Token features -> linear -> masked mean over tokens -> linear (a sentence encoder in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Linear(16, 24)
        self.head = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.tokens(x)) + 1.0  # +1: no token's output is dead by ReLU alone
        m = mask.unsqueeze(-1)
        return self.head((h * m).sum(1) / m.sum(1))


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (n,), generator=gen)
    mask = (torch.arange(10).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return torch.randn(n, 10, 16, generator=gen), mask


def test_padded_rows_are_dead_and_unpadded_layers_are_left_out():
    x, mask = _batch(40, 0)  # 40 examples: more than one backward chunk
    gm = prepare(capture(_Padded().eval(), (x[:2], mask[:2])))
    layers = quant_layers(gm)
    live = live_rows(gm, layers, (x, mask))
    tokens = next(n for n in layers if "tokens" in n)
    assert set(live) == {tokens}  # the head's rows (one per example) all matter
    assert torch.equal(live[tokens], mask.bool())
    assert all(p.grad is None for p in gm.parameters())


def test_dead_rows_do_not_change_gptq():
    gen = torch.Generator().manual_seed(1)
    _, mask = _batch(64, 2)
    live = mask.bool()
    x = torch.randn(64, 10, 3, generator=gen) @ torch.randn(3, 16, generator=gen)  # correlated channels,
    x = x + 0.1 * torch.randn(x.shape, generator=gen)  # where GPTQ beats round-to-nearest
    w = torch.randn(24, 16, generator=gen)
    rounded = []
    for junk in (0.0, 100.0):  # whatever sits in the padded rows
        layer = QuantLayer("fc", "linear", w)
        layer.set_bits("4/8")
        layer.a_quant = None  # weight-only: the layer input as given
        xj = torch.where(live.unsqueeze(-1), x, junk * torch.randn(x.shape, generator=gen))
        assert round_layer(layer, xj, live)
        rounded.append(layer.weight.detach().clone())
    assert torch.equal(rounded[0], rounded[1])



def test_a_one_row_output_has_nothing_to_drop():
    """An unbatched input: the head's output is one vector (no rows), so it gets no mask (and no crash)."""

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Linear(16, 24)
            self.head = nn.Linear(24, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.tokens(x)).mean(0))

    x = torch.randn(10, 16)
    gm = prepare(capture(Unbatched().eval(), (x,)))
    assert live_rows(gm, quant_layers(gm), (x,)) == {}


class _DeadBranch(nn.Module):
    """`a`'s output cannot reach the output: the ReLU after `b` never fires."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x))) - 100.0))


def test_a_layer_without_live_rows_keeps_them_all():
    x = torch.randn(8, 32)
    gm = prepare(capture(_DeadBranch().eval(), (x[:1],)))
    layers = quant_layers(gm)
    assert live_rows(gm, layers, (x,)) == {}  # `a`, `b`: every row dead -> no mask, not an empty one


@pytest.mark.parametrize("target", ["w4a8-npu", "mixed-npu"])
def test_a_dead_layer_compiles_at_narrow_weights(target):
    x = torch.randn(8, 32)
    cm = bitmix.compile(_DeadBranch().eval(), (x[:1],), target, data=x,
                        options=bitmix.CompileOptions(frontier_points=0))
    with torch.no_grad():
        assert torch.equal(cm(x), cm.fake_quant(x))


class _BagWithOffsets(nn.Module):
    """An EmbeddingBag fed 1-D ids and their offsets: no input has a batch dimension to cut examples from."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc1, self.fc2 = nn.EmbeddingBag(100, 16, mode="sum"), nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids, offsets))))


def test_inputs_without_a_shared_batch_dimension_are_not_cut_into_examples():
    model = _BagWithOffsets().eval()
    ids, offsets = torch.randint(0, 100, (40,)), torch.tensor([0, 5, 11, 20, 33])  # more ids than a chunk
    cm = bitmix.compile(model, (ids, offsets), "int4int2-npu", data=(ids, offsets),
                        options=bitmix.CompileOptions(frontier_points=0))
    other = torch.randint(0, 100, (30,)), torch.tensor([0, 7, 29])
    with torch.no_grad():
        assert torch.equal(cm(*other), cm.fake_quant(*other))
        assert torch.nn.functional.cosine_similarity(cm(*other), model(*other)).min() > 0.9
