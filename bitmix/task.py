"""Task data in one shape every stage understands, and the roles data plays in a compile.

A `TaskData` holds input tensors and targets for a train and a test split. Targets are
class labels (metric `top1`, loss cross-entropy) or FP32 reference outputs (metric
`cosine`, loss 1 - cosine similarity, i.e. distillation from the FP32 model). A task may
carry its own detail metrics (`details`), which the compiler calls without knowing the
task. `Data` names the three roles data plays in `bitmix.compile`: calibration (unlabeled
inputs), train (labeled, for methods that train and for fine-tuning) and eval.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.errors import BitmixError, check_count, check_number
from bitmix.ir.precision import PrecisionLike, as_precision

Inputs = tuple[torch.Tensor, ...]
OPTIMIZERS = ("sgd", "adam")
# What `TaskData.classification` reads from a DataLoader into memory: its first whole batches up to this many bytes
# of tensors (the first batch always). 10^6 CIFAR-sized images (3x32x32 float32) are 12 GB; joining the batches
# briefly needs twice what is kept.
MAX_LOADER_BYTES = 2 * 2**30


@dataclass(frozen=True)
class FinetuneConfig:
    """LSQ quantization-aware fine-tuning after allocation; each zoo task carries one that works for it.

    `layer_distill` weighs layer-wise distillation to the float model (`bitmix.compiler.distill`);
    `step_lr_scale` multiplies the LSQ steps' learning rates under Adam; `lr_8bit_activations`, when set,
    replaces `lr` for assignments whose every layer reads 8-bit activations (`lr_for`).
    """

    epochs: int = 2
    lr: float = 0.01
    optimizer: str = "sgd"
    batch_size: int = 64
    layer_distill: float = 0.0
    step_lr_scale: float = 1.0
    lr_8bit_activations: float | None = None

    def __post_init__(self) -> None:
        check_count("FinetuneConfig.epochs", self.epochs, minimum=0)
        check_number("FinetuneConfig.lr", self.lr)
        if self.optimizer not in OPTIMIZERS:
            raise BitmixError(f"unknown FinetuneConfig.optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        check_count("FinetuneConfig.batch_size", self.batch_size)
        check_number("FinetuneConfig.layer_distill", self.layer_distill, inclusive=True)
        check_number("FinetuneConfig.step_lr_scale", self.step_lr_scale)
        if self.lr_8bit_activations is not None:
            check_number("FinetuneConfig.lr_8bit_activations", self.lr_8bit_activations)

    def lr_for(self, assignment: Mapping[str, PrecisionLike]) -> float:
        """The learning rate for fine-tuning `assignment`: `lr_8bit_activations` when it is set and no layer
        reads activations narrower than 8 bits (less activation noise to undo, so smaller moves: see the zoo
        MiniLM recipe), else `lr`."""
        if self.lr_8bit_activations is not None and assignment and all(
                as_precision(bits, f"layer {name!r}").a >= 8 for name, bits in assignment.items()):
            return self.lr_8bit_activations
        return self.lr


@dataclass(frozen=True)
class Split:
    inputs: Inputs
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, index: torch.Tensor) -> Split:
        return Split(tuple(t[index] for t in self.inputs), self.targets[index])


@dataclass(frozen=True)
class TaskData:
    """Train/test splits plus how to score a model on them:
    `TaskData("my-task", "top1", Split((x_train,), y_train), Split((x_test,), y_test))`, or `classification`
    from a DataLoader of (inputs..., labels)."""

    name: str
    metric: str  # "top1" (accuracy, %) or "cosine" (mean cosine similarity to FP32 outputs, %)
    train: Split
    test: Split
    info: dict = field(default_factory=dict, compare=False)
    recipe: FinetuneConfig = FinetuneConfig()  # the fine-tuning recipe known to work on this task
    # extra metrics of a model on the test split beyond `metric` (e.g. nearest-neighbour agreement), {name: %}
    details: Callable[[nn.Module, TaskData], dict[str, float]] | None = field(default=None, compare=False)
    # what building it warned about (a loader capped at MAX_LOADER_BYTES): a compile's report repeats it
    notes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def classification(cls, batches: Iterable[Any], role: str = "train") -> TaskData:
        """A classification task (cross-entropy loss, top-1 accuracy) from (inputs..., class labels) batches, as a
        DataLoader of (x, y) yields: what `Data(train=loader)` / `Data(eval=loader)` mean. The batches are read
        into memory once, the first whole ones up to `MAX_LOADER_BYTES` (2 GiB), with a warning when there are more
        (the rest is never read); both splits hold them (a train role never reads its test split, an eval role its
        train split)."""
        usage = (f"Data({role}=...) must be a TaskData or a DataLoader of (inputs..., class labels) batches, e.g. "
                 f"Data({role}=DataLoader(TensorDataset(x, y), batch_size=64))")
        if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
            raise BitmixError(f"{usage}; got {type(batches).__name__}")
        parts: list[tuple[torch.Tensor, ...]] = []
        held = 0
        notes: tuple[str, ...] = ()
        for batch in batches:
            if isinstance(batch, Mapping):
                raise BitmixError(f"{usage}; got a batch of {{{', '.join(map(repr, batch))}}}: yield "
                                  "(inputs..., labels) tuples instead, e.g. (b['input_ids'], b['labels'])")
            if not (isinstance(batch, list | tuple) and len(batch) >= 2
                    and all(isinstance(t, torch.Tensor) for t in batch)):
                raise BitmixError(f"{usage}; got a batch of {type(batch).__name__} without labels")
            labels = batch[-1]
            if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise BitmixError(f"{usage}; its labels must be integer class indices of shape (batch,), got "
                                  f"{labels.dtype} of shape {tuple(labels.shape)} (other targets: build a TaskData)")
            size = sum(t.numel() * t.element_size() for t in batch)
            if parts and held + size > MAX_LOADER_BYTES:
                examples = sum(len(p[-1]) for p in parts)
                use = "trains" if role == "train" else "measures accuracy" if role == "eval" else "works"
                notes = (f"Data({role}=...) holds more than {MAX_LOADER_BYTES / 2**30:g} GiB of tensors; bitmix reads "
                         f"its first {examples} examples ({held / 2**30:.2f} GiB) into memory and {use} on those only; "
                         "pass a loader over the subset you want, or a TaskData",)
                warnings.warn(notes[0], stacklevel=2)
                break
            parts.append(tuple(batch))
            held += size
        if not parts:
            raise BitmixError(f"{usage}; got no batches")
        if len({len(p) for p in parts}) != 1:
            raise BitmixError(f"{usage}; its batches hold different numbers of tensors")
        *inputs, labels = (torch.cat(ts) for ts in zip(*parts, strict=True))
        split = Split(tuple(inputs), labels)
        return cls(f"{role} data", "top1", split, split, notes=notes)

    def batches(
        self, split: str = "train", batch_size: int = 64, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[Inputs, torch.Tensor]]:
        data = self._split(split)
        n = len(data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield tuple(t[idx] for t in data.inputs), data.targets[idx]

    def calibration(self, n: int = 64) -> Inputs:
        """The first `n` training inputs: unlabeled data for step sizes and post-training scores."""
        return tuple(t[:n] for t in self.train.inputs)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.metric == "top1":
            return F.cross_entropy(outputs, targets)
        return (1.0 - F.cosine_similarity(outputs, targets, dim=-1)).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", batch_size: int = 256) -> float:
        """Task quality in percent: top-1 accuracy, or mean cosine similarity to FP32 outputs."""
        total, count = 0.0, 0
        for inputs, targets in self.batches(split, batch_size):
            out = model(*inputs)
            if self.metric == "top1":
                total += float((out.argmax(dim=-1) == targets).sum())
            else:
                total += float(F.cosine_similarity(out.float(), targets, dim=-1).sum())
            count += len(targets)
        return 100.0 * total / count

    def _split(self, split: str) -> Split:
        if split == "train":
            return self.train
        if split == "test":
            return self.test
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")


Evaluator = Callable[[nn.Module], float]


@dataclass(frozen=True)
class Data:
    """The data a compile may use, by role; every role is optional.

    calibration: unlabeled inputs (a tensor, a tuple of tensors, an iterable of batches or a TaskData)
      for activation step sizes and post-training scores; default: the first training inputs.
    train: labeled TaskData for methods that train (alps, hawq, limpq) and for fine-tuning, or a DataLoader of
      (inputs..., class labels): a classification task (`TaskData.classification`).
    eval: TaskData, a DataLoader of (inputs..., class labels) (top-1 accuracy) or a callable
      `model -> quality (%)`, measured on FP32, fake-quant and kernels.
    """

    calibration: Any = None
    train: TaskData | Iterable[Any] | None = None
    eval: TaskData | Evaluator | Iterable[Any] | None = None

    @classmethod
    def of(cls, data: Any) -> Data:
        """`Data` as given; a TaskData plays every role; inputs alone are calibration data."""
        if data is None:
            return cls()
        if isinstance(data, Data):
            return data
        if isinstance(data, TaskData):
            return cls(calibration=data, train=data, eval=data)
        return cls(calibration=data)
