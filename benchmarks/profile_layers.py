"""Where a compiled zoo model's forward time goes: per lowered layer, per kernel pass, and glue.

Compiles a zoo model as ``bitmix bench model`` does (all-4-bit), then times ``repeats`` forwards
with wall-clock probes around each lowered layer and around the VNNI conv passes (quantize into the
padded code buffer, implicit GEMM, depthwise). "glue" is the forward time outside lowered layers:
torch's ReLU / adds / pooling / layout copies between kernels. Achieved GMAC/s per layer is against
``--peak`` (the machine's int8 peak, GMAC/s, both cores). Probes add a few microseconds per call,
so per-layer sums run slightly above the un-probed forward, which is reported too.

    python benchmarks/profile_layers.py resnet18 --repeats 30 [--ort]

``--ort`` adds ONNX Runtime int8's per-conv times from its own profiler, paired with bitmix's layers in
execution order.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections import defaultdict

import numba
import torch

import bitmix
from bitmix import zoo
from bitmix.compiler import lower
from bitmix.kernels import conv_nhwc, cpu
from bitmix.kernels.threads import configure_threading

TIMES: dict[str, list[float]] = defaultdict(list)


def _probe(owner, attr: str, label: str) -> None:
    fn = getattr(owner, attr)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - start)

    setattr(owner, attr, timed)


def _macs(layer: lower.KernelLayer, x: torch.Tensor, out: torch.Tensor | tuple) -> int:
    p = layer.plan
    out = out[0] if isinstance(out, tuple) else out  # floats and the next conv's input (``floats_too``)
    if p.kind == "conv2d":
        return math.prod(out.shape) * (x.shape[1] // p.groups) * math.prod(p.kernel_size)
    return math.prod(out.shape) * x.shape[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--peak", type=float, default=0.0, help="int8 peak GMAC/s of the machine (both cores)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ort", action="store_true", help="also ONNX Runtime int8's per-conv times (its profiler)")
    parser.add_argument("--no-amx", action="store_true", help="as on a CPU without AMX (`bitmix bench model --no-amx`)")
    args = parser.parse_args()
    if args.no_amx:
        cpu.deny_amx()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    configure_threading()
    numba.set_num_threads(threads)
    model, inputs, data = zoo.load(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = bitmix.compile(model, inputs, target="int4int2-npu", method="eagl", budget=1.0)
    cm.recorder.enabled = False
    with torch.no_grad():
        for _ in range(5):
            cm(*inputs)
        plain = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            cm(*inputs)
            plain.append(time.perf_counter() - start)
    layer_t: dict[str, list[float]] = defaultdict(list)
    layer_order: dict[str, None] = {}  # call order
    macs: dict[str, int] = {}
    original = lower.KernelLayer.forward

    def forward(self, x, other=None, residual=None):
        start = time.perf_counter()
        out = original(self, x, other, residual)
        layer_t[self.name].append(time.perf_counter() - start)
        layer_order.setdefault(self.name, None)
        macs[self.name] = _macs(self, x, out)
        return out

    lower.KernelLayer.forward = forward
    _probe(conv_nhwc, "_pad_codes", "conv: quantize+pad (_pad_codes)")
    _probe(conv_nhwc.ImplicitConv, "on_codes", "conv: implicit GEMM + epilogue (ImplicitConv.on_codes)")
    _probe(conv_nhwc.CodesConv, "__call__", "conv: GEMM into the next conv's codes, with its code pass (CodesConv)")
    _probe(conv_nhwc.FloatsAndCodesConv, "__call__", "conv: GEMM into floats and next conv codes (FloatsAndCodesConv)")
    _probe(conv_nhwc, "_depthwise", "conv: depthwise (_depthwise)")
    _probe(conv_nhwc, "_codes", "conv: quantize (_codes, depthwise/other)")
    _probe(conv_nhwc, "_scale_rows", "conv: scale rows (non-VNNI)")
    totals = []
    with torch.no_grad():
        for _ in range(3):
            cm(*inputs)
        layer_t.clear()
        TIMES.clear()
        for _ in range(args.repeats):
            start = time.perf_counter()
            cm(*inputs)
            totals.append(time.perf_counter() - start)
    lower.KernelLayer.forward = original

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    total = med(totals)
    per_layer = {name: med(v) * len(v) / args.repeats for name, v in layer_t.items()}
    layers_sum = sum(per_layer.values())
    print(f"{args.model}: forward {med(plain) * 1e3:.2f} ms un-probed, {total * 1e3:.2f} ms probed; "
          f"lowered layers {layers_sum * 1e3:.2f} ms; glue (torch ops between layers) "
          f"{(total - layers_sum) * 1e3:.2f} ms; load {os.getloadavg()[0]:.2f}")
    print("kernel passes (median per forward):")
    for label, v in sorted(TIMES.items(), key=lambda kv: -sum(kv[1])):
        per_fwd = sum(v) / args.repeats
        print(f"  {label:45s} {per_fwd * 1e3:7.3f} ms  ({len(v) // args.repeats} calls)")
    all_macs = sum(macs.values())
    print(f"total MACs {all_macs / 1e9:.3f} G -> {all_macs / total / 1e9:.1f} GMAC/s over the forward")
    print(f"{'layer':40s} {'ms':>7s} {'GMAC':>7s} {'GMAC/s':>8s} {'%peak':>6s}")
    for name, t in sorted(per_layer.items(), key=lambda kv: -kv[1])[: args.top]:
        rate = macs[name] / t / 1e9
        pk = f"{100 * rate / args.peak:5.1f}" if args.peak else "-"
        print(f"{name:40s} {t * 1e3:7.3f} {macs[name] / 1e9:7.3f} {rate:8.1f} {pk:>6s}")
    if args.ort:
        _compare_ort(model, inputs, data, threads, args.repeats, per_layer, layer_order, args.top)
    prof_inputs = inputs
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            cm(*prof_inputs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


ORT_WEIGHTED = ("QLinearConv", "ConvInteger", "Conv")


def _compare_ort(model, inputs, data, threads: int, runs: int, per_layer: dict[str, float],
                 layer_order: dict[str, None], top: int) -> None:
    """ONNX Runtime int8's convs beside bitmix's, paired by the module path in ORT's node names, or in
    execution order where a name names no lowered layer."""
    from bitmix.tools.ort_baseline import module_path, ort_int8_node_times

    nodes = ort_int8_node_times(model.eval(), inputs, data, threads, runs)
    convs = [(node, t) for node, op, t in nodes if op in ORT_WEIGHTED]
    ours = [name for name in layer_order if name in per_layer][: len(convs)]
    by_name = [module_path(node) for node, _ in convs]
    if sorted(by_name) == sorted(ours):
        ours = by_name
    other: dict[str, float] = defaultdict(float)
    for _, op, t in nodes:
        if op not in ORT_WEIGHTED:
            other[op] += t
    print(f"\nONNX Runtime int8 (profiler, median of {runs}): {len(convs)} convs "
          f"{sum(t for _, t in convs) * 1e3:.2f} ms (bitmix's first {len(ours)} layers "
          f"{sum(per_layer[n] for n in ours) * 1e3:.2f} ms); other ops "
          + ", ".join(f"{op} {t * 1e3:.2f}" for op, t in sorted(other.items(), key=lambda kv: -kv[1])))
    pairs = sorted(zip(ours, convs, strict=False), key=lambda p: -(per_layer[p[0]] - p[1][1]))
    print(f"{'bitmix layer':32s} {'ORT node':40s} {'ORT us':>8s} {'bitmix us':>9s} {'ratio':>6s}")
    for name, (node, t) in pairs[:top]:
        print(f"{name:32s} {node[-40:]:40s} {t * 1e6:8.1f} {per_layer[name] * 1e6:9.1f} {per_layer[name] / t:6.2f}")


if __name__ == "__main__":
    main()
