"""Memory of a compile, without timing: which weight-sized copies exist at the peak and after it returns.

Compiling one 8192 x 8192 Linear (268 MB of weights) peaked at ~3.8 GB and the compiled model kept three
copies of the weights. These tests count bytes of tensor storage (deduplicated by storage), not RSS: what a
compiled model holds, and the peak of the tensors one step of the compile creates.
"""

from __future__ import annotations

import gc
import types
import weakref

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bitmix
from bitmix.compiler import gptq
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.live import live_rows
from bitmix.compiler.lower import lower
from bitmix.compiler.qlayer import _WEIGHT_CODES, QuantLayer, quant_layers
from bitmix.compiler.quantize import fake_quantize

WIDTH = 384  # 4 layers: 2.4 MB of float32 weights


def _stack() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]).eval()
    return model, torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(1))


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _storages(root: object) -> dict[int, int]:
    """{address: bytes} of every tensor storage and numpy buffer reachable from `root` (not through types,
    modules or functions)."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root]
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
            types.CodeType, str, bytes, int, float)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not obj.is_meta and type(obj).__name__ != "FakeTensor":
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, np.ndarray):
            while isinstance(obj.base, np.ndarray):
                obj = obj.base
            found[obj.__array_interface__["data"][0]] = obj.nbytes
            continue
        stack.extend(gc.get_referents(obj))
    return found


class _Peak(TorchDispatchMode):
    """The peak bytes of tensor storage that ops run under the mode create and that are still alive (a storage
    lives as long as any tensor on it: its Python object is kept while it does, so a finalizer tells)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # address -> bytes
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in inputs or ptr in self.live:  # a view or in-place result: not a new storage
                continue
            self.live[ptr] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._drop, ptr)
        return out

    def _drop(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr)


def test_the_exported_program_reads_the_users_weights_without_a_copy():
    """The exported copy deep-copied every parameter (1x the weights, held by the compiled model for good);
    it now reads the user's own tensors, and compiling still changes nothing in the user's model."""
    model, x = _stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    graph = capture(model, (x,))
    shared = [k for k, v in graph.exported.state_dict.items()
              if v.untyped_storage().data_ptr() == params[k].untyped_storage().data_ptr()]
    assert sorted(shared) == sorted(params)
    cm = bitmix.compile(model, (x,), "int4int2-npu", data=x)
    assert dict(model.named_parameters()) == params and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(cm(x), cm.fake_quant(x))


def test_a_compiled_model_holds_its_fake_quant_weights_once_beside_the_packed_ones():
    """`cm` kept the exported program's copy of the weights, `cm.fake_quant`'s, and (in a module-level cache)
    the fake-quant weights' int32 codes: 3x the weights besides the packed kernels' codes. The user's own
    weights are not counted: the user holds them anyway."""
    model, x = _stack()
    weights = _weight_bytes(model)
    cm = bitmix.compile(model, (x,), "int4int2-npu", data=x)
    users = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    held = {ptr: n for ptr, n in _storages(cm).items() if ptr not in users}
    held_modules = [*cm.modules(), *cm.fake_quant.modules()]  # the twin is an attribute, not a child
    cached = [entry for q, entry in _WEIGHT_CODES.items() if any(q is m for m in held_modules)]
    total = sum(held.values()) + sum(e[2].numel() * e[2].element_size() for e in cached)
    assert total < 1.5 * weights, f"{total / weights:.2f}x the weights"
    with torch.no_grad():  # fake_quant still runs the kernels' integer arithmetic, bit for bit
        assert torch.equal(cm.fake_quant(x), cm(x))


def test_compile_reads_its_float_model_from_the_users_weights_and_never_writes_them(monkeypatch):
    """compile's float model (the reference every stage copies before changing it) held its own copy of every
    quantized weight for the whole compile; it reads the user's tensors now, and a compile that fine-tunes and
    evaluates still leaves them as they were."""
    from bitmix.compiler import pipeline
    from bitmix.task import Split, TaskData

    made: list[torch.nn.Module] = []
    real = pipeline.prepare
    monkeypatch.setattr(pipeline, "prepare", lambda graph, **kw: made.append(real(graph, **kw)) or made[-1])
    model, x = _stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    task = TaskData("t", "top1", Split((x,), y), Split((x[:8],), y[:8]))
    cm = bitmix.compile(model, (x,), "int4int2-npu", data=task, finetune=1)
    users = {t.untyped_storage().data_ptr() for t in model.parameters()}
    assert {layer.weight.untyped_storage().data_ptr() for layer in quant_layers(made[0]).values()} <= users
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(cm(x), cm.fake_quant(x))


def test_prepare_copies_each_weight_once():
    """prepare cloned every weight into its QuantLayer, then deep-copied the whole module: 2x at its peak."""
    model, x = _stack()
    weights = _weight_bytes(model)
    graph = capture(model, (x,))
    with _Peak() as peak:
        float_model = prepare(graph)
    assert peak.peak < 1.3 * weights, f"{peak.peak / weights:.2f}x the weights"
    with torch.no_grad():
        assert torch.equal(float_model(x), model(x))


def test_lower_does_not_copy_the_float_weights_it_replaces():
    """lower deep-copied the fake-quant model, float weights and all, before swapping its layers for kernels."""
    model, x = _stack()
    weights = _weight_bytes(model)
    graph = capture(model, (x,))
    fq = fake_quantize(prepare(graph), dict.fromkeys(graph.names, 4), (x,))
    with _Peak() as peak:
        lowered = lower(fq)
    assert peak.peak < 0.5 * weights, f"{peak.peak / weights:.2f}x the weights"
    assert all(isinstance(layer, QuantLayer) and layer.bits is not None for layer in quant_layers(fq).values())
    with torch.no_grad():
        assert torch.equal(lowered.module(x), fq(x))


def test_live_rows_takes_no_gradient_of_the_weights():
    """The pass that finds each layer's live rows back-propagated into every weight (a gradient the size of the
    model, dropped unread); it needs the gradients of the layers' outputs only."""
    model, x = _stack()
    weights = _weight_bytes(model)
    float_model = prepare(capture(model, (x,)))
    layers = quant_layers(float_model)
    with _Peak() as peak:
        live_rows(float_model, layers, (x,))
    assert peak.peak < 0.5 * weights, f"{peak.peak / weights:.2f}x the weights"
    assert all(p.grad is None for p in float_model.parameters())


def test_gptq_rounds_a_layer_within_a_few_hessians(monkeypatch):
    """GPTQ's working set for one layer: the Hessians (K x K float64, 2x the weight at K = R) and its
    factorisation held 11 of them at once (fit, test, their sum, a reordered copy, a clone, the identity, the
    damped matrix, its flip, the Cholesky factor, the solve and its flip); now 6. One candidate step per
    pass, as a large layer runs (`MAX_STACK`)."""
    monkeypatch.setattr(gptq, "MAX_STACK", 1)
    gen = torch.Generator().manual_seed(0)
    k = 256
    layer = QuantLayer("l", "linear", torch.randn(k, k, generator=gen) / 16)
    layer.set_bits(4)
    x = torch.randn(64, 4, generator=gen) @ torch.randn(4, k, generator=gen) + 0.1 * torch.randn(64, k, generator=gen)
    h_bytes = k * k * 8
    with _Peak() as peak:
        assert gptq.round_layer(layer, x)
    assert peak.peak < 7 * h_bytes, f"{peak.peak / h_bytes:.1f} Hessians"
