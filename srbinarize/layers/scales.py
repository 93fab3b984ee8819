"""SCALES binary convolution (seed 000).

    y = (alpha * sign(x - beta)) (*) (mean|w| * sign(w)) . S(x) . C(x) + bias + x

``beta`` is a learnable per-input-channel threshold, ``alpha`` a learnable layer-wise scale,
``S(x) = sigmoid(conv_{C->1}(x))`` the spatial re-scaling map and ``C(x) = sigmoid(conv1d_k(GAP(x)))``
the channel re-scaling vector, both computed from the FP input. The identity skip applies where the conv
keeps the shape; ``skip: auto`` keeps it only where calibration shows it helps (a converted layer must
then make up ``y - x`` instead of ``y``, which is easier only where the FP conv's output is close to its
input). Every component can be switched off (the paper's ablation).

Zero padding: padded positions contribute 0 to the binary dot product (the conv pads the signed
activations with zeros), which is the definition the deployed kernel implements exactly.

Initialisation from the pretrained conv (`calibrate`): ``beta`` = channel mean of the FP input,
``alpha`` = mean |x - beta| (the L1-optimal scale of a sign), the latent weight = ``w - delta`` when the
skip is on (so that the binary branch approximates what the skip leaves), then scaled per output channel
by the least-squares gain that best matches the FP output on the calibration batch; the re-scaling
branches start at zero weights (sigmoid = 0.5, where its gradient is largest). Whether the skip is on is
a buffer, so it travels with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLayer
from .ste import SteKind, sign_pm1, sign_ste


@dataclass(frozen=True)
class ScalesConfig:
    binarize_weights: bool = True
    binarize_activations: bool = True
    spatial_rescale: bool = True
    # The seed's text lost this size; its EBSR predecessor used 1x1, which is also the cheapest.
    spatial_kernel_size: int = 1
    channel_rescale: bool = True
    channel_kernel_size: int = 5
    skip: Literal["auto", "always", "never"] = "auto"
    ste: SteKind = "clipped"

    def __post_init__(self) -> None:
        for name in ("spatial_kernel_size", "channel_kernel_size"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be a positive odd number, got {getattr(self, name)}")


def supports_conv(conv: nn.Module) -> str | None:
    """Why a conv cannot become a SCALES binary conv (None if it can)."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain Conv2d"
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"kernel {k} is not square and odd"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        return "stride, dilation and groups must be 1"
    if conv.padding != (k[0] // 2, k[1] // 2) or conv.padding_mode != "zeros":
        return f"padding must be 'same' zero padding ({k[0] // 2}), got {conv.padding} {conv.padding_mode}"
    return None


class ScalesConv2d(QuantLayer):
    weight_bits = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool, config: ScalesConfig):
        super().__init__()
        self.config = config
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.act_bits = 1 if config.binarize_activations else 32
        self.weight_bits = 1 if config.binarize_weights else 32
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.beta = nn.Parameter(torch.zeros(in_channels))
        self.alpha = nn.Parameter(torch.ones(()))
        self.spatial = None
        if config.spatial_rescale:
            ks = config.spatial_kernel_size
            self.spatial = nn.Conv2d(in_channels, 1, ks, padding=ks // 2)
            nn.init.zeros_(self.spatial.weight)
            nn.init.zeros_(self.spatial.bias)
        self.same_shape = in_channels == out_channels
        self.channel = None
        if config.channel_rescale and self.same_shape:
            ks = config.channel_kernel_size
            self.channel = nn.Conv1d(1, 1, ks, padding=ks // 2, bias=False)
            nn.init.zeros_(self.channel.weight)
        self.register_buffer("skip_on", torch.tensor(config.skip == "always" and self.same_shape))

    @classmethod
    def from_float(cls, module: nn.Module, config: ScalesConfig) -> ScalesConv2d:
        reason = supports_conv(module)
        if reason:
            raise ValueError(f"SCALES cannot replace this conv: {reason}")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size[0], module.bias is not None, config)
        with torch.no_grad():
            layer.weight.copy_(module.weight)
            if layer.use_skip:
                layer._shift_for_skip(-1.0)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer.to(module.weight.device)

    @property
    def use_skip(self) -> bool:
        return bool(self.skip_on)

    def _shift_for_skip(self, sign: float) -> None:
        """Add ``sign * delta`` to the latent weight: with the skip carrying x, the conv learns ``w - delta``."""
        c = self.kernel_size // 2
        eye = torch.eye(self.out_channels, dtype=self.weight.dtype, device=self.weight.device)
        self.weight[:, :, c, c] += sign * eye

    # Pieces of the forward pass, shared with calibration and export.
    def act_scale(self) -> torch.Tensor:
        return self.alpha.abs() + 1e-8

    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel scale of the binary weights, mean |w|."""
        return self.weight.abs().mean(dim=(1, 2, 3))

    def output_scale(self) -> torch.Tensor:
        """Per-output-channel factor applied to the binary dot product (activation x weight scale)."""
        scale = torch.ones(self.out_channels, device=self.weight.device, dtype=self.weight.dtype)
        if self.config.binarize_weights:
            scale = scale * self.weight_scale()
        if self.config.binarize_activations:
            scale = self.act_scale() * scale
        return scale

    def _weight_window(self) -> torch.Tensor:
        """STE window of the latent weights: 2 mean|w| per output channel, so it follows their scale
        (calibration rescales them) and clips only the tail of the distribution."""
        return 2 * self.weight.detach().abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)

    def binary_weight(self) -> torch.Tensor:
        """The +-1 weights of the deployed conv (no gradient)."""
        return sign_pm1(self.weight.detach())

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.spatial is None else torch.sigmoid(self.spatial(x))

    def channel_vector(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.channel is None:
            return None
        return torch.sigmoid(self.channel(x.mean(dim=(2, 3)).unsqueeze(1))).squeeze(1)

    def _rescaled_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but bias and skip, in the exact order the kernel's epilogue uses."""
        kind = self.config.ste
        a = sign_ste(x - self.beta.view(1, -1, 1, 1), self.act_scale(), kind) if self.config.binarize_activations else x
        w = sign_ste(self.weight, self._weight_window(), kind) if self.config.binarize_weights else self.weight
        t = F.conv2d(a, w, padding=self.kernel_size // 2) * self.output_scale().view(1, -1, 1, 1)
        s = self.spatial_map(x)
        if s is not None:
            t = t * s
        c = self.channel_vector(x)
        if c is not None:
            t = t * c[:, :, None, None]
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._rescaled_conv(x)
        if self.bias is not None:
            t = t + self.bias.view(1, -1, 1, 1)
        if self.use_skip:
            t = t + x
        return t

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y_fp: torch.Tensor) -> None:
        cfg = self.config
        if cfg.binarize_activations:
            self.beta.copy_(x.mean(dim=(0, 2, 3)))
            self.alpha.fill_((x - self.beta.view(1, -1, 1, 1)).abs().mean().clamp_min(1e-6))
        quantized = cfg.binarize_weights or cfg.binarize_activations
        if not (quantized or self.spatial is not None or self.channel is not None):
            return  # the layer is the FP conv (plus an exact skip): nothing to fit
        target = y_fp if self.bias is None else y_fp - self.bias.view(1, -1, 1, 1)
        if self.config.skip == "auto" and self.same_shape:
            without = self._fit(x, target)
            self._shift_for_skip(-1.0)
            with_skip = self._fit(x, target - x)
            if with_skip >= without:
                self._shift_for_skip(1.0)
            self.skip_on.fill_(with_skip < without)
        self._fit(x, target - x if self.use_skip else target, apply=True)

    def _fit(self, x: torch.Tensor, target: torch.Tensor, apply: bool = False) -> float:
        """Least-squares gain per output channel of the latent weight; returns the remaining squared error.

        The output is linear in the latent weight's magnitude (mean|w| * sign(w) and the FP conv alike),
        so scaling the weight by the gain scales the output by it.
        """
        t = self._rescaled_conv(x)
        gain = (t * target).sum(dim=(0, 2, 3)) / (t * t).sum(dim=(0, 2, 3)).clamp_min(1e-12)
        gain = torch.where(torch.isfinite(gain) & (gain != 0), gain, torch.ones_like(gain))
        if apply:
            self.weight.mul_(gain.view(-1, 1, 1, 1))
        return float((target - t * gain.view(1, -1, 1, 1)).pow(2).sum())

    def notes(self) -> list[str]:
        notes = []
        if not self.same_shape:
            notes.append(f"{self.in_channels}->{self.out_channels}: no identity skip / channel re-scaling")
        return notes

    def extra_fp_macs(self, out_shape: torch.Size) -> int:
        n, _, h, w = out_shape
        macs = 0
        if self.spatial is not None:
            macs += n * h * w * self.in_channels * self.config.spatial_kernel_size**2
        if self.channel is not None:
            macs += n * self.in_channels * (h * w + self.config.channel_kernel_size)
        return macs

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}"]
        parts.append(f"w{self.weight_bits}a{self.act_bits}")
        parts += [name for name, on in (("spatial", self.spatial is not None), ("channel", self.channel is not None),
                                        ("skip", self.use_skip)) if on]
        if c.ste != "clipped":
            parts.append(f"ste={c.ste}")
        return ", ".join(parts)
