"""`bitmix simulate`: a zoo model or a .pt2 program, priced at uniform bits, written as JSON."""

import json

import torch

from bitmix.tools.simulate import simulate_model_cli


def test_zoo_model_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert simulate_model_cli("digits-mlp", 4, None, "cycle", str(out)) == 0
    data = json.loads(out.read_text())
    assert data["engine"] == "cycle" and data["chips"] == 1
    assert "frames/s" in capsys.readouterr().out


def test_program_priced_at_the_shape_asked_for(tmp_path):
    """A batch-dynamic program at batch 8 does 4x the MACs of batch 2 (its saved example)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    program = torch.export.export(model.eval(), (torch.randn(2, 3, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "mlp.pt2")
    macs = {}
    for batch, shapes in ((2, None), (8, [(8, 3, 4)])):
        out = tmp_path / f"b{batch}.json"
        assert simulate_model_cli(str(tmp_path / "mlp.pt2"), 8, None, "analytic", str(out), shapes) == 0
        macs[batch] = sum(layer["macs"] for layer in json.loads(out.read_text())["layers"])
    assert macs[2] == 2 * (12 * 16 + 16 * 4) and macs[8] == 4 * macs[2]
