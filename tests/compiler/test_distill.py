"""Layer-wise distillation: the loss compares each quantized layer's output with the float teacher's."""

from __future__ import annotations

import pytest
import torch

from bitmix import zoo
from bitmix.compiler.capture import capture
from bitmix.compiler.distill import LayerDistiller
from bitmix.compiler.fold import prepare
from bitmix.compiler.qlayer import quant_layers
from bitmix.compiler.quantize import fake_quantize, finetune
from bitmix.errors import BitmixError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mlp():
    model, example, data = zoo.load("digits-mlp")
    return prepare(capture(model, example, "digits-mlp")), data


def test_loss_is_zero_against_itself_and_matches_hand_formula(mlp):
    gm, data = mlp
    fq = fake_quantize(gm, {"fc1": 4, "fc2": 2}, calibration=data.calibration(32))
    x = data.calibration(16)
    distiller = LayerDistiller(fq, gm)
    assert distiller.names == ["fc1", "fc2"]  # fc3 stays float: nothing to distil
    with distiller.recording():
        gm(*x)
        fq(*x)
        loss = float(distiller.loss().detach())
    outs: dict[str, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.setdefault(m.name, []).append(o))
             for model in (gm, fq) for layer in quant_layers(model).values()]
    with torch.no_grad():
        gm(*x)
        fq(*x)
    for h in hooks:
        h.remove()
    expected = sum(float((q - t).pow(2).mean() / t.pow(2).mean()) for t, q in (outs["fc1"], outs["fc2"])) / 2
    assert loss == pytest.approx(expected, rel=1e-5)
    assert loss > 0
    same = LayerDistiller(fq, fq)
    with same.recording():
        fq(*x)
        assert float(same.loss().detach()) == 0.0


def test_finetune_with_layer_distillation_is_deterministic_and_needs_a_teacher(mlp):
    gm, data = mlp
    fq = fake_quantize(gm, {"fc1": 8, "fc2": 2, "fc3": 8}, calibration=data.calibration(64))
    a = finetune(fq, data, epochs=1, lr=1e-3, optimizer="adam", seed=1, max_batches=4, teacher=gm, layer_distill=1.0)
    b = finetune(fq, data, epochs=1, lr=1e-3, optimizer="adam", seed=1, max_batches=4, teacher=gm, layer_distill=1.0)
    plain = finetune(fq, data, epochs=1, lr=1e-3, optimizer="adam", seed=1, max_batches=4, teacher=gm)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.state_dict()["bitmix_fc2.weight"], plain.state_dict()["bitmix_fc2.weight"])
    with pytest.raises(BitmixError, match="teacher"):
        finetune(fq, data, epochs=1, lr=1e-3, max_batches=1, layer_distill=1.0)


class PaddedPooling(torch.nn.Module):
    """Two linears over a padded sequence, then a masked mean: the padding rows never reach the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(x)))
        m = mask.unsqueeze(-1)
        return (y * m).sum(1) / m.sum(1)


def test_loss_leaves_out_rows_that_cannot_reach_the_output():
    torch.manual_seed(0)
    model = PaddedPooling().eval()
    x = torch.randn(6, 5, 8)
    mask = (torch.arange(5) < torch.tensor([5, 3, 1, 4, 2, 5]).unsqueeze(1)).float()
    gm = prepare(capture(model, (x[:1], mask[:1]), "padded"))
    fq = fake_quantize(gm, {"fc1": 4, "fc2": 2}, calibration=(x, mask))
    distiller = LayerDistiller(fq, gm)

    def loss(inputs: torch.Tensor) -> float:
        with distiller.recording():
            distiller.teach(inputs, mask)
            fq(inputs, mask)
            return float(distiller.loss().detach())

    noise = torch.randn_like(x) * (mask.unsqueeze(-1) == 0)
    assert loss(x + 10 * noise) == pytest.approx(loss(x), rel=1e-6)  # padding rows: any values, same loss
    outs: dict[str, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.setdefault(m.name, []).append(o))
             for net in (gm, fq) for layer in quant_layers(net).values()]
    with torch.no_grad():
        gm(x, mask)
        fq(x, mask)
    for h in hooks:
        h.remove()
    real = mask.bool()
    expected = sum(float((q[real] - t[real]).pow(2).mean() / t[real].pow(2).mean())
                   for t, q in (outs["fc1"], outs["fc2"])) / 2
    assert loss(x) == pytest.approx(expected, rel=1e-5)
    everything = sum(float((q - t).pow(2).mean() / t.pow(2).mean()) for t, q in (outs["fc1"], outs["fc2"])) / 2
    assert loss(x) != pytest.approx(everything, rel=1e-3)
