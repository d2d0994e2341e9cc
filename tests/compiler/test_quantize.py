"""LSQ quantizer against its formulas, QuantLayer, fake_quantize and finetune."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitmix
from bitmix import zoo
from bitmix.compiler import quantize
from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.qlayer import LSQQuantizer, QuantLayer, qrange, quant_layers
from bitmix.compiler.quantize import fake_quantize, finetune
from bitmix.errors import BitmixError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mlp():
    model, example, data = zoo.load("digits-mlp")
    return prepare(capture(model, example, "digits-mlp")), data


def test_qrange_signed_and_unsigned():
    assert qrange(4, True) == (8, 7)
    assert qrange(2, True) == (2, 1)
    assert qrange(8, False) == (0, 255)
    assert qrange(2, False) == (0, 3)


def test_forward_is_round_clip_times_step():
    q = LSQQuantizer(4, signed=True)
    q.set_step(torch.tensor(0.5))
    v = torch.tensor([-10.0, -1.3, -0.25, 0.0, 0.26, 0.74, 3.49, 10.0])
    expected = torch.round(torch.clamp(v / 0.5, -8, 7)) * 0.5
    assert torch.equal(q(v.unsqueeze(0)).squeeze(0), expected)


def test_gradients_match_hand_derived_lsq_formulas():
    """dL/dv = 1 inside the range, 0 outside; dL/ds = g * sum(up * (round(v/s) - v/s | -Q_N | Q_P))."""
    bits, step = 3, 0.4
    q = LSQQuantizer(bits, signed=True)
    q.set_step(torch.tensor(step))
    q_n, q_p = qrange(bits, True)
    v = torch.tensor([[-3.0, -1.7, -0.5, 0.1, 0.33, 0.9, 1.1, 5.0]], requires_grad=True)
    up = torch.linspace(0.5, 2.0, v.numel()).reshape(v.shape)
    (q(v) * up).sum().backward()
    x = v.detach() / step
    inside = (x > -q_n) & (x < q_p)
    assert torch.allclose(v.grad, inside.float() * up, rtol=1e-6, atol=0)
    clipped = torch.where(x <= -q_n, torch.tensor(-float(q_n)), torch.tensor(float(q_p)))
    ds = torch.where(inside, torch.round(x) - x, clipped)
    g = 1.0 / math.sqrt(v[0].numel() * q_p)
    assert q.step.grad is not None
    assert float(q.step.grad) == pytest.approx(float((ds * up).sum()) * g, rel=1e-6)


def test_per_channel_gradient_scale_uses_elements_per_channel():
    q = LSQQuantizer(4, signed=True, channels=3)
    w = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    q.init_step(w)
    q(w).sum().backward()
    x = w / q.step.detach().reshape(-1, 1, 1)
    inside = (x > -8) & (x < 7)
    ds = torch.where(inside, torch.round(x) - x, torch.where(x <= -8, -8.0, 7.0))
    expected = ds.reshape(3, -1).sum(1) / math.sqrt(10 * 7)
    assert torch.allclose(q.step.grad, expected, rtol=1e-5, atol=1e-7)


def test_init_is_two_mean_abs_over_sqrt_qp():
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    q = LSQQuantizer(2, signed=True, channels=4)
    q.init_step(w)
    assert torch.allclose(q.step, 2 * w.abs().mean(1) / math.sqrt(1))


def test_first_forward_sets_the_mse_step_from_the_batch():
    from bitmix.compiler.ranges import activation_range

    a = torch.rand(8, 16, generator=torch.Generator().manual_seed(2))
    qa = LSQQuantizer(4, signed=False)
    qa(a)
    assert float(qa.step.detach()) == pytest.approx(float(activation_range(a, 4, False)[1]), rel=1e-6)


@pytest.mark.parametrize(("bits", "signed"), [(2, True), (4, True), (8, False), (4, False)])
def test_codes_match_kernel_rounding_bit_for_bit(bits, signed):
    gen = torch.Generator().manual_seed(bits)
    step = 0.0371
    q = LSQQuantizer(bits, signed)
    q.set_step(torch.tensor(step))
    x = torch.randn(64, 33, generator=gen) * 0.3
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.0]) * step  # exact ties
    q_n, q_p = qrange(bits, signed)
    expected = np.rint(np.clip(x.numpy() / np.float32(step), -q_n, q_p))
    codes = q.codes(x)
    assert codes.dtype == torch.int32
    assert np.array_equal(codes.numpy(), expected.astype(np.int32))
    assert torch.equal(q(x), codes.float() * q.step)


def test_quant_layer_float_passthrough_and_quantized_forward():
    gen = torch.Generator().manual_seed(2)
    w, b = torch.randn(6, 3, 3, 3, generator=gen), torch.randn(6, generator=gen)
    layer = QuantLayer("c", "conv2d", w, b, (1, 1), (1, 1))
    x = torch.randn(2, 3, 5, 5, generator=gen)
    assert torch.equal(layer(x), F.conv2d(x, w, b, 1, 1))
    layer.set_bits(4)
    y = layer(x)
    assert layer.a_quant is not None and layer.w_quant is not None
    assert torch.allclose(y, F.conv2d(layer.a_quant(x), layer.w_quant(layer.weight), layer.bias, 1, 1))
    assert layer.a_quant.signed and layer.w_quant.signed and layer.w_quant.channels == 6


def test_matmul_layer_quantizes_both_operands():
    layer = QuantLayer("m", "matmul", a_nonneg=True)
    layer.set_bits(2)
    assert layer.a_quant is not None and layer.b_quant is not None
    assert not layer.a_quant.signed and layer.b_quant.signed and layer.w_quant is None
    a, b = torch.rand(2, 4, 5), torch.randn(2, 5, 3)
    out = layer(a, b)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out, torch.matmul(layer.a_quant(a), layer.b_quant(b)))


def test_fake_quantize_returns_new_module_with_assigned_bits(mlp):
    gm, data = mlp
    calib = data.calibration(32)
    fq = fake_quantize(gm, {"fc1": 8, "fc2": 2}, calibration=calib)
    layers = quant_layers(fq)
    assert (layers["fc1"].bits, layers["fc2"].bits, layers["fc3"].bits) == (8, 2, None)
    assert all(layer.bits is None for layer in quant_layers(gm).values())
    assert not layers["fc1"].a_quant.signed  # pixels in [0, 1]: unsigned from calibration
    assert not layers["fc2"].a_quant.signed  # after ReLU: unsigned from the graph
    assert bool(layers["fc2"].a_quant.initialized)
    assert fq.bitmix_layers == gm.bitmix_layers


def test_fake_quantize_data_free_default_and_errors(mlp):
    gm, _ = mlp
    fq = fake_quantize(gm, {"fc2": 8})
    q = quant_layers(fq)["fc2"].a_quant
    assert float(q.step.detach()) == pytest.approx(2 / math.sqrt(2 * math.pi) / math.sqrt(255), rel=1e-6)
    q = quant_layers(fake_quantize(gm, {"fc2": 4}))["fc2"].a_quant  # per row (bitmix.ir.row_steps): the row's max
    assert q.axis == -1 and float(q.step.detach()) == pytest.approx(1 / 15, rel=1e-6)
    q = quant_layers(fake_quantize(gm, {"fc2": "4/8"}))["fc2"].a_quant  # per row beside narrower weights
    assert q.axis == -1 and float(q.step.detach()) == pytest.approx(1 / 255, rel=1e-6)
    with pytest.raises(BitmixError, match="unknown layer"):
        fake_quantize(gm, {"nope": 4})
    with pytest.raises(BitmixError, match="'fc2'.*8/4: the chip does not run weights wider than activations; use"):
        fake_quantize(gm, {"fc2": "8/4"})
    with pytest.raises(BitmixError, match="'fc2'.*width 3\\); widths must be 8, 4 or 2"):
        fake_quantize(gm, {"fc2": "3/8"})


def test_finetune_is_deterministic_and_leaves_input_untouched(mlp):
    gm, data = mlp
    fq = fake_quantize(gm, {"fc1": 8, "fc2": 2, "fc3": 8}, calibration=data.calibration(64))
    before = {k: v.clone() for k, v in fq.state_dict().items()}
    a = finetune(fq, data, epochs=1, lr=0.01, seed=3, max_batches=6)
    b = finetune(fq, data, epochs=1, lr=0.01, seed=3, max_batches=6)
    for k, v in fq.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.state_dict()["bitmix_fc2.weight"], before["bitmix_fc2.weight"])


def test_integer_path_input_check_reads_a_finite_input_once_and_refuses_as_before(monkeypatch):
    """The integer path's NaN / Inf refusal looks at a finite input's sum only (the elementwise masks took ~25 %
    of a MiniLM integer forward); inputs with NaN or Inf, or whose sum overflows, get the same verdicts."""
    from bitmix.compiler.qlayer import _check_quantizable

    per_tensor, per_row = LSQQuantizer(4, True), LSQQuantizer(4, True, axis=-1)
    seen: list[int] = []
    isnan, isfinite = torch.isnan, torch.isfinite
    monkeypatch.setattr(torch, "isnan", lambda t: seen.append(t.numel()) or isnan(t))
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or isfinite(t))
    x = torch.randn(4, 8, 16)
    for q in (per_tensor, per_row):
        _check_quantizable(x, q, "l")
    assert seen == [1, 1]  # one scalar each: the sum
    nan, inf = x.clone(), x.clone()
    nan[1, 2, 3], inf[0, 0, 0] = float("nan"), float("inf")
    both = inf.clone()
    both[0, 0, 1] = float("-inf")  # the sum is NaN, the input holds no NaN
    overflow = torch.full((4, 8, 16), 3e38)  # finite, its sum is not
    with pytest.raises(BitmixError, match=r"^the input of layer 'l' contains NaN; cannot quantize"):
        _check_quantizable(nan, per_tensor, "l")
    for bad in (nan, inf, both):
        with pytest.raises(BitmixError, match=r"^the input of layer 'l' contains NaN or Inf \(a row's step"):
            _check_quantizable(bad, per_row, "l")
    for fine in (inf, both, overflow):
        _check_quantizable(fine, per_tensor, "l")
    _check_quantizable(overflow, per_row, "l")
    _check_quantizable(torch.zeros(0, 16), per_tensor, "l")


def test_assignments_rotating_the_same_layers_share_the_float_passes_and_quantize_alike(mlp, monkeypatch):
    """The signs and live rows come from float passes of the rotated model: kept per process, they are computed
    once for assignments that rotate the same layers, and the models equal those of a fresh computation."""
    gm, data = mlp
    calls = []
    signs = quantize.calibration_signs
    monkeypatch.setattr(quantize, "calibration_signs", lambda *a: calls.append(1) or signs(*a))
    first, second = {"fc1": 4, "fc2": 2, "fc3": 4}, {"fc1": 2, "fc2": 4, "fc3": "2/4"}  # every one rotated
    quantize._FLOAT_PASSES.clear()
    fake_quantize(gm, first, calibration=data.calibration(64))  # a single compile's call: nothing kept
    assert len(calls) == 1 and not quantize._FLOAT_PASSES
    fake_quantize(gm, first, calibration=data.calibration(64), share_float_passes=True)
    shared = fake_quantize(gm, second, calibration=data.calibration(64), share_float_passes=True)
    assert len(calls) == 2
    quantize._FLOAT_PASSES.clear()
    fresh = fake_quantize(gm, second, calibration=data.calibration(64), share_float_passes=True)
    assert len(calls) == 3
    assert [(q.signed, q.q_n, q.q_p) for q in shared.modules() if isinstance(q, LSQQuantizer)] == [
        (q.signed, q.q_n, q.q_p) for q in fresh.modules() if isinstance(q, LSQQuantizer)]
    assert shared.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in shared.state_dict().items())
    fake_quantize(gm, second, calibration=data.calibration(32), share_float_passes=True)  # other inputs: again
    changed = copy.deepcopy(gm)
    with torch.no_grad():
        changed.bitmix_fc1.weight.mul_(0.5)  # other weights: computed again
    fake_quantize(changed, second, calibration=data.calibration(64), share_float_passes=True)
    assert len(calls) == 5


def test_finetune_in_place_trains_the_model_itself_to_the_same_floats(mlp):
    gm, data = mlp
    fq = fake_quantize(gm, {"fc1": 8, "fc2": 2, "fc3": 8}, calibration=data.calibration(64))
    copied = finetune(fq, data, epochs=1, lr=1e-3, optimizer="adam", seed=3, max_batches=6)
    own = finetune(fq, data, epochs=1, lr=1e-3, optimizer="adam", seed=3, max_batches=6, in_place=True)
    assert own is fq and copied is not fq
    assert all(torch.equal(x, y) for x, y in zip(own.state_dict().values(), copied.state_dict().values(), strict=True))


def test_finetune_recovers_two_bit_accuracy(mlp):
    gm, data = mlp
    fq = fake_quantize(gm, {"fc1": 8, "fc2": 2, "fc3": 8}, calibration=data.calibration(64))
    tuned = finetune(fq, data, epochs=2, lr=1e-3, optimizer="adam", seed=0, teacher=gm)
    # MSE ranges already put the 2-bit layer near FP32 (97.8 %): fine-tuning must keep it there
    assert data.evaluate(tuned) >= data.evaluate(fq) - 1.0
    assert data.evaluate(tuned) > 95.0


def test_finetune_rejects_bad_arguments(mlp):
    gm, data = mlp
    with pytest.raises(BitmixError, match="optimizer"):
        finetune(gm, data, epochs=1, lr=0.1, optimizer="lion")
    with pytest.raises(BitmixError, match="lr > 0"):
        finetune(gm, data, epochs=1, lr=0.0)


def test_calibration_signs_cover_layers_the_forward_never_reaches():
    """minilm's pooler is captured but its output is dropped: LIMPQ asked for its signs and got a KeyError."""
    from bitmix.compiler.quantize import calibration_signs

    nn = torch.nn
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    gm = prepare(capture(net, (torch.randn(3, 4),)))
    layers = quant_layers(gm)
    other = quant_layers(prepare(capture(nn.Sequential(nn.Linear(4, 4)), (torch.randn(3, 4),))))
    ghost = next(iter(other.values()))
    signs = calibration_signs(gm, {**layers, "ghost": ghost}, (torch.randn(8, 4),))
    assert signs["ghost"] == (True, True)
    assert signs[list(layers)[1]][0] is False  # after the ReLU: unsigned


@pytest.mark.parametrize(("bits_a", "bits_w", "c_in", "groups", "k"),
                         [(8, 8, 96, 1, 3), (8, 8, 512, 4, 3), (8, 8, 32, 32, 3), (4, 4, 96, 1, 3), (8, 8, 40, 1, 7)])
def test_exact_conv_equals_the_float64_conv_of_the_codes(bits_a, bits_w, c_in, groups, k):
    from bitmix.compiler.qlayer import exact_conv

    g = torch.Generator().manual_seed(c_in + k)
    a = torch.randint(0, 2**bits_a, (2, c_in, 9, 11), generator=g).float()
    w = torch.randint(-(2 ** (bits_w - 1)), 2 ** (bits_w - 1), (48 if groups < c_in else c_in, c_in // groups, k, k),
                      generator=g).float()
    top_a, top_w = 2**bits_a - 1, 2 ** (bits_w - 1) - 1  # sample 0, channel 0: every product large and positive
    a[0] = torch.randint(top_a * 3 // 4, top_a + 1, a[0].shape, generator=g).float()
    w[0] = torch.randint(top_w * 3 // 4, top_w + 1, w[0].shape, generator=g).float()
    args = ((1, 2), (1, 1), (1, 1), groups)
    exact = F.conv2d(a.double(), w.double(), None, *args)
    assert torch.equal(exact_conv(a, w, *args), exact.float())
    if bits_a == 8 and groups < c_in:  # sums past 2^24: a single float32 conv rounds them
        assert exact.abs().max() > 2**24 and not torch.equal(F.conv2d(a, w, None, *args), exact.float())


@pytest.mark.parametrize(("bits_a", "bits_w", "k", "batch"),
                         [(8, 8, 384, ()), (8, 8, 3000, ()), (8, 4, 1536, (2,)), (8, 8, 1600, (2, 3)), (4, 4, 64, ())])
def test_exact_matmul_equals_the_float64_matmul_of_the_codes(bits_a, bits_w, k, batch):
    from bitmix.compiler.qlayer import exact_matmul

    g = torch.Generator().manual_seed(k + len(batch))
    top_a, top_w = 2**bits_a - 1, 2 ** (bits_w - 1) - 1
    a = torch.randint(0, top_a + 1, (*batch, 5, k), generator=g).float()
    b = torch.randint(-top_w - 1, top_w + 1, (*batch, k, 7), generator=g).float()
    a[..., 0, :] = torch.randint(top_a * 3 // 4, top_a + 1, a[..., 0, :].shape, generator=g).float()
    b[..., :, 0] = torch.randint(top_w * 3 // 4, top_w + 1, b[..., :, 0].shape, generator=g).float()
    exact = torch.matmul(a.double(), b.double())
    assert torch.equal(exact_matmul(a, b), exact.float())
    if k * top_a * top_w > 2**26:  # sums well past 2^24: a single float32 matmul rounds some of them
        assert exact.abs().max() > 2**24 and not torch.equal(torch.matmul(a, b), exact.float())


def test_exact_matmul_falls_back_to_float64_when_float32_matmuls_are_narrowed():
    from bitmix.compiler.qlayer import _reduced_precision_matmul, exact_matmul

    a, b = torch.full((2, 3000), 255.0), torch.full((3000, 3), 127.0)
    expected = torch.full((2, 3), 255.0 * 127 * 3000, dtype=torch.float64).float()
    before = torch.get_float32_matmul_precision()
    assert before == "highest" and not _reduced_precision_matmul()
    try:
        torch.set_float32_matmul_precision("medium")  # may let oneDNN run float32 matmuls in bf16
        assert _reduced_precision_matmul()
        assert torch.equal(exact_matmul(a, b), expected)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(exact_matmul(a, b), expected)


def test_cached_weight_codes_follow_every_change_of_weight_or_step():
    torch.manual_seed(0)
    layer = QuantLayer("fc", "linear", torch.randn(16, 32), torch.randn(16))
    layer.set_bits(4)
    x = torch.randn(8, 32)
    layer.a_quant.init_range(x)
    layer.eval()

    def fresh():
        return layer.w_quant.codes(layer.weight)

    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer.weight_codes(), fresh())
        layer.weight.mul_(1.7)  # in place, as an optimizer step
        assert torch.equal(layer.weight_codes(), fresh())
        layer.w_quant.set_step(layer.w_quant.step * 0.5)
        assert torch.equal(layer.weight_codes(), fresh())
        layer.weight = torch.nn.Parameter(torch.randn(16, 32))  # a new weight
        assert torch.equal(layer.weight_codes(), fresh())
        layer.weight.data.mul_(3.0)  # `.data` bypasses the version counter
        assert torch.equal(layer.weight_codes(), fresh())
        assert not torch.equal(layer(x), first)
    copy = __import__("copy").deepcopy(layer)
    copy.weight.data.zero_()
    assert torch.equal(copy.weight_codes(), torch.zeros_like(fresh())) and torch.equal(layer.weight_codes(), fresh())


def test_fake_quant_of_an_empty_batch_is_empty_as_in_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    cm = bitmix.compile(model, torch.randn(2, 3, 6, 6), "int8-npu", data=torch.randn(8, 3, 6, 6),
                        options=bitmix.CompileOptions(frontier_points=0))
    with torch.no_grad():
        assert cm.fake_quant(torch.randn(0, 3, 6, 6)).shape == (0, 4)


class _Blocks(nn.Module):
    """An input layer and `n` residual MLP blocks: the quantized-layer count grows with `n`, the model does not
    change otherwise."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(n))
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def _forwards(n: int, assignment: str) -> int:
    """Full-model forward passes during `fake_quantize` of `_Blocks(n)`, counted at its first layer (run once
    per pass; its hooks survive the deep copy)."""
    torch.manual_seed(0)
    gm = prepare(capture(_Blocks(n).eval(), (torch.randn(2, 16),)))
    layers = quant_layers(gm)
    calls = [0]
    layers["inp"].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    calibration = (torch.randn(8, 16, generator=torch.Generator().manual_seed(1)),)
    fake_quantize(gm, dict.fromkeys(layers, assignment), calibration)
    return calls[0]


@pytest.mark.parametrize("assignment", ["8", "4/8", "2"])
def test_fake_quantize_runs_the_model_a_fixed_number_of_times_whatever_its_depth(assignment):
    """Every per-layer search (smoothing, activation steps, GPTQ, bias correction) works on inputs recorded in a
    pass per stage, so the number of full forwards must not grow with the number of layers (5 against 17 here;
    a per-layer or per-candidate forward would make a 12-layer GPT-2's quantize stage O(layers x model)). The
    bound is the stages' own: one pass each for signs, live rows, smoothing, the float reference, the steps and
    GPTQ, and at most 7 for bias correction (its held-out check, then the refit on all examples when that helped,
    which depends on the data)."""
    assert 0 < max(_forwards(2, assignment), _forwards(8, assignment)) <= 13
