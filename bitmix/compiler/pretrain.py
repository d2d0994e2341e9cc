"""Training at the highest free choice before scoring: the regime EAGL's paper scores in.

Bablani et al. compute EAGL on a network already trained at the higher precision with LSQ
(shared/reference/methods.md §1.2 [R]); its learned steps are what make the code
distributions differ between layers. `train_at_highest` fake-quantizes a prepared model with
every free layer at `target.highest` (pinned layers at their bits), calibrates activation
steps, and fine-tunes it with a recipe (the zoo's `TaskData.recipe` by default), the steps on
their own learning rate and LSQ's gradient scale 1/sqrt(N·Q_P) (`bitmix.compiler.quantize`).

`cached_train_at_highest` memoises the result per (model weights, target, recipe, step lr,
seed), in memory (the last `MEMORY_ENTRIES`) and as a state_dict under the zoo cache directory. Disk, because every
method, budget and process (CLI compiles, study resumes) reuses it and on minilm it costs
minutes; a state_dict, because GraphModules do not pickle; keyed on the weights' content, so
a changed model can never hit a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bitmix.compiler.digest import update_with_tensor
from bitmix.compiler.quantize import fake_quantize, finetune
from bitmix.errors import BitmixError
from bitmix.ir.precision import Precision
from bitmix.ir.targets import Target
from bitmix.task import FinetuneConfig, TaskData

CACHE_VERSION = 5  # 2: smoothing scales (a_scale); 3: AWQ scales, Hadamard-rotated inputs (rotation_signs);
# 4: per-row activation steps (a step is a fraction of the row max); 5: mid-rise 2-bit activation grids
CALIBRATION = 128  # examples for the activation steps, as the pipeline uses


@dataclass(frozen=True)
class Pretrained:
    """The trained fake-quantized model, what it took and whether it came from the cache."""

    model: nn.Module
    assignment: dict[str, int]
    seconds: float
    cached: bool


def highest_assignment(layer_names: tuple[str, ...], target: Target) -> dict[str, Precision]:
    """Every free layer at the target's highest choice, pinned layers at their bits."""
    return {n: target.highest for n in layer_names} | target.pinned(layer_names)


def train_at_highest(
    prepared: nn.Module,
    layer_names: tuple[str, ...],
    target: Target,
    data: TaskData,
    recipe: FinetuneConfig | None = None,
    step_lr: float | None = None,
    seed: int = 0,
) -> nn.Module:
    """A trained copy of `prepared` at the highest choice (the input is not modified)."""
    recipe = recipe or data.recipe
    if recipe.epochs < 1:
        raise BitmixError(f"training at the highest choice needs >= 1 epoch, got {recipe.epochs}")
    assignment = highest_assignment(layer_names, target)
    fq = fake_quantize(prepared, assignment, data.calibration(CALIBRATION))
    return finetune(fq, data, recipe.epochs, recipe.lr_for(assignment), recipe.optimizer, seed=seed,
                    batch_size=recipe.batch_size, step_lr=step_lr,
                    teacher=prepared if recipe.layer_distill > 0 else None, layer_distill=recipe.layer_distill,
                    step_lr_scale=recipe.step_lr_scale)


# Trained models kept in memory, most recently used last: a process compiling many models (a server, a notebook)
# held every one it ever trained. Evicted ones reload from the disk copy every caller keeps.
MEMORY_ENTRIES = 2
_MEMORY: dict[str, nn.Module] = {}


def _recall(key: str) -> nn.Module | None:
    """The model in memory under ``key``, now the most recently used; None if not there."""
    model = _MEMORY.pop(key, None)
    if model is not None:
        _MEMORY[key] = model
    return model


def _remember(key: str, model: nn.Module) -> None:
    """Keep ``model`` under ``key``, dropping the least recently used beyond ``MEMORY_ENTRIES``."""
    _MEMORY.pop(key, None)
    _MEMORY[key] = model
    while len(_MEMORY) > MEMORY_ENTRIES:
        del _MEMORY[next(iter(_MEMORY))]


def cache_key(prepared: nn.Module, target: Target, recipe: FinetuneConfig, step_lr: float | None, seed: int,
              data: TaskData | None = None) -> str:
    """Content hash of everything that changes the trained model (the training split too: a study may
    train on a subset of the task's data)."""
    h = hashlib.sha1()
    for name, tensor in sorted(prepared.state_dict().items()):
        h.update(name.encode())
        update_with_tensor(h, tensor)
    if data is not None:
        for tensor in (*data.train.inputs, data.train.targets):
            update_with_tensor(h, tensor)
    meta = {"v": CACHE_VERSION, "target": [[_key(c) for c in target.choices], _key(target.pin_first_last)],
            "recipe": _recipe_key(recipe),
            "step_lr": step_lr, "seed": seed, "calibration": CALIBRATION}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _recipe_key(recipe: FinetuneConfig) -> dict:
    """The recipe's fields, those added later only when set (keys of caches written before stay valid)."""
    later = {"layer_distill": 0.0, "step_lr_scale": 1.0, "lr_8bit_activations": None}
    return {k: v for k, v in asdict(recipe).items() if k not in later or v != later[k]}


def _key(p: Precision | None) -> int | str | None:
    """b/b as the int b (keys of caches written before pairs stay valid), other pairs as "w/a"."""
    return p if p is None else (p.w if p == p.w else str(p))


def cached_train_at_highest(
    prepared: nn.Module,
    layer_names: tuple[str, ...],
    target: Target,
    data: TaskData,
    recipe: FinetuneConfig | None = None,
    step_lr: float | None = None,
    seed: int = 0,
    disk: bool = True,
) -> Pretrained:
    """`train_at_highest`, memoised in memory and (with `disk`) under `zoo.cache.cache_dir()/pretrain`."""
    from bitmix.zoo.cache import cache_dir

    recipe = recipe or data.recipe
    start = time.perf_counter()
    assignment = highest_assignment(layer_names, target)
    key = cache_key(prepared, target, recipe, step_lr, seed, data)
    remembered = _recall(key)
    if remembered is not None:
        return Pretrained(remembered, assignment, time.perf_counter() - start, True)
    path = cache_dir() / "pretrain" / f"{key}.pt"
    if disk and path.exists():
        model = fake_quantize(prepared, assignment, data.calibration(CALIBRATION))
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
        except RuntimeError:  # written by a bitmix whose quantized layers hold other state: train again
            path.unlink()
        else:
            _remember(key, model.eval())
            return Pretrained(model, assignment, time.perf_counter() - start, True)
    model = train_at_highest(prepared, layer_names, target, data, recipe, step_lr, seed)
    if disk:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    _remember(key, model)
    return Pretrained(model, assignment, time.perf_counter() - start, False)


def pretrain_stage(step_lr_scale: float | None, prepared: nn.Module, layer_names: tuple[str, ...], target: Target,
                   data: TaskData | None, seed: int) -> nn.Module | None:
    """The pipeline's hook: the model trained at the highest choice, when the method scores one
    (`MethodConfig.pretrain_step_lr_scale()` is not None) and there is data with a recipe."""
    if step_lr_scale is None or data is None or data.recipe.epochs < 1 or len(target.choices) == 1:
        return None  # one choice: nothing to score, so nothing to train for
    step_lr = data.recipe.lr * step_lr_scale
    return cached_train_at_highest(prepared, layer_names, target, data, step_lr=step_lr, seed=seed).model
