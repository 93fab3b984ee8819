"""Per-layer sensitivity of the shared pretrained x4 models, and the mixed point it picks.

    nice -n 10 .venv/bin/python benchmarks/sensitivity.py --models team01_efdn team06_v1 team10_repafdn \\
        --threads 1 -o benchmarks/results/sensitivity

For each model of ``../shared/models`` (loaded per its models.yaml, each in its own process: team10's code
is a top-level package named ``models``): `srbinarize.analysis.sensitivity` with the recipe on ``--crops``
LR crops of BSD100 (the training split; the LR files given there), timed; then the layers to keep FP for
``--binary-share`` of the body's MACs binary, and the PSNR-Y of that mixed conversion on the same crops
(measured, next to the additive estimate). Writes ``<out>_<model>.md/.json/.png`` per model and
``<out>_summary.md`` with the times, the command, the CPU and the load.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


def load_shared(name: str, root: Path) -> tuple[object, float]:
    """The FP model ``name`` of ``root/models.yaml`` (weights loaded strictly, eval mode) and its input range."""
    import yaml
    from safetensors.torch import load_file

    entry = next((e for e in yaml.safe_load((root / "models.yaml").read_text())["models"] if e["name"] == name), None)
    if entry is None:
        raise SystemExit(f"{name} is not in {root / 'models.yaml'}")
    sys.path.insert(0, str(root / entry["folder"]))
    module, _, cls = entry["import"].partition(":")
    model = getattr(importlib.import_module(module), cls)(**entry["kwargs"])
    model.load_state_dict(load_file(str(root / entry["folder"] / entry["weights"])), strict=True)
    return model.eval(), float(entry["input_range"])


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from srbinarize import convert
    from srbinarize.analysis import calibration_crops, crops_psnr, sensitivity, write_report
    from srbinarize.convert import default_calibration_batch
    from srbinarize.recipe import load_recipe

    torch.set_num_threads(args.threads)
    name = args.one
    start = time.perf_counter()
    model, input_range = load_shared(name, Path(args.models_root))
    loaded = time.perf_counter() - start
    images = Path(args.images) if args.images else None
    crops = calibration_crops(images, scale=4, count=args.crops, size=args.crop_size)
    report = sensitivity(model, args.recipe, crops, input_range=input_range, name=name)
    cal = default_calibration_batch(load_recipe(args.recipe).calibration, 3)
    choices, mixed = [], {}
    for by in ("gain", "drop"):
        choice = report.keep_fp(binary_share=args.binary_share, by=by)
        converted = convert(model, args.recipe, example_input=crops.lr[:1], calibration_data=cal,
                            input_range=input_range, keep_fp=choice.keep_fp)
        choices.append(choice)
        mixed[by] = {"keep_fp": choice.keep_fp, "share": choice.binary_share, "speedup": choice.speedup,
                     "estimate": choice.estimated_drop,
                     "psnr": crops_psnr(converted, crops)}
    stability = None
    if args.compare_images:  # the same report on other images: do the layer rankings hold?
        other = sensitivity(model, args.recipe, calibration_crops(Path(args.compare_images), 4, args.crops,
                                                                   args.crop_size), input_range=input_range)
        stability = {"images": other.images, "seconds": other.seconds,
                     **{f"spearman_{m}": _spearman([getattr(s, m) for s in report.layers],
                                                   [getattr(s, m) for s in other.layers]) for m in ("drop", "gain")}}
        print(f"rank correlation with crops of {other.images}: drop {stability['spearman_drop']:.2f}, "
              f"gain {stability['spearman_gain']:.2f}")
    out = Path(f"{args.output}_{name}")
    write_report(report, out, _command(), choices)
    print(report)
    for choice in choices:
        print(f"{choice}\nmeasured: {mixed[choice.by]['psnr']:.3f} dB (FP {report.fp_psnr:.3f})")
    return {
        "model": name, "input_range": input_range, "load_seconds": loaded, "seconds": report.seconds,
        "layers": len(report.layers), "body_share": report.binary_macs / max(report.target_macs, 1),
        "fp": report.fp_psnr, "converted": report.converted_psnr,
        "sum_drops": sum(s.drop for s in report.layers if math.isfinite(s.drop)),
        "bicubic": report.bicubic_psnr, "mixed": mixed, "load": report.load, "threads": report.threads,
        "report": str(out), "stability": stability,
    }


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists (nan entries dropped pairwise; ties broken by order)."""
    import numpy as np

    x, y = np.array(a, dtype=float), np.array(b, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    rx, ry = np.argsort(np.argsort(x[keep])), np.argsort(np.argsort(y[keep]))
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["team01_efdn", "team06_v1", "team10_repafdn"])
    p.add_argument("--models-root", default=str(SHARED / "models"))
    p.add_argument("--images", default=str(SHARED / "data" / "BSD100") if (SHARED / "data" / "BSD100").is_dir()
                   else None, help="crop source (default ../shared/data/BSD100, else scikit-image photos)")
    p.add_argument("--recipe", default="scales")
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--crop-size", type=int, default=48)
    p.add_argument("--binary-share", type=float, default=0.75)
    p.add_argument("--compare-images", help="also run on crops of these images and report the rank correlation of "
                   "the per-layer drops and gains between the two (e.g. ../shared/data/Set14)")
    # One thread: on the shared 2-core machine at load 5-9, two OpenMP threads made a forward pass 20-25x slower
    # (oversubscription), one thread did not (measured 09:30 UTC: EFDN converted, 4 crops of 48x48, 14 s vs 0.9 s).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "results" / "sensitivity"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # one model, in this process (the driver starts these)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        sys.stdout.write(done.stdout)
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"{name} failed (exit {done.returncode})")
        rows.append(json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    write_summary(args, rows)


def _command() -> list[str]:
    """The driver's command line (without the per-model ``--one``)."""
    argv = sys.argv[1:]
    if "--one" in argv:
        i = argv.index("--one")
        argv = argv[:i] + argv[i + 2 :]
    return ["python", "benchmarks/sensitivity.py", *argv]


def _code_state() -> str:
    """The commit measured, and how many tracked files differed from it (the tree is shared)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return f"commit {git('rev-parse', '--short', 'HEAD')}" + (
        f" with {len(dirty)} tracked files modified in the shared tree" if dirty else "")


def write_summary(args: argparse.Namespace, rows: list[dict]) -> None:
    from srbinarize.analysis.sensitivity import cpu_description

    path = Path(f"{args.output}_summary.md")
    cmd = shlex.join(_command())
    lines = [
        "# Per-layer sensitivity of the shared x4 models",
        "",
        f"```\n{cmd}\n```",
        "",
        f"Recipe `{args.recipe}`; {args.crops} LR crops of {args.crop_size}x{args.crop_size} from {args.images}; "
        f"{args.threads} torch threads; {cpu_description()}. Time: `sensitivity()` alone (two conversions, the "
        "summary, two scorings per layer); the model load is not counted. Mixed: the layers `choose_keep_fp` "
        f"keeps FP for binary share {args.binary_share:g}, converted and scored on the same crops. "
        f"Code: {_code_state()}.",
        "",
        "| model | layers | replaced share of body MACs | time s | load avg | FP dB | bicubic dB | all converted dB "
        "| sum of single drops dB | mixed by gain: kept FP / share / speed-up / measured dB | mixed by drop: kept FP / "
        "share / speed-up / measured dB | PNG |",
        "|" + " --- |" * 12,
    ]
    stable = [r for r in rows if r["stability"]]
    for r in rows:
        png = Path(r["report"] + ".png").name
        png = f"[{png}]({png})"
        mixed = [f"{len(m['keep_fp'])} / {100 * m['share']:.1f}% / {m['speedup']:.2f}x / {m['psnr']:.3f}"
                 for m in r["mixed"].values()]
        lines.append(
            f"| {r['model']} | {r['layers']} | {100 * r['body_share']:.1f}% | {r['seconds']:.1f} | {r['load']} | "
            f"{r['fp']:.3f} | {r['bicubic']:.3f} | {r['converted']:.3f} | {r['sum_drops']:.3f} | {mixed[0]} | "
            f"{mixed[1]} | {png} |"
        )
    if stable:
        lines += ["", f"Stability: the same report on {args.crops} crops of {args.compare_images}; Spearman rank "
                  "correlation of the per-layer measures between the two crop sets.", "",
                  "| model | drop | gain | time s (second report) |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['stability']['spearman_drop']:.2f} | {r['stability']['spearman_gain']:.2f} | "
                  f"{r['stability']['seconds']:.1f} |" for r in stable]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
