"""Analyses of a model under a recipe: per-layer sensitivity and mixed precision chosen from it.

    report = srbinarize.analysis.sensitivity(model, "scales")
    print(report); report.plot("sensitivity.png")
    choice = report.keep_fp(binary_share=0.75)
    mixed = srbinarize.convert(model, "scales", keep_fp=choice.keep_fp)
    write_mixed_recipe("scales", choice, "mixed.yaml")  # then: srbinarize finetune ... --recipe mixed.yaml
"""

from .mixed import MixedChoice, choose_keep_fp, write_mixed_recipe
from .sensitivity import (
    Crops,
    LayerSensitivity,
    SensitivityError,
    SensitivityReport,
    calibration_crops,
    crops_psnr,
    sensitivity,
    write_report,
)

__all__ = [
    "Crops", "LayerSensitivity", "MixedChoice", "SensitivityError", "SensitivityReport", "calibration_crops",
    "choose_keep_fp", "crops_psnr", "sensitivity", "write_mixed_recipe", "write_report",
]
