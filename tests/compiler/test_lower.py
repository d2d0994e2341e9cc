"""The kernel path must agree exactly with the fake-quant torch reference."""

import copy
import gc
import threading
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bitmix
from bitmix import kernels
from bitmix.compiler import lower as lower_mod
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.lower import (
    KernelLayer,
    KernelPlan,
    _run_matmul,
    lower,
    matmul_bound,
    matmul_kernel,
    torch_on_one_thread,
)
from bitmix.compiler.qlayer import MIN_STEP, quant_layers
from bitmix.compiler.quantize import fake_quantize
from bitmix.errors import BitmixError
from bitmix.ir.rotation import rotation_block
from bitmix.kernels.pack import code_range
from bitmix.kernels.threads import configure_threading


@pytest.fixture(scope="module")
def digits_lowered():
    from bitmix import zoo

    model, inputs, data = zoo.load("digits-cnn")
    graph = capture(model, inputs, "digits-cnn")
    bits = [8, 4, 2, 4, 2, 4, 2, 4, 8]
    assignment = dict(zip(graph.names, bits, strict=True))
    fq = fake_quantize(prepare(graph), assignment, data.calibration(128))
    return graph, data, fq, lower(fq)


def _layer_inputs(model, x):
    seen = {}
    handles = [layer.register_forward_pre_hook(lambda m, args: seen.__setitem__(m.name, args[0].detach()))
               for layer in quant_layers(model).values()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_packed_codes_are_the_fake_quant_codes(digits_lowered):
    _, _, fq, lowered = digits_lowered
    kernel_layers = {m.name: m for m in lowered.module.modules() if hasattr(m, "plan")}
    assert set(kernel_layers) == set(quant_layers(fq))
    for name, layer in quant_layers(fq).items():
        codes = layer.w_quant.codes(layer.weight.detach()).reshape(layer.weight.shape[0], -1).numpy()
        plan = kernel_layers[name].plan
        assert plan.bits == layer.bits
        np.testing.assert_array_equal(kernels.unpack_weights(plan.packed), codes)


def test_int32_accumulators_equal_torch_on_codes(digits_lowered):
    _, data, fq, lowered = digits_lowered
    inputs = _layer_inputs(fq, data.test.inputs[0][:8])
    kernel_layers = {m.name: m for m in lowered.module.modules() if hasattr(m, "plan")}
    for name, layer in quant_layers(fq).items():
        x = inputs[name]
        a_codes = layer.a_quant.codes(x)
        w_codes = layer.w_quant.codes(layer.weight.detach())
        plan: KernelPlan = kernel_layers[name].plan
        a_np = a_codes.numpy()
        if layer.kind == "conv2d":
            ref = F.conv2d(a_codes.double(), w_codes.double(), None, layer.stride, layer.padding, layer.dilation,
                           layer.groups)
            acc = kernels.conv2d(a_np, plan.packed, plan.kernel_size, plan.stride, plan.padding, plan.dilation,
                                 plan.groups, plan.bits.a, plan.a_signed)
        else:
            ref = F.linear(a_codes.double(), w_codes.double())
            acc = kernels.gemm(a_np.reshape(-1, a_np.shape[-1]), plan.packed, plan.bits.a, plan.a_signed)
        assert acc.dtype == np.int32
        np.testing.assert_array_equal(acc.reshape(ref.shape), ref.numpy().astype(np.int64))
        # float outputs agree up to the final rescale's rounding (a conv's fused ReLU applied to both)
        with torch.no_grad():
            expected = layer(x)
            if kernel_layers[name].clamp is not None:
                lo, hi = kernel_layers[name].clamp
                expected = expected.clamp(min=lo, max=hi)
            out = kernel_layers[name](x)
            if kernel_layers[name].floats_too:  # read by the next conv and other ops: (floats, its input)
                assert isinstance(out, tuple) and len(out) == 2
                out = out[0]
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_kernel_accuracy_equals_fake_quant_accuracy(digits_lowered):
    _, data, fq, lowered = digits_lowered
    with torch.no_grad():
        fq_pred = torch.cat([fq(*x).argmax(-1) for x, _ in data.batches("test", 128)])
        k_pred = torch.cat([lowered.module(*x).argmax(-1) for x, _ in data.batches("test", 128)])
    assert torch.equal(fq_pred, k_pred)


def test_lowered_module_exports_with_custom_ops(digits_lowered):
    _, data, _, lowered = digits_lowered
    ep = torch.export.export(lowered.module, (data.test.inputs[0][:2],))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "bitmix.qconv2d.default" in targets and "bitmix.qlinear.default" in targets


@pytest.mark.parametrize("a_signed,b_signed", [(True, True), (False, True), (True, False), (False, False)])
def test_matmul_kernel_exact(a_signed, b_signed):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, 7, generator=g)
    b = torch.randn(2, 3, 7, 4, generator=g)
    if not a_signed:
        a = a.abs()
    if not b_signed:
        b = b.abs()
    plan = KernelPlan("m", "matmul", 4, a_step=0.3, a_signed=a_signed, b_step=0.25, b_signed=b_signed)
    lo_a, hi_a = (-8, 7) if a_signed else (0, 15)
    lo_b, hi_b = (-8, 7) if b_signed else (0, 15)
    a_codes = torch.round(torch.clamp(a / 0.3, lo_a, hi_a))
    b_codes = torch.round(torch.clamp(b / 0.25, lo_b, hi_b))
    expected = (a_codes.double() @ b_codes.double()).float() * (np.float32(0.3) * np.float32(0.25))
    out = matmul_kernel(a.numpy(), b.numpy(), plan)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize(("bits", "k"), [(8, 64), (8, 300), (4, 2000)])
def test_run_matmul_float_codes_exact(bits, k):
    """Attention products on float32 codes equal the int32 kernel's bit for bit, inside the exact
    bound (8-bit, K = 64; 4-bit, K = 2000) and, through the fallback, beyond it (8-bit unsigned, K = 300)."""
    g = torch.Generator().manual_seed(k)
    a = torch.rand(1, 3, 6, k, generator=g) * 4
    b = torch.randn(3, k, 5, generator=g) * 2
    plan = KernelPlan("m", "matmul", bits, a_step=0.013, a_signed=False, b_step=0.021, b_signed=bits == 4)
    want = matmul_kernel(a.numpy(), b.numpy(), plan)
    got = _run_matmul(a, b, plan)
    assert got.shape == (1, 3, 6, 5)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize(("bits", "a_signed", "b_signed"), [(8, False, True), (8, False, False), (4, True, True)])
def test_matmul_bound_is_derived_once_per_plan_and_routes_at_the_exact_bound(monkeypatch, bits, a_signed, b_signed):
    """The constants a matmul plan binds: the float32-exact K bound (K * max|a code| * max|b code| <= 2^24, the
    largest K routed to ``code_matmul``, one more to the int32 kernel, both bit-identical), the ranges, the floor."""
    import bitmix.kernels.code_matmul as cm

    plan = KernelPlan("m", "matmul", bits, a_step=0.013, a_signed=a_signed, b_step=0.021, b_signed=b_signed,
                      a_axis=-1, b_axis=-2)
    bound = matmul_bound(plan)
    assert matmul_bound(plan) is bound
    max_k, row_steps, floor, a_range, b_range = bound
    top_a, top_b = max(map(abs, a_range)), max(map(abs, b_range))
    assert max_k * top_a * top_b <= 1 << 24 < (max_k + 1) * top_a * top_b
    assert row_steps and floor == MIN_STEP and a_range == code_range(bits, a_signed)
    per_tensor = replace(plan, a_axis=None, b_axis=None)
    assert matmul_bound(per_tensor)[1:3] == (False, None)
    calls = []
    real = cm.code_matmul
    monkeypatch.setattr(cm, "code_matmul", lambda *args: calls.append(args[0].shape[-1]) or real(*args))
    g = torch.Generator().manual_seed(bits)
    if max_k > 4096:
        return
    for k in (max_k, max_k + 1):
        a = torch.rand(2, 3, k, generator=g) * 4
        b = torch.randn(2, k, 5, generator=g)
        want = matmul_kernel(a.numpy(), b.numpy(), per_tensor)
        np.testing.assert_array_equal(_run_matmul(a, b, per_tensor).numpy(), want)
    assert calls == [max_k]


def test_minilm_attention_lowers(capture_zoo, load_zoo):
    model, inputs, data = load_zoo("minilm")
    graph = capture_zoo("minilm")
    assignment = {name: 8 for name in graph.names}
    fq = fake_quantize(prepare(graph), assignment, data.calibration(16))
    lowered = lower(fq)
    x = tuple(t[:4] for t in data.test.inputs)
    with torch.no_grad():
        ref, out = fq(*x), lowered.module(*x)
    assert torch.equal(ref, out)  # fake-quant inference is the integer path: bit-identical outputs
    kinds = [m.kind for m in lowered.module.modules() if hasattr(m, "plan")]
    assert kinds.count("matmul") == 12 and kinds.count("linear") == 36  # the dropped pooler is not captured


PAIRS = {"w4a8": ("4/8", "2/8"), "mixed": ("8/8", "4/8", "2/8", "4/4", "2/4", "2/2"),
         "rotated": ("4/8r", "2/8r", "8/8r", "4/8")}


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp", "minilm",
                                  pytest.param("resnet18", marks=pytest.mark.slow),
                                  pytest.param("mobilenetv2", marks=pytest.mark.slow),
                                  pytest.param("resnet50", marks=pytest.mark.slow),
                                  pytest.param("bert-base", marks=pytest.mark.slow)])
@pytest.mark.parametrize("pairs", PAIRS)
def test_kernels_equal_fake_quant_on_pairs(capture_zoo, load_zoo, name, pairs):
    """Every (weight, activation) pair: packed kernels == fake-quant inference, bit for bit."""
    _, inputs, data = load_zoo(name)
    graph = capture_zoo(name)
    cycle = PAIRS[pairs]
    assignment = {layer: cycle[i % len(cycle)] for i, layer in enumerate(graph.names)}
    calibration = _batch_like(inputs, 8, 0) if data is None else data.calibration(8)
    fq = fake_quantize(prepare(graph), assignment, calibration)
    for layer in quant_layers(fq).values():
        p = layer.bits
        assert layer.a_quant.bits == p.a and (layer.w_quant or layer.b_quant).bits == (p.a if layer.kind == "matmul"
                                                                                         else p.w)
        block = None if layer.weight is None else rotation_block(layer.kind, layer.weight.shape[-1], p,
                                                                  layer.a_nonneg)
        assert (layer.rotation_signs is not None) == (block is not None)
    lowered = lower(fq)
    x = _batch_like(inputs, 2, 1) if data is None else tuple(t[:2] for t in data.test.inputs)
    with torch.no_grad():
        ref, out = fq(*x), lowered.module(*x)
    assert torch.equal(ref, out)


def _batch_like(example: tuple[torch.Tensor, ...], n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """`n` rows shaped like a zoo model's example (the image and BERT entries carry no dataset): normal
    noise for float inputs, the example's own row repeated for integer ones (token ids, masks)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((n, *t.shape[1:]), generator=gen) if t.is_floating_point()
                 else t[:1].expand(n, *t.shape[1:]).clone() for t in example)


def test_eager_calls_skip_the_dispatcher_tracers_see_the_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3)
    assert lower_mod._plain_tensors(x, None)
    assert not lower_mod._plain_tensors(torch.nn.Parameter(x))
    with FakeTensorMode() as mode:
        assert not lower_mod._plain_tensors(mode.from_tensor(x))


def test_plans_are_freed_with_the_lowered_layers(digits_lowered):
    _, data, fq, _ = digits_lowered
    lowered = lower(fq)
    layer = next(m for m in lowered.module.modules() if isinstance(m, KernelLayer))
    packed, handle = weakref.ref(layer.plan.packed), layer.handle
    x = data.test.inputs[0][:2]
    with torch.no_grad():
        want = lowered.module(x)
        twin = copy.deepcopy(lowered.module)  # a copy owns its own plans under new handles
    del layer, lowered
    gc.collect()
    assert packed() is None
    with pytest.raises(BitmixError, match=f"no lowered layer with handle {handle}: the compiled model"):
        lower_mod._plan(handle)
    with torch.no_grad():
        assert torch.equal(twin(x), want)
        assert torch.equal(torch.export.export(twin, (x,)).module()(x), want)


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_mode_is_restored_and_switchable(two_torch_threads):
    with torch_on_one_thread():
        assert torch.get_num_threads() == 1
        with torch_on_one_thread():  # nested: the outer block restores
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError), torch_on_one_thread():
        raise ValueError
    assert torch.get_num_threads() == 2
    with kernels.dispatch.use(torch_one_thread=False), torch_on_one_thread():
        assert torch.get_num_threads() == 2
    with torch_on_one_thread(enabled=False):
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("b_first_touch", [False, True])
@pytest.mark.parametrize("a_leaves_first", [True, False])
def test_one_thread_mode_with_two_python_threads(two_torch_threads, a_leaves_first, b_first_touch):
    """Overlapping blocks in two threads, either leaving first; B touching torch first inside A's block
    (where torch hands a new thread the process-wide count, 1 at that moment)."""
    steps = [threading.Event() for _ in range(5)]  # 4: B has read its count (A enters only then)
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def run(name: str, enter_after: int, entered: int, leave_after: int, left: int) -> None:
        if name == "a" or not b_first_touch:
            seen[name].append(torch.get_num_threads())
        if name == "b":
            steps[4].set()
        steps[enter_after].wait(10)
        with torch_on_one_thread():
            torch.mm(torch.ones(64, 64), torch.ones(64, 64))
            seen[name].append(torch.get_num_threads())
            steps[entered].set()
            steps[leave_after].wait(10)
        seen[name].append(torch.get_num_threads())
        steps[left].set()

    a_plan = (4, 0, 1, 2) if a_leaves_first else (4, 0, 2, 3)
    b_plan = (0, 1, 2, 3) if a_leaves_first else (0, 1, 1, 2)
    workers = [threading.Thread(target=run, args=("a", *a_plan)), threading.Thread(target=run, args=("b", *b_plan))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert seen["a"] == [2, 1, 2]
    assert seen["b"] == ([1, 2] if b_first_touch else [2, 1, 2])
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(configure_threading() == "workqueue",
                    reason="Numba's workqueue layer cannot launch from two threads at once")
def test_compiled_forwards_in_two_threads(digits_lowered, two_torch_threads):
    _, data, _, lowered = digits_lowered
    x = data.test.inputs[0][:16]
    with torch.no_grad():
        want = lowered.module(x)
    outs: list[torch.Tensor] = []
    counts: list[int] = []
    both_started = threading.Barrier(2)  # each reads its count before either enters one-thread mode

    def run() -> None:
        counts.append(torch.get_num_threads())
        both_started.wait(30)
        for _ in range(5):
            with torch.no_grad(), torch_on_one_thread():
                outs.append(lowered.module(x))
        counts.append(torch.get_num_threads())

    workers = [threading.Thread(target=run) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert len(outs) == 10 and all(torch.equal(o, want) for o in outs)
    assert counts == [2, 2, 2, 2] and torch.get_num_threads() == 2


def test_profiles_name_the_kernel_ops(digits_lowered):
    _, data, _, lowered = digits_lowered
    with torch.no_grad(), torch.profiler.profile() as prof:
        lowered.module(data.test.inputs[0][:4])
    names = {e.key for e in prof.key_averages()}
    assert {"bitmix::qconv2d", "bitmix::qlinear"} <= names


class SamePadded(torch.nn.Module):
    """`padding="same"` convs, one with a non-square dilated kernel (explicit symmetric padding (1, 4))."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding="same")
        self.mid = torch.nn.Conv2d(8, 8, (3, 5), padding="same", dilation=(1, 2))
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))


@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize(("net", "shape"), [("conv1d", (4, 33)), ("same", (3, 12, 12)), ("decoder", (3, 12, 10)),
                                           ("attention", (9, 32)), ("einsum", (6, 24)),
                                           ("weight-second", (7, 12)), ("weight-second-t", (7, 12)),
                                           ("sequence-conv", (39, 12))])
def test_rewritten_ops_kernels_equal_fake_quant(pairs, net, shape):
    """Conv1d runs as a conv2d of height 1, `padding="same"` as explicit padding, a transposed conv as its
    equivalent conv2d, fused attention and einsum as matmuls, `x @ W (+ b)` as a linear: on the packed kernels, bit
    for bit the fake-quant result."""
    from tests.compiler.test_capture import Conv1dNet, Decoder, SequenceConv, TransposedWeightSecond, WeightSecond
    from tests.compiler.test_decompose import EinsumAttention, Encoder

    torch.manual_seed(0)
    model = {"conv1d": Conv1dNet, "same": SamePadded, "decoder": Decoder, "attention": Encoder,
             "einsum": EinsumAttention, "weight-second": WeightSecond, "weight-second-t": TransposedWeightSecond,
             "sequence-conv": SequenceConv}[net]().eval()
    graph = capture(model, (torch.randn(2, *shape),))
    assert not graph.unsupported or net in ("conv1d", "decoder", "weight-second")
    cycle = PAIRS[pairs]
    assignment = {layer: cycle[i % len(cycle)] for i, layer in enumerate(graph.names)}
    fq = fake_quantize(prepare(graph), assignment, (torch.randn(8, *shape),))
    lowered = lower(fq)
    kinds = {layer.kind for layer in lowered.module.modules() if isinstance(layer, KernelLayer)}
    assert kinds >= {"attention": {"linear", "matmul"}, "einsum": {"linear", "matmul"}, "weight-second": {"linear"},
                     "weight-second-t": {"linear"}, "sequence-conv": {"linear", "conv2d"}}.get(net, {"conv2d"})
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(fq(x), lowered.module(x))


@pytest.mark.parametrize("target", ["int8-npu", "int4-npu"])
@pytest.mark.parametrize("shape", [(2, 33, 64), (3, 64)])  # many rows (one fused call) and a few
def test_float64_nan_and_inf_inputs_behave_the_same_on_kernels_and_fake_quant(target, shape):
    import bitmix

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    gen = torch.Generator().manual_seed(11)
    cm = bitmix.compile(model, (torch.randn(*shape, generator=gen),), target,
                        data=torch.randn(8, *shape[1:], generator=gen) * 2,
                        options=bitmix.CompileOptions(frontier_points=0))
    x = torch.randn(*shape, generator=gen) * 1.5
    with torch.no_grad():
        assert torch.equal(cm(x.double()), cm.fake_quant(x.double()))  # both read float64 as float32
        assert torch.equal(cm(x.double()), cm(x))
        for value in (float("nan"), float("inf")):
            bad = x.clone()
            bad.view(-1)[5] = value
            outcomes = []
            for run in (cm, cm.fake_quant):
                try:
                    outcomes.append(run(bad))
                except BitmixError as exc:
                    outcomes.append(str(exc))
            if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
                assert outcomes[0] == outcomes[1] and "cannot quantize" in outcomes[0]
            else:  # an infinite input saturates to the extreme code on a per-tensor step, on both sides
                assert value == float("inf") and torch.equal(outcomes[0], outcomes[1])


def test_a_nan_reaching_a_layer_names_that_layer():
    """The kernels refuse their operand "x"; the user is told which layer's input held the NaN."""

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

        def forward(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(image)) * scale.sum(1, keepdim=True))

    torch.manual_seed(0)
    cm = bitmix.compile(TwoInputs().eval(), (torch.randn(16, 16), torch.ones(16, 4)), "int8-npu",
                        data=(torch.randn(64, 16), torch.ones(64, 4)), options=bitmix.CompileOptions(frontier_points=0))
    scale = torch.ones(4, 4)
    scale[1, 0] = float("nan")
    for run in (cm, cm.fake_quant):
        with torch.no_grad(), pytest.raises(BitmixError, match=r"^the input of layer 'b' contains NaN; cannot quant"):
            run(torch.randn(4, 16), scale)

