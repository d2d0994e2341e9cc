"""BERT-base (12 layers, hidden 768) at sequence length 128, randomly initialised."""

from __future__ import annotations

import torch

from bitmix.zoo.minilm import SentenceEncoder, _require_transformers

SEQ_LEN = 128


def bert_base() -> tuple[SentenceEncoder, tuple[torch.Tensor, torch.Tensor], None]:
    transformers = _require_transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(attn_implementation="eager")
    model = SentenceEncoder(transformers.BertModel(config)).eval()
    ids = torch.randint(0, config.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    return model, (ids, torch.ones(1, SEQ_LEN, dtype=torch.long)), None
