"""Replacement layers, one small module per method, and the registry recipes name them by.

Adding a method: write its layer (a `QuantLayer` with a config dataclass) and register it below;
recipes then refer to it by its key in ``layers.<kind>.type``.
"""

from __future__ import annotations

from .bam import BamConfig, BamConv2d, link_bam
from .base import LayerType, QuantLayer
from .fqsr import FqsrAdd, FqsrAddConfig, FqsrConv2d, FqsrConvConfig
from .lmb import LmbConfig, LmbConv2d
from .ma import MaConfig, MaConv2d, link_ma
from .scales import ScalesConfig, ScalesConv2d, ScalesLinear, ScalesLinearConfig
from .ste import sign_pm1, sign_ste

LAYER_TYPES: dict[str, LayerType] = {
    "scales": LayerType(ScalesConfig, ("conv2d",), ScalesConv2d.from_float),
    "scales_linear": LayerType(ScalesLinearConfig, ("linear",), ScalesLinear.from_float),
    "fqsr_conv": LayerType(FqsrConvConfig, ("conv2d",), FqsrConv2d.from_float),
    "fqsr_add": LayerType(FqsrAddConfig, ("add",), FqsrAdd.from_float),
    "bam": LayerType(BamConfig, ("conv2d",), BamConv2d.from_float, link_bam),
    "ma": LayerType(MaConfig, ("conv2d",), MaConv2d.from_float, link_ma),
    "lmb": LayerType(LmbConfig, ("conv2d",), LmbConv2d.from_float),
}

__all__ = [
    "LAYER_TYPES", "LayerType", "QuantLayer", "ScalesConfig", "ScalesConv2d", "ScalesLinear", "sign_pm1", "sign_ste",
]
