"""Apply a plan: choose the layers a recipe takes, build and calibrate their replacements, swap them in."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .partition import LayerRow, Plan


def select(plan: Plan, roles: tuple[str, ...], kinds: set[str], include_pooled: bool, min_kernel_size: int,
           modules: dict[str, nn.Module]) -> list[LayerRow]:
    """The rows a recipe replaces; rows left FP for a reason get a note saying why."""
    chosen = []
    for row in plan.rows:
        if row.role not in roles or row.kind not in kinds:
            continue
        module = modules[row.name]
        if row.pooled_input and not include_pooled:
            row.note = "acts on pooled vectors (channel attention): kept FP"
            continue
        kernel = getattr(module, "kernel_size", (1, 1))[0]
        if kernel < min_kernel_size:
            row.note = f"{kernel}x{kernel} below min_kernel_size {min_kernel_size}: kept FP"
            continue
        chosen.append(row)
    return chosen


def build_replacements(
    model: nn.Module,
    rows: list[LayerRow],
    build: Callable[[LayerRow, nn.Module], nn.Module],
    calibration: torch.Tensor | None,
    link: Callable[[dict[str, nn.Module]], None] | None = None,
) -> dict[str, nn.Module]:
    """Build the replacement of each row from its FP module; calibrate it on the FP model's activations.

    ``link`` (if given) sees all built replacements before calibration and may drop some. Calibration
    runs the FP model once on ``calibration``; each replacement sees the inputs and outputs its FP layer
    saw there, in dataflow order. A row whose layer cannot be replaced gets a note and stays FP.
    """
    modules = dict(model.named_modules())
    built: dict[str, nn.Module] = {}
    for row in rows:
        try:
            built[row.name] = build(row, modules[row.name])
        except ValueError as err:
            row.note = f"kept FP: {err}"
    if link is not None:
        link(built)
    if calibration is None or not built:
        return built
    handles = []
    done: set[str] = set()

    def hook(name: str):
        def fn(_module, inputs, output):
            if name not in done:  # a module called twice is calibrated on its first call
                done.add(name)
                built[name].calibrate(inputs[0].detach(), output.detach())

        return fn

    for name in built:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(calibration)
    finally:
        for h in handles:
            h.remove()
    return built


def swap(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    for name, new in replacements.items():
        model.set_submodule(name, new)
