"""LSQ fake quantization and quantization-aware fine-tuning.

Learned Step Size Quantization (Esser et al., ICLR 2020): a quantizer is
`v_hat = round(clip(v / s, -Q_N, Q_P)) * s` with a learnable step `s`, a
straight-through round, and the step's gradient scaled by `g = 1 / sqrt(N * Q_P)`.
`QuantLayer` (one per conv2d / linear / matmul of the captured graph, inserted by
`bitmix.compiler.fold.prepare`) applies one precision to its weights and its input
activations; with `bits=None` it is an exact float passthrough.

The forward pass and `LSQQuantizer.codes` divide by the same float32 step, so the
integer codes the lowering packs are exactly those the fake-quantized model used.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler import ranges
from bitmix.compiler.progress import limit as _limit
from bitmix.compiler.progress import progress as _progress
from bitmix.errors import BitmixError
from bitmix.task import TaskData

# E|v| for v ~ N(0, 1) (signed) and for relu(v) (unsigned): the data-free activation prior.
GAUSSIAN_ABS_MEAN = {True: math.sqrt(2.0 / math.pi), False: 1.0 / math.sqrt(2.0 * math.pi)}
MIN_STEP = ranges.MIN_STEP


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


class LSQQuantizer(nn.Module):
    """LSQ fake quantizer with one step per tensor (activations) or per output channel (weights).

    Unless a step was set before, the first forward pass sets it from the values it sees:
    the MSE-optimal step (`init_range`, `bitmix.compiler.ranges`), the post-training range
    the fine-tuning then starts from. `init_step` is LSQ's own `2 <|v|> / sqrt(Q_P)`.
    `bits` is this operand's width; a layer's weight and activation quantizers each have their own.
    """

    def __init__(self, bits: int, signed: bool, channels: int | None = None) -> None:
        super().__init__()
        if bits < 2:
            raise BitmixError(f"LSQ needs at least 2 bits, got {bits}")
        self.bits = bits
        self.signed = signed
        self.channels = channels
        self.q_n, self.q_p = qrange(bits, signed)
        self.step = nn.Parameter(torch.ones(channels if channels is not None else ()))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        kind = f"per-channel({self.channels})" if self.channels is not None else "per-tensor"
        return f"bits={self.bits}, signed={self.signed}, {kind}"

    @torch.no_grad()
    def init_step(self, v: torch.Tensor) -> None:
        """LSQ initialisation s0 = 2 <|v|> / sqrt(Q_P) from weights or a calibration batch."""
        if self.channels is not None:
            mean_abs = v.detach().abs().reshape(v.shape[0], -1).mean(dim=1)
        else:
            mean_abs = v.detach().abs().mean()
        self.set_step(2.0 * mean_abs / math.sqrt(self.q_p))

    @torch.no_grad()
    def init_range(self, v: torch.Tensor) -> None:
        """Post-training range: the step minimising the quantization MSE of `v` (per channel for weights);
        a signed activation turns unsigned where clipping its few negatives costs less (e.g. after GELU)."""
        if self.channels is not None:
            self.set_step(ranges.weight_steps(v, self.q_n, self.q_p))
            return
        self.signed, step = ranges.activation_range(v, self.bits, self.signed)
        self.q_n, self.q_p = qrange(self.bits, self.signed)
        self.set_step(step)

    @torch.no_grad()
    def init_gaussian(self) -> None:
        """Data-free activation step: assume unit-Gaussian values (ReLU'd if unsigned)."""
        self.set_step(torch.tensor(2.0 * GAUSSIAN_ABS_MEAN[self.signed] / math.sqrt(self.q_p)))

    @torch.no_grad()
    def set_step(self, step: torch.Tensor) -> None:
        self.step.copy_(step.clamp(min=MIN_STEP).to(self.step.dtype).reshape(self.step.shape))
        self.initialized.fill_(True)

    def elements_per_step(self, v: torch.Tensor) -> int:
        """N in the LSQ gradient scale: elements per channel, or features per example."""
        if self.channels is not None:
            return max(1, v.numel() // self.channels)
        return max(1, v[0].numel() if v.dim() > 1 else v.numel())

    def _step_for(self, v: torch.Tensor) -> torch.Tensor:
        if self.channels is not None:
            return self.step.reshape((-1,) + (1,) * (v.dim() - 1))
        return self.step

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_range(v)
        g = 1.0 / math.sqrt(self.elements_per_step(v) * self.q_p)
        s = _GradScale.apply(self._step_for(v), g)
        return _RoundSTE.apply(torch.clamp(v / s, -self.q_n, self.q_p)) * s

    @torch.no_grad()
    def codes(self, v: torch.Tensor) -> torch.Tensor:
        """Integer codes (int32) of `v`, computed in float32 exactly as the forward pass does."""
        s = self._step_for(v)
        return torch.round(torch.clamp(v.float() / s.float(), -self.q_n, self.q_p)).to(torch.int32)


class QuantLayer(nn.Module):
    """One quantizable op of the captured graph: conv2d, linear, or activation x activation matmul.

    `bits=None` runs the float op unchanged. With bits set, the op consumes
    `a_quant(x)` and `w_quant(weight)` (matmul: `a_quant(a)`, `b_quant(b)`).
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
        self.bits: int | None = None
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

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind}, bits={self.bits}"

    def set_bits(self, bits: int | None, a_signed: bool | None = None, b_signed: bool | None = None) -> None:
        """Switch precision; new quantizers start uninitialised except the weight step.

        Activation signedness defaults to "signed unless the graph proves the operand
        non-negative"; pass `a_signed` / `b_signed` to override (e.g. from calibration).
        """
        self.bits = bits
        if bits is None:
            self.w_quant = self.a_quant = self.b_quant = None
            return
        a_signed = (not self.a_nonneg) if a_signed is None else a_signed
        self.a_quant = LSQQuantizer(bits, a_signed)
        if self.kind == "matmul":
            b_signed = (not self.b_nonneg) if b_signed is None else b_signed
            self.b_quant = LSQQuantizer(bits, b_signed)
            self.w_quant = None
            return
        assert self.weight is not None
        self.w_quant = LSQQuantizer(bits, signed=True, channels=self.weight.shape[0])
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

        Products of codes are summed in float64, which is exact for any int32 accumulator,
        then cast to float32 and scaled by `a_step * w_step` (+ bias) in the same order as
        `bitmix.kernels.qlinear` / `qconv2d`, so fake-quant inference and the packed
        kernels produce bit-identical outputs and the same accuracy.
        """
        assert self.a_quant is not None
        a_step = self.a_quant.step.detach().float()
        a = self.a_quant.codes(x).double()
        if self.kind == "matmul":
            assert other is not None and self.b_quant is not None
            acc = torch.matmul(a, self.b_quant.codes(other).double()).float()
            return acc * (a_step * self.b_quant.step.detach().float())
        assert self.weight is not None and self.w_quant is not None
        w = self.w_quant.codes(self.weight).double()
        scale = a_step * self.w_quant.step.detach().float()
        if self.kind == "linear":
            out = F.linear(a, w).float() * scale
            return out + self.bias.detach().float() if self.bias is not None else out
        out = F.conv2d(a, w, None, self.stride, self.padding, self.dilation, self.groups).float()
        out = out * scale.reshape(1, -1, 1, 1)
        return out + self.bias.detach().float().reshape(1, -1, 1, 1) if self.bias is not None else out


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Every `QuantLayer` of a prepared model, keyed by layer name, in registration order."""
    return {m.name: m for m in model.modules() if isinstance(m, QuantLayer)}


def fake_quantize(
    graph_or_model: object,
    assignment: dict[str, int],
    calibration: tuple[torch.Tensor, ...] | None = None,
    bias_correction: bool = True,
) -> torch.fx.GraphModule:
    """A new fake-quantized copy of a prepared model with per-layer bits from `assignment`.

    `graph_or_model` is a `LayerGraph` (prepared here with `fold.prepare`) or an
    already prepared module (deep-copied). Layers missing from `assignment` stay float.
    Weight steps are per-channel MSE steps (`bitmix.compiler.ranges`). With `calibration`,
    activation steps are MSE steps on its activations, then biases are corrected
    (`bitmix.compiler.correct`); without, the data-free `2 E|v| / sqrt(Q_P)` for unit-Gaussian
    values (E|v| = sqrt(2/pi) signed, 1/sqrt(2 pi) unsigned). `compile` calibrates on the examples.
    """
    from bitmix.compiler.correct import bias_correct, float_reference
    from bitmix.compiler.fold import prepare
    from bitmix.ir.graph import LayerGraph

    if isinstance(graph_or_model, LayerGraph):
        model = prepare(graph_or_model)
    elif isinstance(graph_or_model, nn.Module):
        model = copy.deepcopy(graph_or_model)
    else:
        raise BitmixError("fake_quantize needs a LayerGraph or a module prepared by bitmix.compiler.fold.prepare")
    layers = quant_layers(model)
    unknown = sorted(set(assignment) - set(layers))
    if unknown:
        raise BitmixError(f"assignment names unknown layer {unknown[0]!r}; valid layers: {', '.join(layers)}")
    if calibration is not None:
        ranges.check_calibration(calibration)
    signs = calibration_signs(model, layers, calibration) if calibration is not None else {}
    reference = float_reference(model, calibration) if calibration is not None and bias_correction else None
    for name, layer in layers.items():
        a_signed, b_signed = signs.get(name, (None, None))
        layer.set_bits(assignment.get(name), a_signed=a_signed, b_signed=b_signed)
    if calibration is not None:
        with torch.no_grad():
            model(*calibration)
        if reference is not None:
            bias_correct(model, reference, calibration)
    else:
        for layer in layers.values():
            for q in (layer.a_quant, layer.b_quant):
                if isinstance(q, LSQQuantizer):
                    q.init_gaussian()
    return model


def calibration_signs(
    model: nn.Module, layers: dict[str, QuantLayer], calibration: tuple[torch.Tensor, ...]
) -> dict[str, tuple[bool, bool]]:
    """Per layer (a_signed, b_signed): signed unless the graph or the calibration shows v >= 0.

    A layer the forward pass never reaches (e.g. a pooler whose output the model drops) stays signed.
    """
    minima: dict[str, tuple[float, float]] = {}

    def hook(layer: QuantLayer, args: tuple) -> None:
        b_min = float(args[1].min()) if layer.kind == "matmul" else 0.0
        minima[layer.name] = (float(args[0].min()), b_min)

    saved = {name: layer.bits for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(hook) for layer in layers.values()]
    try:
        for layer in layers.values():
            layer.bits = None  # float pass: signs of the unquantized activations
        with torch.no_grad():
            try:
                model(*calibration)
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                raise BitmixError(f"calibration inputs do not fit the model ({first[:160]}); pass inputs shaped "
                                  "and typed like the example inputs") from None
    finally:
        for h in handles:
            h.remove()
        for name, layer in layers.items():
            layer.bits = saved[name]
    return {
        name: (not (layer.a_nonneg or a_min >= 0.0), not (layer.b_nonneg or b_min >= 0.0))
        for name, layer in layers.items()
        for a_min, b_min in [minima.get(name, (-1.0, -1.0))]
    }


def finetune(
    model: nn.Module,
    data: TaskData,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    seed: int = 0,
    batch_size: int = 64,
    teacher: nn.Module | None = None,
    max_batches: int | None = None,
) -> nn.Module:
    """Quantization-aware fine-tuning of a copy of `model`; the input module is untouched.

    SGD (momentum 0.9) or Adam with a cosine learning-rate schedule over all steps.
    The loss is `data.loss` (cross-entropy, or 1 - cosine to FP32 outputs, which is
    already distillation); with a `teacher` on labeled data a KL term to the teacher's
    softmax (T = 1, weight 1, the LSQ+KD recipe) is added. Deterministic given `seed`
    at a fixed torch thread count. `max_batches` caps batches per epoch (fractional epochs).
    """
    if epochs < 0 or lr <= 0:
        raise BitmixError(f"finetune needs epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    if optimizer not in ("sgd", "adam"):
        raise BitmixError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if epochs == 0 or not params:
        return model.eval()
    per_epoch = math.ceil(len(data.train) / batch_size)
    if max_batches is not None:
        per_epoch = min(per_epoch, max_batches)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(params, lr=lr, momentum=0.9)
            if optimizer == "sgd"
            else torch.optim.Adam(_adam_groups(model, params, lr), lr=lr)
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * per_epoch)
        kd = teacher is not None and data.metric == "top1"
        model.train()
        with _progress(epochs, "fine-tune") as advance:
            for epoch in range(epochs):
                for inputs, targets in _limit(data.batches("train", batch_size, True, seed + epoch), per_epoch):
                    out = model(*inputs)
                    loss = data.loss(out, targets)
                    if kd:
                        assert teacher is not None
                        with torch.no_grad():
                            soft = F.softmax(teacher(*inputs), dim=-1)
                        loss = loss + F.kl_div(F.log_softmax(out, dim=-1), soft, reduction="batchmean")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    _keep_steps_positive(model)
                advance()
    return model.eval()


def _adam_groups(model: nn.Module, params: list[nn.Parameter], lr: float) -> list[dict]:
    """Adam moves every parameter ~lr per step whatever its gradient scale, which undoes LSQ's
    gradient scaling: a step of 0.004 (an 8-bit MSE range) went negative at lr 0.01. Each step
    size gets lr times its own magnitude instead."""
    steps = {id(q.step): q.step for q in model.modules() if isinstance(q, LSQQuantizer)}
    groups: list[dict] = [{"params": [p for p in params if id(p) not in steps]}]
    groups += [{"params": [s], "lr": lr * float(s.detach().abs().mean())} for s in steps.values() if s.requires_grad]
    return groups


@torch.no_grad()
def _keep_steps_positive(model: nn.Module) -> None:
    for q in model.modules():
        if isinstance(q, LSQQuantizer):
            q.step.clamp_(min=MIN_STEP)
