"""Mixed precision from a sensitivity report: which layers to keep FP for a target.

The choice is additive in one of the report's two per-layer measures (``by``):

- ``"gain"`` (default): keeping a set of layers FP in the full conversion regains the sum of their
  leave-one-out gains; the estimated drop is the full conversion's drop minus that sum;
- ``"drop"``: converting a set of layers costs the sum of their single-layer drops (each layer converted
  alone in the FP model); the estimated drop is that sum over the layers left converted.

Neither is exact (layers interact; the report prints the sum of single drops next to the measured drop of
the full conversion, so one can see how far additivity holds). Keeping a layer FP buys back its measure
and costs its MACs; layers are taken in order of measure per MAC (the greedy rule for this knapsack),
skipping those that no longer fit.

- ``binary_share=P``: at least ``P`` of the MACs of the recipe's target roles (the body) stay binary;
  within that, as many layers as fit are kept FP.
- ``target_speedup=X``: the model's modelled speed-up (the summary's OPs before over after: BOPs/64 + FLOPs)
  stays at least ``X``; within that, as many layers as fit are kept FP.
- ``max_drop=DB``: layers are kept FP until the estimated drop is at most ``DB`` (with a share or speed-up
  target too, only as far as those allow).

The result's ``keep_fp`` goes to ``convert(model, recipe, keep_fp=[...])``, ``--set keep_fp=[...]``, or a
recipe file of its own (`write_mixed_recipe`) that ``--recipe`` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_text_atomic
from ..recipe import Recipe, load_recipe
from .sensitivity import SensitivityError, SensitivityReport

MEASURES = ("gain", "drop")


@dataclass
class MixedChoice:
    """The layers to keep FP and what the report predicts for the rest."""

    keep_fp: list[str]
    binary_share: float  # of the target roles' MACs, after keeping ``keep_fp`` FP
    speedup: float  # modelled: the model's FP OPs over its OPs after the mixed conversion
    estimated_drop: float  # dB below FP, by the additive model of ``by``
    met: bool  # both targets reached (by the estimate)
    target: str  # the targets asked for, in words
    by: str = "gain"

    def set_argument(self) -> str:
        """The recipe override, as ``--set`` takes it."""
        return "keep_fp=[" + ", ".join(self.keep_fp) + "]"

    def __str__(self) -> str:
        state = "met" if self.met else "NOT met"
        return (f"{self.target} ({state}, by {self.by}): keep {len(self.keep_fp)} layers FP; "
                f"{100 * self.binary_share:.1f}% of the body's MACs binary, modelled speed-up {self.speedup:.2f}x; "
                f"estimated drop {self.estimated_drop:.3f} dB\n"
                f"--set '{self.set_argument()}'")


def choose_keep_fp(
    report: SensitivityReport,
    binary_share: float | None = None,
    max_drop: float | None = None,
    by: str = "gain",
    target_speedup: float | None = None,
) -> MixedChoice:
    """The layers to keep FP so that ``binary_share`` / ``target_speedup`` / ``max_drop`` hold (module doc)."""
    if binary_share is None and max_drop is None and target_speedup is None:
        raise SensitivityError("give a target: binary_share (fraction of body MACs kept binary), target_speedup "
                               "(modelled OPs ratio) and/or max_drop (dB)")
    if binary_share is not None and not 0 <= binary_share <= 1:
        raise SensitivityError(f"binary_share is a fraction of the body's MACs in [0, 1], got {binary_share}")
    if target_speedup is not None and not (target_speedup > 0 and math.isfinite(target_speedup)):
        raise SensitivityError(f"target_speedup is a positive ratio of OPs, got {target_speedup}")
    if max_drop is not None and (max_drop < 0 or not math.isfinite(max_drop)):
        raise SensitivityError(f"max_drop is a non-negative PSNR drop in dB, got {max_drop}")
    if by not in MEASURES:
        raise SensitivityError(f"by must be one of {list(MEASURES)}, got {by!r}")
    asked = (("binary share", binary_share), ("target speed-up", target_speedup), ("max drop", max_drop))
    target = ", ".join(f"{k} {v:g}" for k, v in asked if v is not None)
    total = report.target_macs
    binary = report.binary_macs
    # Whole MACs, the share's product rounded up (a relative 1e-12 forgives 0.6 * 5 = 3.0000000000000004).
    required = 0 if binary_share is None else math.ceil(binary_share * total * (1 - 1e-12))
    if binary < required:
        raise SensitivityError(
            f"{report.model}: recipe {report.recipe} converts {100 * binary / max(total, 1):.1f}% of the body's MACs "
            f"even with no layer kept FP, below the binary share {100 * binary_share:.1f}% asked for"
        )
    budget = math.inf if binary_share is None else binary - required
    # OPs of the model: FP MACs of what stays FP, BOPs/64 + FLOPs of what is converted (the summary's counts).
    ops = report.total_macs - binary + sum(s.ops for s in report.layers)
    ops_budget = math.inf
    if target_speedup is not None:
        ops_budget = report.total_macs / target_speedup - ops
        if ops_budget < 0:
            raise SensitivityError(
                f"{report.model}: recipe {report.recipe} reaches a modelled speed-up of "
                f"{report.total_macs / ops:.2f}x even with no layer kept FP, below the {target_speedup:g}x asked for"
            )
    measured = [s for s in report.layers if math.isfinite(getattr(s, by))]
    drop = report.fp_psnr - report.converted_psnr if by == "gain" else sum(s.drop for s in measured)
    candidates = sorted((s for s in measured if getattr(s, by) > 0), key=lambda s: -getattr(s, by) / max(s.macs, 1))
    keep: list[str] = []
    for layer in candidates:
        if max_drop is not None and drop <= max_drop:
            break
        extra_ops = layer.macs - layer.ops  # what keeping it FP adds to the model's OPs
        if layer.macs <= budget and extra_ops <= ops_budget:
            keep.append(layer.name)
            budget -= layer.macs
            ops_budget -= extra_ops
            binary -= layer.macs
            ops += extra_ops
            drop -= getattr(layer, by)
    met = max_drop is None or drop <= max_drop
    return MixedChoice(keep, binary / total if total else 0.0, report.total_macs / ops, drop, met, target, by)


def write_mixed_recipe(recipe: str | Path | Recipe, choice: MixedChoice, path: str | Path,
                       **overrides: Any) -> Path:
    """A recipe file: ``recipe`` (with ``overrides``) whose ``targets.keep_fp`` is the choice's layers.

    Written under a temporary name, then renamed; `load_recipe` (and ``--recipe``) read it back.
    """
    mixed = load_recipe(recipe).with_overrides(**overrides, keep_fp=list(choice.keep_fp))
    data = mixed.to_dict()
    data["name"] = f"{mixed.name}-mixed"
    data["about"] = f"{mixed.about} Mixed precision: {choice.target} by {choice.by}, {len(choice.keep_fp)} layers FP."
    return write_text_atomic(path, f"# Written by srbinarize.analysis.write_mixed_recipe: {choice.target}, "
                             f"{100 * choice.binary_share:.1f}% of the body's MACs binary.\n"
                             + yaml.safe_dump(data, sort_keys=False, width=110))
