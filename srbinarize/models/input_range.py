"""The RGB range a model takes ([0, 1] or [0, 255]) and the wrapper that lets the pipeline feed [0, 1].

Calibration, finetuning, evaluation, export and `upscale` all handle images in [0, 1]. A model trained on
[0, 255] (FMEN, RFDN-AIM, RLFN, ...) is wrapped in `ScaledRange`: ``y = model(255 x) / 255``, so from the
outside it is a [0, 1] model and nothing else changes; the two scalings are element-wise ops that carry
no layer, so the partition finds the same head, body and tail. Its state dict keys gain the prefix
``model.``; `ModelSpec.build` wraps as the spec's ``input_range`` says, so a checkpoint rebuilds alike.

When the range is not given, `detect_input_range` probes the FP model on natural LR patches at both ranges
and keeps the one whose output, brought back to the input size, reproduces the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SrbinarizeError
from .probe import example_input, fitting_size

RANGES: tuple[float, ...] = (1.0, 255.0)
#: Mean |downscaled output - input| (images in [0, 1]) below which an output "matches" its input.
MATCH_ERROR = 0.01
#: The chosen range must beat the other by this factor.
MARGIN = 2.0


class InputRangeError(SrbinarizeError):
    """An input range that is neither 1 nor 255, or a model whose output fits neither."""


def check_input_range(value: object, source: str = "input range") -> float:
    """``value`` as 1.0 or 255.0; anything else is one `InputRangeError` naming ``source``."""
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        r = math.nan
    if r not in RANGES:
        raise InputRangeError(f"{source} must be 1 (RGB in [0, 1]) or 255 (RGB in [0, 255]), got {value!r}")
    return r


class ScaledRange(nn.Module):
    """A model that takes and returns RGB in [0, ``input_range``], seen as one in [0, 1]."""

    def __init__(self, model: nn.Module, input_range: float):
        super().__init__()
        self.model = model
        self.input_range = check_input_range(input_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.input_range) / self.input_range

    def extra_repr(self) -> str:
        return f"input_range={self.input_range:g}"


def with_input_range(model: nn.Module, input_range: float) -> nn.Module:
    """``model`` as a [0, 1] model: itself for range 1, else wrapped in `ScaledRange` (never wrapped twice)."""
    r = check_input_range(input_range)
    if r == 1.0 or isinstance(model, ScaledRange):
        return model
    return ScaledRange(model, r)


def model_input_range(model: nn.Module) -> float:
    """The range the network inside takes (255 for a `ScaledRange` or a conversion of one, else 1)."""
    if isinstance(model, ScaledRange):
        return model.input_range
    info = getattr(model, "srbinarize_info", None)
    return float(getattr(info, "input_range", 1.0))


def probe_patches(channels: int = 3, n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural LR patches (N, C, size, size) in [0, 1]: the photos scikit-image ships, halved."""
    from ..convert import default_calibration_batch
    from ..recipe import Calibration

    return default_calibration_batch(Calibration(batches=1, batch_size=n, patch_size=size), channels, seed)


def _mismatch(model: nn.Module, x: torch.Tensor, r: float) -> float:
    """Mean |output brought to the input size - input| with the model fed [0, r], in [0, 1] units."""
    with torch.no_grad():
        y = model(x * r) / r
    if y.dim() != 4 or y.shape[1] != x.shape[1]:
        return math.inf
    if y.shape[-2:] != x.shape[-2:]:
        y = F.interpolate(y, size=x.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
    err = (y - x).abs().mean().item()
    return err if math.isfinite(err) else math.inf


def detect_input_range(model: nn.Module, name: str | None = None, x: torch.Tensor | None = None
                       ) -> tuple[float, str]:
    """The range the FP ``model`` takes, found by probing; returns it and a sentence saying why.

    ``x``: LR patches in [0, 1] (default: `probe_patches` with the channels the model accepts).
    """
    name = name or type(model).__name__
    was_training = model.training
    model.eval()
    try:
        if x is None:
            x = probe_patches(example_input(model, size=16).shape[1], size=fitting_size(model, 32))
        errors = {r: _mismatch(model, x, r) for r in RANGES}
    finally:
        model.train(was_training)
    seen = ", ".join(f"{e:.4f} fed [0, {r:g}]" for r, e in errors.items())
    best, other = sorted(RANGES, key=lambda r: errors[r])
    if errors[best] <= MATCH_ERROR and errors[best] * MARGIN <= errors[other]:
        return best, f"{name}: input range [0, {best:g}] detected (mean |downscaled output - input| {seen})"
    if errors[other] <= MATCH_ERROR:  # it normalises its input itself (basicsr's img_range): either range works
        return 1.0, f"{name}: input range [0, 1] (its output matches its input fed either range: {seen})"
    why = "neither" if errors[best] > MATCH_ERROR else "both"
    raise InputRangeError(
        f"{name}: its output matches its input in {why} of the ranges [0, 1] and [0, 255] "
        f"(mean |downscaled output - input| {seen}; a match is below {MATCH_ERROR} and {MARGIN:g}x below "
        "the other); give the range explicitly (--input-range 1 or 255)"
    )


def resolve_input_range(model: nn.Module, given: object = None, name: str | None = None, strict: bool = False
                        ) -> tuple[nn.Module, float, str]:
    """``model`` as a [0, 1] model, its range (given, else detected) and one sentence saying which.

    When detection finds no range, ``strict`` raises its `InputRangeError`; otherwise [0, 1] (what the
    pipeline assumed before) is used and the sentence says so, with what was seen.
    """
    name = name or type(model).__name__
    if given is not None:
        r = check_input_range(given, "--input-range")
        message = f"{name}: input range [0, {r:g}] (given)"
    elif isinstance(model, ScaledRange):
        r, message = model.input_range, f"{name}: input range [0, {model.input_range:g}] (from its description)"
    else:
        try:
            r, message = detect_input_range(model, name)
        except InputRangeError as err:
            if strict:
                raise
            r, message = 1.0, f"warning: {err}; using [0, 1]"
    return with_input_range(model, r), r, message


def load_pretrained_in_range(source: str, input_range: object = None, **kwargs) -> tuple[nn.Module, object, str]:
    """`srbinarize.models.load_pretrained` followed by `resolve_input_range`.

    Returns the model as a [0, 1] model, its `ModelSpec` carrying the range (so checkpoints rebuild it
    wrapped) and the sentence to show.
    """
    from dataclasses import replace

    from .load import load_pretrained

    model, spec = load_pretrained(source, **kwargs)
    model, r, message = resolve_input_range(model, input_range, name=str(source))
    return model, replace(spec, input_range=r), message


__all__ = [
    "InputRangeError", "ScaledRange", "check_input_range", "detect_input_range", "load_pretrained_in_range",
    "model_input_range", "probe_patches", "resolve_input_range", "with_input_range",
]
