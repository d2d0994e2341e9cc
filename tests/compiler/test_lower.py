"""The kernel path must agree exactly with the fake-quant torch reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitmix import kernels
from bitmix.compiler.capture import capture
from bitmix.compiler.lower import KernelPlan, lower, matmul_kernel
from bitmix.compiler.quantize import fake_quantize, quant_layers


@pytest.fixture(scope="module")
def digits_lowered():
    from bitmix import zoo

    model, inputs, data = zoo.load("digits-cnn")
    graph = capture(model, inputs, "digits-cnn")
    bits = [8, 4, 2, 4, 2, 4, 2, 4, 8]
    assignment = dict(zip(graph.names, bits, strict=True))
    fq = fake_quantize(graph, assignment, data.calibration(128))
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
                                 plan.groups, plan.bits, plan.a_signed)
        else:
            ref = F.linear(a_codes.double(), w_codes.double())
            acc = kernels.gemm(a_np.reshape(-1, a_np.shape[-1]), plan.packed, plan.bits, plan.a_signed)
        assert acc.dtype == np.int32
        np.testing.assert_array_equal(acc.reshape(ref.shape), ref.numpy().astype(np.int64))
        # float outputs agree up to the final rescale's rounding
        with torch.no_grad():
            torch.testing.assert_close(kernel_layers[name](x), layer(x), rtol=1e-5, atol=1e-5)


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


def test_minilm_attention_lowers(capture_zoo, load_zoo):
    model, inputs, data = load_zoo("minilm")
    graph = capture_zoo("minilm")
    assignment = {name: 8 for name in graph.names}
    fq = fake_quantize(graph, assignment, data.calibration(16))
    lowered = lower(fq)
    x = tuple(t[:4] for t in data.test.inputs)
    with torch.no_grad():
        ref, out = fq(*x), lowered.module(*x)
    assert torch.equal(ref, out)  # fake-quant inference is the integer path: bit-identical outputs
    kinds = [m.kind for m in lowered.module.modules() if hasattr(m, "plan")]
    assert kinds.count("matmul") == 12 and kinds.count("linear") == 36  # the dropped pooler is not captured


def test_eager_calls_skip_the_dispatcher_tracers_see_the_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bitmix.compiler import lower as lower_mod

    x = torch.randn(2, 3)
    assert lower_mod._plain_tensors(x, None)
    assert not lower_mod._plain_tensors(torch.nn.Parameter(x))
    with FakeTensorMode() as mode:
        assert not lower_mod._plain_tensors(mode.from_tensor(x))


def test_torch_runs_on_one_thread_while_lowered_layers_run():
    from bitmix.compiler.lower import torch_on_one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_on_one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError), torch_on_one_thread():
            raise ValueError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_profiles_name_the_kernel_ops(digits_lowered):
    _, data, _, lowered = digits_lowered
    with torch.no_grad(), torch.profiler.profile() as prof:
        lowered.module(data.test.inputs[0][:4])
    names = {e.key for e in prof.key_averages()}
    assert {"bitmix::qconv2d", "bitmix::qlinear"} <= names
