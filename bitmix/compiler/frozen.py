"""The copy of the user's model that bitmix exports: its modules and buffers deep-copied, in eval mode,
parametrized weights baked; its parameters shared with the user's model.

`compile` never touches the user's model, so everything below edits the copy only. The parameters are the
user's own tensors, never written: the exported program reads them, and every module bitmix changes or
trains is a deep copy of it (`fold.prepare`), so a second copy of every weight held for the whole compile
and by the compiled model (`cm.graph.exported`) bought nothing (an 8192 x 8192 Linear: 268 MB more).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


def frozen_copy(model: nn.Module) -> nn.Module:
    """`model` deep-copied but for its parameters (the same tensors), in eval mode, with weight / spectral norm
    and pruning masks baked into plain parameters (new ones: the user's stay as they are)."""
    return _bake_parametrizations(_deep_copy(model).eval())


TRAIN_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.modules.dropout._DropoutNd)


def train_mode_modules(model: nn.Module) -> list[str]:
    """Submodules left in training mode whose output depends on it (BatchNorm, InstanceNorm, dropout): the
    frozen copy computes what `model.eval()` would, which such a model does not compute now."""
    return [f"{name} ({type(m).__name__})" if name else type(m).__name__ for name, m in model.named_modules()
            if m.training and isinstance(m, TRAIN_DEPENDENT)]


def _deep_copy(model: nn.Module) -> nn.Module:
    """A deep copy, also of a model whose hooks keep a computed weight as a non-leaf tensor attribute (hook-based
    weight / spectral norm, `torch.nn.utils.prune`), which `copy.deepcopy` refuses (torch PR 103001): those
    attributes are copied detached. Parameters are not copied (the module docstring)."""
    memo: dict[int, object] = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            name = _computed_name(hook)
            value = getattr(module, name, None) if name is not None else None
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _computed_name(hook: object) -> str | None:
    """The attribute a forward pre-hook computes (weight norm, spectral norm, pruning), or None."""
    if isinstance(hook, WeightNorm | SpectralNorm):
        return hook.name
    if isinstance(hook, prune.BasePruningMethod):
        return hook._tensor_name
    return None


def _computed_value(hook: object, module: nn.Module) -> torch.Tensor:
    """The eval-mode value of the attribute `hook` computes (no power iteration for spectral norm)."""
    with torch.no_grad():
        if isinstance(hook, SpectralNorm):
            return hook.compute_weight(module, do_power_iteration=False).detach().clone()
        if isinstance(hook, WeightNorm):
            return hook.compute_weight(module).detach().clone()
        assert isinstance(hook, prune.BasePruningMethod)
        return hook.apply_mask(module).detach().clone()


def _bake_parametrizations(model: nn.Module) -> nn.Module:
    """`model` (a copy) with every weight computed from other parameters made a plain parameter of its value.

    Weight norm, spectral norm and other `torch.nn.utils.parametrize` parametrizations, and the older hooks
    (weight / spectral norm, `torch.nn.utils.prune`'s masks) compute a layer's weight in the forward pass;
    exported as-is the weight is an op's output, not a parameter, so the layer could not be quantized (a linear
    stayed FP32 without even a report). In eval mode the computed value is fixed: the layer is that weight
    (a pruned one keeps its zeros)."""
    for module in list(model.modules()):  # a list: the loop edits the module tree
        if parametrize.is_parametrized(module):
            # not `parametrize.remove_parametrizations`: it deletes the property from the parametrized class,
            # which the copy shares with the user's model
            with torch.no_grad():
                values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
            del module.parametrizations
            module.__class__ = module.__class__.__bases__[0]
            for name, value in values.items():
                module.register_parameter(name, nn.Parameter(value))
        for key, hook in list(module._forward_pre_hooks.items()):
            name = _computed_name(hook)
            if name is None:
                continue
            value = _computed_value(hook, module)
            del module._forward_pre_hooks[key]
            for suffix in ("", "_g", "_v", "_orig", "_u", "_mask"):  # the hook's inputs and its last result
                if hasattr(module, name + suffix):
                    delattr(module, name + suffix)
            module.register_parameter(name, nn.Parameter(value))
    return model
