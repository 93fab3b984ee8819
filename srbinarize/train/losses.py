"""The finetuning objective: L1 to HR, distillation from the FP teacher, recipe-declared extra losses.

    loss = l1_weight * |S(x) - HR|_1 + distill_weight * |S(x) - T(x)|_1
         + feature_distill_weight * mean over converted body layers of |f_S - f_T|_1 / mean|f_T|
         + sum over recipe.train.extra_losses of weight * extra(model)

``f_S`` / ``f_T`` are the outputs of each converted layer of the student and of the FP layer with the same
module name in the teacher (both models keep the original module names), normalised by the teacher
feature's mean magnitude so that layers of any scale weigh alike. Extra losses are looked up by name in
`EXTRA_LOSSES` (``sqcl``: FQSR's quantization calibration loss); each takes the model right after its
training forward and returns a scalar. A recipe or run folder names a loss, it never names code: a new
loss is registered from Python (`register_extra_loss`) before the run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SrbinarizeError

# name -> the function (or "module:function" of this package, imported when used); it gets the student
# model after its forward pass.
EXTRA_LOSSES: dict[str, str | Callable[[nn.Module], torch.Tensor]] = {
    "sqcl": "srbinarize.layers.fqsr:sqcl_loss",
}


def register_extra_loss(name: str, loss: Callable[[nn.Module], torch.Tensor]) -> None:
    """Make ``name`` usable in ``train.extra_losses`` (recipes, ``--extra-loss``) for this process."""
    EXTRA_LOSSES[name] = loss


class LossError(SrbinarizeError):
    """An extra loss the recipe declares that cannot be found."""


def resolve_extra_loss(name: str) -> Callable[[nn.Module], torch.Tensor]:
    """The registered loss ``name``; anything else is refused (nothing named by a file is imported)."""
    target = EXTRA_LOSSES.get(name)
    if target is None:
        raise LossError(f"unknown extra loss '{name}': known {sorted(EXTRA_LOSSES)} (register others from Python "
                        "with srbinarize.train.losses.register_extra_loss)")
    if callable(target):
        return target
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


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
