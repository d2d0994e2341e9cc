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
