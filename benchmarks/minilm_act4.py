"""Which of MiniLM's activations lose its fidelity at 4 bits (issue 12 diagnosis).

    .venv/bin/python benchmarks/minilm_act4.py [--bits 4] [--calib 32] [--test 128] [--per-op]

The FP32 HF model with float weights; the input activations of every linear (q/k/v, attention
out-projection, FFN1, FFN2) and both operands of the two attention matmuls (q·kᵀ, softmax·v;
intercepted at `torch.matmul`, which the eager attention calls) are fake-quantized per tensor with
`bitmix.compiler.ranges.activation_range` (MSE step, signed/unsigned choice) fitted on calibration
sentences; no smoothing. For each group of ops: cosine to FP32 with only that group at `--bits`
("only") and with every activation but that group at `--bits` ("all but").
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from bitmix import zoo
from bitmix.compiler import ranges
from bitmix.compiler.qlayer import qrange

SAMPLES = 1 << 16  # values kept per activation per calibration batch for the step search


class ActivationQuantizer:
    """Records activations by name (calibration), then fake-quantizes the names switched on."""

    def __init__(self, bits: int) -> None:
        self.bits, self.calibrating, self.on = bits, True, set()
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.steps: dict[str, tuple[bool, torch.Tensor]] = {}
        self.calls = 0

    def __call__(self, name: str, v: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            flat = v.detach().reshape(-1)
            pick = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLES]
            self.seen.setdefault(name, []).append(torch.cat([flat[pick], flat.min()[None], flat.max()[None]]))
            return v
        if name not in self.on:
            return v
        signed, step = self.steps[name]
        q_n, q_p = qrange(self.bits, signed)
        return torch.round(torch.clamp(v / step, -q_n, q_p)) * step

    def fit(self) -> None:
        for name, parts in self.seen.items():
            v = torch.cat(parts)
            self.steps[name] = ranges.activation_range(v, self.bits, bool(v.min() < 0))
        self.seen.clear()
        self.calibrating = False


def role(name: str) -> str:
    if name.startswith("L"):
        return "q·kᵀ (both operands)" if ".qk." in name else "softmax·v (both operands)"
    if name.endswith(("query", "key", "value")):
        return "q/k/v input (post-LayerNorm)"
    if name.endswith("attention.output.dense"):
        return "out-projection input (attention context)"
    if name.endswith("intermediate.dense"):
        return "FFN1 input (post-LayerNorm)"
    return "FFN2 input (after GELU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--per-op", action="store_true", help="also every op on its own")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, _, data = zoo.load("minilm")
    aq = ActivationQuantizer(args.bits)
    matmul = torch.matmul

    def quantized_matmul(a: torch.Tensor, b: torch.Tensor, *rest, **kw) -> torch.Tensor:
        layer, kind = aq.calls // 2, "qk" if aq.calls % 2 == 0 else "pv"
        aq.calls += 1
        return matmul(aq(f"L{layer}.{kind}.a", a), aq(f"L{layer}.{kind}.b", b), *rest, **kw)

    for name, m in model.bert.named_modules():
        if isinstance(m, torch.nn.Linear) and "pooler" not in name:
            m.register_forward_pre_hook(lambda mod, a, n=name: (aq(n, a[0]),))

    def run(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        outs = []
        for i in range(0, inputs[0].shape[0], 32):
            aq.calls = 0
            outs.append(model(*(x[i : i + 32] for x in inputs)))
        return torch.cat(outs)

    torch.matmul = quantized_matmul
    try:
        with torch.no_grad():
            run(data.calibration(args.calib))
            aq.fit()
            test = tuple(x[: args.test] for x in data.test.inputs)
            ref = data.test.targets[: args.test]

            def cosine(on: set[str]) -> float:
                aq.on = on
                return 100 * float(F.cosine_similarity(run(test), ref, dim=-1).mean())

            names = set(aq.steps)
            print(f"every activation at {args.bits} bits: {cosine(names):.3f} % ({len(names)} tensors)")
            groups: dict[str, set[str]] = {}
            for n in sorted(names):
                groups.setdefault(role(n), set()).add(n)
            if args.per_op:
                for n in sorted(names):
                    groups.setdefault(n.rsplit(".", 1)[0] if n.startswith("L") else n, set()).add(n)
            print(f"{'activations':<48} {'tensors':>7} {'only':>8} {'all but':>8}")
            for g, members in groups.items():
                print(f"{g:<48} {len(members):>7} {cosine(members):8.3f} {cosine(names - members):8.3f}", flush=True)
    finally:
        torch.matmul = matmul
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
