import dataclasses

import pytest
import torch

from bitmix import zoo
from bitmix.errors import BitmixError
from bitmix.task import Split
from bitmix.zoo import digits


def test_unknown_model():
    with pytest.raises(BitmixError, match="unknown model 'nope'; available: digits-cnn"):
        zoo.load("nope")


def test_digits_cnn_accuracy(load_zoo):
    model, inputs, data = load_zoo("digits-cnn")
    assert inputs[0].shape == (256, 1, 8, 8)
    assert len(data.train) + len(data.test) == 1797
    assert data.evaluate(model) >= 97.0


def test_digits_mlp_accuracy(load_zoo):
    model, _, data = load_zoo("digits-mlp")
    assert data.evaluate(model) >= 95.0


def test_digits_training_is_deterministic(load_zoo, tmp_path, monkeypatch):
    """A fresh training run reproduces the cached weights bit for bit."""
    cached, _, _ = load_zoo("digits-cnn")
    monkeypatch.setenv("BITMIX_CACHE_DIR", str(tmp_path))
    fresh, _ = digits.load_digits_model("digits-cnn")
    assert (tmp_path / f"digits-cnn-v{digits.CACHE_VERSION}.pt").exists()
    for (k, a), b in zip(cached.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_minilm_is_pretrained_and_offline(load_zoo):
    from bitmix.zoo.minilm import fidelity

    model, (ids, mask), data = load_zoo("minilm")
    assert data.metric == "cosine" and len(data.train) > 1000 and len(data.test) > 300  # the whole stdlib
    assert data.details is fidelity  # the task supplies its own detail metrics to the compiler
    subset = dataclasses.replace(data, test=Split(tuple(t[:48] for t in data.test.inputs), data.test.targets[:48]))
    fid = fidelity(model, subset)
    assert fid["cosine"] == pytest.approx(100.0, abs=1e-3) and fid["nn_agreement"] == 100.0
    # pretrained, not random: related sentences are closer than unrelated ones
    from transformers import AutoTokenizer

    from bitmix.zoo.minilm import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir())
    enc = tok(["Return a copy of the list.", "Make a shallow copy of a list.", "The cat sat on the mat."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(enc["input_ids"], enc["attention_mask"]), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2


@pytest.mark.parametrize("name,shape", [("resnet18", (1, 3, 224, 224)), ("mobilenetv2", (1, 3, 224, 224))])
def test_image_models_run(load_zoo, name, shape):
    model, inputs, data = load_zoo(name)
    assert data is None and inputs[0].shape == shape
    with torch.no_grad():
        assert model(*inputs).shape == (1, 1000)


def test_bert_base_shapes(load_zoo):
    model, (ids, mask), data = load_zoo("bert-base")
    assert ids.shape == (1, 128) and data is None
    assert sum(p.numel() for p in model.parameters()) > 100_000_000


def test_recall_at_k_against_plain_sets():
    from bitmix.zoo.minilm import recall_at_k

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(30, 8, generator=gen)
    assert recall_at_k(ref, ref, 10) == 1.0
    noisy = ref + 0.3 * torch.randn(30, 8, generator=gen)
    e, q = (torch.nn.functional.normalize(t, dim=-1) for t in (ref, noisy))

    def top(m: torch.Tensor, i: int) -> set[int]:
        sims = m @ m[i]
        sims[i] = -2.0
        return set(sims.topk(10).indices.tolist())

    expected = sum(len(top(e, i) & top(q, i)) / 10 for i in range(30))
    assert abs(recall_at_k(noisy, ref, 10) - expected / 30) < 1e-6
