import math
from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitmix
from bitmix.compiler.capture import capture, export_program
from bitmix.compiler.shapes import InputSpec
from bitmix.errors import BitmixError
from bitmix.kernels.limits import MAX_BMM_K, max_weight_k

ZOO = ["digits-cnn", "digits-mlp", "minilm", "resnet18", "resnet50", "mobilenetv2", "bert-base"]


@pytest.mark.parametrize("name", ZOO)
def test_capture_every_zoo_model(capture_zoo, name):
    graph = capture_zoo(name)
    assert graph.layers, name
    assert len(set(graph.names)) == len(graph.layers)
    for layer in graph.layers:
        assert layer.macs > 0
        assert layer.kind in ("conv2d", "linear", "matmul")
        assert (layer.params == 0) == (layer.kind == "matmul")
    assert set(graph.deps.nodes) == set(graph.names)


def test_resnet50_counts(capture_zoo):
    graph = capture_zoo("resnet50")
    kinds = [layer.kind for layer in graph.layers]
    assert kinds.count("conv2d") == 53 and kinds.count("linear") == 1
    assert abs(graph.total_macs - 4.1e9) / 4.1e9 < 0.01
    assert graph.layers[0].name == "conv1" and graph.layers[-1].name == "fc"


def test_resnet18_counts(capture_zoo):
    graph = capture_zoo("resnet18")
    assert len(graph.layers) == 21
    assert abs(graph.total_macs - 1.81e9) / 1.81e9 < 0.01


def test_minilm_counts(capture_zoo):
    graph = capture_zoo("minilm")
    kinds = [layer.kind for layer in graph.layers]
    assert kinds.count("linear") == 36  # the encoder's; the pooler's output never reaches the model's
    assert graph.layers[-1].name == "bert.encoder.layer.5.output.dense"  # what targets pin
    assert kinds.count("matmul") == 12  # QK^T and AV in 6 layers
    qk = next(layer for layer in graph.layers if layer.kind == "matmul")
    assert qk.input_shape == (1, 12, 64, 32) and qk.weight_shape == (1, 12, 32, 64)
    assert qk.macs == 12 * 64 * 64 * 32


def test_mobilenet_depthwise(capture_zoo):
    graph = capture_zoo("mobilenetv2")
    dw = [layer for layer in graph.layers if layer.groups > 1]
    assert len(dw) == 17
    for layer in dw:
        assert layer.groups == layer.weight_shape[0] and layer.weight_shape[1] == 1
        assert layer.macs == math.prod(layer.output_shape) * 9


def test_digits_cnn_hand_computed(load_zoo):
    model, (x,), _ = load_zoo("digits-cnn")
    assert x.shape[0] == 256  # the zoo prices digits as a serving batch
    graph = capture(model, (x[:1],), "digits-cnn")
    stem = graph.layer("stem")
    assert stem.weight_shape == (32, 1, 3, 3) and stem.output_shape == (1, 32, 8, 8)
    assert stem.macs == 32 * 8 * 8 * 9 and stem.params == 288
    down = graph.layer("block2.conv1")
    assert down.stride == (2, 2) and down.padding == (1, 1) and down.output_shape == (1, 64, 4, 4)
    assert down.macs == 64 * 4 * 4 * 32 * 9
    fc = graph.layer("fc")
    assert fc.kind == "linear" and fc.has_bias and fc.params == 650 and fc.macs == 640
    assert fc.weight_param == "fc.weight" and fc.bias_param == "fc.bias"
    # dependencies go through BN, ReLU and residual adds
    assert graph.deps.has_edge("stem", "block1.conv1")
    assert graph.deps.has_edge("block1.conv2", "block2.shortcut.0")
    assert graph.deps.has_edge("block3.conv2", "fc")
    kinds = {op.kind for op in graph.vector_ops}
    assert {"relu", "add", "batch_norm"} <= kinds


def test_capture_grouped_dilated_conv_and_bmm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, groups=4)
            self.proj = nn.Linear(16, 16, bias=False)

        def forward(self, x):
            y = self.conv(x).flatten(2).transpose(1, 2)  # (B, L, 16)
            y = self.proj(y)
            return torch.bmm(y, y.transpose(1, 2))

    graph = capture(Net(), (torch.randn(2, 8, 9, 9),))
    conv, proj, bmm = graph.layers
    assert conv.groups == 4 and conv.dilation == (2, 2) and conv.stride == (2, 2) and conv.padding == (2, 2)
    assert conv.output_shape == (2, 16, 5, 5) and conv.macs == 2 * 16 * 25 * 2 * 9
    assert conv.params == 16 * 2 * 9 + 16
    assert proj.kind == "linear" and not proj.has_bias and proj.macs == 2 * 25 * 16 * 16
    assert bmm.kind == "matmul" and bmm.macs == 2 * 25 * 25 * 16
    assert graph.deps.has_edge(proj.name, bmm.name)


def test_capture_does_not_mutate_model():
    from bitmix import zoo

    model, inputs, _ = zoo.load("digits-cnn")  # a private copy: train() below must not leak
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, inputs)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_capture_errors():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(BitmixError, match="torch.export could not capture"):
        capture(DataDependent(), (torch.randn(1, 4),))
    with pytest.raises(BitmixError, match="no quantizable layers"):
        capture(nn.ReLU(), (torch.randn(1, 4),))
    with pytest.raises(BitmixError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(1, 4),))  # type: ignore[arg-type]
    with pytest.raises(BitmixError, match="example_inputs"):
        capture(nn.Linear(4, 4), ([1, 2, 3],))
    with pytest.raises(BitmixError, match=r"'weight' is torch.float16; bitmix compiles float32 models"):
        capture(nn.Linear(4, 4).half(), (torch.randn(1, 4).half(),))
    with pytest.raises(BitmixError, match=r"does not run on the example inputs \(RuntimeError: .*\); pass inputs"):
        capture(nn.Conv2d(3, 4, 3), (torch.randint(0, 5, (1, 3, 8, 8)),))  # integer pixels into a float conv


class LongReductions(nn.Module):
    """Layers at and just past the longest reductions the kernels take (`bitmix.kernels.limits`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fits = nn.Linear(max_weight_k(), 2)
        self.long = nn.Linear(max_weight_k() + 1, 2)
        self.conv = nn.Conv2d(7282, 2, 3)  # K = 7282 * 3 * 3 = 65538

    def forward(self, a, b, c, q, k):
        qk_fits = q.transpose(1, 2) @ q  # activation x activation, K = MAX_BMM_K
        qk_long = k.transpose(1, 2) @ k  # K = MAX_BMM_K + 1
        return self.fits(a).sum() + self.long(b).sum() + self.conv(c).sum() + qk_fits.sum() + qk_long.sum()


def test_a_reduction_longer_than_the_kernels_take_stays_fp32():
    inputs = (torch.randn(1, max_weight_k()), torch.randn(1, max_weight_k() + 1), torch.randn(1, 7282, 3, 3),
              torch.randn(1, MAX_BMM_K, 2), torch.randn(1, MAX_BMM_K + 1, 2))
    graph = capture(LongReductions(), inputs, dynamic_shapes=None)
    assert sorted(graph.names) == ["fits", "matmul"]
    too_long = (f"long (linear, reduction {max_weight_k() + 1} > {max_weight_k()})",
                f"conv (conv2d, reduction 65538 > {max_weight_k()})",
                f"matmul_1 (matmul, reduction {MAX_BMM_K + 1} > {MAX_BMM_K})")
    assert sorted(graph.unsupported) == sorted(too_long)
    with pytest.raises(BitmixError, match=r"no quantizable layers .*without a bitmix kernel: 0 \(linear, reduc"):
        capture(nn.Sequential(nn.Linear(max_weight_k() + 1, 2)), (torch.randn(1, max_weight_k() + 1),))


def test_single_tensor_example_input():
    graph = capture(nn.Linear(4, 3), torch.randn(2, 4))
    assert graph.layers[0].macs == 2 * 4 * 3 and graph.input_shapes == ((2, 4),)


def test_recurrent_layers_are_listed_as_without_kernel():
    """An LSTM has weights but no packed kernel: it must be reported, not silently left in FP32."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])

    graph = capture(Net(), (torch.randn(2, 7, 8),))
    assert graph.names == ("fc",)
    assert any("lstm" in entry for entry in graph.unsupported)


class Conv1dNet(nn.Module):
    """Conv1d in the forms 1-D models use: BatchNorm1d after it, depthwise, strided and dilated, a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.dw = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.down = nn.Conv1d(16, 24, 3, stride=2, dilation=2)
        self.same = nn.Conv1d(24, 24, 3, padding="same", dilation=2)
        self.even = nn.Conv1d(24, 24, 4, padding="same")  # pads one side more: no layer kind for it
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.down(y + self.dw(y)))
        return self.fc(self.even(self.same(y)).mean(-1))


def test_conv1d_is_a_conv2d_of_height_one():
    net = Conv1dNet().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    graph = capture(net, (torch.randn(2, 4, 33),))
    assert graph.names == ("stem", "dw", "down", "same", "fc")
    stem, dw, down, same, _ = graph.layers
    assert stem.kind == "conv2d" and stem.weight_shape == (16, 4, 1, 5) and stem.padding == (0, 2)
    assert stem.input_shape == (2, 4, 1, 33) and stem.output_shape == (2, 16, 1, 33)
    assert stem.macs == 2 * 16 * 33 * 4 * 5 and stem.params == 16 * 4 * 5
    assert dw.groups == 16 and dw.weight_shape == (16, 1, 1, 3)
    assert down.stride == (1, 2) and down.dilation == (1, 2) and down.output_shape == (2, 24, 1, 15)
    assert same.padding == (0, 2) and same.output_shape == (2, 24, 1, 15)  # padding="same" made explicit
    assert graph.unsupported == ("even (conv1d)",)  # reported, stays FP32


def test_conv2d_padding_same_and_valid():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.same = nn.Conv2d(3, 8, (3, 5), padding="same", dilation=(1, 2))
            self.valid = nn.Conv2d(8, 8, 3, padding="valid")

        def forward(self, x):
            return self.valid(self.same(x))

    same, valid = capture(Net(), (torch.randn(1, 3, 12, 12),)).layers
    assert same.padding == (1, 4) and same.output_shape == (1, 8, 12, 12)
    assert valid.padding == (0, 0) and valid.output_shape == (1, 8, 10, 10)


class Decoder(nn.Module):
    """Transposed convs as decoders use them: overlapping (k 4, s 2, p 1) with a BatchNorm after it, output
    padding, a bias-free one, a grouped one, a 1-D one, and a dilated one (no equivalent conv here: FP32)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.grouped = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.line = nn.ConvTranspose1d(4, 4, 5, stride=3, padding=1, output_padding=2)
        self.dilated = nn.ConvTranspose2d(4, 2, 3, stride=2, dilation=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.up2(torch.relu(self.bn(self.up(torch.relu(self.down(x)))))))
        y = self.grouped(y)[:, :, ::2, ::2]
        side = self.line(y.mean(2)).mean(-1)[:, :2, None, None] + self.dilated(y).mean((2, 3))[:, :, None, None]
        return self.head(y) + side


def test_transposed_convs_are_their_equivalent_conv2d():
    graph = capture(Decoder().eval(), (torch.randn(2, 3, 12, 10),))
    assert graph.names == ("down", "up", "up2", "grouped", "line", "head")  # execution order
    _, up, up2, grouped, line, _ = graph.layers
    # k 4, s 2: 2 x 2 taps per phase, 4 phases as output channels, padding taps - 1
    assert up.kind == "conv2d" and up.weight_shape == (24, 8, 2, 2) and up.padding == (1, 1) and up.stride == (1, 1)
    assert up.input_shape == (2, 8, 6, 5) and up.output_shape == (2, 24, 7, 6)
    assert up.macs == 2 * 24 * 7 * 6 * 8 * 4 and up.params == 24 * 8 * 4 + 24
    assert up2.weight_shape == (16, 6, 2, 2) and not up2.has_bias
    assert line.weight_shape == (12, 4, 1, 2) and line.input_shape == (2, 4, 1, 20)  # 1-D: height 1
    assert grouped.weight_shape == (16, 2, 1, 1) and grouped.groups == 2
    assert graph.unsupported == ("dilated (conv_transpose2d)",)


class WeightSecond(nn.Module):
    """`x @ W (+ b)` with the weight (in, out) as the second operand: GPT-2's `Conv1D` (addmm), a bare matmul
    and mm; a weight as the *first* operand has no linear form (stays FP32, reported)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(12, 16) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16) * 0.1)
        self.w2 = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.w3 = nn.Parameter(torch.randn(8, 4) * 0.3)
        self.left = nn.Parameter(torch.randn(5, 7) * 0.3)

    def forward(self, x):
        b, t, _ = x.shape
        h = torch.addmm(self.b1, x.reshape(-1, 12), self.w1).reshape(b, t, 16)  # GPT-2's Conv1D
        h = torch.relu(h) @ self.w2
        y = torch.mm(torch.tanh(h).reshape(-1, 8), self.w3).reshape(b, t, 4)
        return y + (self.left @ x[:, :, :4].transpose(1, 2).reshape(-1, 7, 1)).reshape(b, 5, 4).mean(1, keepdim=True)


def test_weight_as_second_matmul_operand_is_a_linear():
    graph = capture(WeightSecond().eval(), (torch.randn(2, 7, 12),))
    assert [(layer.name, layer.kind) for layer in graph.layers] == [
        ("addmm", "linear"), ("matmul", "linear"), ("mm", "linear")]
    conv1d, bare, mm = graph.layers
    assert conv1d.weight_shape == (16, 12) and conv1d.has_bias and conv1d.input_shape == (14, 12)
    assert conv1d.params == 12 * 16 + 16 and conv1d.macs == 14 * 12 * 16
    assert bare.weight_shape == (8, 16) and not bare.has_bias and bare.input_nonneg and bare.macs == 2 * 7 * 16 * 8
    assert mm.weight_shape == (4, 8)
    assert len(graph.unsupported) == 1 and "matmul" in graph.unsupported[0]


class TransposedWeightSecond(nn.Module):
    """`x @ V.t() (+ b)`: `F.linear(x, V, b)` written out, as a bare matmul, mm and addmm (V is (out, in))."""

    def __init__(self) -> None:
        super().__init__()
        self.v1 = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16) * 0.1)
        self.v2 = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.v3 = nn.Parameter(torch.randn(4, 8) * 0.3)

    def forward(self, x):
        b, t, _ = x.shape
        h = torch.addmm(self.b1, x.reshape(-1, 12), self.v1.t()).reshape(b, t, 16)
        h = torch.relu(h) @ self.v2.T
        return torch.mm(torch.tanh(h).reshape(-1, 8), self.v3.transpose(0, 1)).reshape(b, t, 4)


def test_a_transposed_weight_as_second_matmul_operand_is_a_linear_of_that_weight():
    """`x @ V.t()` was captured as an activation x activation matmul of 0 params: the weight's bytes were missing
    from the simulated cost and the weight was quantized like an activation."""
    graph = capture(TransposedWeightSecond().eval(), (torch.randn(2, 7, 12),))
    assert [(layer.name, layer.kind) for layer in graph.layers] == [
        ("addmm", "linear"), ("matmul", "linear"), ("mm", "linear")]
    addmm, bare, mm = graph.layers
    assert addmm.weight_shape == (16, 12) and addmm.has_bias and addmm.params == 16 * 12 + 16
    assert addmm.weight_param == "v1" and addmm.bias_param == "b1" and addmm.macs == 14 * 12 * 16
    assert bare.weight_shape == (8, 16) and bare.params == 8 * 16 and bare.input_nonneg
    assert mm.weight_shape == (4, 8) and mm.weight_param == "v3"
    assert not graph.unsupported


class SequenceConv(nn.Module):
    """A conv1d over a transposed sequence (wav2vec2's positional conv): its input is channels-last strided once
    the unit height is added, so torch's conv returns channels-last, and the GELU on a slice after it sees
    other strides than after the lowered conv unless both are made contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 16)
        self.conv = nn.Conv1d(16, 16, 16, padding=8, groups=4)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        h = self.proj(x)
        pos = F.gelu(self.conv(h.transpose(1, 2))[:, :, :-1]).transpose(1, 2)
        return self.out(self.norm(h + pos))


class _TiedAutoencoder(nn.Module):
    """A decoder that reuses the encoder's weight transposed: `F.linear(h, enc.weight.t())`."""

    def __init__(self, transpose=lambda w: w.t()) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 64)
        self.dec_bias = nn.Parameter(torch.randn(16) * 0.1)
        self.transpose = transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.enc(x)), self.transpose(self.enc.weight), self.dec_bias)


@pytest.mark.parametrize("transpose", [lambda w: w.t(), lambda w: w.T, lambda w: w.mT, lambda w: w.transpose(-1, -2),
                                       lambda w: w.permute(1, 0)])
def test_a_linear_on_a_transposed_parameter_is_a_quantized_layer(transpose):
    """`F.linear(h, enc.weight.t())` is `h @ W` with the encoder's weight: a linear of weight W^T (it stayed FP32)."""
    torch.manual_seed(0)
    model = _TiedAutoencoder(transpose).eval()
    x = torch.randn(8, 16)
    graph = capture(model, (x,))
    assert len(graph.layers) == 2 and graph.unsupported == ()
    decoder = graph.layers[1]
    assert decoder.kind == "linear" and decoder.weight_shape == (16, 64) and decoder.macs == 8 * 64 * 16
    cm = bitmix.compile(model, (x,), "int8-npu", data=torch.randn(64, 16))
    with torch.no_grad():
        assert torch.equal(cm(x), cm.fake_quant(x))
        assert float(F.cosine_similarity(cm(x), model(x)).mean()) > 0.999


class _WeightFirst(nn.Module):
    """A weight as a matmul's first operand, written plainly or through views."""

    def __init__(self, spell) -> None:  # noqa: ANN001
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32))
        self.out = nn.Linear(8, 4)
        self.spell = spell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.spell(self.w, x))


WEIGHT_FIRST = {"plain": lambda w, x: w @ x, "w.t().t()": lambda w, x: w.t().t() @ x, "w.t()": lambda w, x: w.t() @ x,
                "contiguous": lambda w, x: w.T.contiguous() @ x, "expand": lambda w, x: w.expand(2, 32, 32) @ x}


@pytest.mark.parametrize("spell", WEIGHT_FIRST)
def test_a_weight_first_in_a_matmul_stays_fp32_however_it_is_written(spell):
    """`W @ x` has no kernel (FP32, "no kernel"); `W.t().t() @ x` or `W.t() @ x` were quantized as an activation x
    activation matmul of 0 params, so the simulated cost left out the weight's bytes."""
    graph = capture(_WeightFirst(WEIGHT_FIRST[spell]).eval(), (torch.randn(2, 32, 8),))
    assert [(layer.name, layer.kind) for layer in graph.layers] == [("out", "linear")]
    assert len(graph.unsupported) == 1 and "matmul" in graph.unsupported[0]


def test_a_weight_first_through_a_view_is_reported_as_without_kernel():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8)
    model = _WeightFirst(WEIGHT_FIRST["w.t().t()"]).eval()
    cm = bitmix.compile(model, (x,), "w4a8-npu", budget=1.0, options=bitmix.CompileOptions(frontier_points=0))
    assert sorted((row.name, row.kind, row.params) for row in cm.report.layers) == [
        ("matmul (matmul)", "no kernel", 0), ("out", "linear", 36)]


NUMBA_DURING_EXPORT = """
import numpy as np, torch, bitmix
from bitmix.compiler.capture import export_program
from bitmix import kernels
first_kernel_call = []
def another_thread_serves(module, args):  # runs while export has math.pow patched, as another thread would
    first_kernel_call.append(kernels.quantize_activations(np.ones((2, 8), np.float32), 0.1, 8, True).sum())
model = torch.nn.Linear(8, 4)
model.register_forward_pre_hook(another_thread_serves)
export_program(model, (torch.randn(2, 8),), None)
print(first_kernel_call)
"""


def test_a_first_kernel_call_during_an_export_keeps_numba_working():
    """Non-strict torch.export patches ``math.pow`` process-wide; Numba's first compile must not see it."""
    import subprocess
    import sys

    import numpy as np

    from bitmix import kernels

    kernels.quantize_activations(np.ones((2, 8), np.float32), 0.1, 8, True)  # in Numba's cache, as a served model's
    run = subprocess.run([sys.executable, "-c", NUMBA_DURING_EXPORT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[np.int64(160)]"


def test_a_numba_compile_in_another_thread_waits_for_an_export():
    """Non-strict export patches ``min`` process-wide; a signature compiled meanwhile would type it as a partial."""
    import threading

    import numba

    @numba.njit(cache=False)
    def smallest(a, b):  # noqa: ANN001, ANN202
        return min(a, b)

    exporting, compiled, result = threading.Event(), threading.Event(), []

    def compile_in_another_thread() -> None:
        exporting.wait()
        try:
            result.append(smallest(3, 2))
        except Exception as exc:  # noqa: BLE001 - the thread's failure is what the test checks
            result.append(f"{type(exc).__name__}: {exc}")
        compiled.set()

    def export_in_progress(module: torch.nn.Module, args: tuple) -> None:
        exporting.set()
        compiled.wait(timeout=2)  # the compile waits for the export to end, so this times out

    thread = threading.Thread(target=compile_in_another_thread)
    thread.start()
    model = torch.nn.Linear(8, 4)
    model.register_forward_pre_hook(export_in_progress)
    export_program(model, (torch.randn(2, 8),), None)
    thread.join(timeout=60)
    assert result == [2]


class Gated(nn.Module):
    """Two tensor inputs around a left-out tensor argument and a non-tensor one, as Hugging Face forwards are."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 2.0,
                t: torch.Tensor | None = None) -> torch.Tensor:
        h = self.b(F.relu(self.a(x))) * scale
        h = h if mask is None else h * mask
        return h if t is None else h + t


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, y: torch.Tensor, *, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x))) + y


class Encoding(UserDict):
    """What a tokenizer returns (`transformers.BatchEncoding`): a Mapping with attribute access, not a dict."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


def _names(graph) -> tuple[str, ...]:  # noqa: ANN001
    return InputSpec.of(graph.exported).names


def test_a_dict_of_example_inputs_binds_to_the_forwards_parameter_order():
    """A dict example was refused ("must be a tensor or a tuple of tensors"): its tensors are the inputs, in the
    forward's order whatever the key order; a left-out argument and a non-tensor one at its default keep it."""
    x, t = torch.randn(4, 16), torch.randn(4, 8)
    for example in ({"t": t, "x": x}, {"t": t, "scale": 2.0, "x": x, "mask": None}, Encoding(t=t, x=x)):
        graph = capture(Gated().eval(), example)
        assert _names(graph) == ("x", "t") and graph.input_shapes == ((4, 16), (4, 8))


def test_a_keyword_only_forward_captures_from_a_dict():
    """`forward(self, y, *, x)` could not be captured at all; a tuple for it says how to pass x."""
    x, y = torch.randn(4, 16), torch.randn(4, 8)
    graph = capture(KeywordOnly().eval(), {"x": x, "y": y})
    assert _names(graph) == ("y", "x") and graph.input_shapes == ((4, 8), (4, 16))
    batch = torch.export.Dim("batch", max=64)  # a dynamic_shapes spec keyed by name reaches keyword-only ones too
    graph = capture(KeywordOnly().eval(), {"x": x, "y": y}, dynamic_shapes={"x": {0: batch}, "y": {0: batch}})
    (y_batch, _), (x_batch, _) = InputSpec.of(graph.exported).dims
    assert isinstance(x_batch, str) and x_batch == y_batch
    with pytest.raises(BitmixError, match=r"^forward takes 'x' by keyword only; pass example_inputs as a dict of "
                                          r"argument name -> tensor, e.g. \{'x': x\}$"):
        capture(KeywordOnly().eval(), (y, x))


@pytest.mark.parametrize(("example", "match"), [
    ({"x": "x", "bogus": "t"}, r"^example_inputs has 'bogus', which is not an argument of Gated.forward \(x, mask, "
                               r"scale, t\); key the dict by the forward's named arguments \(not \*\*kwargs\), "
                               r"or pass a tuple$"),
    ({"t": "t"}, r"^example_inputs has no 'x', an argument of Gated.forward without a default; add it to the dict$"),
    ({"x": "x", "t": [1.0, 2.0]}, r"^example_inputs\['t'\] is a list \(\[1.0, 2.0\]\), not a tensor: bitmix "
                                  r"compiles the tensor arguments only, .*; leave it out, or wrap the model"),
    ({"x": "x", "scale": 0.5}, r"^example_inputs\['scale'\] is a float \(0.5\), not a tensor"),
    ({"x": None}, r"^example_inputs\['x'\] is a NoneType \(None\), not a tensor"),
    ({}, r"^example_inputs has no 'x', an argument of Gated.forward without a default"),
])
def test_bad_dict_example_inputs_are_one_line(example, match):
    tensors = {"x": torch.randn(4, 16), "t": torch.randn(4, 8)}
    example = {k: tensors.get(v, v) if isinstance(v, str) else v for k, v in example.items()}
    with pytest.raises(BitmixError, match=match):
        capture(Gated().eval(), example)


def test_a_forward_taking_only_kwargs_says_to_name_them():
    """forward(self, **kwargs) compiled from a dict was told to "pass a tuple", which such a forward cannot take."""

    class Kwargs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
            return self.fc(inputs["x"]) + inputs["t"]

    with pytest.raises(BitmixError, match=r"^example_inputs has 'x', which Kwargs.forward takes only through "
                                          r"\*\*kwargs: .*compile a wrapper whose forward names them "
                                          r"\(def forward\(self, x, t\)"):
        capture(Kwargs().eval(), {"x": torch.randn(4, 16), "t": torch.randn(4, 8)})
