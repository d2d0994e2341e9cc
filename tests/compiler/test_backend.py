import torch
from torch import nn


def test_torch_compile_backend_runs_on_kernels():
    assert "bitmix" in torch._dynamo.list_backends()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="bitmix")
    with torch.no_grad():
        out = compiled(x)
        ref = model(x)
    assert out.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean() > 0.8
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_graph_breaks_and_dynamic_recompiles_never_break_the_model():
    """A data-dependent branch splits the graph (one piece has no layer); a second batch size makes Dynamo
    recompile with symbolic sizes, which runs eagerly with a warning instead of failing."""
    import pytest

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 16)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x)).mean((2, 3))
            if h.sum() > 0:
                h = h * 2
            return self.out(torch.relu(self.fc(h)))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net().eval()
    compiled = torch.compile(model, backend="bitmix")
    with torch.no_grad():
        x = torch.randn(4, 3, 8, 8)
        cos = torch.nn.functional.cosine_similarity(compiled(x).flatten(), model(x).flatten(), dim=0)
        assert cos > 0.95
        y = torch.randn(6, 3, 8, 8)
        with pytest.warns(UserWarning, match="symbolic sizes"):
            out = compiled(y)
        assert out.shape == (6, 2)
        assert torch.nn.functional.cosine_similarity(out.flatten(), model(y).flatten(), dim=0) > 0.95
