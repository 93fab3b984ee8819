"""`srbinarize inspect --sensitivity MODEL`: the options and what the command does with them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..convert import conversion_info
from .mixed import write_mixed_recipe
from .sensitivity import SensitivityError, sensitivity, write_report


def add_sensitivity_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-layer sensitivity (with --sensitivity)")
    g.add_argument("--sensitivity", action="store_true",
                   help="PSNR-Y drop of each layer the recipe replaces when it alone is converted (calibrated, no "
                   "training), the PSNR-Y it regains when it alone stays FP, its share of MACs and modelled "
                   "speed-up; prints the table, writes .md/.json/.png")
    g.add_argument("--recipe", default="scales", help="shipped recipe name or path to a .yaml recipe")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe option")
    g.add_argument("--images", help="image folder (HR/ + LR_bicubic/X<s>/, or HR images only); default: the "
                   "photos scikit-image ships")
    g.add_argument("--crops", type=int, default=4, help="number of LR crops scored")
    g.add_argument("--crop-size", type=int, default=48, help="LR crop side in pixels")
    g.add_argument("--binary-share", type=float, metavar="P",
                   help="also choose the layers to keep FP so that at least P of the body's MACs stay binary (any "
                   "target writes PREFIX_mixed.yaml, a recipe with the chosen layers in targets.keep_fp)")
    g.add_argument("--target-speedup", type=float, metavar="X",
                   help="also choose the layers to keep FP so that the modelled speed-up (OPs) stays at least X")
    g.add_argument("--max-drop", type=float, metavar="DB",
                   help="also choose the layers to keep FP so that the estimated drop is at most DB")
    g.add_argument("--by", choices=("gain", "drop"), default="gain",
                   help="measure the choice adds up: gain (layer alone kept FP, rest converted; default) or drop "
                   "(layer alone converted, rest FP)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is the fast choice on a loaded machine)")
    g.add_argument("-o", "--output", type=Path, metavar="PREFIX",
                   help="report prefix: writes PREFIX.md, PREFIX.json, PREFIX.png (default: sensitivity_<model>)")


def run_sensitivity(model: nn.Module, args: argparse.Namespace) -> None:
    from ..train.cli import key_values

    if conversion_info(model) is not None:
        raise SensitivityError(f"{args.model} is already converted: give the pretrained FP checkpoint")
    name = Path(args.model).stem
    if args.threads < 0:
        raise SensitivityError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    overrides = key_values(args.set, "--set")
    try:
        report = sensitivity(model, args.recipe, args.images, crops=args.crops, crop_size=args.crop_size,
                             input_range=args.input_range, name=name, **overrides)
    finally:
        torch.set_num_threads(threads)
    print(report)
    choices = []
    if any(v is not None for v in (args.binary_share, args.max_drop, args.target_speedup)):
        choices.append(report.keep_fp(args.binary_share, args.max_drop, args.by, args.target_speedup))
        print(f"\n{choices[0]}")
    prefix = args.output or Path(f"sensitivity_{name}")
    paths = write_report(report, prefix, _command(args), choices)
    if choices:
        paths.append(write_mixed_recipe(args.recipe, choices[0], prefix.with_name(f"{prefix.name}_mixed.yaml"),
                                        **overrides))
    print("wrote " + ", ".join(map(str, paths)))


def _command(args: argparse.Namespace) -> list[str]:
    """The command line that gives this report (options at their values, defaults included)."""
    cmd = ["srbinarize", "inspect", "--sensitivity", args.model, "--recipe", str(args.recipe)]
    for pair in args.set:
        cmd += ["--set", pair]
    if args.arch:
        cmd += ["--arch", args.arch, "--arch-kwargs", args.arch_kwargs]
    if args.images:
        cmd += ["--images", args.images]
    cmd += ["--crops", str(args.crops), "--crop-size", str(args.crop_size), "--threads", str(args.threads)]
    if args.input_range is not None:
        cmd += ["--input-range", f"{args.input_range:g}"]
    targets = (("--binary-share", args.binary_share), ("--target-speedup", args.target_speedup),
               ("--max-drop", args.max_drop))
    for flag, value in targets:
        if value is not None:
            cmd += [flag, f"{value:g}"]
    if any(value is not None for _, value in targets):
        cmd += ["--by", args.by]
    if args.output:
        cmd += ["-o", str(args.output)]
    return cmd
