"""The copy of the user's model that bitmix exports: deep-copied, in eval mode, parametrized weights baked.

`compile` never touches the user's model, so everything below edits the copy only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


def frozen_copy(model: nn.Module) -> nn.Module:
    """`model` deep-copied, in eval mode, with weight / spectral norm baked to plain parameters."""
    return _bake_parametrizations(_deep_copy(model).eval())


def _deep_copy(model: nn.Module) -> nn.Module:
    """A deep copy, also of a model whose hook-based weight / spectral norm keeps its computed weight as a
    non-leaf tensor attribute (which `copy.deepcopy` refuses, torch PR 103001): those are copied detached."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            value = getattr(module, hook.name, None) if isinstance(hook, WeightNorm | SpectralNorm) else None
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _bake_parametrizations(model: nn.Module) -> nn.Module:
    """`model` (a copy) with every weight computed from other parameters made a plain parameter of its value.

    Weight norm, spectral norm and other `torch.nn.utils.parametrize` parametrizations (and the older hook-based
    `weight_norm`) compute a layer's weight in the forward pass; exported as-is the weight is an op's output,
    not a parameter, so the layer could not be quantized (a linear stayed FP32 without even a report).
    In eval mode the computed value is fixed: the layer is that weight."""
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
            if isinstance(hook, WeightNorm | SpectralNorm):
                with torch.no_grad():
                    value = (hook.compute_weight(module, do_power_iteration=False) if isinstance(hook, SpectralNorm)
                             else hook.compute_weight(module)).detach().clone()
                del module._forward_pre_hooks[key]
                for suffix in ("_g", "_v", "_orig", "_u"):
                    if hasattr(module, hook.name + suffix):
                        delattr(module, hook.name + suffix)
                if hasattr(module, hook.name):
                    delattr(module, hook.name)
                module.register_parameter(hook.name, nn.Parameter(value))
    return model
