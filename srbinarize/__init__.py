"""srbinarize: binary and low-bit super-resolution networks, from a pretrained FP model to a fast CPU runtime.

    binary = srbinarize.convert(model, recipe="scales")
    print(srbinarize.summary(binary))
    run = srbinarize.finetune("zoo:edsr-x2", "scales", srbinarize.DataConfig(train="../shared/data/BSD100"),
                              srbinarize.Budget(steps=200), srbinarize.RunSettings(out="runs/x"), lr=1e-3)
"""

from .convert import ConversionError, convert
from .export.onnx import export_onnx
from .export.upscale import upscale_file
from .graph.fold_bn import fold_bn
from .recipe import Recipe, RecipeError, load_recipe
from .runtime import ort_session
from .summary import summary
from .train.config import Budget, DataConfig, ModelConfig, RunSettings
from .train.finetune import finetune

__version__ = "0.1.0"

__all__ = [
    "Budget", "ConversionError", "DataConfig", "ModelConfig", "Recipe", "RecipeError", "RunSettings", "convert",
    "export_onnx", "finetune", "fold_bn", "load_recipe", "ort_session", "summary", "upscale_file",
]
