"""A small input a model accepts: the usual image channel counts tried, the side fitted to its window."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import SrbinarizeError


class ModelInputError(SrbinarizeError):
    """The model runs on none of the small image inputs tried."""


def input_multiple(model: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> int:
    """The side a model's input is padded to a multiple of: the largest integer ``window_size`` of its modules.

    basicsr's SwinIR does not pad inputs itself (the original repository pads in its test script), so any
    size that is not a multiple of the window fails; models that pad themselves (HAT) get the same padding.
    1 for models without windows and for callables that are not modules.
    """
    if not isinstance(model, nn.Module):
        return 1
    sizes = [w for m in model.modules() if isinstance(w := getattr(m, "window_size", None), int)]
    return max(sizes, default=1)


def fitting_size(model: nn.Module, size: int) -> int:
    """``size`` rounded up to a multiple of the model's window (`input_multiple`)."""
    multiple = input_multiple(model)
    return -(-size // multiple) * multiple


def example_input(model: nn.Module, size: int = 48) -> torch.Tensor:
    """A 1xCxSxS input in [0, 1] that ``model`` runs on, S = ``size`` fitted to its window: C found by trying
    3, then 1, then 4."""
    size = fitting_size(model, size)
    errors = []
    for channels in (3, 1, 4):
        x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception as err:  # any failure means: not this channel count
            errors.append(f"{channels} channels: {type(err).__name__}: {str(err).splitlines()[0]}")
    raise ModelInputError(
        f"{type(model).__name__} rejects a 1xCx{size}x{size} input for C in (3, 1, 4): "
        + "; ".join(errors) + ". Pass example_input=... with a shape it accepts."
    )
