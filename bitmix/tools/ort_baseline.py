"""ONNX Runtime int8 as a baseline for ``bitmix bench model``.

The same zoo model is exported with ``torch.onnx``, quantized statically in QDQ format
(uint8 activations, int8 per-channel weights -- ORT's recommended x86 pairing, MLAS's u8s8
kernels; reference/quantization.md section 6) from a few calibration inputs, and timed on the
same input as the eager and compiled models, at 1 and at N intra-op threads (one session each).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from torch import nn

from bitmix.errors import BitmixError
from bitmix.task import TaskData

CALIBRATION_INPUTS = 4


def _names(inputs: tuple[torch.Tensor, ...]) -> list[str]:
    return [f"input{i}" for i in range(len(inputs))]


def _calibration(inputs: tuple[torch.Tensor, ...], data: TaskData | None) -> list[tuple[torch.Tensor, ...]]:
    """A few inputs shaped like ``inputs``: rows of the task's training split when there is one
    (real text for MiniLM), else seeded noise around the example input."""
    batch = inputs[0].shape[0]
    if data is not None:
        train = data.train.inputs if isinstance(data.train.inputs, tuple) else (data.train.inputs,)
        if len(train) == len(inputs) and all(t.shape[1:] == x.shape[1:] for t, x in zip(train, inputs, strict=True)):
            n = train[0].shape[0] // batch
            return [tuple(t[i * batch : (i + 1) * batch] for t in train) for i in range(min(n, CALIBRATION_INPUTS))]
    gen = torch.Generator().manual_seed(0)
    samples = [inputs]
    for _ in range(CALIBRATION_INPUTS - 1):
        samples.append(tuple(x + torch.randn(x.shape, generator=gen) if x.is_floating_point() else x for x in inputs))
    return samples


def ort_int8_session(model: nn.Module, inputs: tuple[torch.Tensor, ...], data: TaskData | None,
                     threads: int) -> Callable[[], object]:
    """Export, quantize (static QDQ, per-channel) and load ``model``; returns a no-argument call
    that runs it once on ``inputs``."""
    return ort_int8_sessions(model, inputs, data, (threads,))[threads]


def ort_int8_sessions(model: nn.Module, inputs: tuple[torch.Tensor, ...], data: TaskData | None,
                      thread_counts: tuple[int, ...]) -> dict[int, Callable[[], object]]:
    """``ort_int8_session`` for each intra-op thread count, the model quantized once."""
    sessions, feed = _int8_sessions(model, inputs, data, thread_counts, None)
    return {n: partial(session.run, None, feed) for n, session in zip(thread_counts, sessions, strict=True)}


def ort_int8_outputs(model: nn.Module, calibration: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...]
                     ) -> torch.Tensor:
    """ONNX Runtime int8's outputs (one row per test input, flattened) after static calibration on the rows of
    ``calibration``: the fidelity baseline of `benchmarks/quality.py --ort`, fed exactly what bitmix is fed."""
    example = tuple(t[:1] for t in calibration)
    samples = [tuple(t[i : i + 1] for t in calibration) for i in range(calibration[0].shape[0])]
    (session,), _ = _int8_sessions(model, example, None, (1,), None, samples)
    names = _names(example)
    rows = [session.run(None, {n: t[i : i + 1].numpy() for n, t in zip(names, test, strict=True)})[0]
            for i in range(test[0].shape[0])]
    return torch.from_numpy(np.concatenate([r.reshape(1, -1) for r in rows])).float()


def ort_int8_node_times(model: nn.Module, inputs: tuple[torch.Tensor, ...], data: TaskData | None, threads: int,
                        runs: int) -> list[tuple[str, str, float]]:
    """(node, op type, median seconds) of every node ORT's profiler reports, in execution order, over
    ``runs`` calls after 5 warm-up calls (`benchmarks/profile_layers.py --ort`)."""
    with tempfile.TemporaryDirectory() as tmp:
        (session,), feed = _int8_sessions(model, inputs, data, (threads,), os.path.join(tmp, "profile"))
        for _ in range(5 + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    times: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            times.setdefault(node, []).append(e["dur"] * 1e-6)
            ops[node] = e["args"].get("op_name", "")
    return [(node, ops[node], statistics.median(t[-runs:])) for node, t in times.items()]


def module_path(node: str) -> str:
    """The torch module path of an exported ONNX node's name: ``/layer1/layer1.0/downsample/downsample.0/Conv_..``
    -> ``layer1.0.downsample.0`` (each scope names its child as the parent's attribute plus the child's, ``layer1.0``
    inside ``layer1``). ORT may run a block's branches in another order than torch, so profiles pair by this name."""
    parts: list[str] = []
    for seg in node.strip("/").split("/")[:-1]:
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts)


@contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` in eval mode under no_grad take a fused fast path
    (`aten::_native_multi_head_attention`, `aten::_transformer_encoder_layer_fwd`) that the ONNX exporter cannot
    write; with it off they run (and export) as their plain ops, the same function."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    """ONNX Runtime's quantizer reports through the root logger: quiet it for a block, then restore it."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


def _int8_sessions(model: nn.Module, inputs: tuple[torch.Tensor, ...], data: TaskData | None,
                   thread_counts: tuple[int, ...], profile_prefix: str | None,
                   calibration: list[tuple[torch.Tensor, ...]] | None = None) -> tuple[list, dict[str, np.ndarray]]:
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise BitmixError("onnxruntime is not installed: pip install -e '.[dev]' (or --no-ort)") from exc
    names = _names(inputs)
    samples = _calibration(inputs, data) if calibration is None else calibration
    feeds = [{n: x.numpy() for n, x in zip(names, sample, strict=True)} for sample in samples]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "model.onnx")
        prep = os.path.join(tmp, "model.prep.onnx")
        int8 = os.path.join(tmp, "model.int8.onnx")
        with torch.no_grad(), _mha_fastpath_off():
            torch.onnx.export(model, inputs, fp32, input_names=names, dynamo=False)
        try:  # shape inference + graph optimisation (constant biases become initializers)
            quant_pre_process(fp32, prep)
        except Exception:  # noqa: BLE001 - ORT's symbolic shape inference fails on some graphs (weight norm's)
            quant_pre_process(fp32, prep, skip_symbolic_shape=True)  # ONNX's own shape inference only
        with _root_log_level(logging.ERROR):  # one "Axis 1 is out-of-range" line per LayerNorm weight otherwise
            quantize_static(prep, int8, _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        sessions = []
        for threads in thread_counts:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.log_severity_level = 3
            # idle pool threads would otherwise spin after each run and slow the eager/compiled timings
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if profile_prefix is not None:
                opts.enable_profiling = True
                opts.profile_file_prefix = profile_prefix
            sessions.append(ort.InferenceSession(int8, opts, providers=["CPUExecutionProvider"]))
    feed = feeds[0] if data is None else {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
    return sessions, feed
