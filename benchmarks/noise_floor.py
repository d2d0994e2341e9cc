"""How much output error a model makes from noise alone: the floor under any quantizer's fidelity.

    .venv/bin/python benchmarks/noise_floor.py [--models mobilenetv2,resnet18]

For each zoo model (FP32, `benchmarks/quality.py`'s 16 seeded test inputs): 1 - cosine between its outputs
on the inputs and on the inputs plus Gaussian noise of a fraction of their std, and with only the input
rounded to 8 bits (a per-tensor step from 8 calibration inputs' max |x| / 127, as an int8 engine must).
An int8 quantizer adds noise of ~1 % of each tensor's std at every layer, so a model whose output moves by
more than a fidelity bar under 0.1 % input noise cannot meet that bar at 8 bits.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from quality import _inputs, _outputs

from bitmix import zoo

NOISE_FRACTIONS = (1e-3, 3e-3, 1e-2)


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(1 - F.cosine_similarity(a, b, dim=-1).mean())


def floor(name: str, seed: int = 0) -> dict[str, float]:
    model, example, data = zoo.load(name)
    model.eval()
    calib, test = _inputs(example, data, 8, seed, "train"), _inputs(example, data, 16, seed, "test")
    if not all(t.is_floating_point() for t in test):
        raise SystemExit(f"{name}: integer inputs (token ids) cannot take input noise; pick an image or vector model")
    ref = _outputs(model, test)
    gen = torch.Generator().manual_seed(seed)
    row = {}
    for frac in NOISE_FRACTIONS:
        noisy = tuple(t + frac * t.std() * torch.randn(t.shape, generator=gen) for t in test)
        row[f"noise {frac:g} of std"] = _one_minus_cos(_outputs(model, noisy), ref)
    steps = [c.abs().max() / 127 for c in calib]
    rounded = tuple(torch.clamp(torch.round(t / s), -128, 127) * s for t, s in zip(test, steps, strict=True))
    row["input at 8 bits"] = _one_minus_cos(_outputs(model, rounded), ref)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,resnet18,resnet50")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in args.models.split(","):
        print(name, "  ".join(f"{k}: {v:.2e}" for k, v in floor(name, args.seed).items()), flush=True)


if __name__ == "__main__":
    main()
