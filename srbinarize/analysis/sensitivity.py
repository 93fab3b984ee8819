"""Per-layer sensitivity: how much PSNR-Y each replaceable layer costs when it alone is converted.

`sensitivity(model, recipe)` converts the model once (calibrated as `convert` does: every replacement is
fitted to the FP activations of its own layer, so a layer's replacement is the same whether it is converted
alone or with all the others), then, for each replaced layer in turn, scores a few LR/HR crops twice, by
swapping modules in place: its *drop* puts that one replacement into an FP copy of the traced model (the
layer alone converted); its *gain* puts the FP layer back into the full conversion (the layer alone kept
FP). Each equals what `convert` gives with ``keep_fp`` set accordingly. No training.

Operation counts come from `srbinarize.summary` (MACs per row; OPs = BOPs/64 + FLOPs, the FP side branches
of a replacement included): a layer's *speed-up* is its FP MACs over its OPs once converted. PSNR-Y is the
field's convention (`srbinarize.train.metrics.psnr_ssim_y`: 8-bit output, Y channel, ``scale`` pixels of
border cropped), averaged over the crops.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..atomic import write_text_atomic
from ..convert import conversion_info, convert, default_calibration_batch
from ..errors import SrbinarizeError
from ..models.input_range import check_input_range, model_input_range, with_input_range
from ..models.load import model_scale
from ..recipe import Recipe, load_recipe
from ..summary import summary
from ..train.data import EvalSet, degrade_window, modcrop, to_float
from ..train.metrics import bicubic_upscale, psnr_ssim_y, tensor_to_uint8

if TYPE_CHECKING:
    from .mixed import MixedChoice

# Photos scikit-image ships, used when no image folder is given (no download, no data set).
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


class SensitivityError(SrbinarizeError):
    """Sensitivity cannot be measured as asked (images too small, a bad target, ...)."""


@dataclass
class Crops:
    """LR inputs (N, 3, s, s) in [0, 1] and their uint8 HR windows (the ground truth)."""

    lr: torch.Tensor
    hr: list[np.ndarray]
    scale: int
    source: str
    grey: list[bool] = field(default_factory=list)


def calibration_crops(
    images: str | Path | None = None, scale: int = 4, count: int = 4, size: int = 48, seed: int = 0
) -> Crops:
    """``count`` LR crops of ``size`` x ``size`` with their HR windows.

    ``images``: a folder in the ``../shared/data`` layout (``HR/`` + ``LR_bicubic/X<s>/``; the given LR files
    are used) or a plain folder of HR images (LR made with MATLAB-style bicubic); None: the photos
    scikit-image ships, LR by MATLAB-style bicubic. Crop positions are drawn with ``seed``; image ``i % n``.
    """
    if count < 1 or size < 1:
        raise SensitivityError(f"need at least one crop of at least 1 pixel, got count={count} size={size}")
    rng = np.random.default_rng(seed)
    lrs, hrs, greys = [], [], []
    if images is None:
        from skimage import data

        photos = [modcrop(np.asarray(getattr(data, n)()), scale) for n in _PHOTOS]
        for i in range(count):
            hr = photos[i % len(photos)]
            top, left = _position(rng, hr.shape[0] // scale, hr.shape[1] // scale, size, _PHOTOS[i % len(_PHOTOS)])
            lr, hr_win = degrade_window(hr, scale, top, left, size)
            lrs.append(lr)
            hrs.append(np.round(hr_win * 255).astype(np.uint8))
            greys.append(False)
        source = f"scikit-image photos {', '.join(_PHOTOS[: min(count, len(_PHOTOS))])} (MATLAB-style bicubic LR)"
    else:
        eval_set = EvalSet.load(images, scale, limit=count)
        for i in range(count):
            im = eval_set.images[i % len(eval_set.images)]
            top, left = _position(rng, im.lr.shape[0], im.lr.shape[1], size, im.name)
            lrs.append(to_float(im.lr[top : top + size, left : left + size]))
            hrs.append(im.hr[top * scale : (top + size) * scale, left * scale : (left + size) * scale])
            greys.append(im.grey)
        source = f"{images} ({len(eval_set.images)} images; LR {eval_set.lr_source})"
    lr = torch.from_numpy(np.stack(lrs).transpose(0, 3, 1, 2).copy()).float()
    return Crops(lr, hrs, scale, source, greys)


def _position(rng: np.random.Generator, h: int, w: int, size: int, name: str) -> tuple[int, int]:
    if h < size or w < size:
        raise SensitivityError(f"image {name} has an LR size {w}x{h}, smaller than the crop {size}x{size}")
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


@torch.no_grad()
def crops_psnr(model: nn.Module, crops: Crops) -> float:
    """Mean PSNR-Y of ``model`` (taking RGB in [0, 1]) on the crops."""
    y = model(crops.lr)
    want = (crops.lr.shape[-2] * crops.scale, crops.lr.shape[-1] * crops.scale)
    if tuple(y.shape[-2:]) != want:
        raise SensitivityError(f"the model turned {tuple(crops.lr.shape[-2:])} crops into {tuple(y.shape[-2:])}, "
                               f"not x{crops.scale}")
    scores = [psnr_ssim_y(tensor_to_uint8(y[i]), hr, crops.scale, ssim=False, grey=g)[0]
              for i, (hr, g) in enumerate(zip(crops.hr, crops.grey, strict=True))]
    return float(np.mean(scores))


@dataclass
class LayerSensitivity:
    """One replaced layer: its PSNR-Y drop when it alone is converted, its MACs and its modelled OPs."""

    name: str
    role: str
    module: str  # the original layer, e.g. "Conv2d 48->48 3x3"
    became: str
    drop: float  # dB below the FP model on the crops (negative: converting it helped); nan: not measured
    # dB regained when this layer alone stays FP and every other one is converted (leave-one-out); nan: not measured
    gain: float
    macs: int  # of the FP layer at the crop size (summary)
    ops: float  # OPs of the converted layer (BOPs/64 + FLOPs, side branches included)
    note: str = ""

    @property
    def speedup(self) -> float:
        """Modelled speed-up of this layer alone: FP MACs over converted OPs."""
        return self.macs / self.ops if self.ops else math.inf


@dataclass
class SensitivityReport:
    """Per-layer drops of one model under one recipe, and what the whole conversion does."""

    model: str
    recipe: str
    scale: int
    images: str  # where the crops come from
    crops: int
    crop_size: int
    input_range: float  # of the network inside (255: it was wrapped to take [0, 1])
    fp_psnr: float
    converted_psnr: float  # every layer the recipe replaces converted at once
    bicubic_psnr: float  # MATLAB-style bicubic upscaling of the same crops (the floor)
    layers: list[LayerSensitivity]
    total_macs: int  # all conv / linear layers of the model (summary)
    target_macs: int  # conv / linear layers with a role the recipe targets (the body's MACs)
    target_roles: tuple[str, ...]
    seconds: float
    threads: int
    load: str = ""  # /proc/loadavg at the start, where the system has one

    @property
    def binary_macs(self) -> int:
        return sum(s.macs for s in self.layers)

    def mac_share(self, layer: LayerSensitivity) -> float:
        """The layer's share of the model's MACs."""
        return layer.macs / self.total_macs if self.total_macs else 0.0

    def table(self, markdown: bool = False) -> str:
        """Plan order; ``rank`` 1 is the largest drop."""
        ranked = sorted((s for s in self.layers if math.isfinite(s.drop)), key=lambda s: -s.drop)
        rank = {s.name: i + 1 for i, s in enumerate(ranked)}
        head = ("layer", "role", "original", "became", "drop dB", "rank", "gain kept FP dB", "MACs %", "speed-up",
                "note")
        body = [(s.name, s.role, s.module, s.became, f"{s.drop:.3f}", str(rank.get(s.name, "-")), f"{s.gain:.3f}",
                 f"{100 * self.mac_share(s):.2f}", f"{s.speedup:.1f}x", s.note) for s in self.layers]
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in body]
        else:
            widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
            lines += [fmt.format(*r).rstrip() for r in body]
        share = self.binary_macs / self.target_macs if self.target_macs else 0.0
        lines += [
            "",
            f"{self.model}, recipe {self.recipe}, x{self.scale}: PSNR-Y on {self.crops} crops of "
            f"{self.crop_size}x{self.crop_size} LR from {self.images}",
            f"FP {self.fp_psnr:.3f} dB; all {len(self.layers)} layers converted {self.converted_psnr:.3f} dB "
            f"(sum of single-layer drops {sum(s.drop for s in self.layers if math.isfinite(s.drop)):.3f} dB); "
            f"bicubic {self.bicubic_psnr:.3f} dB",
            "drop: the layer alone converted, the rest FP; gain kept FP: the layer alone FP, the rest converted",
            f"replaced layers hold {100 * share:.1f}% of the MACs of roles {list(self.target_roles)} "
            f"({100 * self.binary_macs / max(self.total_macs, 1):.1f}% of the model's)",
            f"measured in {self.seconds:.1f} s on {self.threads} threads"
            + (f" (load average {self.load})" if self.load else ""),
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row, s in zip(out["layers"], self.layers, strict=True):
            row["mac_share"], row["speedup"] = self.mac_share(s), s.speedup
        return out

    def plot(self, path: str | Path) -> Path:
        """A bar chart of the drops in plan order, the layers' MAC shares as a second series; PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        names = [s.name for s in self.layers]
        drops = [s.drop if math.isfinite(s.drop) else 0.0 for s in self.layers]
        gains = [s.gain if math.isfinite(s.gain) else 0.0 for s in self.layers]
        shares = [100 * self.mac_share(s) for s in self.layers]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 4.8))
        x = np.arange(len(names))
        ax.bar(x - 0.2, drops, 0.4, color="tab:red", label="drop: layer alone converted (dB)")
        ax.bar(x + 0.2, gains, 0.4, color="tab:orange", label="gain: layer alone kept FP, rest converted (dB)")
        ax.set_ylabel("PSNR-Y (dB)")
        ax.set_xticks(x, names, rotation=90, fontsize=6)
        ax.set_xlim(-0.6, len(names) - 0.4)
        twin = ax.twinx()
        twin.plot(x, shares, "o", color="tab:blue", markersize=3, label="share of model MACs (%)")
        twin.set_ylabel("share of model MACs (%)")
        twin.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower center", ncol=3,
                  bbox_to_anchor=(0.5, 1.0), frameon=False)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(f"{self.model} / {self.recipe} x{self.scale}: FP {self.fp_psnr:.2f} dB, all converted "
                     f"{self.converted_psnr:.2f} dB, bicubic {self.bicubic_psnr:.2f} dB ({self.crops} crops "
                     f"{self.crop_size}px)",
                     fontsize=9, pad=18)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=130)
        plt.close(fig)
        tmp.replace(path)
        return path

    def keep_fp(self, binary_share: float | None = None, max_drop: float | None = None, by: str = "gain",
                target_speedup: float | None = None) -> MixedChoice:
        """The layers to keep FP for a target; see `srbinarize.analysis.mixed.choose_keep_fp`."""
        from .mixed import choose_keep_fp

        return choose_keep_fp(self, binary_share, max_drop, by, target_speedup)


def sensitivity(
    model: nn.Module,
    recipe: str | Path | Recipe = "scales",
    images: str | Path | Crops | None = None,
    *,
    crops: int = 4,
    crop_size: int = 48,
    scale: int | None = None,
    input_range: float | None = None,
    calibration_data: torch.Tensor | None = None,
    name: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> SensitivityReport:
    """PSNR-Y drop of each layer ``recipe`` replaces when that layer alone is converted (calibrated, no training),
    and the PSNR-Y it gives back when it alone stays FP in the full conversion.

    ``images``: `Crops`, an image folder or None (see `calibration_crops`). ``input_range=255``: the model
    takes RGB in [0, 255] and is wrapped as `convert` wraps it (its layers are then named ``model.<name>``).
    ``calibration_data``: as `convert` takes it, in [0, 1]; by default the recipe's own calibration patches.
    ``overrides`` go to the recipe as in `convert`. A layer whose replacement reads other layers' inputs
    (BAM's linked chains) cannot stand alone: its drop and gain are nan, with a note.
    """
    recipe = load_recipe(recipe).with_overrides(**overrides)
    start = time.perf_counter()
    load = _loadavg()
    if input_range is not None:
        model = with_input_range(model, check_input_range(input_range, "input_range"))
    model = model.eval()
    scale = scale or model_scale(model)
    data = images if isinstance(images, Crops) else calibration_crops(images, scale, crops, crop_size, seed)
    if data.scale != scale:
        raise SensitivityError(f"the crops are for x{data.scale}, the model is x{scale}")
    cal = calibration_data if calibration_data is not None else default_calibration_batch(
        recipe.calibration, data.lr.shape[1])
    example = data.lr[:1]
    converted = convert(model, recipe, example_input=example, calibration_data=cal)
    fp = convert(model, recipe, example_input=example, calibrate=False, roles=[])
    info = conversion_info(converted)
    stats = {s.row.name: s for s in summary(converted, input_size=tuple(data.lr.shape[-2:])).layers}
    fp_psnr = crops_psnr(fp, data)
    converted_psnr = crops_psnr(converted, data)

    fp_modules, new_modules = dict(fp.named_modules()), dict(converted.named_modules())
    layers = []
    for row in info.plan.rows:
        if row.replaced_by is None:
            continue
        new, old = new_modules[row.name], fp_modules[row.name]
        s = stats[row.name]
        entry = LayerSensitivity(row.name, row.role, row.module, row.replaced_by, math.nan, math.nan, s.macs,
                                 s.bops / 64 + s.flops)
        if new.extra_inputs():
            entry.note = f"reads the inputs of {new.extra_inputs()}: not measured alone"
        else:
            entry.drop = fp_psnr - _swapped_psnr(fp, row.name, new, old, data)
            entry.gain = _swapped_psnr(converted, row.name, old, new, data) - converted_psnr
        layers.append(entry)
    roles = recipe.targets.roles
    all_stats = list(stats.values())
    return SensitivityReport(
        model=name or type(model).__name__,
        recipe=recipe.name,
        scale=scale,
        images=data.source,
        crops=data.lr.shape[0],
        crop_size=data.lr.shape[-1],
        input_range=model_input_range(model),
        fp_psnr=fp_psnr,
        converted_psnr=converted_psnr,
        bicubic_psnr=bicubic_psnr(data),
        layers=layers,
        total_macs=sum(s.macs for s in all_stats if s.row.kind != "add"),
        target_macs=sum(s.macs for s in all_stats if s.row.kind != "add" and s.row.role in roles),
        target_roles=tuple(roles),
        seconds=time.perf_counter() - start,
        threads=torch.get_num_threads(),
        load=load,
    )


def _swapped_psnr(model: nn.Module, name: str, swap_in: nn.Module, back: nn.Module, crops: Crops) -> float:
    """PSNR-Y of ``model`` with its layer ``name`` replaced by ``swap_in`` for the measurement, then ``back``."""
    model.set_submodule(name, swap_in)
    try:
        return crops_psnr(model, crops)
    finally:
        model.set_submodule(name, back)


def bicubic_psnr(crops: Crops) -> float:
    """Mean PSNR-Y of MATLAB-style bicubic upscaling of the crops."""
    scores = []
    for lr, hr, grey in zip(crops.lr, crops.hr, crops.grey, strict=True):
        up = bicubic_upscale(tensor_to_uint8(lr), crops.scale)
        scores.append(psnr_ssim_y(up, hr, crops.scale, ssim=False, grey=grey)[0])
    return float(np.mean(scores))


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def write_report(
    report: SensitivityReport,
    prefix: str | Path,
    command: Sequence[str] | None = None,
    choices: Sequence[MixedChoice] = (),
) -> list[Path]:
    """``<prefix>.md`` (command, table, mixed-precision choices), ``<prefix>.json`` and ``<prefix>.png``.

    Each file is written under a temporary name, then renamed.
    """
    import json

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md = f"# Per-layer sensitivity: {report.model} ({report.recipe})\n\n"
    if command:
        md += "```\n" + shlex.join(command) + "\n```\n\n"
    md += report.table(markdown=True) + "\n"
    for choice in choices:
        md += f"\nMixed precision, {choice}\n"
    record = {**report.to_dict(), "command": list(command) if command else None, "cpu": cpu_description(),
              "mixed": [asdict(c) for c in choices]}
    paths = []
    for suffix, text in ((".md", md), (".json", json.dumps(record, indent=1))):
        paths.append(write_text_atomic(prefix.with_name(prefix.name + suffix), text))
    paths.append(report.plot(prefix.with_name(prefix.name + ".png")))
    return paths


def cpu_description() -> str:
    """The CPU model and the number of cores visible (for benchmark records)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"
