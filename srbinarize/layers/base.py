"""What every replacement layer offers to the graph pass, the summary and the exporter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..graph.partition import Plan


class QuantLayer(nn.Module):
    """A layer that stands in for one FP conv or linear of the original model.

    Subclasses set ``weight_bits`` / ``act_bits`` (32 where a side stays FP) and implement
    `from_float`; `calibrate` refines the initialisation from FP inputs and outputs of the layer.
    """

    weight_bits: int = 32
    act_bits: int = 32
    output_bits: int = 32  # bits of the tensor the layer writes (the summary's activation memory)

    @classmethod
    def from_float(cls, module: nn.Module, config: Any) -> QuantLayer:
        raise NotImplementedError

    @torch.no_grad()
    def copy_weights_from(self, module: nn.Module) -> None:
        """Start from the FP layer: its weight, and its bias where it has one."""
        self.weight.copy_(module.weight)
        if module.bias is not None:
            self.bias.copy_(module.bias)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y_fp: torch.Tensor) -> None:
        """Initialise from a batch of the FP layer's inputs ``x`` and outputs ``y_fp`` (default: nothing)."""

    def at_network_boundary(self, reads_input: bool, writes_output: bool) -> None:
        """Told by `convert` that the layer reads the network input / writes the final output (default: nothing)."""

    def notes(self) -> list[str]:
        """Short remarks for the summary (e.g. a component that does not apply to this layer)."""
        return []

    def extra_fp_macs(self, out_shape: torch.Size) -> int:
        """Multiply-accumulates of FP side branches (re-scaling maps etc.) per forward."""
        return 0

    def extra_inputs(self) -> list[str]:
        """Layers (module names) whose input tensors this layer takes as extra forward arguments, in order."""
        return []


@dataclass(frozen=True)
class LayerType:
    """A registered replacement: its config dataclass, the layer kinds it takes and its builder.

    ``link``, if set, runs once after all layers of this type are built and before calibration, with
    those layers by name, the plan and the model being converted: layers that depend on each other
    (BAM's chains) are connected there; it may drop a layer from the dict (it then stays FP) and
    writes what it decided into the plan's row notes and messages.
    """

    config: type
    kinds: tuple[str, ...]
    build: Callable[[nn.Module, Any], QuantLayer]
    link: Callable[[dict[str, QuantLayer], Plan, nn.Module], None] | None = None
