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
- ``max_drop=DB``: layers are kept FP until the estimated drop is at most ``DB`` (with ``binary_share``
  too, only as far as the share allows).

The result's ``keep_fp`` goes to ``convert(model, recipe, keep_fp=[...])``, ``--set keep_fp=[...]``, or a
recipe file of its own (`write_mixed_recipe`) that ``--recipe`` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..recipe import Recipe, load_recipe
from .sensitivity import SensitivityError, SensitivityReport

MEASURES = ("gain", "drop")


@dataclass
class MixedChoice:
    """The layers to keep FP and what the report predicts for the rest."""

    keep_fp: list[str]
    binary_share: float  # of the target roles' MACs, after keeping ``keep_fp`` FP
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
                f"{100 * self.binary_share:.1f}% of the body's MACs binary; "
                f"estimated drop {self.estimated_drop:.3f} dB\n"
                f"--set '{self.set_argument()}'")


def choose_keep_fp(
    report: SensitivityReport, binary_share: float | None = None, max_drop: float | None = None, by: str = "gain"
) -> MixedChoice:
    """The layers to keep FP so that ``binary_share`` / ``max_drop`` hold (see the module doc)."""
    if binary_share is None and max_drop is None:
        raise SensitivityError("give a target: binary_share (fraction of body MACs kept binary) and/or max_drop (dB)")
    if binary_share is not None and not 0 <= binary_share <= 1:
        raise SensitivityError(f"binary_share is a fraction of the body's MACs in [0, 1], got {binary_share}")
    if max_drop is not None and (max_drop < 0 or not math.isfinite(max_drop)):
        raise SensitivityError(f"max_drop is a non-negative PSNR drop in dB, got {max_drop}")
    if by not in MEASURES:
        raise SensitivityError(f"by must be one of {list(MEASURES)}, got {by!r}")
    target = ", ".join(f"{k} {v:g}" for k, v in (("binary share", binary_share), ("max drop", max_drop))
                       if v is not None)
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
    measured = [s for s in report.layers if math.isfinite(getattr(s, by))]
    drop = report.fp_psnr - report.converted_psnr if by == "gain" else sum(s.drop for s in measured)
    candidates = sorted((s for s in measured if getattr(s, by) > 0), key=lambda s: -getattr(s, by) / max(s.macs, 1))
    keep: list[str] = []
    for layer in candidates:
        if max_drop is not None and drop <= max_drop:
            break
        if layer.macs <= budget:
            keep.append(layer.name)
            budget -= layer.macs
            binary -= layer.macs
            drop -= getattr(layer, by)
    met = max_drop is None or drop <= max_drop
    return MixedChoice(keep, binary / total if total else 0.0, drop, met, target, by)


def write_mixed_recipe(recipe: str | Path | Recipe, choice: MixedChoice, path: str | Path,
                       **overrides: Any) -> Path:
    """A recipe file: ``recipe`` (with ``overrides``) whose ``targets.keep_fp`` is the choice's layers.

    Written under a temporary name, then renamed; `load_recipe` (and ``--recipe``) read it back.
    """
    mixed = load_recipe(recipe).with_overrides(**overrides, keep_fp=list(choice.keep_fp))
    data = mixed.to_dict()
    data["name"] = f"{mixed.name}-mixed"
    data["about"] = f"{mixed.about} Mixed precision: {choice.target} by {choice.by}, {len(choice.keep_fp)} layers FP."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"# Written by srbinarize.analysis.write_mixed_recipe: {choice.target}, "
                   f"{100 * choice.binary_share:.1f}% of the body's MACs binary.\n"
                   + yaml.safe_dump(data, sort_keys=False, width=110))
    tmp.replace(path)
    return path
