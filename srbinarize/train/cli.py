"""The `finetune`, `eval` and `demo` subcommands of ``srbinarize`` (registered by `srbinarize.cli`).

    srbinarize finetune pretrained.pth --recipe scales --train DIR --val DIR --minutes 10 -o runs/x
    srbinarize finetune --resume runs/x
    srbinarize eval runs/x --data ../shared/data/Set5 ../shared/data/Set14
    srbinarize demo --minutes 3 -o runs/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError

DEFAULT_DATA_ROOT = "../shared/data"


# What YAML 1.1 (PyYAML) reads as a string but a user means as a number: 1e-2, 5E3 (no dot before the exponent).
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def key_values(pairs: list[str], what: str) -> dict[str, Any]:
    """``["a=1", "b=x", "c=1e-2"]`` -> ``{"a": 1, "b": "x", "c": 0.01}``, each value read as YAML."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"{what} expects KEY=VALUE, got '{pair}'")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _EXPONENT_NUMBER.fullmatch(parsed.strip()):
            parsed = float(parsed)
        out[key.strip()] = parsed
    return out


def data_root() -> Path:
    return Path(os.environ.get("SRBINARIZE_DATA", DEFAULT_DATA_ROOT))


def skimage_folders(dest: Path) -> tuple[Path, Path]:
    """Training and evaluation folders made of the photos scikit-image ships (no download, no data set)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    train = ("astronaut", "coffee", "rocket", "hubble_deep_field", "retina", "camera", "coins", "moon")
    evaluation = ("chelsea", "immunohistochemistry", "clock")
    for folder, names in ((dest / "photos_train" / "HR", train), (dest / "photos_eval" / "HR", evaluation)):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            path = folder / f"{name}.png"
            if not path.exists():
                Image.fromarray(np.asarray(getattr(data, name)())).save(path)
    return dest / "photos_train", dest / "photos_eval"


# ------------------------------------------------------------------------------------------------ finetune

# Each setting flag's destination is the name of the field it sets, in the config object of its concern
# (srbinarize.train.config) or in the recipe's TrainSpec; a flag left out keeps that object's default.
def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _settings(args: argparse.Namespace, cls) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _fields(cls) if getattr(args, name, None) is not None}


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..recipe import TrainSpec, load_recipe
    from .config import Budget, DataConfig, ModelConfig, RunSettings
    from .finetune import finetune

    if args.extra_losses:
        args.extra_losses = {k: float(v) for k, v in key_values(args.extra_losses, "--extra-loss").items()}
    if args.no_distill:
        args.distill_weight = 0.0
    given = {cls: _settings(args, cls) for cls in (ModelConfig, DataConfig, Budget, RunSettings, TrainSpec)}
    if args.resume:  # --arch may be repeated: it allows the run's own architecture (see srbinarize.cli.main)
        given[ModelConfig].pop("arch", None)
        extra = sorted(k for values in given.values() for k in values) + (["--set"] if args.set else [])
        if extra:
            raise SystemExit(f"srbinarize finetune: --resume continues with the run's stored settings; leave out "
                             f"{', '.join(extra)}")
        result = finetune(resume=args.resume, progress=not args.quiet)
    else:
        if not args.source:
            raise SystemExit("srbinarize finetune: give the pretrained model (or --resume RUN_DIR)")
        if args.out is None:
            raise SystemExit("srbinarize finetune: give the run folder with -o RUN_DIR")
        recipe = load_recipe(args.recipe).with_overrides(**key_values(args.set, "--set"))
        result = finetune(ModelConfig(**given[ModelConfig]), recipe, DataConfig(**given[DataConfig]),
                          Budget(**given[Budget]), RunSettings(**given[RunSettings]), progress=not args.quiet,
                          **given[TrainSpec])
    _print_result(result)
    return 130 if result.interrupted else 0


def _print_result(result) -> None:
    print(f"run folder: {result.run_dir}  (step {result.step}/{result.total_steps}"
          f"{', interrupted: resume with --resume ' + str(result.run_dir) if result.interrupted else ''})")
    for name, b in result.baselines.items():
        fin = result.final_val.get(name, {})
        tail = f", finetuned {fin['psnr']:.2f} / {fin['ssim']:.4f}" if fin else ""
        before = ", ".join(f"{k} {v:.2f}" for k, v in b.items())
        print(f"  {name}: {before}{tail} (PSNR-Y dB / SSIM-Y)")


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="convert a pretrained FP model and finetune it with the FP teacher",
                       description="Convert a pretrained FP checkpoint with a recipe and finetune it (quantization-"
                                   "aware, with the FP model as teacher). Training settings left out come from the "
                                   "recipe's train section; every setting is checked before anything is written.")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run where it stopped (its settings are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    m = p.add_argument_group("model (ModelConfig)")
    m.add_argument("source", nargs="?", metavar="model",
                   help="pretrained checkpoint (.pth/.pt/.safetensors, BasicSR or plain) or zoo:NAME")
    m.add_argument("--arch", help="architecture as package.module:Class when it cannot be detected")
    m.add_argument("--arch-kwargs", help="JSON keyword arguments for --arch")
    m.add_argument("--scale", type=int, help="expected scale (checked against the model)")
    m.add_argument("--input-range", type=float, metavar="1|255",
                   help="RGB range the model takes (default: detected by probing it)")
    r = p.add_argument_group("recipe (its train section: the overrides below)")
    r.add_argument("--recipe", default="scales", help="shipped recipe name or a .yaml path (default scales)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe option (a layer option, a targets field or train.FIELD)")
    d = p.add_argument_group("data (DataConfig)")
    d.add_argument("--train", nargs="+", help="training folders of HR images (or <set>/HR layouts)")
    d.add_argument("--train-lr", nargs="+", help="paired LR folders (one per --train folder) instead of bicubic")
    d.add_argument("--val", nargs="*", help="validation sets (HR/ + LR_bicubic/X<s>/ or HR folders)")
    d.add_argument("--val-limit", type=int, help="use only the first N images of each validation set")
    d.add_argument("--batch", type=int, help="batch size (default 16)")
    d.add_argument("--patch", type=int, help="LR patch side, HR patch = patch x scale (default 32, or the "
                   "nearest multiple of a window-attention model's window)")
    d.add_argument("--workers", type=int, help="data loader processes (default min(2, cores))")
    b = p.add_argument_group("budget (Budget): one of").add_mutually_exclusive_group()
    b.add_argument("--steps", type=int, help="optimizer steps of all phases")
    b.add_argument("--minutes", type=float, help="wall-clock budget; the step count that fits is measured")
    o = p.add_argument_group("run (RunSettings)")
    o.add_argument("-o", "--output", dest="out", help="run folder (new or empty)")
    o.add_argument("--seed", type=int, help="default 0")
    o.add_argument("--val-every", type=int, help="validate every N steps (default: 5 times per run)")
    o.add_argument("--save-every", type=int, help="checkpoint every N steps (default 500; and every --save-seconds)")
    o.add_argument("--save-seconds", type=float, help="checkpoint at least this often (default 120)")
    o.add_argument("--keep", type=int, help="checkpoints kept (default 2)")
    o.add_argument("--threads", type=int, help="torch threads")
    o.add_argument("--device", help="cpu (default) or cuda[:N]")
    t = p.add_argument_group("training settings (the recipe's TrainSpec)")
    t.add_argument("--optimizer", help="adam, adamw or sgd")
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", help="cosine, constant or linear")
    t.add_argument("--warmup", dest="warmup_steps", type=int, help="warmup steps")
    t.add_argument("--l1-weight", type=float)
    t.add_argument("--distill-weight", type=float)
    t.add_argument("--no-distill", action="store_true", help="distill weight 0 (L1 to HR only)")
    t.add_argument("--feature-distill-weight", type=float)
    t.add_argument("--reconstruct", type=float, metavar="SHARE",
                   help="share of the budget for block-wise reconstruction before end-to-end training (0: none)")
    t.add_argument("--reconstruct-lr", type=float, help="Adam learning rate of the reconstruction phase")
    t.add_argument("--interval-lr", type=float, metavar="RELATIVE",
                   help="learning rate of learnable quantizer intervals as a share of each interval (FQSR)")
    t.add_argument("--extra-loss", dest="extra_losses", action="append", metavar="NAME=WEIGHT",
                   help="replace the recipe's extra losses (e.g. sqcl=0.3)")
    p.set_defaults(func=_cmd_finetune)


# ------------------------------------------------------------------------------------------------------ eval


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..models.load import model_in_channels, model_scale
    from .evaluate import describe_sets, entries_for, evaluate_entries, format_table, load_sets

    entries = []
    for m in args.models:
        entries += entries_for(m, args.arch, args.arch_kwargs, args.recipe, args.scale, input_range=args.input_range)
    scale = args.scale
    for e in entries:
        s = model_scale(e.model, model_in_channels(e.model))
        if scale is None:
            scale = s
        elif s != scale:
            raise SystemExit(f"srbinarize eval: '{e.label}' is x{s}, but the table is x{scale}")
    if scale is None:
        raise SystemExit("srbinarize eval: give a model or --scale")
    sets = load_sets(args.data, scale, args.limit)
    t0 = time.time()
    results = evaluate_entries(entries, sets, args.device, ssim=not args.no_ssim)
    table = format_table(results, sets)
    print(table)
    print(f"\nPSNR / SSIM on Y (BT.601), {scale} border pixels cropped; {describe_sets(sets)}; "
          f"{time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"scale": scale, "results": results}, indent=1))
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="PSNR/SSIM-Y table of bicubic and models on benchmark sets",
                       description="Evaluate models in the field's convention (Y of YCbCr, scale pixels cropped, "
                                   "given LR files). A finetune run folder stands for its FP teacher, converted and "
                                   "finetuned models.")
    p.add_argument("models", nargs="*", help="run folders, srbinarize .safetensors, pretrained checkpoints, zoo:NAME")
    p.add_argument("--data", nargs="+", required=True, help="benchmark sets (HR/ + LR_bicubic/X<s>/)")
    p.add_argument("--recipe", help="also convert each pretrained checkpoint with this recipe (no finetune) row")
    p.add_argument("--scale", type=int)
    p.add_argument("--limit", type=int, help="first N images of each set")
    p.add_argument("--no-ssim", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the results as JSON")
    p.add_argument("--arch")
    p.add_argument("--arch-kwargs", default=None)
    p.add_argument("--input-range", type=float, metavar="1|255",
                   help="RGB range of the pretrained checkpoints (default: detected by probing them)")
    p.set_defaults(func=_cmd_eval)


# ------------------------------------------------------------------------------------------------------ demo


def run_demo(minutes: float, out: Path, scale: int = 2, recipe: str = "scales", data: Path | None = None,
             seed: int = 0, progress: bool = True, batch: int = 16, patch: int = 32, lr: float | None = 1e-3,
             threads: int | None = None) -> str:
    """convert the zoo EDSR -> finetune ``minutes`` -> eval -> ``<out>/report.md``; returns the report."""
    from ..atomic import write_text_atomic
    from .config import Budget, DataConfig, RunConfig, RunSettings, run_exists
    from .evaluate import describe_sets, entries_for, evaluate_entries, format_table, load_sets
    from .finetune import finetune
    from .session import hardware

    data = data or data_root()
    model = f"zoo:edsr-x{scale}"
    if (data / "BSD100").is_dir() and (data / "Set5").is_dir():
        train, val, eval_roots = [str(data / "BSD100")], [str(data / "Set5")], [
            str(data / s) for s in ("Set5", "Set14") if (data / s).is_dir()]
        where = f"train {data / 'BSD100'}, validation Set5, evaluation Set5 + Set14 (given LR files)"
    else:
        t, e = skimage_folders(out.with_name(f"{out.name}-photos"))  # beside the run: its folder starts empty
        train, val, eval_roots = [str(t)], [str(e)], [str(e)]
        where = f"no {data}: scikit-image's bundled photos (train {t}, evaluation {e}, LR made by MATLAB-style bicubic)"
    print(f"srbinarize demo: {model} -> {recipe} -> finetune {minutes:g} min -> eval; {where}", flush=True)
    t0 = time.time()
    if run_exists(out):
        result = finetune(resume=out, progress=progress)
    else:
        overrides = {"lr": lr} if lr is not None else {}
        result = finetune(model, recipe, DataConfig(train=train, val=val, batch=batch, patch=patch),
                          Budget(minutes=minutes), RunSettings(out=str(out), seed=seed, threads=threads),
                          progress=progress, **overrides)
    t_train = time.time() - t0
    entries = entries_for(str(out), include_best=False)  # the best-on-validation pick would be chosen on Set5
    sets = load_sets(eval_roots, scale)
    t1 = time.time()
    results = evaluate_entries(entries, sets)
    t_eval = time.time() - t1
    table = format_table(results, sets)
    cfg = RunConfig.load(out)
    tr = cfg.recipe.train
    report = "\n".join([
        f"# srbinarize demo: {model}, recipe {recipe}, x{scale}",
        "",
        f"Command: `srbinarize demo --minutes {minutes:g} --scale {scale} --recipe {recipe} --lr {tr.lr:g} -o {out}`",
        "",
        f"Finetuning: {result.step} steps (batch {cfg.data.batch}, LR patch {cfg.data.patch}, {tr.optimizer} "
        f"lr {tr.lr:g} {tr.schedule}, L1 + distillation weight {tr.distill_weight:g}) in "
        f"{t_train / 60:.1f} min on {hardware()}.",
        f"Data: {where}.",
        "",
        table,
        "",
        f"PSNR / SSIM on Y (BT.601), {scale} border pixels cropped; {describe_sets(sets)}; evaluation took "
        f"{t_eval:.0f} s.",
        "Pictures: `curves.png` (loss, validation PSNR), `crops.png` (bicubic | FP | binary | HR).",
        "",
    ])
    write_text_atomic(out / "report.md", report)
    return report


def _cmd_demo(args: argparse.Namespace) -> int:
    report = run_demo(args.minutes, args.output, args.scale, args.recipe, Path(args.data) if args.data else None,
                      args.seed, not args.quiet, args.batch, args.patch, args.lr, args.threads)
    print()
    print(report)
    print(f"(written to {args.output / 'report.md'})")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the shipped EDSR: convert, finetune, eval, report",
                       description="Convert the project's own FP EDSR (shipped in the package) with a recipe, finetune "
                                   "it for a few minutes on ../shared/data/BSD100 (or scikit-image's photos), evaluate "
                                   "on Set5/Set14 and write report.md, curves.png and crops.png in the run folder.")
    p.add_argument("--minutes", type=float, default=3.0, help="finetuning budget (default 3)")
    p.add_argument("--scale", type=int, default=2, choices=[2, 4])
    p.add_argument("--recipe", default="scales")
    p.add_argument("--data",
                   help=f"data root with BSD100/, Set5/, Set14/ (default $SRBINARIZE_DATA or {DEFAULT_DATA_ROOT})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate (default 1e-3: on 150-step SCALES runs it beat the recipe's 2e-4 by 0.4 dB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (1 is much faster on a machine busy with other jobs)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/demo"))
    p.set_defaults(func=_cmd_demo)


def register(sub) -> None:
    """Add ``finetune``, ``eval`` and ``demo`` to the ``srbinarize`` subparsers."""
    add_finetune(sub)
    add_eval(sub)
    add_demo(sub)
