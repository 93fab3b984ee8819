"""`convert`: the one entry point from an FP model and a recipe to a trainable quantized model.

    trace (graph/trace) -> plan (graph/partition) -> select + build + calibrate (graph/rewrite) -> swap

The result is an ordinary ``nn.Module`` (an ``fx.GraphModule`` when the model traced) that carries
a `ConversionInfo` as ``model.srbinarize_info``: the plan and the recipe, which `summary`, checkpoints
and the exporter read.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SrbinarizeError
from .graph.adds import insert_skip_adds, network_io_layers
from .graph.chains import wire_extra_inputs
from .graph.fold_bn import fold_bn_graph
from .graph.partition import Plan, layer_kind, partition_exported, partition_graph
from .graph.rewrite import build_replacements, select, swap
from .graph.trace import TraceFailure, trace
from .layers import LAYER_TYPES
from .models import probe
from .models.input_range import check_input_range, model_input_range, with_input_range
from .recipe import Calibration, Recipe, load_recipe

INFO_ATTR = "srbinarize_info"


class ConversionError(SrbinarizeError):
    """The model cannot be converted (no layers, no input size that runs, ...)."""


@dataclass
class ConversionInfo:
    recipe: Recipe
    plan: Plan
    in_channels: int
    input_range: float = 1.0  # RGB range of the network inside; the converted model takes [0, 1] regardless


def conversion_info(model: nn.Module) -> ConversionInfo | None:
    return getattr(model, INFO_ATTR, None)


def convert(
    model: nn.Module,
    recipe: str | Path | Recipe = "scales",
    *,
    example_input: torch.Tensor | None = None,
    calibration_data: torch.Tensor | None = None,
    calibrate: bool = True,
    leaf_modules: Sequence[type] = (),
    input_range: float | None = None,
    **overrides: Any,
) -> nn.Module:
    """Return a copy of ``model`` whose layers are replaced as ``recipe`` says; ``model`` is untouched.

    ``overrides`` replace layer options or targets of the recipe (``skip=False``, ``roles=["body"]``).
    ``calibration_data`` is a batch of LR images (N, C, H, W) in [0, 1]; by default, crops of the natural
    images scikit-image ships. ``calibrate=False`` skips it (used when weights are loaded afterwards).
    ``input_range=255`` for a model trained on RGB in [0, 255]: it is wrapped (`ScaledRange`) so that the
    result, like its calibration, takes [0, 1]; by default the range is the model's own (255 for an already
    wrapped model, else 1; `srbinarize.models.input_range.detect_input_range` finds it by probing).
    """
    recipe = load_recipe(recipe).with_overrides(**overrides)
    if input_range is not None:
        model = with_input_range(model, check_input_range(input_range, "input_range"))
    if not any(layer_kind(m) for m in model.modules()):
        raise ConversionError(
            f"{type(model).__name__} has no Conv2d, ConvTranspose2d or Linear layer: nothing to convert"
        )
    work = copy.deepcopy(model).eval()
    example = example_input if example_input is not None else _probe_input(work)
    try:
        traced = trace(work, example, leaf_modules)
        folded = fold_bn_graph(traced.module)  # conv -> BatchNorm pairs become one conv (exact in eval)
        work, plan = traced.module, partition_graph(traced.module, traced.leaves, example)
        if folded:
            plan.messages.append(f"BatchNorm folded into the conv before it: {folded}")
        if traced.leaves:
            plan.messages.append(f"kept whole (untraceable), layers reached by module path: {traced.leaves}")
        if "add" in recipe.layers:  # the recipe replaces skip-connection adds: they become rows like layers
            insert_skip_adds(work, plan)
    except TraceFailure as err:
        plan = partition_exported(work, example, str(err))
        warnings.warn(plan.messages[0], stacklevel=2)
        if "add" in recipe.layers:
            plan.messages.append("skip adds are found in the traced graph only: none replaced")
    record_shapes(work, plan, example)

    modules = dict(work.named_modules())
    targets = recipe.targets
    rows = select(plan, targets.roles, set(recipe.layers), targets.include_pooled, targets.min_kernel_size, modules)
    keep, names = set(targets.keep_fp), {r.name for r in plan.rows}
    if keep - names:
        raise ConversionError(f"keep_fp names {sorted(keep - names)}: not layers of {type(model).__name__}")
    for row in (r for r in rows if r.name in keep):
        row.note = "kept FP: in targets.keep_fp"
    rows = [r for r in rows if r.name not in keep]

    def build(row, module):
        spec = recipe.layers[row.kind]
        return LAYER_TYPES[spec.type].build(module, spec.config)

    batch = None
    if calibrate:
        batch = calibration_data if calibration_data is not None else default_calibration_batch(
            recipe.calibration, example.shape[1]
        )

    def link(built):  # layer types whose layers depend on each other (BAM chains) connect them here
        for type_name in sorted({spec.type for spec in recipe.layers.values()}):
            if LAYER_TYPES[type_name].link is None:
                continue
            mine = {n: m for n, m in built.items() if recipe.layers[plan.row(n).kind].type == type_name}
            LAYER_TYPES[type_name].link(mine, plan, work)
            for name in set(built) - set(mine):  # the ones link dropped stay FP
                if recipe.layers[plan.row(name).kind].type == type_name:
                    del built[name]

    replacements = build_replacements(work, rows, build, batch, link)
    swap(work, replacements)
    if plan.traced:  # layers reading the network input or writing the final output may leave those FP
        for name, (reads_input, writes_output) in network_io_layers(work, plan).items():
            if name in replacements:
                replacements[name].at_network_boundary(reads_input, writes_output)
    wire_extra_inputs(work, replacements)
    for name, new in replacements.items():
        plan.row(name).replaced_by = type(new).__name__
    setattr(work, INFO_ATTR, ConversionInfo(recipe, plan, example.shape[1], model_input_range(model)))
    return work.train(model.training)


def record_shapes(model: nn.Module, plan: Plan, example: torch.Tensor) -> None:
    """Fill in each row's input and output shape from one forward pass on ``example``."""
    modules = dict(model.named_modules())
    handles = []

    def hook(row):
        def fn(_module, inputs, output):
            if row.in_shape is None:
                row.in_shape, row.out_shape = tuple(inputs[0].shape), tuple(output.shape)

        return fn

    for row in plan.rows:
        row.in_shape = row.out_shape = None
        handles.append(modules[row.name].register_forward_hook(hook(row)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()


def _probe_input(model: nn.Module) -> torch.Tensor:
    """A small input ``model`` runs on, or one `ConversionError` saying which were tried."""
    try:
        return probe.example_input(model)
    except probe.ModelInputError as err:
        raise ConversionError(str(err)) from None


def default_calibration_batch(cal: Calibration, channels: int, seed: int = 0) -> torch.Tensor:
    """LR-like patches from the natural photos bundled with scikit-image (no download, no data folder)."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    patches = []
    for i in range(cal.batches * cal.batch_size):
        img = torch.from_numpy(photos[i % len(photos)].copy()).permute(2, 0, 1)[None].float() / 255
        # Halve with antialiasing so the patches look like the low-resolution inputs an SR model gets.
        img = F.interpolate(img, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
        h, w = img.shape[-2:]
        top, left = rng.integers(0, h - cal.patch_size), rng.integers(0, w - cal.patch_size)
        patches.append(img[..., top : top + cal.patch_size, left : left + cal.patch_size])
    batch = torch.cat(patches).clamp(0, 1)
    if channels == 1:
        batch = (batch * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif channels != 3:
        batch = batch.mean(1, keepdim=True).expand(-1, channels, -1, -1).contiguous()
    return batch
