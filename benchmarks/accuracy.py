"""Accuracy protocol: bicubic, FP, converted, and finetuned with and without distillation, at one budget.

    python benchmarks/accuracy.py --model zoo:edsr-x2 --recipe scales --steps 600 \\
        -o benchmarks/results/accuracy_scales_edsr_x2
    python benchmarks/accuracy.py --recipe fqsr:4/4/8 fqsr:6/6/8 scales:skip=false ...

``--convert-only`` skips finetuning: the rows are the conversions a finetune would start from.

A recipe is a name or YAML path, optionally followed by ``:`` and overrides of its options: FQSR-style bits
``w/a/s`` (``bits_w``, ``bits_a``, ``bits_s``) or ``key=value`` pairs separated by commas (values read as YAML,
as ``srbinarize finetune --set``).

For each recipe it converts the model (calibrated on training patches), finetunes it twice with the same
budget and seed, once with L1 + distillation from the FP teacher (the recipe's weights) and once with L1
only, then evaluates every model on the benchmark sets (PSNR / SSIM on Y, the given LR files). The table
reports the *final* finetuned models: validation (``--val``, Set5 by default) only draws the curves, it
selects nothing. It writes ``<out>.md`` and ``<out>.json`` with the command, the hardware and the budget;
the run folders (curves.png, crops.png, logs) go to ``--runs``. A row whose run already finished is reused,
an unfinished one is resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srbinarize.checkpoint import load_model  # noqa: E402
from srbinarize.convert import convert  # noqa: E402
from srbinarize.models.load import load_pretrained  # noqa: E402
from srbinarize.recipe import load_recipe  # noqa: E402
from srbinarize.train.cli import key_values  # noqa: E402
from srbinarize.train.config import Budget, DataConfig, RunSettings, run_exists  # noqa: E402
from srbinarize.train.evaluate import (  # noqa: E402
    Entry,
    describe_sets,
    evaluate_entries,
    format_table,
    load_sets,
    write_report,
)
from srbinarize.train.finetune import calibration_batch, finetune  # noqa: E402
from srbinarize.train.session import hardware  # noqa: E402

DATA = Path(os.environ.get("SRBINARIZE_DATA", os.path.relpath(REPO.parent / "shared" / "data")))
BITS = re.compile(r"(\d+)/(\d+)/(\d+)")


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """``fqsr:6/6/8`` -> ``("fqsr", {"bits_w": 6, "bits_a": 6, "bits_s": 8})``; ``scales:skip=false,k=v`` -> pairs.

    The overrides are checked against the recipe (an unknown key or value is an error before any run starts).
    """
    name, _, options = text.partition(":")
    bits = BITS.fullmatch(options)
    if bits:
        overrides: dict[str, Any] = dict(zip(("bits_w", "bits_a", "bits_s"), map(int, bits.groups()), strict=True))
    else:
        overrides = key_values(options.split(","), f"--recipe {text}") if options else {}
    load_recipe(name).with_overrides(**overrides)
    return name, overrides


def run_tag(recipe: str) -> str:
    """A folder-name-safe form of a recipe argument: ``fqsr:6/6/8`` -> ``fqsr-6-6-8``."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", recipe)


def _finished(run: Path) -> bool:
    summary = run / "summary.json"
    if not summary.is_file():
        return False
    s = json.loads(summary.read_text())
    return (run / "final.safetensors").is_file() and not s.get("interrupted", True)


def _train_overrides(args, distill: bool) -> dict[str, Any]:
    """The recipe train settings this invocation replaces."""
    out: dict[str, Any] = {} if distill else {"distill_weight": 0.0}
    if args.lr is not None:
        out["lr"] = args.lr
    return out


def _same_settings(run: Path, args, recipe: str, overrides: dict[str, Any], distill: bool) -> bool:
    """Whether a finished run was made with this invocation's model, recipe (options and train settings
    included), budget and data settings."""
    cfg = json.loads((run / "summary.json").read_text())["config"]
    train = {f"train.{k}": v for k, v in _train_overrides(args, distill).items()}
    rec = load_recipe(recipe).with_overrides(**overrides, **train).to_dict()
    wanted = {("model", "source"): args.model, ("budget", "steps"): args.steps, ("budget", "minutes"): args.minutes,
              ("data", "batch"): args.batch, ("data", "patch"): args.patch, ("run", "seed"): args.seed}
    if "format" not in cfg:
        raise SystemExit(f"{run} holds a run of an earlier srbinarize format: give another --runs folder")
    same = all(cfg[section].get(key) == v for (section, key), v in wanted.items())
    return same and all(cfg["recipe"][k] == rec[k] for k in ("name", "layers", "train"))


def run_row(args, recipe: str, overrides: dict[str, Any], distill: bool, run: Path) -> dict:
    t0 = time.time()
    if _finished(run):
        if not _same_settings(run, args, recipe, overrides, distill):
            raise SystemExit(f"{run} holds a finished run with other settings: give another --runs folder")
        print(f"[{run.name}] finished earlier with the same settings: reused", flush=True)
    elif run_exists(run):
        print(f"[{run.name}] resuming", flush=True)
        finetune(resume=run, progress=not args.quiet)
    else:
        print(f"[{run.name}] finetuning", flush=True)
        finetune(args.model, load_recipe(recipe).with_overrides(**overrides),
                 DataConfig(train=args.train, val=args.val, batch=args.batch, patch=args.patch, workers=args.workers),
                 Budget(steps=args.steps, minutes=args.minutes),
                 RunSettings(out=str(run), seed=args.seed, threads=args.threads), progress=not args.quiet,
                 **_train_overrides(args, distill))
    summary = json.loads((run / "summary.json").read_text())
    cfg = summary["config"]
    train = cfg["recipe"]["train"]
    return {"run": str(run), "steps": summary["step"], "total_steps": summary["total_steps"],
            "seconds": summary.get("seconds_this_call"), "wall_seconds_this_invocation": round(time.time() - t0, 1),
            "distill_weight": train["distill_weight"], "lr": train["lr"], "optimizer": train["optimizer"],
            "schedule": train["schedule"], "batch": cfg["data"]["batch"], "patch": cfg["data"]["patch"],
            "interval_lr": train.get("interval_lr")}


def convert_like_finetune(teacher: torch.nn.Module, recipe: str, overrides: dict[str, Any], train: list[str],
                          scale: int, seed: int) -> torch.nn.Module:
    """The conversion `finetune` starts from: calibrated on LR patches of the training data, same seeds."""
    rec = load_recipe(recipe).with_overrides(**overrides)
    torch.manual_seed(seed)
    return convert(teacher, rec, calibration_data=calibration_batch(train, scale, rec, seed, None))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="zoo:edsr-x2")
    p.add_argument("--recipe", nargs="+", default=["scales"], metavar="RECIPE[:OPTIONS]",
                   help="recipes to compare, each with optional overrides: fqsr:6/6/8 (bits w/a/s), scales:skip=false")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimizer steps per finetuned row")
    budget.add_argument("--minutes", type=float, help="wall-clock minutes per finetuned row")
    budget.add_argument("--convert-only", action="store_true", help="no finetuning: the converted rows only")
    p.add_argument("--train", nargs="+", default=[str(DATA / "BSD100")])
    p.add_argument("--val", nargs="*", default=[str(DATA / "Set5")])
    p.add_argument("--sets", nargs="+", default=[str(DATA / "Set5"), str(DATA / "Set14")])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ablation", action="store_true",
                   help="finetune with distillation only (skip the L1-only row), e.g. to compare recipes")
    p.add_argument("--threads", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--runs", default="runs/accuracy", help="folder for the run folders")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("-o", "--out", required=True, help="output path without suffix (.md and .json are written)")
    args = p.parse_args(argv)
    try:
        recipes = {text: parse_recipe(text) for text in args.recipe}
    except ValueError as e:  # RecipeError is one
        p.error(str(e))
    command = "python benchmarks/accuracy.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher, spec = load_pretrained(args.model)
    from srbinarize.models.load import model_scale

    scale = model_scale(teacher)
    sets = load_sets(args.sets, scale)
    tag = args.model.replace("zoo:", "").replace("/", "_").replace(".", "_")
    entries = [Entry(f"FP {args.model}", teacher)]
    rows: dict[str, dict] = {}
    for recipe, (name, overrides) in recipes.items():
        if args.convert_only:
            model = convert_like_finetune(teacher, name, overrides, args.train, scale, args.seed)
            entries.append(Entry(f"{recipe}: converted, no finetune", model))
            continue
        for distill in (True,) if args.no_ablation else (True, False):
            run = Path(args.runs) / f"{tag}_{run_tag(recipe)}_{'distill' if distill else 'nodistill'}"
            info = run_row(args, name, overrides, distill, run)
            if distill:
                entries.append(Entry(f"{recipe}: converted, no finetune", load_model(run / "converted.safetensors")))
            label = (f"{recipe}: finetuned, L1 + distillation (w={info['distill_weight']:g})" if distill
                     else f"{recipe}: finetuned, L1 only (no distillation)")
            entries.append(Entry(label, load_model(run / "final.safetensors")))
            rows[label] = info
    print("evaluating ...", flush=True)
    results = evaluate_entries(entries, sets)
    table = format_table(results, sets)
    lines = [
        f"# Accuracy: {args.model} x{scale}, recipe(s) {', '.join(args.recipe)}",
        "",
        f"Command: `{command}`",
        "",
        f"Hardware: {hardware()}; shared machine (other jobs ran beside it), so wall times are indicative.",
    ]
    if args.convert_only:
        lines += [f"No finetuning: each recipe converted with calibration on LR patches of {', '.join(args.train)} "
                  f"(the recipe's calibration batch, seed {args.seed}), as `finetune` converts.", "", table, "",
                  f"PSNR / SSIM on Y (BT.601), {scale} border pixels cropped; {describe_sets(sets)}."]
    else:
        budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min wall clock"
        any_row = next(iter(rows.values()))
        intervals = f", intervals lr {any_row['interval_lr']:g} x |I|" if any_row.get("interval_lr") else ""
        lines += [
            f"Budget per finetuned row: {budget} (batch {any_row['batch']}, LR patch {any_row['patch']}, "
            f"{any_row['optimizer']} lr {any_row['lr']:g} {any_row['schedule']}{intervals}, seed {args.seed}); "
            "training data "
            f"{', '.join(args.train)} (MATLAB-style bicubic LR made on the fly).",
            "",
            table,
            "",
            f"PSNR / SSIM on Y (BT.601), {scale} border pixels cropped; {describe_sets(sets)}.",
            "Finetuned rows are the models after the last step (validation on "
            f"{', '.join(Path(v).name for v in args.val) or 'nothing'} drew the curves and selected nothing). "
            "Both start from the same calibrated conversion (the 'converted, no finetune' row) with the same seed "
            "and samples; equal budget means equal steps: distillation adds one FP teacher forward per step (wall "
            "times below).",
            "",
            "| finetuned row | steps | wall time (s) | run folder |",
            "|---|---|---|---|",
        ]
        lines += [f"| {row} | {info['steps']} | {info['seconds']} | `{info['run']}` |" for row, info in rows.items()]
    write_report(args.out, "\n".join(lines) + "\n", {
        "command": command, "model": args.model, "model_spec": {"target": spec.target, "kwargs": spec.kwargs},
        "scale": scale, "recipes": args.recipe,
        "budget": {"steps": args.steps, "minutes": args.minutes, "convert_only": args.convert_only},
        "hardware": hardware(), "sets": describe_sets(sets), "results": results, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
