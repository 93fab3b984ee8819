"""A small input a model accepts, found by trying the usual image channel counts."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SrbinarizeError


class ModelInputError(SrbinarizeError):
    """The model runs on none of the small image inputs tried."""


def example_input(model: nn.Module, size: int = 48) -> torch.Tensor:
    """A 1xCx``size``x``size`` input in [0, 1] that ``model`` runs on: C found by trying 3, then 1, then 4."""
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
