"""Mixed precision from a sensitivity report: which layers to keep FP for a target.

The model of the choice is additive: converting a set of layers is taken to cost the sum of their
single-layer drops (the report prints that sum next to the measured drop of the full conversion, so one
can see how far it holds). Keeping a layer FP buys back its drop and costs its MACs; layers are taken in
order of drop per MAC (the greedy rule for this knapsack), skipping those that no longer fit.

- ``binary_share=P``: at least ``P`` of the MACs of the recipe's target roles (the body) stay binary;
  within that, as many sensitive layers as fit are kept FP.
- ``max_drop=DB``: layers are kept FP until the estimated drop is at most ``DB`` (with ``binary_share``
  too, only as far as the share allows).

The result's ``keep_fp`` goes to ``convert(model, recipe, keep_fp=[...])`` or ``--set keep_fp=[...]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .sensitivity import SensitivityError, SensitivityReport


@dataclass
class MixedChoice:
    """The layers to keep FP and what the report predicts for the rest."""

    keep_fp: list[str]
    binary_share: float  # of the target roles' MACs, after keeping ``keep_fp`` FP
    estimated_drop: float  # sum of the single-layer drops of the layers left converted (dB)
    met: bool  # both targets reached
    target: str  # the targets asked for, in words

    def set_argument(self) -> str:
        """The recipe override, as ``--set`` takes it."""
        return "keep_fp=[" + ", ".join(self.keep_fp) + "]"

    def __str__(self) -> str:
        state = "met" if self.met else "NOT met"
        return (f"{self.target} ({state}): keep {len(self.keep_fp)} layers FP; {100 * self.binary_share:.1f}% of "
                f"the body's MACs binary; estimated drop {self.estimated_drop:.3f} dB (sum of single-layer drops)\n"
                f"--set '{self.set_argument()}'")


def choose_keep_fp(
    report: SensitivityReport, binary_share: float | None = None, max_drop: float | None = None
) -> MixedChoice:
    """The most sensitive layers to keep FP so that ``binary_share`` / ``max_drop`` hold (see the module doc)."""
    if binary_share is None and max_drop is None:
        raise SensitivityError("give a target: binary_share (fraction of body MACs kept binary) and/or max_drop (dB)")
    if binary_share is not None and not 0 <= binary_share <= 1:
        raise SensitivityError(f"binary_share is a fraction of the body's MACs in [0, 1], got {binary_share}")
    if max_drop is not None and (max_drop < 0 or not math.isfinite(max_drop)):
        raise SensitivityError(f"max_drop is a non-negative PSNR drop in dB, got {max_drop}")
    target = ", ".join(f"{k} {v:g}" for k, v in (("binary share", binary_share), ("max drop", max_drop))
                       if v is not None)
    total = report.target_macs
    binary = report.binary_macs
    if binary_share is not None and binary < math.ceil(binary_share * total * (1 - 1e-12)):
        raise SensitivityError(
            f"{report.model}: recipe {report.recipe} converts {100 * binary / max(total, 1):.1f}% of the body's MACs "
            f"even with no layer kept FP, below the binary share {100 * binary_share:.1f}% asked for"
        )
    # Whole MACs, the share's product rounded up (a relative 1e-12 forgives 0.6 * 5 = 3.0000000000000004).
    budget = math.inf if binary_share is None else binary - math.ceil(binary_share * total * (1 - 1e-12))
    measured = [s for s in report.layers if math.isfinite(s.drop)]
    drop = sum(s.drop for s in measured)
    candidates = sorted((s for s in measured if s.drop > 0), key=lambda s: -s.drop / max(s.macs, 1))
    keep: list[str] = []
    for layer in candidates:
        if max_drop is not None and drop <= max_drop:
            break
        if layer.macs <= budget:
            keep.append(layer.name)
            budget -= layer.macs
            binary -= layer.macs
            drop -= layer.drop
    met = max_drop is None or drop <= max_drop
    return MixedChoice(keep, binary / total if total else 0.0, drop, met, target)
