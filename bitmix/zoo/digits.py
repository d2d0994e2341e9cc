"""Small models trained on scikit-learn's bundled digits images (1,797 real 8x8 scans).

Trained deterministically on first use (a few seconds on 2 cores) and cached, so every
run of every test sees the same weights. Fixed split: 80 % train, 20 % test, stratified,
seed 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.task import FinetuneConfig, Split, TaskData
from bitmix.zoo.cache import cache_dir

TRAIN_SEED = 0
CACHE_VERSION = 1
# Example inputs are a batch of 256 frames. One 8x8 frame is ~3.3 MMAC for the CNN: on a
# 256-core chip that is a few cycles per core, so at batch 1 every layer costs its fixed
# pipeline and NoC latency (~46 cycles) whatever its precision. Priced per frame over a
# serving batch, compute dominates as it does for ImageNet-size models (see README).
SERVING_BATCH = 256


# LSQ fine-tuning after allocation: what the CLI and the frontier study use on the digits task.
RECIPE = FinetuneConfig(epochs=3, lr=0.01, optimizer="sgd", batch_size=64)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsCNN(nn.Module):
    """ResNet-style CNN for 1x8x8 digits: stem, three residual blocks, pool, classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = ResidualBlock(width, width)
        self.block2 = ResidualBlock(width, 2 * width, stride=2)
        self.block3 = ResidualBlock(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DigitsMLP(nn.Module):
    """Three-layer perceptron on the flattened 64 pixels."""

    def __init__(self, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def digits_data() -> TaskData:
    """The digits images as (N, 1, 8, 8) floats in [0, 1] with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=TRAIN_SEED, stratify=digits.target
    )
    train = Split((x[idx_train],), y[idx_train])
    test = Split((x[idx_test],), y[idx_test])
    return TaskData("digits", "top1", train, test, {"source": "sklearn.datasets.load_digits"}, RECIPE)


def _train(model: nn.Module, data: TaskData, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(data.train) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        for (x,), y in data.batches("train", 64, shuffle=True, seed=TRAIN_SEED + epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()


def _build(name: str) -> nn.Module:
    return DigitsCNN() if name == "digits-cnn" else DigitsMLP()


def load_digits_model(name: str) -> tuple[nn.Module, TaskData]:
    """Return the trained model (eval mode) and its data; train and cache on first use."""
    data = digits_data()
    path = cache_dir() / f"{name}-v{CACHE_VERSION}.pt"
    torch.manual_seed(TRAIN_SEED)
    model = _build(name)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model, data
    with torch.random.fork_rng():
        torch.manual_seed(TRAIN_SEED)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # single-threaded training gives bit-identical weights run to run
        try:
            _train(model, data, epochs=30 if name == "digits-cnn" else 40, lr=3e-3)
        finally:
            torch.set_num_threads(threads)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, data
