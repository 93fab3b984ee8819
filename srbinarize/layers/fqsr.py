"""FQSR: fully quantized SR layers (seed 004) — a quantizer with a learnable interval, conv and skip add.

Quantizer (Eq. 3 of the paper, one learnable interval ``I`` per quantizer, STE through the rounding)::

    Q(v) = round(clip(v / I, -s, 1) * n) * I / n        s = 1 + 1/n signed, 0 unsigned

with ``n = 2^M - 1`` levels above zero for unsigned data and ``n = 2^(M-1) - 1`` for signed data, i.e.
the integer codes ``[0, 2^M - 1]`` or ``[-2^(M-1), 2^(M-1) - 1]`` with step ``I / n``. The paper writes
``2^M - 1`` and ``s = 1`` for both; on signed data that gives ``2^(M+1) - 1`` values, an (M+1)-bit code.
Here an M-bit quantizer has at most ``2^M`` values, exactly the range of an M-bit integer (two's
complement), so ONNX QuantizeLinear's saturation to int8/uint8 (int4/uint4) is the clip itself.
Gradients: STE through ``round`` only, everything else differentiated as written, so ``I`` gets the
LSQ-style gradient ``(round(u) - u) / n`` inside the range and ``+-1`` where ``v`` is clipped.
Whether activations are signed is read off the data at the first observation (any ``v < 0`` means
signed): inputs after a ReLU get the unsigned code and twice the resolution.

DAIA (distribution-aware interval adaptation): the first ``l`` (``daia_iters``, 20) observations of a
quantizer pass values through unchanged and set ``I`` to the running mean of ``max|v|``; afterwards ``I``
is trained with the network. Observations happen in two places:

- at convert time, `calibrate` runs DAIA on the FP activations the graph pass hands over: the calibration
  batch is one observation, like one training batch (the paper's ``max(V_i)`` of a batch), and then the
  window is closed, so a converted model quantizes at once, in eval and in training. (The mean of per-image
  maxima of 48x48 calibration patches sat below the maxima of whole test images: at 8/8/32 its clipping
  cost the zoo EDSR x2 0.47 dB on Set5 before finetuning, the batch maximum 0.07 dB);
- in training (``model.train()``), a quantizer whose window is still open (never calibrated, or reopened
  with `restart_daia`) passes through and observes once per forward, i.e. once per training iteration:
  the counter is the buffer ``daia_seen`` and travels with the state dict.

A quantizer that never observed anything refuses to quantize in eval mode instead of using a made-up
interval. The conv quantizes its input, weight and output; the add quantizes both operands with one
shared quantizer (the official code's ``y = Q(x) + Q(z)``) and its result with a second one (the paper's
Fig. 3: the output of the element-wise layer is quantized too). Bits of 32 switch a quantizer off.
SQCL: `sqcl_loss` is ``sum over quantizers ||Q(v) - v||_1`` (mean over elements of each tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLayer

FP_BITS = 32

# Ready-made bit settings w/a/s of the paper, as overrides: convert(model, "fqsr", **SETTINGS["6/6/8"]).
SETTINGS: dict[str, dict[str, int]] = {
    "4/4/8": {"bits_w": 4, "bits_a": 4, "bits_s": 8},
    "6/6/8": {"bits_w": 6, "bits_a": 6, "bits_s": 8},
    "8/8/8": {"bits_w": 8, "bits_a": 8, "bits_s": 8},
    "8/8/32": {"bits_w": 8, "bits_a": 8, "bits_s": 32},
}


def _check_bits(name: str, bits: int) -> None:
    if bits != FP_BITS and not 2 <= bits <= 16:
        raise ValueError(f"{name} must be between 2 and 16, or 32 for full precision; got {bits}")


@dataclass(frozen=True)
class FqsrConvConfig:
    bits_w: int = 8  # weights of every conv
    bits_a: int = 8  # input and output activations of every conv
    daia_iters: int = 20  # l: observations that set the interval before it is trained

    def __post_init__(self) -> None:
        _check_bits("bits_w", self.bits_w)
        _check_bits("bits_a", self.bits_a)
        if self.daia_iters < 1:
            raise ValueError(f"daia_iters must be >= 1, got {self.daia_iters}")


@dataclass(frozen=True)
class FqsrAddConfig:
    bits_s: int = 8  # operands and result of every skip-connection add
    daia_iters: int = 20

    def __post_init__(self) -> None:
        _check_bits("bits_s", self.bits_s)
        if self.daia_iters < 1:
            raise ValueError(f"daia_iters must be >= 1, got {self.daia_iters}")


def round_ste(u: torch.Tensor) -> torch.Tensor:
    """``round(u)`` forward (half to even, as ONNX QuantizeLinear), identity gradient."""
    return u + (torch.round(u) - u).detach()


class IntervalQuantizer(nn.Module):
    """``Q(v)`` with one learnable interval, DAIA initialisation and an SQCL term of its last call.

    ``signed=None`` decides from the data at the first observation; weights pass ``signed=True``.
    """

    def __init__(self, bits: int, daia_iters: int = 20, signed: bool | None = None):
        super().__init__()
        _check_bits("bits", bits)
        if bits == FP_BITS:
            raise ValueError("a 32-bit quantizer is no quantizer: leave it out")
        self.bits, self.daia_iters = bits, daia_iters
        self.interval = nn.Parameter(torch.ones(()))
        self.register_buffer("daia_seen", torch.zeros((), dtype=torch.long))
        # -1: not known yet (decided at the first observation), 0: unsigned, 1: signed
        self.register_buffer("sign_mode", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))
        # ||Q(v) - v||_1 of the last training forward (SQCL), with its graph: read within the same step
        # (`sqcl_loss`); never copied, pickled or kept across a switch of mode.
        self.last_error: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["last_error"] = None  # a non-leaf tensor: deepcopy and pickle refuse it, and it is one step's
        return state

    def train(self, mode: bool = True) -> IntervalQuantizer:
        self.last_error = None
        return super().train(mode)

    @property
    def signed(self) -> bool:
        if int(self.sign_mode) < 0:
            raise RuntimeError("quantizer has not observed any data yet, so its sign is unknown")
        return bool(self.sign_mode)

    @property
    def ready(self) -> bool:
        """The DAIA window is closed: the quantizer quantizes."""
        return int(self.daia_seen) >= self.daia_iters

    def levels(self) -> int:
        """``n``: the positive levels of the code; ``I`` maps to ``n``."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def qrange(self) -> tuple[int, int]:
        """Integer range of the code, ``(-n - 1, n)`` signed or ``(0, n)`` unsigned."""
        n = self.levels()
        return (-n - 1 if self.signed else 0), n

    def step(self) -> torch.Tensor:
        """The quantization step ``I / n`` (the scale of the integer code)."""
        return self.interval.detach().abs() / self.levels()

    @torch.no_grad()
    def observe(self, *vs: torch.Tensor) -> None:
        """One DAIA observation of one or more tensors sharing this quantizer: ``max|v|`` into the running mean."""
        negative = any(bool((v < 0).any()) for v in vs)
        if int(self.sign_mode) < 0 or (negative and not self.sign_mode):
            self.sign_mode.fill_(int(negative))
        k = int(self.daia_seen)
        m = torch.stack([v.abs().amax() for v in vs]).amax().clamp_min(1e-8)
        self.interval.copy_((self.interval * k + m) / (k + 1))
        self.daia_seen += 1

    @torch.no_grad()
    def calibrate(self, *vs: torch.Tensor) -> None:
        """DAIA on calibration data: one observation of the whole batch (``I = max|v|``), then close the window."""
        self.daia_seen.zero_()
        self.observe(*vs)
        self.daia_seen.fill_(self.daia_iters)

    def integer(self, v: torch.Tensor) -> torch.Tensor:
        """The integer code of ``v`` (no gradient): what the deployed graph stores."""
        lo, hi = self.qrange()
        return torch.clamp(torch.round(v.detach() / self.step()), lo, hi)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            if self.training:
                self.observe(v)
                self.last_error = None
                return v
            if int(self.daia_seen) == 0:
                raise RuntimeError(
                    "FQSR quantizer was never calibrated: convert with calibration data, load a checkpoint, "
                    f"or train it for {self.daia_iters} iterations (DAIA) before evaluating"
                )
        lo, hi = self.qrange()
        step = self.interval.abs().clamp_min(1e-8) / self.levels()
        q = round_ste(torch.clamp(v / step, lo, hi)) * step
        self.last_error = (q - v).abs().mean() if self.training else None
        return q

    def extra_repr(self) -> str:
        sign = {-1: "sign from data", 0: "unsigned", 1: "signed"}[int(self.sign_mode)]
        return f"bits={self.bits}, {sign}, daia {int(self.daia_seen)}/{self.daia_iters}"


def _quantizer(bits: int, daia_iters: int, signed: bool | None = None) -> IntervalQuantizer | None:
    return None if bits == FP_BITS else IntervalQuantizer(bits, daia_iters, signed)


def supports_conv(conv: nn.Module) -> str | None:
    """Why a conv cannot become an FQSR conv (None if it can)."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding must be explicit zero padding, got {conv.padding!r} {conv.padding_mode}"
    return None


class FqsrConv2d(QuantLayer):
    """``Q_out(conv(Q_in(x), Q_w(w)) + b)``; the bias stays FP (an int32 on the grid of the product)."""

    def __init__(self, conv: nn.Conv2d, config: FqsrConvConfig):
        super().__init__()
        self.config = config
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.weight_q = _quantizer(config.bits_w, config.daia_iters, signed=True)
        self.input_q = _quantizer(config.bits_a, config.daia_iters)
        self.output_q = _quantizer(config.bits_a, config.daia_iters)
        self.weight_bits = config.bits_w
        self._sync_bits()

    def _sync_bits(self) -> None:
        self.act_bits = self.input_q.bits if self.input_q is not None else FP_BITS
        self.output_bits = self.output_q.bits if self.output_q is not None else FP_BITS

    @classmethod
    def from_float(cls, module: nn.Module, config: FqsrConvConfig) -> FqsrConv2d:
        reason = supports_conv(module)
        if reason:
            raise ValueError(f"FQSR cannot replace this conv: {reason}")
        return cls(module, config).to(module.weight.device)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_q(self.weight) if self.weight_q is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_q is not None:
            x = self.input_q(x)
        y = F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.output_q(y) if self.output_q is not None else y

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y_fp: torch.Tensor) -> None:
        if self.weight_q is not None:
            self.weight_q.calibrate(self.weight)
        if self.input_q is not None:
            self.input_q.calibrate(x)
        if self.output_q is not None:
            self.output_q.calibrate(y_fp)

    def at_network_boundary(self, reads_input: bool, writes_output: bool) -> None:
        """The network input and the final output are left as they are (not quantized)."""
        if reads_input:
            self.input_q = None
        if writes_output:
            self.output_q = None
        self._sync_bits()

    def notes(self) -> list[str]:
        notes = []
        if self.input_q is None and self.act_bits == FP_BITS and self.config.bits_a != FP_BITS:
            notes.append("reads the network input: input left FP")
        if self.output_q is None and self.config.bits_a != FP_BITS:
            notes.append("writes the final output: output left FP")
        return notes

    def extra_repr(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        bits = f"w{self.weight_bits} in{self.act_bits} out{self.output_bits}"
        return f"{self.in_channels}, {self.out_channels}, k={k}, {bits}"


class FqsrAdd(QuantLayer):
    """``Q_out(Q_s(x) + Q_s(z))``: both operands on one shared grid, the sum re-quantized."""

    weight_bits = FP_BITS  # no weights

    def __init__(self, config: FqsrAddConfig):
        super().__init__()
        self.config = config
        self.operand_q = _quantizer(config.bits_s, config.daia_iters)
        self.output_q = _quantizer(config.bits_s, config.daia_iters)
        self.act_bits = self.output_bits = config.bits_s

    @classmethod
    def from_float(cls, module: nn.Module, config: FqsrAddConfig) -> FqsrAdd:
        """``module`` is the graph pass's FP add (``x + z``, nothing to copy)."""
        if any(True for _ in module.parameters()):
            raise ValueError(f"FQSR add replaces a parameter-free add, not {type(module).__name__}")
        return cls(config)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.operand_q is None:
            return x + z
        if not self.operand_q.ready and self.training:
            self.operand_q.observe(x, z)  # DAIA: one observation of both operands, the shared interval covers both
            return self.output_q(x + z)
        return self.output_q(self.operand_q(x) + self.operand_q(z))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y_fp: torch.Tensor) -> None:
        """``x`` is the first operand and ``y_fp`` the FP sum, so the second operand is ``y_fp - x``."""
        if self.operand_q is None:
            return
        self.operand_q.calibrate(x, y_fp - x)
        self.output_q.calibrate(y_fp)

    def extra_repr(self) -> str:
        return f"s{self.config.bits_s}"


def fqsr_quantizers(model: nn.Module) -> list[IntervalQuantizer]:
    return [m for m in model.modules() if isinstance(m, IntervalQuantizer)]


def sqcl_loss(model: nn.Module) -> torch.Tensor:
    """SQCL of the last training forward: ``sum over quantizers of mean |Q(v) - v|`` (weights and activations).

    Call it right after the forward pass of a training step and add ``weight * sqcl_loss(model)`` to the
    SR loss (the recipe declares the weight as ``train.extra_losses.sqcl``, 0.3 in the paper). Quantizers
    still in their DAIA window contribute nothing. A model without FQSR quantizers is an error.
    """
    quantizers = fqsr_quantizers(model)
    if not quantizers:
        raise ValueError("sqcl_loss: the model has no FQSR quantizer (was it converted with the fqsr recipe?)")
    terms = [q.last_error for q in quantizers if q.last_error is not None]
    if not terms:
        return next(model.parameters()).new_zeros(())
    return torch.stack(terms).sum()


def restart_daia(model: nn.Module) -> int:
    """Reopen the DAIA window of every FQSR quantizer (the paper's schedule from scratch); returns how many."""
    quantizers = fqsr_quantizers(model)
    for q in quantizers:
        q.daia_seen.zero_()
    return len(quantizers)
