"""How much of its FP block a SCALES binary block can hold, on the shared pretrained models.

    python benchmarks/binary_body.py --models team01_efdn team03_fmen team06_v1 --steps 300 \\
        --runs runs/quality_real2/team01_efdn/rec05 runs/quality_real2/team01_efdn/default \\
        -o benchmarks/results/binary_body

For each model (each in its own process, as `sensitivity.py`), on Set5 x4 (PSNR-Y, MATLAB LR files):
- FP, the calibrated conversion, and its *floor*: the same network with every binary layer's product set to
  zero (each layer then gives its bias, plus its input where the identity skip is on), i.e. what the FP
  head, tail and side branches score with no information through the binary convs;
- for the reconstruction unit with the most binary layers (or ``--units``), the relative MSE to the
  teacher's block output that ``--steps`` steps of block reconstruction reach (lr 5e-3, 32 training
  batches of 16 BSD100 patches; measured on 8 held-out batches), per variant: the full binary layer, binary
  weights only, binary activations only, the identity skip on every same-shape layer.
For each finished run folder in ``--runs``, the share of binary weights whose sign changed from the
conversion (``converted.safetensors``) to the final model (``final.safetensors``).
Writes ``<out>.md`` / ``<out>.json`` with the command and the CPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS: dict[str, dict[str, object]] = {
    "binary": {},
    "binary weights only": {"binarize_activations": False},
    "binary activations only": {"binarize_weights": False},
    "identity skip on every same-shape layer": {"skip": "always"},
}


def run_one(args: argparse.Namespace) -> dict:
    """The measurements of one model (run in a process of its own)."""
    import torch
    from body_use import psnr_and_floor
    from sensitivity import load_shared

    from srbinarize import convert
    from srbinarize.convert import default_calibration_batch
    from srbinarize.models.input_range import with_input_range
    from srbinarize.recipe import load_recipe
    from srbinarize.train.data import TrainPatches, patch_loader
    from srbinarize.train.evaluate import load_sets
    from srbinarize.train.metrics import evaluate_model
    from srbinarize.train.reconstruct import _examples, reconstruct_unit, reconstruction_units, unit_module

    torch.set_num_threads(args.threads)
    name = args.one
    sys.path.insert(0, str(Path(args.models_root) / name))
    model, input_range = load_shared(name, Path(args.models_root))
    teacher = with_input_range(model, input_range).eval().requires_grad_(False)
    set5 = load_sets([str(SHARED / "data" / "Set5")], 4)[0]
    cal = default_calibration_batch(load_recipe("scales").calibration, 3)
    loader = patch_loader(TrainPatches(str(SHARED / "data" / "BSD100"), 4, patch=32, seed=0), 16, workers=0)
    pool = [next(loader)[0] for _ in range(32)]
    held_out = [next(loader)[0] for _ in range(8)]

    def psnr(m) -> float:
        return round(evaluate_model(m, set5, ssim=False).psnr, 2)

    out: dict = {"model": name, "fp": psnr(teacher), "units": {}}
    student = convert(teacher, "scales", example_input=cal[:1], calibration_data=cal)
    out["converted"], out["floor"] = psnr_and_floor(student, set5)
    units = reconstruction_units(student)
    if len(units) < 2:  # the unit is the whole network (team03_fmen's `model`): its output carries the long skip
        path = units[0].path if units else "none"
        out["units_note"] = f"one reconstruction unit ({path}), the whole network: not probed"
        return out
    probed = args.units or [max(range(len(units)), key=lambda i: len(units[i].layers))]
    for variant, overrides in VARIANTS.items():
        for k in probed:
            st = convert(teacher, "scales", example_input=cal[:1], calibration_data=cal, **overrides)
            unit = reconstruction_units(st)[k]
            start = time.perf_counter()
            result = reconstruct_unit(st, teacher, unit, pool, args.steps, 5e-3)
            with torch.no_grad():
                module = unit_module(st, unit)
                pairs = _examples(st, teacher, unit, held_out, 1024, None)
                held = sum(float((module(*i) - t).pow(2).mean() / t.pow(2).mean()) for i, t in pairs) / len(pairs)
            out["units"].setdefault(f"{unit.path} ({len(unit.layers)} layers)", {})[variant] = {
                "first": round(result.first_loss, 3), "train": round(result.last_loss, 3), "held_out": round(held, 3),
                "seconds": round(time.perf_counter() - start, 1)}
    return out


def sign_flips(run: Path) -> dict:
    """Share of binary latent weights whose sign differs between the run's conversion and its final model."""
    import torch
    from safetensors.torch import load_file

    before, after = load_file(str(run / "converted.safetensors")), load_file(str(run / "final.safetensors"))
    latent = [k for k in before if k.endswith(".weight") and k[: -len("weight")] + "alpha" in before]
    flipped = sum(int((torch.sign(before[k]) != torch.sign(after[k])).sum()) for k in latent)
    total = sum(before[k].numel() for k in latent)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return {"run": str(run), "flipped": flipped, "weights": total, "share": round(flipped / max(total, 1), 4),
            "steps": summary.get("step")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["team01_efdn", "team03_fmen", "team06_v1"])
    p.add_argument("--models-root", default=str(SHARED / "models"))
    p.add_argument("--steps", type=int, default=300, help="reconstruction steps per unit and variant")
    p.add_argument("--units", type=int, nargs="*", default=[],
                   help="indices of the reconstruction units probed (default: the one with the most binary layers)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", nargs="*", default=[], help="finished run folders to count sign flips in")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("-o", "--out", required=False)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if not args.out:
        p.error("-o/--out is required")
    import torch

    from srbinarize.train.evaluate import write_report
    from srbinarize.train.session import hardware

    torch.set_num_threads(args.threads)  # so that hardware() names the runs' thread count

    models = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--models-root", args.models_root, "--steps", str(args.steps),
               "--threads", str(args.threads), "--units", *map(str, args.units)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        models.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: done", flush=True)
    flips = [sign_flips(Path(r)) for r in args.runs]
    command = "python benchmarks/binary_body.py " + shlex.join(sys.argv[1:])
    lines = ["# What a SCALES binary block holds of its FP block (shared models, x4)", "",
             f"`{command}`", "", f"CPU: {hardware()}.", "",
             "Set5 x4 PSNR-Y (dB). Floor: every binary layer's product set to zero (bias, plus the input where the "
             "skip is on): the FP head, tail and side branches alone.", "",
             "| model | FP | converted | floor |", "|---|---|---|---|"]
    lines += [f"| {m['model']} | {m['fp']:.2f} | {m['converted']:.2f} | {m['floor']:.2f} |" for m in models]
    lines += ["", f"Relative MSE of a unit's output to the teacher's after {args.steps} reconstruction steps (lr 5e-3, "
              "32 batches of 16 BSD100 patches), measured on 8 held-out batches (start -> held-out):", "",
              "| model | unit | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for m in models:
        if "units_note" in m:
            lines.append(f"| {m['model']} | {m['units_note']} |" + " |" * len(VARIANTS))
        for unit, row in m["units"].items():
            cells = [f"{row[v]['first']:.2f} -> {row[v]['held_out']:.3f}" for v in VARIANTS]
            lines.append(f"| {m['model']} | {unit} | " + " | ".join(cells) + " |")
    if flips:
        lines += ["", "Binary weights whose sign changed from the conversion to the final model:", "",
                  "| run | steps | flipped |", "|---|---|---|"]
        lines += [f"| `{f['run']}` | {f['steps']} | {f['flipped']} of {f['weights']} ({100 * f['share']:.1f}%) |"
                  for f in flips]
    write_report(args.out, "\n".join(lines) + "\n", {"command": command, "cpu": hardware(), "models": models,
                                                     "sign_flips": flips})


if __name__ == "__main__":
    main()
