"""Pictures of a run: the training curves and a side-by-side crop (bicubic | FP | binary | HR), as PNG.

Both are written to a temporary name and renamed, like every file of a run folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_output


def _atomic_png(save, path: Path) -> None:
    with atomic_output(path, suffix=".tmp.png") as tmp:  # matplotlib and Pillow read the format off the name
        save(tmp)


def plot_curves(
    path: Path,
    steps: Sequence[int],
    losses: Sequence[float],
    val: dict[str, list[tuple[int, float]]],
    baselines: dict[str, dict[str, float]] | None = None,
    title: str = "",
) -> None:
    """Loss per step (raw and smoothed) and validation PSNR-Y per set with the reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if len(steps):
        ax.plot(steps, losses, color="0.75", lw=0.6, label="loss")
        if len(losses) > 5:
            alpha = min(0.5, 10.0 / len(losses))
            ema, acc = [], losses[0]
            for v in losses:
                acc = (1 - alpha) * acc + alpha * v
                ema.append(acc)
            ax.plot(steps, ema, color="C0", lw=1.5, label="smoothed")
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax = axes[1]
    styles = {"bicubic": ":", "FP teacher": "--", "converted": "-."}
    for i, (name, points) in enumerate(val.items()):
        color = f"C{i}"
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", color=color, ms=3, label=f"{name} (finetuning)")
        for label, value in (baselines or {}).get(name, {}).items():
            ax.axhline(value, color=color, ls=styles.get(label, ":"), lw=0.9, alpha=0.8, label=f"{name} {label}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation PSNR-Y (dB)")
    ax.grid(alpha=0.3)
    if val:
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _atomic_png(lambda p: fig.savefig(p, dpi=110), path)
    plt.close(fig)


def textured_window(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner (HR pixels) of the ``size`` window with the most gradient energy."""
    g = hr.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(g, axis=0))[:, :-1] + np.abs(np.diff(g, axis=1))[:-1]
    h, w = energy.shape
    if h < size or w < size:
        return 0, 0
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    step = max(1, size // 4)
    sub = sums[::step, ::step]
    i, j = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return int(i * step), int(j * step)


def save_crops(path: Path, panels: Sequence[tuple[str, np.ndarray]], top: int, left: int, size: int,
               zoom: int = 2) -> None:
    """Crops of same-size uint8 RGB images side by side, each labelled, enlarged ``zoom`` times."""
    from PIL import Image, ImageDraw

    tiles = []
    label_h = 16
    for label, img in panels:
        crop = img[top : top + size, left : left + size]
        tile = Image.fromarray(np.ascontiguousarray(crop)).resize((size * zoom, size * zoom), Image.NEAREST)
        canvas = Image.new("RGB", (tile.width, tile.height + label_h), "white")
        canvas.paste(tile, (0, label_h))
        ImageDraw.Draw(canvas).text((3, 2), label, fill="black")
        tiles.append(canvas)
    gap = 4
    out = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    _atomic_png(lambda p: out.save(p, format="PNG"), path)
