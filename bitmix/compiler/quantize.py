"""Fake quantization of a prepared model (PTQ ranges, bias correction) and LSQ fine-tuning.

`fake_quantize` sets every `QuantLayer`'s precision (`bitmix.compiler.qlayer`), its steps
(`bitmix.compiler.ranges`) and corrects biases (`bitmix.compiler.correct`); `finetune` is
LSQ quantization-aware training of the result.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler import ranges
from bitmix.compiler.digest import update_with_tensor
from bitmix.compiler.distill import LayerDistiller
from bitmix.compiler.equalize import equalize, pairs
from bitmix.compiler.progress import limit as _limit
from bitmix.compiler.progress import progress as _progress
from bitmix.compiler.qlayer import MIN_STEP, LSQQuantizer, QuantLayer, fixed_batch, forget_weight_codes, quant_layers
from bitmix.errors import BitmixError
from bitmix.ir.precision import PrecisionLike
from bitmix.task import TaskData

# digest of (graph, float state, calibration) -> (signs, live rows): the float passes of `_quantize`, which every
# assignment rotating the same layers shares (at int4int2-npu every one below 8 bits; at w4a8-npu every one)
_FLOAT_PASSES: dict[str, tuple[dict[str, tuple[bool, bool]], dict[str, torch.Tensor]]] = {}
FLOAT_PASSES_KEPT = 2  # a conv net's fake_quantize passes both its plain and its equalised copy


def fake_quantize(
    model: nn.Module,
    assignment: dict[str, PrecisionLike],
    calibration: tuple[torch.Tensor, ...] | None = None,
    bias_correction: bool = True,
    smoothing: bool = True,
    equalization: bool = True,
    rounding: bool = True,
    activation_search: bool = True,
    rotation: bool = True,
    share_float_passes: bool = False,
) -> torch.fx.GraphModule:
    """A new fake-quantized copy of a prepared model with per-layer `Precision` pairs from `assignment`
    (weight width for the weights, activation width for the inputs; an int b means b/b).

    `model` is a module prepared by `fold.prepare` (deep-copied, never changed). Layers missing from
    `assignment` stay float.
    Linears at 4-bit or narrower activations read their input through a fixed randomized Hadamard rotation
    folded into their weights (`bitmix.compiler.rotate`, the rule in `bitmix.ir.rotation`, which the
    simulator prices; `rotation=False` is for ablations only: the simulator still prices it).
    Weight steps are per-channel MSE steps (`bitmix.compiler.ranges`). With `calibration`,
    activation steps are MSE steps on its activations, then biases are corrected
    (`bitmix.compiler.correct`), after per-input-channel scales are migrated between linears' activations
    and weights (`bitmix.compiler.smooth`: SmoothQuant's where the weights are at least as wide as the
    activations, AWQ's where they are narrower; each layer only where it lowers its output error) and conv pairs are
    equalised (`bitmix.compiler.equalize`, kept only if the calibration output error drops) and, with
    `rounding`, weights are rounded by GPTQ (`bitmix.compiler.gptq`, each layer only where it lowers
    its held-out output error) and, with `activation_search`, the activation steps of linears whose weights
    are not the narrower operand are chosen by their output error (`bitmix.compiler.act_search`); without
    calibration,
    the data-free `2 E|v| / sqrt(Q_P)` for unit-Gaussian values (E|v| = sqrt(2/pi) signed,
    1/sqrt(2 pi) unsigned). `compile` calibrates on the examples.
    `share_float_passes` (studies: many assignments of one model) keeps the float calibration passes per process
    and reuses them where the rotated model and the inputs are the same (`float_passes`); a single compile does
    not pay for the digest.
    """
    if not isinstance(model, nn.Module):
        raise BitmixError("fake_quantize needs a module prepared by bitmix.compiler.fold.prepare(graph)")
    model = copy.deepcopy(model)
    layers = quant_layers(model)
    unknown = sorted(set(assignment) - set(layers))
    if unknown:
        raise BitmixError(f"assignment names unknown layer {unknown[0]!r}; valid layers: {', '.join(layers)}")
    if calibration is None:
        return _quantize(model, assignment, None, bias_correction, smoothing, rounding, activation_search, rotation,
                         share_float_passes)
    ranges.check_calibration(calibration)
    if not (equalization and isinstance(model, torch.fx.GraphModule) and pairs(model)):
        model = _quantize(model, assignment, calibration, bias_correction, smoothing, rounding, activation_search,
                          rotation, share_float_passes)
        forget_weight_codes(model)
        return model
    target = _float_output(model, calibration)
    options = (bias_correction, smoothing, rounding, activation_search, rotation, share_float_passes)
    plain = _quantize(copy.deepcopy(model), assignment, calibration, *options)
    equalize(model)
    equalized = _quantize(model, assignment, calibration, *options)
    errors = [float((_flat(m(*calibration)) - target).pow(2).sum()) for m in (plain, equalized)]
    best = equalized if errors[1] < errors[0] else plain
    forget_weight_codes(best)
    return best


def _quantize(model: nn.Module, assignment: dict[str, int], calibration: tuple[torch.Tensor, ...] | None,
              bias_correction: bool, smoothing: bool, rounding: bool, activation_search: bool, rotation: bool,
              share_float_passes: bool = False) -> torch.fx.GraphModule:
    """`fake_quantize` on a private copy, after the optional equalisation."""
    from bitmix.compiler.act_search import search_activation_steps
    from bitmix.compiler.correct import bias_correct, float_reference
    from bitmix.compiler.gptq import gptq_round
    from bitmix.compiler.rotate import rotate_linears
    from bitmix.compiler.smooth import smooth_linears

    layers = quant_layers(model)
    if rotation:
        rotate_linears(layers, assignment)
    signs, live = float_passes(model, layers, calibration, share_float_passes) if calibration is not None else ({}, {})
    if calibration is not None and smoothing:
        smooth_linears(model, layers, assignment, calibration, signs, live)
    reference = float_reference(model, calibration, live) if calibration is not None and bias_correction else None
    for name, layer in layers.items():
        a_signed, b_signed = signs.get(name, (None, None))
        layer.set_bits(assignment.get(name), a_signed=a_signed, b_signed=b_signed)
    if calibration is not None:
        with torch.no_grad():
            if activation_search:
                search_activation_steps(model, layers, calibration, live)
            else:
                model(*calibration)
        if rounding:
            gptq_round(model, layers, calibration, live)
        if reference is not None:
            bias_correct(model, reference, calibration, live)
    else:
        for layer in layers.values():
            for q in (layer.a_quant, layer.b_quant):
                if isinstance(q, LSQQuantizer):
                    q.init_gaussian()
    return model  # type: ignore[return-value]


def float_passes(model: nn.Module, layers: dict[str, QuantLayer], calibration: tuple[torch.Tensor, ...],
                 share: bool = False) -> tuple[dict[str, tuple[bool, bool]], dict[str, torch.Tensor]]:
    """(`calibration_signs`, `live_rows`) of the model as it is (rotated, not yet smoothed): two float passes
    (and a backward) that depend only on the graph, its tensors and the calibration inputs, so with `share` the
    last results are kept per process, keyed by a digest of those: a study's points (MiniLM: ~6 s each at load
    ~4) share them. Without it nothing is hashed or kept (the digest reads every weight: ~1 s a GB)."""
    from bitmix.compiler.live import live_rows

    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    if not share or not isinstance(model, torch.fx.GraphModule) or hooked:  # hooks: code the digest cannot see
        return calibration_signs(model, layers, calibration), live_rows(model, layers, calibration)
    key = _float_digest(model, layers, calibration)
    if key not in _FLOAT_PASSES:
        while len(_FLOAT_PASSES) >= FLOAT_PASSES_KEPT:
            del _FLOAT_PASSES[next(iter(_FLOAT_PASSES))]
        _FLOAT_PASSES[key] = (calibration_signs(model, layers, calibration), live_rows(model, layers, calibration))
    signs, live = _FLOAT_PASSES[key]
    return dict(signs), {name: mask.clone() for name, mask in live.items()}


def _float_digest(model: torch.fx.GraphModule, layers: dict[str, QuantLayer], calibration: tuple[torch.Tensor, ...]
                  ) -> str:
    """sha1 of what the float passes read: the graph's code, every parameter and buffer, the layers' kinds,
    precisions and graph-proven signs, the calibration inputs, the mode and torch's thread count."""
    digest = hashlib.sha1()
    meta = [model.code, model.training, torch.get_num_threads(), fixed_batch(model),
            [(n, m.kind, m.bits, m.a_nonneg, m.b_nonneg, m.training) for n, m in layers.items()]]
    digest.update(repr(meta).encode())
    named = [*model.named_parameters(), *model.named_buffers(), *((f"input{i}", t) for i, t in enumerate(calibration))]
    for name, t in named:
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.requires_grad}".encode())
        update_with_tensor(digest, t)
    return digest.hexdigest()


def _flat(out: object) -> torch.Tensor:
    from bitmix.compiler.correct import flat

    return flat(out)


@torch.no_grad()
def _float_output(model: nn.Module, calibration: tuple[torch.Tensor, ...]) -> torch.Tensor:
    layers = quant_layers(model)
    saved = {name: layer.bits for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.bits = None
        return _flat(model(*calibration))
    finally:
        for name, layer in layers.items():
            layer.bits = saved[name]


def calibration_signs(
    model: nn.Module, layers: dict[str, QuantLayer], calibration: tuple[torch.Tensor, ...]
) -> dict[str, tuple[bool, bool]]:
    """Per layer (a_signed, b_signed): signed unless the graph or the calibration shows v >= 0.

    A layer the forward pass never reaches (e.g. a pooler whose output the model drops) stays signed.
    """
    minima: dict[str, tuple[float, float]] = {}

    def hook(layer: QuantLayer, args: tuple) -> None:
        b_min = float(args[1].min()) if layer.kind == "matmul" else 0.0
        a = args[0] if layer.kind == "matmul" else layer.prepare_input(args[0])
        minima[layer.name] = (float(a.min()), b_min)

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
                batch = fixed_batch(model)
                if batch is not None and calibration and calibration[0].shape[:1] != (batch,):
                    raise BitmixError(
                        f"calibration inputs do not fit the model ({first[:160]}): it was captured with static "
                        f"shapes (batch {batch}), which its reshapes keep; compile with a dynamic batch (the "
                        f"default, or CompileOptions(dynamic_shapes=...)) or pass {batch} calibration examples"
                    ) from None
                raise BitmixError(f"calibration inputs do not fit the model ({first[:160]}); pass inputs shaped "
                                  "and typed like the example inputs") from None
    finally:
        for h in handles:
            h.remove()
        for name, layer in layers.items():
            layer.bits = saved[name]
    return {
        name: (not (layer.input_nonneg or a_min >= 0.0), not (layer.b_nonneg or b_min >= 0.0))
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
    step_lr: float | None = None,
    layer_distill: float = 0.0,
    step_lr_scale: float = 1.0,
    in_place: bool = False,
) -> nn.Module:
    """Quantization-aware fine-tuning of a copy of `model`; the input module is untouched (with `in_place`,
    `model` itself is trained: for a caller whose model is a fresh copy already).

    SGD (momentum 0.9) or Adam with a cosine learning-rate schedule over all steps.
    The loss is `data.loss` (cross-entropy, or 1 - cosine to FP32 outputs, which is
    already distillation); with a `teacher` on labeled data a KL term to the teacher's
    softmax (T = 1, weight 1, the LSQ+KD recipe) is added. Deterministic given `seed`
    at a fixed torch thread count. `max_batches` caps batches per epoch (fractional epochs).
    `step_lr` puts the LSQ steps on their own learning rate (LSQ's gradient scale still applies).
    `layer_distill` > 0 adds that weight times the layer-wise distillation loss to the float `teacher`
    (`bitmix.compiler.distill`); `step_lr_scale` multiplies Adam's per-step learning rates.
    """
    if epochs < 0 or lr <= 0:
        raise BitmixError(f"finetune needs epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    if optimizer not in ("sgd", "adam"):
        raise BitmixError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
    model = model if in_place else copy.deepcopy(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if epochs == 0 or not params:
        return model.eval()
    per_epoch = math.ceil(len(data.train) / batch_size)
    if max_batches is not None:
        per_epoch = min(per_epoch, max_batches)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if step_lr is not None:  # the steps on their own learning rate (training before EAGL, `pretrain.py`)
            steps = [p for n, p in named if n.endswith(".step")]
            groups = [{"params": [p for _, p in named if not any(p is q for q in steps)]}]
            groups += [{"params": steps, "lr": step_lr}] if steps else []
        else:
            groups = _adam_groups(model, params, lr, step_lr_scale) if optimizer == "adam" else [{"params": params}]
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(groups, lr=lr, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(groups, lr=lr)
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * per_epoch)
        kd = teacher is not None and data.metric == "top1"
        distiller = _distiller(model, teacher, layer_distill)
        model.train()
        with _progress(epochs, "fine-tune") as advance:
            for epoch in range(epochs):
                for inputs, targets in _limit(data.batches("train", batch_size, True, seed + epoch), per_epoch):
                    out, loss = _forward(model, inputs, targets, data, teacher, distiller, layer_distill)
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


def _distiller(model: nn.Module, teacher: nn.Module | None, weight: float) -> LayerDistiller | None:
    if weight <= 0:
        return None
    if teacher is None:
        raise BitmixError("layer distillation needs the float teacher model; pass teacher=")
    return LayerDistiller(model, teacher)


def _forward(model: nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, data: TaskData,
             teacher: nn.Module | None, distiller: LayerDistiller | None, weight: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output and its task loss, plus the layer-wise distillation term when asked."""
    if distiller is None:
        out = model(*inputs)
        return out, data.loss(out, targets)
    assert teacher is not None
    with distiller.recording():
        distiller.teach(*inputs)
        out = model(*inputs)
        return out, data.loss(out, targets) + weight * distiller.loss()


def _adam_groups(model: nn.Module, params: list[nn.Parameter], lr: float, scale: float = 1.0) -> list[dict]:
    """Adam moves every parameter ~lr per step whatever its gradient scale, which undoes LSQ's
    gradient scaling: a step of 0.004 (an 8-bit MSE range) went negative at lr 0.01. Each step
    size gets lr times its own magnitude instead."""
    steps = {id(q.step): q.step for q in model.modules() if isinstance(q, LSQQuantizer)}
    groups: list[dict] = [{"params": [p for p in params if id(p) not in steps]}]
    groups += [{"params": [s], "lr": scale * lr * float(s.detach().abs().mean())}
               for s in steps.values() if s.requires_grad]
    return groups


@torch.no_grad()
def _keep_steps_positive(model: nn.Module) -> None:
    for q in model.modules():
        if isinstance(q, LSQQuantizer):
            q.step.clamp_(min=MIN_STEP)
