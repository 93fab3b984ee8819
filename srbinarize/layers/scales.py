"""SCALES binary convolution and linear (seed 000).

    conv:    y = (alpha * sign(x - beta)) (*) (mean|w| * sign(w)) . S(x) . C(x) + bias + x
    linear:  y = (alpha * sign(x - beta)) @  (mean|w| * sign(w))^T . S(x)         + bias + x

``beta`` is a learnable per-input-channel threshold, ``alpha`` a learnable layer-wise scale. For convs,
``S(x) = sigmoid(conv_{C->1}(x))`` is the spatial re-scaling map and ``C(x) = sigmoid(conv1d_k(GAP(x)))``
the channel re-scaling vector; for linears (Transformer tokens) ``S(x) = sigmoid(linear_{C->1}(x))`` is one
value per token and there is no channel re-scaling (LayerNorm already evens out the channels). Both are
computed from the FP input. The identity skip applies where the layer keeps the shape; ``skip: auto``
keeps it only where calibration shows it helps (the layer must then make up ``y - x`` instead of ``y``,
easier only where the FP layer's output is close to its input). Every component can be switched off
(the paper's ablation).

Zero padding: padded positions contribute 0 to the binary dot product (the conv pads the signed
activations with zeros), which is the definition the deployed kernel implements exactly. The forward
pass computes the +-1 product first and applies the scales afterwards, in the kernel's epilogue order.

Initialisation from the pretrained layer (`calibrate`): ``beta`` = channel mean of the FP input,
``alpha`` = mean |x - beta| (the L1-optimal scale of a sign), the latent weight = ``w - I`` when the
skip is on (so that the binary branch approximates what the skip leaves), then scaled per output channel
by the least-squares gain that best matches the FP output on the calibration batch (with ``fit_offset``,
gain and offset are fitted together and the offset goes into the bias: ``sign(x - beta)`` drops the
input's mean, so the product alone misses the FP layer's response to it); the re-scaling
branches start at zero weights (sigmoid = 0.5, where its gradient is largest). Whether the skip is on is
a buffer, so it travels with the weights.

Progressive binarization (`set_binarization`, driven by the end-to-end phase's ``train.progressive``):
the layer outputs ``(1 - l) * fp(x) + l * binary(x)``, where ``fp`` is the FP layer the latent weight
stands for: calibration scaled the latent weight by a per-output-channel gain (kept in the ``fp_gain``
buffer), so ``fp(x) = conv(x, W) + bias - fp_offset (+ x where the skip is on)`` with ``W = weight / fp_gain`` is
the pretrained layer exactly until training moves the weight. ``l = 1`` (the default, and what export
and inference see) is the binary layer alone; ``l = 0`` the FP one alone. A second level ``lw`` binarizes
the weights of the FP side: ``W -> (1 - lw) * W + lw * mean|W| * sign(W)`` (FP activations, binary
weights at ``lw = 1``: the first of two steps), with ``fp_side_gain`` fitted at calibration like the
binary layer's gain, so that ``lw = 1`` starts calibrated too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLayer
from .ste import SteKind, sign_pm1, sign_ste

SkipMode = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class ScalesConfig:
    binarize_weights: bool = True
    binarize_activations: bool = True
    spatial_rescale: bool = True
    # The seed's text lost this size; its EBSR predecessor used 1x1, which is also the cheapest.
    spatial_kernel_size: int = 1
    channel_rescale: bool = True
    channel_kernel_size: int = 5
    skip: SkipMode = "auto"
    ste: SteKind = "clipped"
    fit_offset: bool = False  # calibration also fits a per-output-channel offset into the bias

    def __post_init__(self) -> None:
        for name in ("spatial_kernel_size", "channel_kernel_size"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be a positive odd number, got {getattr(self, name)}")


@dataclass(frozen=True)
class ScalesLinearConfig:
    binarize_weights: bool = True
    binarize_activations: bool = True
    spatial_rescale: bool = True  # one FP value per token: sigmoid(linear_{C->1}(x))
    learn_threshold: bool = True  # False: beta stays 0 (plain sign, the BiBERT-style baseline)
    skip: SkipMode = "auto"
    ste: SteKind = "clipped"
    fit_offset: bool = False


def supports_conv(conv: nn.Module, grouped: bool = False) -> str | None:
    """Why a conv cannot become a binary conv of the deployed kind (None if it can); ``grouped``: groups allowed."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain Conv2d"
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"kernel {k} is not square and odd"
    if grouped and (conv.stride != (1, 1) or conv.dilation != (1, 1)):
        return "stride and dilation must be 1"
    if not grouped and (conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1):
        return "stride, dilation and groups must be 1"
    if conv.padding != (k[0] // 2, k[1] // 2) or conv.padding_mode != "zeros":
        return f"padding must be 'same' zero padding ({k[0] // 2}), got {conv.padding} {conv.padding_mode}"
    return None


class _ScalesBase(QuantLayer):
    """What SCALES convs and linears share: binarizers, scales, skip, calibration.

    Subclasses say how the +-1 product is taken (`_product`), how a per-output-channel vector broadcasts
    against the output (`_per_out`), which dims are reduced per channel (`_reduce_dims`), and how the
    re-scaling maps apply (`_rescale`).
    """

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, config: ScalesConfig | ScalesLinearConfig,
                 in_channels: int | None = None):
        super().__init__()
        self.config = config
        self.out_channels, self.in_channels = weight_shape[0], in_channels or weight_shape[1]
        self.act_bits = 1 if config.binarize_activations else 32
        self.weight_bits = 1 if config.binarize_weights else 32
        self.weight = nn.Parameter(torch.empty(weight_shape))
        # With fit_offset a layer always has a bias: calibration puts the fitted offset there.
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias or config.fit_offset else None
        self.beta = nn.Parameter(torch.zeros(self.in_channels))
        self.alpha = nn.Parameter(torch.ones(()))
        self.same_shape = self.in_channels == self.out_channels
        self.register_buffer("skip_on", torch.tensor(config.skip == "always" and self.same_shape))
        # The calibration gain the latent weight carries (1 before calibration): weight / fp_gain is the FP weight.
        self.register_buffer("fp_gain", torch.ones(self.out_channels))
        # Least-squares gain of the FP side's binarized weights on FP inputs (progressive weights_first).
        self.register_buffer("fp_side_gain", torch.ones(self.out_channels))
        # The offset calibration added to the bias (fit_offset): bias - fp_offset is the FP layer's bias.
        self.register_buffer("fp_offset", torch.zeros(self.out_channels))
        self.binarization = 1.0  # l of the progressive ramp; 1: the deployed binary layer
        self.fp_side_weights = 0.0  # lw: how far the FP side's weights are binarized
        self.spatial: nn.Module | None = None  # re-scaling branches, set by subclasses
        self.channel: nn.Module | None = None

    # Subclass interface.
    def _product(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _per_out(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _per_in(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reduce_dims(self, t: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def _rescale(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _identity_delta(self) -> torch.Tensor:
        """The weight of the identity map (what the skip adds)."""
        raise NotImplementedError

    # Pieces of the forward pass, shared with calibration and export.
    @property
    def use_skip(self) -> bool:
        return bool(self.skip_on)

    def act_scale(self) -> torch.Tensor:
        return self.alpha.abs() + 1e-8

    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel scale of the binary weights, mean |w|."""
        return self.weight.abs().mean(dim=tuple(range(1, self.weight.dim())))

    def output_scale(self) -> torch.Tensor:
        """Per-output-channel factor applied to the binary dot product (activation x weight scale)."""
        scale = torch.ones(self.out_channels, device=self.weight.device, dtype=self.weight.dtype)
        if self.config.binarize_weights:
            scale = scale * self.weight_scale()
        if self.config.binarize_activations:
            scale = self.act_scale() * scale
        return scale

    def binary_weight(self) -> torch.Tensor:
        """The +-1 weights of the deployed layer (no gradient)."""
        return sign_pm1(self.weight.detach())

    @staticmethod
    def _weight_window(w: torch.Tensor) -> torch.Tensor:
        """STE window of weights ``w``: 2 mean|w| per output channel, so it follows their scale (calibration
        rescales them) and clips only the tail of the distribution."""
        dims = tuple(range(1, w.dim()))
        return 2 * w.detach().abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)

    def _scaled_product(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but bias and skip, in the exact order the kernel's epilogue uses."""
        kind = self.config.ste
        a = x
        if self.config.binarize_activations:
            a = sign_ste(x - self._per_in(self.beta), self.act_scale(), kind)
        w = self.weight
        if self.config.binarize_weights:
            w = sign_ste(w, self._weight_window(w), kind)
        return self._rescale(self._product(a, w) * self._per_out(self.output_scale()), x)

    def set_binarization(self, level: float, weights: float = 0.0) -> None:
        """Blend of the FP-equivalent (``level`` 0) and the binary layer (1) in the forward pass; ``weights``:
        how far the FP side's weights are binarized (0: FP, 1: mean|W| sign(W))."""
        for name, value in (("binarization level", level), ("weight binarization level", weights)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        self.binarization, self.fp_side_weights = float(level), float(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = self.binarization
        if level >= 1.0:
            return self._finish(self._scaled_product(x), x)
        fp = self._finish(self._product(x, self._fp_side_weight()), x) - self._per_out(self.fp_offset)
        return fp if level <= 0.0 else torch.lerp(fp, self._finish(self._scaled_product(x), x), level)

    def _fp_side_weight(self) -> torch.Tensor:
        """The FP weight the latent weight stands for, its weights binarized by ``fp_side_weights``."""
        w = self.weight / self._per_weight(self.fp_gain)
        if self.fp_side_weights <= 0.0:
            return w
        return torch.lerp(w, self._per_weight(self.fp_side_gain) * self._binarized(w), self.fp_side_weights)

    def _binarized(self, w: torch.Tensor) -> torch.Tensor:
        """mean|w| * sign(w) per output channel, with the weights' STE window."""
        dims = tuple(range(1, w.dim()))
        return w.abs().mean(dim=dims, keepdim=True) * sign_ste(w, self._weight_window(w), self.config.ste)

    def _per_weight(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *[1] * (self.weight.dim() - 1))

    def _finish(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Bias and identity skip on top of the product."""
        if self.bias is not None:
            t = t + self._per_out(self.bias)
        if self.use_skip:
            t = t + x
        return t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files written before these buffers existed: their latent weights carry an unknown gain; 1 (and no
        # offset) keeps them loadable (only the progressive ramp reads them).
        for name, value in (("fp_gain", 1.0), ("fp_side_gain", 1.0), ("fp_offset", 0.0)):
            state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y_fp: torch.Tensor) -> None:
        cfg = self.config
        if cfg.binarize_activations:
            if getattr(cfg, "learn_threshold", True):
                self.beta.copy_(x.mean(dim=self._reduce_dims(x)))
            self.alpha.fill_((x - self._per_in(self.beta)).abs().mean().clamp_min(1e-6))
        if not (cfg.binarize_weights or cfg.binarize_activations or self.has_rescaling):
            return  # the layer is the FP layer (plus an exact skip): nothing to fit
        target = y_fp if self.bias is None else y_fp - self._per_out(self.bias)
        if cfg.skip == "auto" and self.same_shape:
            without = self._fit(x, target)
            self.weight -= self._identity_delta()
            with_skip = self._fit(x, target - x)
            if with_skip >= without:
                self.weight += self._identity_delta()
            self.skip_on.fill_(with_skip < without)
        target = target - x if self.use_skip else target
        self._fit(x, target, apply=True)
        fp_side = self._product(x, self._binarized(self.weight / self._per_weight(self.fp_gain)))
        self.fp_side_gain.copy_(self._gain(fp_side, target))

    def _fit(self, x: torch.Tensor, target: torch.Tensor, apply: bool = False) -> float:
        """Least-squares gain per output channel of the latent weight (and, with ``fit_offset``, an offset
        added to the bias); returns the remaining squared error.

        The output is linear in the latent weight's magnitude (mean|w| * sign(w) and the FP product alike),
        so scaling the weight by the gain scales the output by it.
        """
        t = self._scaled_product(x)
        offset = torch.zeros(self.out_channels, dtype=t.dtype, device=t.device)
        if self.config.fit_offset:
            dims = self._reduce_dims(t)
            t_mean, y_mean = t.mean(dim=dims), target.mean(dim=dims)
            gain = self._gain(t - self._per_out(t_mean), target - self._per_out(y_mean))
            offset = y_mean - gain * t_mean
        else:
            gain = self._gain(t, target)
        if apply:
            self.weight.mul_(self._per_weight(gain))
            self.fp_gain.mul_(gain)
            if self.config.fit_offset:
                self.bias.add_(offset)
                self.fp_offset.add_(offset)
        return float((target - t * self._per_out(gain) - self._per_out(offset)).pow(2).sum())

    def _gain(self, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-output-channel least-squares factor of ``t`` towards ``target`` (1 where it is 0 or undefined)."""
        dims = self._reduce_dims(t)
        gain = (t * target).sum(dim=dims) / (t * t).sum(dim=dims).clamp_min(1e-12)
        return torch.where(torch.isfinite(gain) & (gain != 0), gain, torch.ones_like(gain))

    @property
    def has_rescaling(self) -> bool:
        return self.spatial is not None or self.channel is not None

    def _init_skip_weight(self, module: nn.Module) -> None:
        self.copy_weights_from(module)
        if self.use_skip:
            with torch.no_grad():
                self.weight -= self._identity_delta()


class ScalesConv2d(_ScalesBase):
    """A SCALES conv; ``groups > 1`` (grouped and depthwise convs) binarizes each group's product alike."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool, config: ScalesConfig,
                 groups: int = 1):
        super().__init__((out_channels, in_channels // groups, kernel_size, kernel_size), bias, config, in_channels)
        self.kernel_size, self.groups = kernel_size, groups
        if config.spatial_rescale:
            ks = config.spatial_kernel_size
            self.spatial = nn.Conv2d(in_channels, 1, ks, padding=ks // 2)
            nn.init.zeros_(self.spatial.weight)
            nn.init.zeros_(self.spatial.bias)
        if config.channel_rescale and self.same_shape:
            ks = config.channel_kernel_size
            self.channel = nn.Conv1d(1, 1, ks, padding=ks // 2, bias=False)
            nn.init.zeros_(self.channel.weight)

    @classmethod
    def from_float(cls, module: nn.Module, config: ScalesConfig) -> ScalesConv2d:
        reason = supports_conv(module, grouped=True)
        if reason:
            raise ValueError(f"SCALES cannot replace this conv: {reason}")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size[0], module.bias is not None, config,
                    module.groups)
        layer._init_skip_weight(module)
        return layer.to(module.weight.device)

    def _product(self, a, w):
        return F.conv2d(a, w, padding=self.kernel_size // 2, groups=self.groups)

    def _per_out(self, v):
        return v.view(1, -1, 1, 1)

    _per_in = _per_out

    def _reduce_dims(self, t):
        return (0, 2, 3)

    def _identity_delta(self):
        delta = torch.zeros_like(self.weight)
        c, per_group = self.kernel_size // 2, self.in_channels // self.groups
        out = torch.arange(self.out_channels, device=self.weight.device)
        delta[out, out % per_group, c, c] = 1.0  # output o copies input o, the (o mod C/g)-th of its group
        return delta

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.spatial is None else torch.sigmoid(self.spatial(x))

    def channel_vector(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.channel is None:
            return None
        return torch.sigmoid(self.channel(x.mean(dim=(2, 3)).unsqueeze(1))).squeeze(1)

    def _rescale(self, t, x):
        s = self.spatial_map(x)
        if s is not None:
            t = t * s
        c = self.channel_vector(x)
        if c is not None:
            t = t * c[:, :, None, None]
        return t

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
        parts = [f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}"]
        if self.groups > 1:
            parts.append(f"groups={self.groups}")
        parts.append(f"w{self.weight_bits}a{self.act_bits}")
        on = {"spatial": self.spatial is not None, "channel": self.channel is not None, "skip": self.use_skip}
        parts += [name for name, flag in on.items() if flag]
        if self.config.ste != "clipped":
            parts.append(f"ste={self.config.ste}")
        return ", ".join(parts)


class ScalesLinear(_ScalesBase):
    """SCALES for the linears of Transformer blocks; inputs are (..., tokens, features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: ScalesLinearConfig):
        super().__init__((out_features, in_features), bias, config)
        if config.spatial_rescale:
            self.spatial = nn.Linear(in_features, 1)
            nn.init.zeros_(self.spatial.weight)
            nn.init.zeros_(self.spatial.bias)
        if not config.learn_threshold:
            self.beta.requires_grad_(False)

    @classmethod
    def from_float(cls, module: nn.Module, config: ScalesLinearConfig) -> ScalesLinear:
        if type(module) is not nn.Linear:
            raise ValueError(f"SCALES cannot replace {type(module).__name__}: a plain nn.Linear is expected")
        layer = cls(module.in_features, module.out_features, module.bias is not None, config)
        layer._init_skip_weight(module)
        return layer.to(module.weight.device)

    def _product(self, a, w):
        return F.linear(a, w)

    def _per_out(self, v):
        return v

    _per_in = _per_out

    def _reduce_dims(self, t):
        return tuple(range(t.dim() - 1))

    def _identity_delta(self):
        return torch.eye(self.out_channels, dtype=self.weight.dtype, device=self.weight.device)

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.spatial is None else torch.sigmoid(self.spatial(x))

    def _rescale(self, t, x):
        s = self.spatial_map(x)
        return t if s is None else t * s

    def notes(self) -> list[str]:
        return [] if self.same_shape else [f"{self.in_channels}->{self.out_channels}: no identity skip"]

    def extra_fp_macs(self, out_shape: torch.Size) -> int:
        tokens = out_shape.numel() // out_shape[-1]
        return tokens * self.in_channels if self.spatial is not None else 0

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}", f"w{self.weight_bits}a{self.act_bits}"]
        parts += [name for name, flag in {"spatial": self.spatial is not None, "skip": self.use_skip}.items() if flag]
        return ", ".join(parts)
