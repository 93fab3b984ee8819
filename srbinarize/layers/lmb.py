"""LMB: binarization with local-mean thresholds (seed 003).

Each activation is binarized against the mean of its FP neighbourhood in the same channel:

    x_b = sign(x - m(x)),   m(x) = avg_pool_{k x k}(x)   (stride 1, "same" size)
    y   = conv(x_b, sign(W)) * mean|W|[o] * g[o] + bias

At the border the mean is over the pixels of the window that lie inside the image (``count_include_pad``
off: padding does not pull the mean toward 0); this is ONNX AveragePool's default, so the deployed
pre-op is one standard op.

Not published by the seed, chosen here:
- ``window: 3`` (the seed gives no size; 3 is the smallest window around a pixel, and the 3x3 conv's
  own receptive field);
- the gradient approximator: ApproxSign (Bi-Real Net: ``2 - 2|v|`` inside the window, 0 outside) for
  activations and weights. Activations: the window is ``mean |x - m(x)|`` on the calibration batch (a
  buffer), and the gradient reaches ``x`` both directly and through ``m(x)``. Weights: the window is
  ``max |W|`` per output channel (``weight_grad_window: max_abs``), so the gradient adapts to each filter's
  scale and is largest for the weights nearest a sign flip; ``unit`` is the plain window |W| <= 1;
- ``g``: a learnable per-output-channel gain, the least-squares fit to the FP conv's output on the
  calibration batch (it also absorbs the scale binary activations lose), so the start is near the FP model.

Zero padding of the conv: padded positions contribute 0 to the binary dot product (as SCALES / the kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLayer
from .scales import supports_conv
from .ste import SteKind, sign_pm1, sign_ste


@dataclass(frozen=True)
class LmbConfig:
    binarize_weights: bool = True
    binarize_activations: bool = True
    window: int = 3
    ste: SteKind = "approx"
    weight_grad_window: Literal["max_abs", "unit"] = "max_abs"

    def __post_init__(self) -> None:
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be a positive odd number, got {self.window}")


def local_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of each element's ``window x window`` neighbourhood in its channel, over the pixels inside."""
    return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)


#: Relative margin by which ``x`` may fall short of its local mean and still count as ``>=``. After a binary
#: layer, features take few distinct values, so ``x == local mean`` is common; PyTorch and onnxruntime then
#: get ``0`` or ``+-1 ulp`` in different places (their window sums add in different orders) and the sign
#: flips. The margin, far above rounding and far below the steps between distinct values, settles ties as +1.
TIE_MARGIN = 2.0**-16


def centered(x: torch.Tensor, window: int) -> torch.Tensor:
    """``x - local_mean(x)`` plus the tie margin: what the binary activation takes the sign of."""
    m = local_mean(x, window)
    return x - m + TIE_MARGIN * (x.abs() + m.abs()).detach()


@dataclass
class LmbDeployed:
    """What the exporter writes for one LMB conv.

    Pre-op (FP, only if ``binary_activations``): ``t = AveragePool(x, window, stride 1, pads window // 2,
    count_include_pad 0)``; binary activations ``+1 if x - t + TIE_MARGIN (|x| + |t|) >= 0 else -1``. Binary conv:
    ``y = conv(a, weight_pm1, padding, zero-padded) * scale[o] + bias[o]``.
    """

    weight_pm1: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    padding: int
    window: int
    binary_activations: bool

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The deployed computation in PyTorch (what an exported graph must reproduce)."""
        a = sign_pm1(centered(x, self.window)) if self.binary_activations else x
        y = F.conv2d(a, self.weight_pm1, padding=self.padding) * self.scale.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class LmbConv2d(QuantLayer):
    weight_bits = 1
    act_bits = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool, config: LmbConfig):
        super().__init__()
        self.config = config
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight_bits = 1 if config.binarize_weights else 32
        self.act_bits = 1 if config.binarize_activations else 32
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.register_buffer("act_window", torch.ones(()))

    @classmethod
    def from_float(cls, module: nn.Module, config: LmbConfig) -> LmbConv2d:
        reason = supports_conv(module)
        if reason:
            raise ValueError(f"LMB cannot replace this conv: {reason}")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size[0], module.bias is not None, config)
        layer.copy_weights_from(module)
        return layer.to(module.weight.device)

    def threshold(self, x: torch.Tensor) -> torch.Tensor:
        """The per-element activation threshold: the local mean of ``x``."""
        return local_mean(x, self.config.window)

    def weight_window(self) -> torch.Tensor | float:
        if self.config.weight_grad_window == "unit":
            return 1.0
        return self.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)

    def output_scale(self) -> torch.Tensor:
        """Per-output-channel factor on the binary dot product: mean|W| (binary weights) times the gain."""
        scale = self.gain
        if self.config.binarize_weights:
            scale = scale * self.weight.abs().mean(dim=(1, 2, 3))
        return scale

    def binary_weight(self) -> torch.Tensor:
        """The +-1 weights of the deployed conv (no gradient)."""
        return sign_pm1(self.weight.detach())

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        a = sign_ste(centered(x, cfg.window), self.act_window, cfg.ste) if cfg.binarize_activations else x
        w = sign_ste(self.weight, self.weight_window(), cfg.ste) if cfg.binarize_weights else self.weight
        return F.conv2d(a, w, padding=self.kernel_size // 2) * self.output_scale().view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not (cfg.binarize_weights or cfg.binarize_activations):
            return F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)
        y = self._product(x)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y_fp: torch.Tensor) -> None:
        cfg = self.config
        if not (cfg.binarize_weights or cfg.binarize_activations):
            return
        if cfg.binarize_activations:
            self.act_window.fill_(float((x - self.threshold(x)).abs().mean().clamp_min(1e-6)))
        self.gain.fill_(1.0)
        t = self._product(x)
        target = y_fp if self.bias is None else y_fp - self.bias.view(1, -1, 1, 1)
        fit = (t * target).sum(dim=(0, 2, 3)) / (t * t).sum(dim=(0, 2, 3)).clamp_min(1e-12)
        self.gain.copy_(torch.where(torch.isfinite(fit) & (fit != 0), fit, torch.ones_like(fit)))

    @torch.no_grad()
    def deployed(self) -> LmbDeployed:
        """The inference form: +-1 weights, per-channel scale, and the local-mean pre-op (an average pool)."""
        if not self.config.binarize_weights:
            raise ValueError("LMB conv with binarize_weights off has no packed form")
        return LmbDeployed(
            weight_pm1=self.binary_weight(),
            scale=self.output_scale().detach().clone(),
            bias=None if self.bias is None else self.bias.detach().clone(),
            padding=self.kernel_size // 2,
            window=self.config.window,
            binary_activations=self.config.binarize_activations,
        )

    def extra_fp_macs(self, out_shape: torch.Size) -> int:
        if not self.config.binarize_activations:
            return 0
        n, _, h, w = out_shape  # the local mean: one k x k average per input element
        return n * h * w * self.in_channels * self.config.window**2

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, w{self.weight_bits}a{self.act_bits}, "
                f"window={self.config.window}")
