"""The finetuning objective: L1 to HR, distillation from the FP teacher, recipe-declared extra losses.

    loss = l1_weight * |S(x) - HR|_1 + distill_weight * |S(x) - T(x)|_1
         + feature_distill_weight * mean over converted body layers of |f_S - f_T|_1 / mean|f_T|
         + sum over recipe.train.extra_losses of weight * extra(model)

``f_S`` / ``f_T`` are the outputs of each converted layer of the student and of the FP layer with the same
module name in the teacher (both models keep the original module names), normalised by the teacher
feature's mean magnitude so that layers of any scale weigh alike. Extra losses are looked up by name in
`EXTRA_LOSSES` (``sqcl``: FQSR's quantization calibration loss) or given as ``package.module:function``;
each takes the model right after its training forward and returns a scalar.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SrbinarizeError

# name -> "module:function"; the function gets the student model after its forward pass.
EXTRA_LOSSES: dict[str, str] = {
    "sqcl": "srbinarize.layers.fqsr:sqcl_loss",
}


class LossError(SrbinarizeError):
    """An extra loss the recipe declares that cannot be found."""


def resolve_extra_loss(name: str) -> Callable[[nn.Module], torch.Tensor]:
    target = EXTRA_LOSSES.get(name, name)
    module_name, _, func_name = target.partition(":")
    if not func_name:
        raise LossError(f"unknown extra loss '{name}': known {sorted(EXTRA_LOSSES)}, or give 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise LossError(f"extra loss '{name}' -> {target}: {err}") from None


class FeatureTap:
    """Records the outputs of named modules during forward passes (forward hooks)."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise LossError(f"feature distillation: no module named {missing[:3]} in {type(model).__name__}")
        self.features: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(_module, _inputs, output):
            self.features[name] = output

        return fn

    def clear(self) -> None:
        self.features = {}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Objective:
    """Computes the weighted loss of one step and its parts (for the log)."""

    l1_weight: float = 1.0
    distill_weight: float = 1.0
    feature_distill_weight: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    student_tap: FeatureTap | None = None
    teacher_tap: FeatureTap | None = None

    def __post_init__(self) -> None:
        self.extra_fns = {name: resolve_extra_loss(name) for name, w in self.extra.items() if w}

    @property
    def needs_teacher(self) -> bool:
        return bool(self.distill_weight or self.feature_distill_weight)

    def __call__(
        self, student: nn.Module, sr: torch.Tensor, hr: torch.Tensor, teacher_sr: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        parts: dict[str, torch.Tensor] = {}
        if self.l1_weight:
            parts["l1"] = self.l1_weight * F.l1_loss(sr, hr)
        if self.distill_weight and teacher_sr is not None:
            parts["distill"] = self.distill_weight * F.l1_loss(sr, teacher_sr)
        if self.feature_distill_weight and self.student_tap and self.teacher_tap:
            terms = []
            for name, fs in self.student_tap.features.items():
                ft = self.teacher_tap.features[name].detach()
                terms.append(F.l1_loss(fs, ft) / ft.abs().mean().clamp_min(1e-6))
            if terms:
                parts["feature"] = self.feature_distill_weight * torch.stack(terms).mean()
        for name, fn in self.extra_fns.items():
            parts[name] = self.extra[name] * fn(student)
        if not parts:
            raise LossError("every loss weight is 0: nothing to train")
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}
