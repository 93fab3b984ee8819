"""Ablation of the reconstruction phase: calibration only, reconstruction only, end-to-end only, both.

    python benchmarks/reconstruction.py --model zoo:edsr-x4 --minutes 6 --shares 0 0.25 1 --jobs 3 \\
        --threads 1 -o benchmarks/results/reconstruction_edsr_x4

Each share is one `srbinarize finetune` run with the same wall-clock budget (``--minutes``), seed and data:
share 0 is end-to-end finetuning only, 1 is block reconstruction only, values in between split the budget
(reconstruction first). ``--jobs`` runs that many arms at the same time, so that on a shared machine they
see the same load. Every model is then evaluated on the benchmark sets (PSNR / SSIM on Y): the conversion
before any training, the model right after the reconstruction phase, and each run's final model. Writes
``<out>.md`` / ``<out>.json`` with the command and the hardware. Finished runs with the same settings are
reused (``--runs``), unfinished ones resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srbinarize.checkpoint import load_model  # noqa: E402
from srbinarize.models.load import load_pretrained, model_scale  # noqa: E402
from srbinarize.train.evaluate import (  # noqa: E402
    Entry,
    describe_sets,
    evaluate_entries,
    format_table,
    load_sets,
    write_report,
)
from srbinarize.train.session import hardware  # noqa: E402

DATA = Path(os.environ.get("SRBINARIZE_DATA", os.path.relpath(REPO.parent / "shared" / "data")))


def _command(args, share: float, run: Path) -> list[str]:
    exe = Path(sys.executable).with_name("srbinarize")
    cmd = [str(exe), "finetune", args.model, "--recipe", args.recipe, "--minutes", f"{args.minutes:g}",
           "--reconstruct", f"{share:g}", "--train", *args.train, "--val", *args.val, "--batch", str(args.batch),
           "--patch", str(args.patch), "--seed", str(args.seed), "--quiet", "-o", str(run)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.reconstruct_lr is not None:
        cmd += ["--reconstruct-lr", f"{args.reconstruct_lr:g}"]
    return cmd


def _state(run: Path, args, share: float) -> str:
    """'new', 'finished' (same settings), 'resume', or an error for a finished run made otherwise."""
    if not (run / "config.json").is_file():
        return "new"
    summary = run / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text()).get("interrupted", True):
        return "resume"
    cfg = json.loads(summary.read_text())["config"]
    if "format" not in cfg:
        raise SystemExit(f"{run} holds a run of an earlier srbinarize format: give another --runs folder")
    wanted = {("model", "source"): args.model, ("budget", "minutes"): args.minutes, ("data", "batch"): args.batch,
              ("data", "patch"): args.patch, ("run", "seed"): args.seed}
    if any(cfg[section].get(key) != v for (section, key), v in wanted.items()) \
            or cfg["recipe"]["train"]["reconstruct"] != share or cfg["recipe"]["name"] != args.recipe:
        raise SystemExit(f"{run} holds a finished run with other settings: give another --runs folder")
    return "finished"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="zoo:edsr-x4")
    p.add_argument("--recipe", default="scales")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget of every arm")
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 1.0],
                   help="reconstruction shares of the budget, one arm each")
    p.add_argument("--reconstruct-lr", type=float)
    p.add_argument("--train", nargs="+", default=[str(DATA / "BSD100")])
    p.add_argument("--val", nargs="+", default=[str(DATA / "Set5")])
    p.add_argument("--sets", nargs="+", default=[str(DATA / "Set5"), str(DATA / "Set14")])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads of each arm")
    p.add_argument("--jobs", type=int, default=1, help="arms run at the same time")
    p.add_argument("--runs", default="runs/reconstruction")
    p.add_argument("-o", "--out", required=True, help="output path without suffix (.md and .json are written)")
    args = p.parse_args(argv)
    command = "python benchmarks/reconstruction.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    tag = args.model.replace("zoo:", "").replace("/", "_").replace(".", "_")
    runs = {share: Path(args.runs) / f"{tag}_{args.recipe}_{args.minutes:g}min_share{share:g}" for share in args.shares}
    pending: list[tuple[float, list[str]]] = []
    for share, run in runs.items():
        state = _state(run, args, share)
        if state == "finished":
            print(f"[{run.name}] finished earlier with the same settings: reused", flush=True)
        else:
            cmd = ["--resume", str(run), "--quiet"] if state == "resume" else None
            full = [str(Path(sys.executable).with_name("srbinarize")), "finetune", *cmd] if cmd else _command(
                args, share, run)
            pending.append((share, full))
    while pending:
        batch, pending = pending[: args.jobs], pending[args.jobs :]
        procs = []
        for share, cmd in batch:
            print(f"[share {share:g}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
            procs.append(subprocess.Popen(cmd))
        if any(proc.wait() != 0 for proc in procs):
            raise SystemExit("an arm failed; its train.log says why (run again to resume)")

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, _ = load_pretrained(args.model)
    scale = model_scale(teacher)
    sets = load_sets(args.sets, scale)
    first = runs[args.shares[0]]
    entries = [Entry(f"FP {args.model}", teacher),
               Entry("converted (calibration only)", load_model(first / "converted.safetensors"))]
    labels: dict[float, str] = {}
    for share, run in runs.items():
        if 0 < share < 1:
            entries.append(Entry(f"share {share:g}: right after its reconstruction phase",
                                 load_model(run / "reconstructed.safetensors")))
        labels[share] = ("end-to-end only" if share == 0 else "reconstruction only" if share == 1
                         else f"reconstruction ({share:g}) + end-to-end")
        entries.append(Entry(labels[share], load_model(run / "final.safetensors")))
    print("evaluating ...", flush=True)
    results = evaluate_entries(entries, sets)
    table = format_table(results, sets)

    rows = []
    for share, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        cfg = summary["config"]
        rows.append({"share": share, "label": labels[share], "run": str(run), "e2e_steps": summary["step"],
                     "reconstruct_steps_per_unit": cfg.get("reconstruct_steps") if share else 0,
                     "seconds": summary.get("seconds_this_call")})
    lines = [
        f"# Reconstruction ablation: {args.model} x{scale}, recipe {args.recipe}, {args.minutes:g} min per arm",
        "",
        f"Command: `{command}`",
        "",
        f"Hardware: {hardware()}; {args.jobs} arm(s) at a time, each with {args.threads or 'default'} thread(s), "
        "on a shared machine (other jobs ran beside them).",
        f"Every arm: {args.minutes:g} min wall clock in all (conversion, calibration and validation included), "
        f"batch {args.batch}, LR patch {args.patch}, seed {args.seed}, the recipe's end-to-end settings "
        f"(L1 + distillation); training data {', '.join(args.train)}.",
        "",
        table,
        "",
        f"PSNR / SSIM on Y (BT.601), {scale} border pixels cropped; {describe_sets(sets)}.",
        "",
        "| arm | reconstruction steps per unit | end-to-end steps | wall time (s) | run folder |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['reconstruct_steps_per_unit']} | {r['e2e_steps']} | {r['seconds']} | "
                     f"`{r['run']}` |")
    write_report(args.out, "\n".join(lines) + "\n", {
        "command": command, "model": args.model, "scale": scale, "recipe": args.recipe, "minutes": args.minutes,
        "hardware": hardware(), "sets": describe_sets(sets), "results": results, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
