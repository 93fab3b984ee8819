"""The evaluation table: bicubic and any number of models on benchmark sets, PSNR / SSIM on Y.

A model entry is a pretrained FP checkpoint (any format `load_pretrained` reads, or ``zoo:<name>``), an
srbinarize model file (converted, written by `srbinarize.checkpoint.save_model`), or a finetune run folder,
which stands for its FP teacher, its converted-before-finetune model and its finetuned model(s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import write_text_atomic
from .data import EvalSet, hr_folder, list_images
from .metrics import evaluate_bicubic, evaluate_model


@dataclass
class Entry:
    label: str
    model: nn.Module | None  # None: the bicubic baseline


def _is_srbinarize_file(path: Path) -> bool:
    from ..checkpoint import FORMAT, read_metadata

    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return read_metadata(path).get("format") == FORMAT
    except Exception:
        return False


def _file_extra(path: Path) -> dict[str, Any]:
    from ..checkpoint import read_metadata

    try:
        return json.loads(read_metadata(path).get("extra") or "{}")
    except (ValueError, json.JSONDecodeError):
        return {}


def entries_for(source: str, arch: str | None = None, arch_kwargs: Any = None, recipe: str | None = None,
                scale: int | None = None, include_best: bool = True, input_range: float | None = None
                ) -> list[Entry]:
    """The table rows one MODEL argument stands for (a run: also its best-on-validation model if it differs).

    A pretrained checkpoint is evaluated in its ``input_range`` (1 or 255; None: detected by probing it).
    """
    from ..checkpoint import load_model
    from ..models.input_range import load_pretrained_in_range

    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but not a finetune run (no config.json)")
        rows = []
        named = (("teacher.safetensors", "FP teacher"), ("converted.safetensors", "converted (no finetune)"))
        for name, label in named:
            if (path / name).is_file():
                rows.append(Entry(label, load_model(path / name)))
        if (path / "final.safetensors").is_file():
            step = _file_extra(path / "final.safetensors").get("step", "?")
            rows.append(Entry(f"finetuned (final, step {step})", load_model(path / "final.safetensors")))
        if include_best and (path / "best.safetensors").is_file():
            extra = _file_extra(path / "best.safetensors")
            final_step = _file_extra(path / "final.safetensors").get("step") if (path / "final.safetensors").is_file() \
                else None
            if extra.get("step") != final_step:
                rows.append(Entry(f"finetuned (best on val, step {extra.get('step', '?')})",
                                  load_model(path / "best.safetensors")))
        return rows
    if _is_srbinarize_file(path):
        return [Entry(path.stem, load_model(path))]
    model, _, message = load_pretrained_in_range(source, input_range, arch=arch, arch_kwargs=arch_kwargs, scale=scale)
    print(message)
    rows = [Entry(f"FP {Path(source).stem if not source.startswith('zoo:') else source}", model)]
    if recipe:
        from ..convert import convert

        rows.append(Entry(f"{recipe} converted (no finetune)", convert(model, recipe)))
    return rows


def load_sets(roots: list[str], scale: int, limit: int | None = None) -> list[EvalSet]:
    return [EvalSet.load(r, scale, limit=limit) for r in roots]


def evaluate_entries(entries: list[Entry], sets: list[EvalSet], device: str = "cpu", ssim: bool = True,
                     progress: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """``{label: {set name: {"psnr": .., "ssim": ..}}}``, bicubic first."""
    results: dict[str, dict[str, dict[str, float]]] = {"bicubic": {}}
    for es in sets:
        r = evaluate_bicubic(es, ssim)
        results["bicubic"][es.name] = {"psnr": r.psnr, "ssim": r.ssim}
    for e in entries:
        if e.model is None:
            continue
        results[e.label] = {}
        e.model.to(device)
        for es in sets:
            if progress:
                print(f"  evaluating {e.label} on {es.name} ...", flush=True)
            with torch.no_grad():
                r = evaluate_model(e.model, es, device, ssim)
            results[e.label][es.name] = {"psnr": r.psnr, "ssim": r.ssim}
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]], sets: list[EvalSet]) -> str:
    """A markdown table: one row per method, one PSNR / SSIM column per set."""
    head = "| method | " + " | ".join(f"{es.name} x{es.scale} PSNR / SSIM" for es in sets) + " |"
    rule = "|---|" + "---|" * len(sets)
    lines = [head, rule]
    for label, per_set in results.items():
        cells = []
        for es in sets:
            v = per_set.get(es.name)
            if v is None:
                cells.append("-")
            elif np.isnan(v["ssim"]):
                cells.append(f"{v['psnr']:.2f}")
            else:
                cells.append(f"{v['psnr']:.2f} / {v['ssim']:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_sets(sets: list[EvalSet]) -> str:
    return "; ".join(f"{es.name}: {len(es.images)} images, LR {es.lr_source}" for es in sets)


def default_eval_roots(data_root: Path) -> list[str]:
    return [str(data_root / s) for s in ("Set5", "Set14") if (data_root / s).is_dir()]


def check_roots(roots: list[str]) -> None:
    for r in roots:
        list_images(hr_folder(r))


def write_report(out: str | Path, markdown: str, record: dict[str, Any]) -> None:
    """``<out>.md`` and ``<out>.json`` of a benchmark (each written under a temporary name, then renamed)."""
    out = Path(out)
    for path, text in ((out.with_suffix(".md"), markdown), (out.with_suffix(".json"), json.dumps(record, indent=1))):
        write_text_atomic(path, text)
    print(markdown)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
