"""BAM: bit-accumulation binary convolutions (seed 001, Xin et al., "Binarized neural network for single
image super resolution", ECCV 2020).

The n-th conv of an accumulation chain (chains come from the graph, see `srbinarize.graph.chains`)
binarizes its weights and its input activations from the accumulated values of the chain so far:

    W_n^B = sign(BN_w(a_1 W_1 + ... + a_n W_n))              (folded into one +-1 tensor after training)
    A_n^B = sign(BN(b_1 A_1 + ... + b_n A_n)),   b_i = b_i_scale * E(A_i)
    y     = (A_n^B (*) W_n^B) * E(|W_n|) * g + bias

``W_i`` are the latent FP weights of the chain's convs, ``a`` the n-th conv's own combination
coefficients, ``A_i`` the FP input of the i-th conv, ``E(A_i)`` its mean over channels (a spatial map),
``b_i_scale`` a learnable scalar of the i-th conv (shared by every later conv of the chain), ``E(|W_n|)``
the mean |W_n| per output channel. Short chains (within a residual block) accumulate weights and
activations; a block's first conv accumulates the weights of the first convs of earlier sibling blocks
(long chain). A conv in no chain is binarized alone by the same formulas with n = 1.

Not published by the paper, chosen here (all recipe parameters):
- ``BN_w`` on a weight tensor: per output channel, standardise over (in, kh, kw) with the tensor's own
  statistics (weights have no batch), then a learnable affine; its shift starts at mean/std, so that the
  start is sign(accumulated weight) (a zero shift would start at sign(v - mean), measured worse);
- the activation BN is a ``BatchNorm2d`` over the input channels; its running statistics start at the
  calibration batch's and its shift at mean/std, so that it starts as sign(accumulated activation), like
  ``BN_w`` (a zero shift, i.e. thresholds at the channel means, measured worse at the start);
- initialisation: ``a_i = r^(n-i)`` and ``b_i_scale = r^-(i-1) / rms(E(A_i) A_i)`` with
  ``r = accumulation_init``, so each earlier term of a sum weighs ``r`` times the next one and the
  converted conv starts near its own single-layer binarization;
- ``g``: a learnable per-output-channel gain (not in the paper, which trains from scratch), set by
  least squares against the FP conv's output on the calibration batch, so the converted model starts
  close to the pretrained one;
- gradients: STE (clipped to |u| <= 1 after the BNs, ``ste: approx`` for ApproxSign); the accumulated
  sum passes gradients to every latent weight and activation of the chain.

Zero padding: padded positions contribute 0 to the binary dot product, as in the SCALES conv and the
deployed kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.chains import find_chains
from ..graph.partition import Plan
from .base import QuantLayer
from .scales import supports_conv
from .ste import SteKind, sign_pm1, sign_ste

_WEIGHT_BN_EPS = 1e-12  # relative to weight variances of 1e-6..1e-2; only guards an all-equal filter


@dataclass(frozen=True)
class BamConfig:
    binarize_weights: bool = True
    binarize_activations: bool = True
    short_range: bool = True  # accumulate within a residual block (weights and activations)
    long_range: bool = True  # a block's first conv accumulates the first convs of earlier sibling blocks
    plain_chain_length: int = 3  # convs outside residual blocks: chains of this many (the paper's VDSR)
    accumulation_init: float = 0.25  # r: weight of an earlier term relative to the next at the start
    activation_statistic: Literal["mean", "abs_mean"] = "abs_mean"  # E(A): channel mean of |A|, or of A
    weight_bn: bool = True
    activation_bn: bool = True
    ste: SteKind = "clipped"

    def __post_init__(self) -> None:
        if not 0 < self.accumulation_init <= 1:
            raise ValueError(f"accumulation_init must be in (0, 1], got {self.accumulation_init}")
        if self.plain_chain_length < 1:
            raise ValueError(f"plain_chain_length must be at least 1, got {self.plain_chain_length}")


@dataclass
class BamDeployed:
    """What the exporter writes for one BAM conv (all tensors detached).

    Pre-op (FP, only if ``binary_activations``): ``acc = sum_i beta[i] * E(x_i) * x_i`` over the inputs of
    the layers ``inputs`` (this layer's own input last), ``E`` the channel statistic ``statistic``; then
    ``z = acc * bn_mul[c] + bn_add[c]`` and the binary activations are ``+1 if z >= 0 else -1``.
    Binary conv: ``y = conv(a, weight_pm1, padding, zero-padded) * scale[o] + bias[o]``.
    """

    weight_pm1: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    padding: int
    binary_activations: bool
    inputs: list[str]
    beta: list[float]
    statistic: str
    bn_mul: torch.Tensor
    bn_add: torch.Tensor

    def reference(self, x: torch.Tensor, *earlier: torch.Tensor) -> torch.Tensor:
        """The deployed computation in PyTorch (what an exported graph must reproduce)."""
        a = x
        if self.binary_activations:
            acc = sum(b * _statistic(t, self.statistic) * t for b, t in zip(self.beta, (*earlier, x), strict=True))
            a = sign_pm1(acc * self.bn_mul.view(1, -1, 1, 1) + self.bn_add.view(1, -1, 1, 1))
        y = F.conv2d(a, self.weight_pm1, padding=self.padding) * self.scale.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _statistic(x: torch.Tensor, kind: str) -> torch.Tensor:
    """E(A): the mean over channels (N, 1, H, W), of A or of |A|."""
    return (x.abs() if kind == "abs_mean" else x).mean(dim=1, keepdim=True)


class BamConv2d(QuantLayer):
    weight_bits = 1
    act_bits = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool, config: BamConfig):
        super().__init__()
        self.config = config
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight_bits = 1 if config.binarize_weights else 32
        self.act_bits = 1 if config.binarize_activations else 32
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.alpha = nn.Parameter(torch.ones(1))  # coefficients of the weight chain, this conv's own last
        self.beta_scale = nn.Parameter(torch.ones(()))
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.act_bn = nn.BatchNorm2d(in_channels) if config.activation_bn else None
        self.weight_bn = None
        if config.weight_bn:
            self.weight_bn = nn.ParameterDict(
                {"weight": nn.Parameter(torch.ones(out_channels)), "bias": nn.Parameter(torch.zeros(out_channels))}
            )
        # Earlier convs of this conv's chains: plain lists, not submodules (they are registered elsewhere).
        self._weight_chain: list[BamConv2d] = []
        self._act_chain: list[BamConv2d] = []
        self._act_chain_names: list[str] = []
        self._keep_calibration_input = False
        self._calibration_input: torch.Tensor | None = None
        self.chain_note = ""

    @classmethod
    def from_float(cls, module: nn.Module, config: BamConfig) -> BamConv2d:
        reason = supports_conv(module)
        if reason:
            raise ValueError(f"BAM cannot replace this conv: {reason}")
        if config.weight_bn and module.weight[0].numel() < 2:
            raise ValueError("BAM's weight BN needs at least two weights per filter")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size[0], module.bias is not None, config)
        layer.copy_weights_from(module)
        layer.reset_weight_bn()
        return layer.to(module.weight.device)

    @torch.no_grad()
    def reset_weight_bn(self) -> None:
        """Start BN_w's shift at mean/std of the accumulated weight, so that sign(BN_w(v)) = sign(v)."""
        if self.weight_bn is not None:
            v = self.accumulated_weight()
            mean = v.mean(dim=(1, 2, 3))
            std = torch.sqrt(v.var(dim=(1, 2, 3), unbiased=False) + _WEIGHT_BN_EPS)
            self.weight_bn["weight"].fill_(1.0)
            self.weight_bn["bias"].copy_(mean / std)

    def set_chains(self, weight_chain: list[BamConv2d], act_chain: list[BamConv2d], act_names: list[str]) -> None:
        """Connect this conv to the earlier convs of its weight and activation chains (dataflow order)."""
        self._weight_chain, self._act_chain, self._act_chain_names = weight_chain, act_chain, act_names
        n, r = len(weight_chain) + 1, self.config.accumulation_init
        coefficients = torch.tensor([r ** (n - 1 - i) for i in range(n)], dtype=self.weight.dtype)
        self.alpha = nn.Parameter(coefficients.to(self.weight.device))
        self.reset_weight_bn()
        for earlier in act_chain:
            earlier._keep_calibration_input = True

    def extra_inputs(self) -> list[str]:
        return list(self._act_chain_names)

    # Pieces of the forward pass, shared with calibration and export.
    def accumulated_weight(self) -> torch.Tensor:
        """``a_1 W_1 + ... + a_n W_n`` over the weight chain (latent weights)."""
        weights = [m.weight for m in self._weight_chain] + [self.weight]
        return sum(a * w for a, w in zip(self.alpha, weights, strict=True))

    def weight_sign_input(self) -> torch.Tensor:
        """``BN_w(accumulated weight)``: the values whose sign is the binary weight."""
        v = self.accumulated_weight()
        if self.weight_bn is None:
            return v
        mean = v.mean(dim=(1, 2, 3), keepdim=True)
        var = v.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        u = (v - mean) / torch.sqrt(var + _WEIGHT_BN_EPS)
        return u * self.weight_bn["weight"].view(-1, 1, 1, 1) + self.weight_bn["bias"].view(-1, 1, 1, 1)

    def binary_weight(self) -> torch.Tensor:
        """The folded +-1 weights of the deployed conv (no gradient)."""
        return sign_pm1(self.weight_sign_input().detach())

    def accumulated_activation(self, x: torch.Tensor, earlier: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``b_1 A_1 + ... + b_n A_n`` with ``b_i = b_i_scale * E(A_i)``."""
        kind = self.config.activation_statistic
        members = [*self._act_chain, self]
        return sum(m.beta_scale * _statistic(t, kind) * t for m, t in zip(members, (*earlier, x), strict=True))

    def output_scale(self) -> torch.Tensor:
        """Per-output-channel factor on the binary dot product: E(|W_n|) (binary weights) times the gain."""
        scale = self.gain
        if self.config.binarize_weights:
            scale = scale * self.weight.abs().mean(dim=(1, 2, 3))
        return scale

    def _bn_running(self, acc: torch.Tensor) -> torch.Tensor:
        bn = self.act_bn
        return F.batch_norm(acc, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def _product(self, x: torch.Tensor, earlier: tuple[torch.Tensor, ...], running_bn: bool) -> torch.Tensor:
        cfg = self.config
        a = x
        if cfg.binarize_activations:
            u = self.accumulated_activation(x, earlier)
            if self.act_bn is not None:
                u = self._bn_running(u) if running_bn else self.act_bn(u)
            a = sign_ste(u, 1.0, cfg.ste)
        w = sign_ste(self.weight_sign_input(), 1.0, cfg.ste) if cfg.binarize_weights else self.weight
        return F.conv2d(a, w, padding=self.kernel_size // 2) * self.output_scale().view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor, *earlier: torch.Tensor) -> torch.Tensor:
        if len(earlier) != len(self._act_chain):
            raise RuntimeError(
                f"BAM conv expects the inputs of {self._act_chain_names} as extra arguments, got {len(earlier)}"
            )
        cfg = self.config
        if not (cfg.binarize_weights or cfg.binarize_activations):
            return F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)
        y = self._product(x, earlier, running_bn=False)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y_fp: torch.Tensor) -> None:
        cfg = self.config
        if not (cfg.binarize_weights or cfg.binarize_activations):
            return  # the layer is the FP conv
        missing = [n for n, m in zip(self._act_chain_names, self._act_chain, strict=True) if
                   m._calibration_input is None]
        if missing:
            raise RuntimeError(f"BAM calibration: the chain's earlier convs {missing} were not calibrated first")
        earlier = tuple(m._calibration_input for m in self._act_chain)
        if self._keep_calibration_input:
            self._calibration_input = x
        if cfg.binarize_activations:
            term = _statistic(x, cfg.activation_statistic) * x
            rms = term.square().mean().sqrt().clamp_min(1e-12)
            self.beta_scale.fill_(cfg.accumulation_init ** -len(self._act_chain) / float(rms))
            if self.act_bn is not None:
                acc = self.accumulated_activation(x, earlier)
                bn, mean = self.act_bn, acc.mean(dim=(0, 2, 3))
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(acc.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-12))
                bn.weight.fill_(1.0)  # shift mean/std: sign(BN(acc)) starts as sign(acc), like BN_w
                bn.bias.copy_(mean / torch.sqrt(bn.running_var + bn.eps))
        target = y_fp if self.bias is None else y_fp - self.bias.view(1, -1, 1, 1)
        self.gain.fill_(1.0)
        t = self._product(x, earlier, running_bn=True)
        gain = (t * target).sum(dim=(0, 2, 3)) / (t * t).sum(dim=(0, 2, 3)).clamp_min(1e-12)
        self.gain.copy_(torch.where(torch.isfinite(gain) & (gain != 0), gain, torch.ones_like(gain)))
        if not self._keep_calibration_input:  # the chain's last conv: its earlier inputs are no longer needed
            for m in self._act_chain:
                m._calibration_input = None

    @torch.no_grad()
    def deployed(self) -> BamDeployed:
        """The inference form: folded +-1 weights, per-channel scale, and the FP activation pre-op."""
        cfg = self.config
        if not cfg.binarize_weights:
            raise ValueError("BAM conv with FP weights has no packed form (binarize_weights is off)")
        if self.act_bn is not None:
            bn = self.act_bn
            mul = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            add = bn.bias - bn.running_mean * mul
        else:
            mul, add = torch.ones(self.in_channels), torch.zeros(self.in_channels)
        members = [*self._act_chain, self]
        return BamDeployed(
            weight_pm1=self.binary_weight(),
            scale=self.output_scale().detach().clone(),
            bias=None if self.bias is None else self.bias.detach().clone(),
            padding=self.kernel_size // 2,
            binary_activations=cfg.binarize_activations,
            inputs=[*self._act_chain_names, "<self>"],
            beta=[float(m.beta_scale) for m in members],
            statistic=cfg.activation_statistic,
            bn_mul=mul.detach().clone(),
            bn_add=add.detach().clone(),
        )

    def extra_fp_macs(self, out_shape: torch.Size) -> int:
        if not self.config.binarize_activations:
            return 0
        n, _, h, w = out_shape
        terms = len(self._act_chain) + 1  # per term: channel statistic, product with it, sum; then the BN
        return n * h * w * self.in_channels * (3 * terms + 1)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}"]
        parts.append(f"w{self.weight_bits}a{self.act_bits}")
        if self.chain_note:
            parts.append(self.chain_note)
        return ", ".join(parts)


def link_bam(layers: dict[str, QuantLayer], plan: Plan, model: nn.Module) -> None:
    """Form the accumulation chains among ``layers`` from the graph and connect the convs; note each in the plan."""
    if not layers:
        return
    cfg: BamConfig = next(iter(layers.values())).config
    chains = find_chains(model, plan, list(layers), plain_length=cfg.plain_chain_length,
                         short_range=cfg.short_range, long_range=cfg.long_range)
    # A chain accumulates activations only if every input it reads later is still intact then.
    acts_on = {c.label: cfg.binarize_activations and not set(c.members[:-1]) & chains.unreadable_inputs
               for c in chains.short}
    act_names: dict[str, list[str]] = {}
    for name in layers:
        short = chains.short_of(name)
        act_names[name] = short.members[: short.position(name) - 1] if short and acts_on[short.label] else []
    for name, layer in layers.items():
        short, long = chains.short_of(name), chains.long_of(name)
        if short and short.position(name) > 1:
            weight_chain = short.members[: short.position(name) - 1]
        elif long:
            weight_chain = long.members[: long.position(name) - 1]
        else:
            weight_chain = []
        layer.set_chains([layers[n] for n in weight_chain], [layers[n] for n in act_names[name]], act_names[name])
        parts = []
        if short:
            what = "w+a" if acts_on[short.label] else "w"
            parts.append(f"{short.label} {short.position(name)}/{len(short.members)} ({what})")
        if long:
            parts.append(f"{long.label} {long.position(name)}/{len(long.members)} (w)")
        layer.chain_note = "BAM chain " + ", ".join(parts) if parts else f"BAM single-layer: {chains.single[name]}"
        row = plan.row(name)
        row.note = f"{row.note}; {layer.chain_note}" if row.note else layer.chain_note
    for chain in [*chains.short, *chains.long]:
        what = "weights+activations" if chain.kind == "short" and acts_on[chain.label] else "weights"
        plan.messages.append(
            f"BAM chain {chain.label} ({chain.kind} range, {what}; {chain.block}): {' -> '.join(chain.members)}"
        )
    if chains.single:
        plan.messages.append(f"BAM: {len(chains.single)} conv(s) in no chain are binarized alone (see their notes)")
    blocked = [c.label for c in chains.short if cfg.binarize_activations and not acts_on[c.label]]
    if blocked:
        plan.messages.append(f"BAM: chains {blocked} accumulate weights only (an input is rewritten in place)")
