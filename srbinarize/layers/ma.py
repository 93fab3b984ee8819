"""Binary-weight convolution of Ma et al. (seed 002, "Efficient super resolution using binarized neural
network", CVPRW 2019): binary filters with a learnable scale each, full-precision activations.

    y = conv(x, s[o] * sign(W)) + bias          s: learnable per output channel (per filter)

Only the convs of residual blocks are binarized (``residual_blocks_only``: a block is a residual region
of the graph holding no smaller one, see `srbinarize.graph.chains.residual_blocks`); others stay FP.

Not published by the seed, chosen here:
- ``scale_init: least_squares``: ``s`` starts at the per-filter least-squares fit of ``conv(x, sign(W))``
  to the FP conv's output on the calibration batch, so the converted model starts near the pretrained
  one; ``mean_abs`` is the paper's ``mean |W|`` per filter (L2-optimal for the weights alone);
- gradients: BinaryConnect STE, the sign's gradient passed where |W| <= 1 (``ste: approx`` for ApproxSign).

Deployment: +-1 weights bitpacked, FP activations (weight-only packing: no binary kernel applies); the
scale multiplies the conv output per channel, which equals scaling the filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.chains import residual_blocks
from ..graph.partition import Plan
from .base import QuantLayer
from .ste import SteKind, sign_pm1, sign_ste


@dataclass(frozen=True)
class MaConfig:
    binarize_weights: bool = True
    residual_blocks_only: bool = True
    scale_init: Literal["least_squares", "mean_abs"] = "least_squares"
    ste: SteKind = "clipped"


@dataclass
class MaDeployed:
    """What the exporter writes for one Ma conv: ``y = conv(x, weight_pm1, ...) * scale[o] + bias[o]``, x FP."""

    weight_pm1: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The deployed computation in PyTorch (what an exported graph must reproduce)."""
        y = F.conv2d(x, self.weight_pm1, None, self.stride, self.padding, self.dilation, self.groups)
        y = y * self.scale.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class MaConv2d(QuantLayer):
    weight_bits = 1
    act_bits = 32

    def __init__(self, conv: nn.Conv2d, config: MaConfig):
        super().__init__()
        self.config = config
        self.weight_bits = 1 if config.binarize_weights else 32
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.scale = nn.Parameter(self.weight.detach().abs().mean(dim=(1, 2, 3)))

    @classmethod
    def from_float(cls, module: nn.Module, config: MaConfig) -> MaConv2d:
        if type(module) is not nn.Conv2d:
            raise ValueError(f"Ma's binary-weight conv replaces a plain Conv2d, not {type(module).__name__}")
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"padding must be explicit zero padding, got {module.padding} {module.padding_mode}")
        return cls(module, config)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def binary_weight(self) -> torch.Tensor:
        """The +-1 weights of the deployed conv (no gradient)."""
        return sign_pm1(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.binarize_weights:
            return self._conv(x, self.weight, self.bias)
        w = sign_ste(self.weight, 1.0, self.config.ste) * self.scale.view(-1, 1, 1, 1)
        return self._conv(x, w, self.bias)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y_fp: torch.Tensor) -> None:
        if not self.config.binarize_weights or self.config.scale_init != "least_squares":
            return
        t = self._conv(x, self.binary_weight())
        target = y_fp if self.bias is None else y_fp - self.bias.view(1, -1, 1, 1)
        fit = (t * target).sum(dim=(0, 2, 3)) / (t * t).sum(dim=(0, 2, 3)).clamp_min(1e-12)
        self.scale.copy_(torch.where(torch.isfinite(fit) & (fit != 0), fit, self.scale))

    @torch.no_grad()
    def deployed(self) -> MaDeployed:
        """The inference form: +-1 weights and a per-filter scale; activations stay FP."""
        if not self.config.binarize_weights:
            raise ValueError("Ma conv with binarize_weights off has no packed form")
        return MaDeployed(
            weight_pm1=self.binary_weight(),
            scale=self.scale.detach().clone(),
            bias=None if self.bias is None else self.bias.detach().clone(),
            stride=tuple(self.stride),
            padding=tuple(self.padding),
            dilation=tuple(self.dilation),
            groups=self.groups,
        )

    def extra_repr(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        return f"{self.in_channels}, {self.out_channels}, k={k}, w{self.weight_bits}a32"


def link_ma(layers: dict[str, QuantLayer], plan: Plan, model: nn.Module) -> None:
    """Keep only the convs inside residual blocks (when the recipe asks for that); note the others."""
    if not layers or not next(iter(layers.values())).config.residual_blocks_only:
        return
    blocks = residual_blocks(model, plan, list(layers))
    if blocks is None:
        plan.messages.append("Ma: the model was not traced, residual blocks unknown: every selected conv binarized")
        return
    for name in [n for n in layers if n not in blocks]:
        del layers[name]
        row = plan.row(name)
        note = "outside residual blocks: kept FP (Ma binarizes residual blocks only)"
        row.note = f"{row.note}; {note}" if row.note else note
