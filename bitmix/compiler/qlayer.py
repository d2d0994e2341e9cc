"""LSQ quantizers and the quantized layer that `fold.prepare` inserts for every conv2d / linear / matmul.

Learned Step Size Quantization (Esser et al., ICLR 2020): a quantizer is
`v_hat = round(clip(v / s, -Q_N, Q_P)) * s` with a learnable step `s`, a
straight-through round, and the step's gradient scaled by `g = 1 / sqrt(N * Q_P)`.
`QuantLayer` applies a `Precision` pair: weight width to its weights, activation width to
its input activations (both operands of an activation x activation matmul are activations);
with `bits=None` it is an exact float passthrough.

The forward pass and `LSQQuantizer.codes` divide by the same float32 step, so the
integer codes the lowering packs are exactly those the fake-quantized model used.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler import ranges
from bitmix.compiler.hadamard import rotate_input
from bitmix.errors import BitmixError
from bitmix.ir.precision import Precision, PrecisionLike, chip_precision
from bitmix.ir.row_steps import row_steps

# E|v| for v ~ N(0, 1) (signed) and for relu(v) (unsigned): the data-free activation prior.
GAUSSIAN_ABS_MEAN = {True: math.sqrt(2.0 / math.pi), False: 1.0 / math.sqrt(2.0 * math.pi)}
MIN_STEP = ranges.MIN_STEP
MIDRISE_BITS = 2  # the widest activation offered the mid-rise grid: at 4 bits and up one level of 16 is noise
# weight codes per weight quantizer, until the weight or its step changes (calibration passes reuse them)
_WEIGHT_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
EXACT_F32 = float(2**24)  # float32 represents every integer up to this exactly


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times `scale` backward.

    A custom function (rather than LSQ's `(x - x*g).detach() + x*g`) keeps the
    forward value bit-identical to the stored step, which `codes` relies on.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P): codes lie in [-Q_N, Q_P]."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def row_max(v: torch.Tensor, axis: int) -> torch.Tensor:
    """max |v| along `axis` (kept), floored so an all-zero row gets codes 0: the per-row step's scale."""
    return v.detach().float().abs().amax(dim=axis, keepdim=True).clamp(min=MIN_STEP)


class LSQQuantizer(nn.Module):
    """LSQ fake quantizer with one step per tensor (activations) or per output channel (weights).

    With `axis`, an activation's step is per row: `step * max |v|` along `axis` (`bitmix.ir.row_steps`), and
    the learned `step` is a fraction of that max.

    Unless a step was set before, the first forward pass sets it from the values it sees:
    the MSE-optimal step (`init_range`, `bitmix.compiler.ranges`), the post-training range
    the fine-tuning then starts from. `init_step` is LSQ's own `2 <|v|> / sqrt(Q_P)`.
    `bits` is this operand's width; a layer's weight and activation quantizers each have their own.

    With `midrise` allowed (a signed per-tensor activation of at most `MIDRISE_BITS`), `init_range` may put
    the codes on the mid-rise grid: code c stands for (c + 1/2) * step, so 2-bit codes -2..1 are the
    symmetric levels -1.5, -0.5, 0.5, 1.5 steps instead of -2, -1, 0, 1 (one of four levels wasted on a
    symmetric distribution). The half step times the weights' column sums is a constant per output channel,
    folded into the bias (`QuantLayer.folded_bias`): the integer work is the same.
    """

    def __init__(self, bits: int, signed: bool, channels: int | None = None, axis: int | None = None,
                 midrise: bool = False) -> None:
        super().__init__()
        if bits < 2:
            raise BitmixError(f"LSQ needs at least 2 bits, got {bits}")
        self.bits = bits
        self.signed = signed
        self.channels = channels
        self.axis = axis
        self.may_midrise = midrise and signed and channels is None and axis is None and bits <= MIDRISE_BITS
        self.q_n, self.q_p = qrange(bits, signed)
        self.step = nn.Parameter(torch.ones(channels if channels is not None else ()))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("midrise", torch.tensor(False))  # codes c stand for (c + 1/2) * step

    def extra_repr(self) -> str:
        kind = (f"per-channel({self.channels})" if self.channels is not None
                else f"per-row(axis={self.axis})" if self.axis is not None else "per-tensor")
        return f"bits={self.bits}, signed={self.signed}, {kind}" + (", mid-rise" if bool(self.midrise) else "")

    @torch.no_grad()
    def init_step(self, v: torch.Tensor) -> None:
        """LSQ initialisation s0 = 2 <|v|> / sqrt(Q_P) from weights or a calibration batch."""
        if self.channels is not None:
            mean_abs = v.detach().abs().reshape(v.shape[0], -1).mean(dim=1)
        else:
            mean_abs = self.normalised(v).abs().mean()
        self.set_step(2.0 * mean_abs / math.sqrt(self.q_p))

    @torch.no_grad()
    def init_range(self, v: torch.Tensor) -> None:
        """Post-training range: the step minimising the quantization MSE of `v` (per channel for weights);
        a signed activation turns unsigned where clipping its few negatives costs less (e.g. after GELU)."""
        if self.channels is not None:
            self.set_step(ranges.weight_steps(v, self.q_n, self.q_p))
            return
        self.signed, midrise, step = ranges.activation_grid(self.normalised(v), self.bits, self.signed,
                                                            self.may_midrise)
        self.q_n, self.q_p = qrange(self.bits, self.signed)
        self.midrise.fill_(midrise)
        self.set_step(step)

    @torch.no_grad()
    def init_gaussian(self) -> None:
        """Data-free activation step: assume unit-Gaussian values (ReLU'd if unsigned); per row, the row's max."""
        if self.axis is not None:
            self.set_step(torch.tensor(1.0 / self.q_p))
            return
        self.set_step(torch.tensor(2.0 * GAUSSIAN_ABS_MEAN[self.signed] / math.sqrt(self.q_p)))

    def normalised(self, v: torch.Tensor) -> torch.Tensor:
        """`v` as the learned step sees it: divided by its rows' max when the step is per row."""
        return v if self.axis is None else v.detach().float() / row_max(v, self.axis)

    @torch.no_grad()
    def set_step(self, step: torch.Tensor) -> None:
        self.step.copy_(step.clamp(min=MIN_STEP).to(self.step.dtype).reshape(self.step.shape))
        self.initialized.fill_(True)

    def elements_per_step(self, v: torch.Tensor) -> int:
        """N in the LSQ gradient scale: elements per channel, or features per example."""
        if self.channels is not None:
            return max(1, v.numel() // self.channels)
        return max(1, v[0].numel() if v.dim() > 1 else v.numel())

    def step_for(self, v: torch.Tensor) -> torch.Tensor:
        """The step each element of `v` is quantized with (broadcastable to `v`)."""
        if self.channels is not None:
            return self.step.reshape((-1,) + (1,) * (v.dim() - 1))
        if self.axis is not None:
            return self.step * row_max(v, self.axis)
        return self.step

    def half_step(self) -> torch.Tensor | None:
        """The mid-rise grid's shift (step / 2, exact in float32), or None on the plain grid."""
        return self.step.detach().float() * 0.5 if bool(self.midrise) else None

    def dequantized(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """`v` rounded on this quantizer's grid with `step` (a candidate in a step search): the forward's
        float32 ops in the same order, in place on one buffer (4-5x faster on calibration-sized tensors)."""
        if bool(self.midrise):
            half = step * 0.5
            return torch.sub(v, half).div_(step).clamp_(-self.q_n, self.q_p).round_().mul_(step).add_(half)
        return torch.div(v, step).clamp_(-self.q_n, self.q_p).round_().mul_(step)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_range(v)
        g = 1.0 / math.sqrt(self.elements_per_step(v) * self.q_p)
        s = _GradScale.apply(self.step_for(v), g)
        if bool(self.midrise):
            half = s * 0.5
            return _RoundSTE.apply(torch.clamp((v - half) / s, -self.q_n, self.q_p)) * s + half
        return _RoundSTE.apply(torch.clamp(v / s, -self.q_n, self.q_p)) * s

    @torch.no_grad()
    def codes(self, v: torch.Tensor) -> torch.Tensor:
        """Integer codes (int32) of `v`, computed in float32 exactly as the forward pass does
        (on the mid-rise grid: of `v - step / 2`, the subtraction the lowered layer does before its kernel)."""
        s = self.step_for(v).float()
        v = v.float() if not bool(self.midrise) else v.float() - s * 0.5
        return torch.div(v, s).clamp_(-self.q_n, self.q_p).round_().to(torch.int32)


class QuantLayer(nn.Module):
    """One quantizable op of the captured graph: conv2d, linear, or activation x activation matmul.

    `bits=None` runs the float op unchanged. With `bits` a pair (w, a), the op consumes
    `a_quant(x)` at a bits and `w_quant(weight)` at w bits (matmul: `a_quant(a)`, `b_quant(b)`,
    both at a bits: the second operand is an activation too).
    `a_nonneg` / `b_nonneg` record that the graph guarantees a non-negative operand
    (after ReLU, softmax, ...), which makes its quantizer unsigned.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        a_nonneg: bool = False,
        b_nonneg: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("conv2d", "linear", "matmul"):
            raise BitmixError(f"layer {name!r}: unsupported kind {kind!r}; expected conv2d, linear or matmul")
        if kind != "matmul" and weight is None:
            raise BitmixError(f"layer {name!r}: a {kind} layer needs a weight")
        self.name = name
        self.kind = kind
        self.bits: Precision | None = None
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        self.a_nonneg = a_nonneg
        self.b_nonneg = b_nonneg
        self.w_quant: nn.Module | None = None
        self.a_quant: nn.Module | None = None
        self.b_quant: nn.Module | None = None
        # per-input-channel activation multiplier of a smoothed linear (`bitmix.compiler.smooth`)
        self.register_buffer("a_scale", None)
        # +-1 vector of a linear whose input is Hadamard-rotated (`bitmix.compiler.rotate`)
        self.register_buffer("rotation_signs", None)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation as this layer quantizes it: rotated (`bitmix.compiler.rotate`), then smoothed."""
        if self.rotation_signs is not None:
            x = rotate_input(x, self.rotation_signs)
        if self.a_scale is not None:
            x = x * self.a_scale
        return x

    @property
    def input_nonneg(self) -> bool:
        """The graph guarantees a non-negative quantized input (a rotation makes any input signed)."""
        return self.a_nonneg and self.rotation_signs is None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind}, bits={self.bits}"

    @property
    def w_bits(self) -> int | None:
        return None if self.bits is None else self.bits.w

    @property
    def a_bits(self) -> int | None:
        return None if self.bits is None else self.bits.a

    def set_bits(self, bits: PrecisionLike | None, a_signed: bool | None = None, b_signed: bool | None = None
                 ) -> None:
        """Switch precision (a pair, or an int b for b/b); new quantizers start uninitialised except the weight step.

        Activation signedness defaults to "signed unless the graph proves the operand
        non-negative"; pass `a_signed` / `b_signed` to override (e.g. from calibration).
        """
        if bits is None:
            self.bits = None
            self.w_quant = self.a_quant = self.b_quant = None
            return
        p = self.bits = chip_precision(bits, f"layer {self.name!r}: precision")
        a_signed = (not self.input_nonneg) if a_signed is None else a_signed
        per_row = row_steps(self.kind, p)
        # mid-rise only for linears: a conv's zero padding has no code on that grid, and a matmul's second
        # operand would add an input-dependent cross term
        self.a_quant = LSQQuantizer(p.a, a_signed, axis=-1 if per_row else None, midrise=self.kind == "linear")
        if self.kind == "matmul":
            b_signed = (not self.b_nonneg) if b_signed is None else b_signed
            self.b_quant = LSQQuantizer(p.a, b_signed, axis=-2 if per_row else None)
            self.w_quant = None
            return
        assert self.weight is not None
        self.w_quant = LSQQuantizer(p.w, signed=True, channels=self.weight.shape[0])
        self.w_quant.init_range(self.weight)
        self.b_quant = None

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        quantized = self.bits is not None
        if quantized and not self.training and not torch.is_grad_enabled() and self._initialized():
            return self.integer_forward(x, other)
        if self.kind == "matmul":
            assert other is not None
            if quantized:
                assert self.a_quant is not None and self.b_quant is not None
                x, other = self.a_quant(x), self.b_quant(other)
            return torch.matmul(x, other)
        assert self.weight is not None
        weight = self.weight
        x = self.prepare_input(x)
        if quantized:
            assert self.a_quant is not None and self.w_quant is not None
            x, weight = self.a_quant(x), self.w_quant(weight)
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


    def _initialized(self) -> bool:
        """The integer path needs plain LSQ quantizers with steps set (not e.g. LIMPQ's multi-step ones)."""
        quantizers = [q for q in (self.a_quant, self.b_quant, self.w_quant) if q is not None]
        return all(type(q) is LSQQuantizer and bool(q.initialized) for q in quantizers)

    @torch.no_grad()
    def integer_forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """Inference as the kernels compute it: exact integer accumulation, then one float32 rescale.

        Products of codes are summed exactly (in float64, or float32 chunks for convs: `exact_conv`),
        then cast to float32 and scaled by `a_step * w_step` (+ bias) in the same order as
        `bitmix.kernels.qlinear` / `qconv2d`, so fake-quant inference and the packed
        kernels produce bit-identical outputs and the same accuracy.
        """
        assert self.a_quant is not None
        x, other = x.float(), None if other is None else other.float()  # the kernels read float64 as float32
        if self.kind != "matmul":
            x = self.prepare_input(x)
        _check_quantizable(x, self.a_quant, self.name)
        a_step = self.a_quant.step_for(x).detach().float()
        a = self.a_quant.codes(x)
        if self.kind == "matmul":
            assert other is not None and self.b_quant is not None
            acc = exact_matmul(a, self.b_quant.codes(other))
            return acc * (a_step * self.b_quant.step_for(other).detach().float())
        assert self.weight is not None and self.w_quant is not None
        w = self.weight_codes()
        w_step = self.w_quant.step.detach().float()
        if self.kind == "linear":
            if self.a_quant.axis is not None:  # (acc * w_step) * row step: the lowered layer's order
                out = exact_matmul(a, w.t()) * w_step * a_step
            else:
                out = exact_matmul(a, w.t()) * (a_step * w_step)
            bias = self.folded_bias(w)
            return out + bias if bias is not None else out
        scale = a_step * w_step
        # contiguous as the lowered conv hands it on: a channels-last-strided input (a transposed sequence under
        # a conv1d's unit height) makes torch's conv return channels-last, and elementwise ops after it then
        # round in another order
        out = exact_conv(a.float(), w.float(), self.stride, self.padding, self.dilation, self.groups).contiguous()
        out = out * scale.reshape(1, -1, 1, 1)
        return out + self.bias.detach().float().reshape(1, -1, 1, 1) if self.bias is not None else out

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """`w_quant.codes(weight)`, computed once per weight and step: every in-place change (an optimizer
        step, `copy_`, `set_step`) bumps a tensor's version, a new weight or quantizer misses the cache, and
        the float64 sums catch writes through `.data` (which bypass the version counter)."""
        assert self.weight is not None and self.w_quant is not None
        w, q = self.weight, self.w_quant
        sums = [float(torch.sum(t.detach(), dtype=torch.float64)) for t in (w, q.step)]
        key = (w.data_ptr(), w._version, q.step._version, q.midrise._version, *sums)
        cached = _WEIGHT_CODES.get(q)
        if cached is None or cached[0] is not w or cached[1] != key:
            cached = (w, key, q.codes(w))
            _WEIGHT_CODES[q] = cached
        return cached[2]

    @torch.no_grad()
    def folded_bias(self, w_codes: torch.Tensor | None = None) -> torch.Tensor | None:
        """The float32 bias the kernel adds: the layer's, plus on a mid-rise input grid the half step's
        product with the quantized weights, `(step / 2 * w_step) * Σ_k w_codes[:, k]` per output channel
        (`w_codes`: the weight's codes when the caller has them already)."""
        bias = self.bias.detach().float() if self.bias is not None else None
        half = self.a_quant.half_step() if isinstance(self.a_quant, LSQQuantizer) else None
        if half is None or self.weight is None or self.w_quant is None:
            return bias
        codes = self.weight_codes() if w_codes is None else w_codes
        sums = codes.reshape(self.weight.shape[0], -1).sum(dim=1).float()
        shift = (half * self.w_quant.step.detach().float()) * sums
        return shift if bias is None else bias + shift


def _check_quantizable(x: torch.Tensor, quant: LSQQuantizer, name: str) -> None:
    """The kernels' refusal, word for word: NaN has no code, and a row's step from an infinite max is NaN.

    A NaN or Inf anywhere makes the sum non-finite, so a finite sum clears the input in one read (15-30x
    cheaper than the elementwise masks, which took ~25 % of a MiniLM integer forward); only a non-finite
    sum (or one that overflowed) looks element by element."""
    if bool(torch.isfinite(x.sum())):
        return
    if quant.axis is not None and not bool(torch.isfinite(x).all()):
        raise layer_input_error(name, BitmixError(
            "x: contains NaN or Inf (a row's step from its max); cannot quantize"))
    if bool(torch.isnan(x).any()):
        raise layer_input_error(name, BitmixError("x: contains NaN; cannot quantize"))


def layer_input_error(name: str, error: BitmixError) -> BitmixError:
    """A kernel's refusal of its operand ``x`` ("x: contains NaN; ...") as one about layer ``name``'s input: the
    kernel's argument is no input of the user's model, and the NaN may come from any op before the layer."""
    text = str(error)
    if not text.startswith("x: contains NaN"):
        return error
    return BitmixError(f"the input of layer {name!r}{text[2:]}; look for NaN or Inf in the model's inputs, "
                       "or made by the ops before that layer")


def exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of integer codes (held in float), exactly, cast to float32 once at the end.

    As `exact_conv`: float32 sums integers exactly while every partial sum stays below 2^24, so the
    reduction runs in float32 chunks within that bound, summed in float64 (one chunk covers 4-bit
    weights up to K = 9400 and 8/8 up to K = 1040). It replaces a float64 matmul, which torch runs
    several times slower than float32; above the bound, or when the user has let float32 matmuls run
    in a narrower type, it falls back to float64."""
    per_term = float(a.abs().amax()) * float(b.abs().amax()) if a.numel() and b.numel() else 0.0
    k = a.shape[-1]
    if per_term > EXACT_F32 or _reduced_precision_matmul():
        return torch.matmul(a.double(), b.double()).float()
    chunk = k if per_term == 0 else max(1, min(k, int(EXACT_F32 // per_term)))
    a32, b32 = a.float(), b.float()
    if chunk >= k:
        return torch.matmul(a32, b32)
    out = torch.matmul(a32[..., :chunk], b32[..., :chunk, :]).double()
    for start in range(chunk, k, chunk):
        out += torch.matmul(a32[..., start:start + chunk], b32[..., start:start + chunk, :]).double()
    return out.float()


def exact_conv(a: torch.Tensor, w: torch.Tensor, stride: tuple[int, ...], padding: tuple[int, ...] | str,
               dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """conv2d of integer codes (held in float32), exactly, cast to float32 once at the end.

    float32 adds integers exactly while every partial sum stays below 2^24, whatever the order, so
    input channels are taken in chunks small enough for that (|a|·|w| per tap, times taps per
    channel) and the chunks are summed in float64 (a single channel over the bound, or a narrower
    oneDNN float32 setting, falls back to a float64 conv). One chunk covers every 2- and 4-bit conv
    and depthwise ones; a float64 conv instead runs torch's slow non-oneDNN path (a MobileNetV2 int8
    compile spent 64 s in it at load 7, cProfile 2026-12-02)."""
    if a.numel() == 0 or w.numel() == 0:  # an empty batch: nothing to sum, as torch's conv
        return F.conv2d(a, w, None, stride, padding, dilation, groups)
    per_channel = float(a.abs().amax()) * float(w.abs().amax()) * w.shape[2] * w.shape[3]
    in_per_group = w.shape[1]
    if per_channel > EXACT_F32 or _reduced_precision_conv():
        return F.conv2d(a.double(), w.double(), None, stride, padding, dilation, groups).float()
    chunk = in_per_group if per_channel == 0 else max(1, min(in_per_group, int(EXACT_F32 // per_channel)))
    if chunk == in_per_group:
        return F.conv2d(a, w, None, stride, padding, dilation, groups)
    n, _, h, width = a.shape
    grouped = a.reshape(n, groups, in_per_group, h, width)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, in_per_group, chunk):
        part = grouped[:, :, start:start + chunk].reshape(n, -1, h, width)
        total = total + F.conv2d(part, w[:, start:start + chunk], None, stride, padding, dilation, groups).double()
    return total.float()


def _reduced_precision_matmul() -> bool:
    """Whether the user let float32 matmuls run in a narrower type (TF32/bf16: then float32 is not exact)."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return (torch.get_float32_matmul_precision() != "highest"
            or getattr(matmul, "fp32_precision", "none") not in ("none", "ieee"))


def _reduced_precision_conv() -> bool:
    """Whether the user let oneDNN run float32 convs in a narrower type (then float32 is not exact)."""
    conv = getattr(torch.backends.mkldnn, "conv", None)
    return getattr(conv, "fp32_precision", "none") not in ("none", "ieee")


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Every `QuantLayer` of a prepared model, keyed by layer name, in registration order."""
    return {m.name: m for m in model.modules() if isinstance(m, QuantLayer)}


def fixed_batch(model: nn.Module) -> int | None:
    """The only batch a prepared model runs, if it was exported with static shapes (`fold.prepare`)."""
    return getattr(model, "bitmix_fixed_batch", None)


def forget_weight_codes(model: nn.Module) -> None:
    """Drop the cached weight codes of `model`'s layers (`QuantLayer.weight_codes`): an int32 copy of every
    quantized weight, which a compiled model's `fake_quant` otherwise kept beside its float weights for good.
    The next integer forward pass computes them again (the same codes)."""
    for layer in quant_layers(model).values():
        if layer.w_quant is not None:
            _WEIGHT_CODES.pop(layer.w_quant, None)
