"""srbinarize: binary and low-bit super-resolution networks, from a pretrained FP model to a fast CPU runtime.

    binary = srbinarize.convert(model, recipe="scales")
    print(srbinarize.summary(binary))
"""

from .convert import ConversionError, convert
from .graph.fold_bn import fold_bn
from .recipe import Recipe, RecipeError, load_recipe
from .summary import summary
from .train.finetune import finetune

__version__ = "0.1.0"

__all__ = ["ConversionError", "Recipe", "RecipeError", "convert", "finetune", "fold_bn", "load_recipe", "summary"]
