"""Quality on the real pretrained models of ``../shared/models``: FP, onnxruntime int8, converted, finetuned.

    python benchmarks/quality_real.py --recipe scales --minutes 12 --threads 2 \\
        -o benchmarks/results/quality_real_scales
    python benchmarks/quality_real.py --models team01_efdn team06_v1 --minutes 12 \\
        --arm default --arm e2e:train.reconstruct=0 -o benchmarks/results/quality_real_ablation

Each model is finetuned the way a user would: the ``srbinarize finetune`` command on its published weights
(``--arch`` from ``models.yaml``), BSD100 as training data, Set5 and Set14 x4 as validation, one run per arm
and model, one at a time (two runs at once would halve each other's budget). An arm is ``NAME`` or
``NAME:KEY=VALUE,KEY=VALUE`` (``--set`` overrides of the recipe, ``train.FIELD`` for training settings).
Beside the runs, each model's FP network is exported to ONNX and quantized by onnxruntime's own
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, 16 LR patches of BSD100): the one-call
alternative a user already has. The table gives PSNR-Y (4 border pixels, MATLAB LR files) of FP, ORT int8,
the conversion before finetuning and the final finetuned model; ``<out>.md`` / ``<out>.json`` also hold the
command, the CPU, the load before and after each run, and the steps each run fitted in its budget. A run
folder that already finished with the same command is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = SHARED / "models"
DATA = SHARED / "data"
SETS = ("Set5", "Set14")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from e2e import ort_int8, patches  # noqa: E402

from srbinarize.train.data import EvalSet  # noqa: E402
from srbinarize.train.evaluate import write_report  # noqa: E402
from srbinarize.train.metrics import evaluate_model  # noqa: E402


def manifest() -> dict[str, dict[str, Any]]:
    if not (MODELS / "models.yaml").is_file():
        raise SystemExit(f"{MODELS / 'models.yaml'} not found: this benchmark runs on ../shared/models")
    return {e["name"]: e for e in yaml.safe_load((MODELS / "models.yaml").read_text())["models"]}


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, options = text.partition(":")
    pairs = [p for p in options.split(",") if p]
    if not name or any("=" not in p for p in pairs):
        raise SystemExit(f"--arm {text!r}: expected NAME or NAME:KEY=VALUE,KEY=VALUE")
    return name, pairs


def model_env(entry: dict[str, Any]) -> dict[str, str]:
    """The environment in which the model's own code imports (its folder on PYTHONPATH)."""
    folder = str(MODELS / entry["folder"])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([folder, *filter(None, [env.get("PYTHONPATH")])])
    return env


def finetune_command(entry: dict[str, Any], recipe: str, sets: list[str], args: argparse.Namespace,
                     out: Path) -> list[str]:
    weights = MODELS / entry["folder"] / entry["weights"]
    cmd = [str(Path(sys.executable).with_name("srbinarize")), "finetune", str(weights), "--arch", entry["import"],
           "--arch-kwargs", json.dumps(entry["kwargs"]), "--recipe", recipe,
           "--train", str(DATA / "BSD100"), "--val", *(str(DATA / s) for s in SETS),
           *(["--steps", str(args.steps)] if args.steps else ["--minutes", str(args.minutes)]),
           "--threads", str(args.threads), "--workers", str(args.workers),
           "--seed", str(args.seed), "--quiet", "-o", str(out)]
    for pair in sets:
        cmd += ["--set", pair]
    return cmd


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_arm(entry: dict[str, Any], recipe: str, arm: str, sets: list[str], args: argparse.Namespace
            ) -> dict[str, Any]:
    out = Path(args.runs) / entry["name"] / arm
    cmd = finetune_command(entry, recipe, sets, args, out)
    record_file = out / "quality_real.json"
    if record_file.is_file() and json.loads(record_file.read_text())["command"] == cmd:
        return json.loads(record_file.read_text())
    if out.exists():
        raise SystemExit(f"{out} holds an unfinished or different run: remove it or pass another --runs")
    before = loadavg()
    print(f"{entry['name']} / {arm}: {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, env=model_env(entry), check=True)
    summary = json.loads((out / "summary.json").read_text())
    record = {
        "command": cmd, "load_before": before, "load_after": loadavg(), "steps": summary["step"],
        "converted": {s: summary["baselines"][s]["converted"] for s in SETS},
        "fp": {s: summary["baselines"][s]["FP teacher"] for s in SETS},
        "bicubic": {s: summary["baselines"][s]["bicubic"] for s in SETS},
        "final": {s: summary["final_val"][s]["psnr"] for s in SETS},
        "hardware": summary["hardware"],
    }
    record_file.write_text(json.dumps(record, indent=1))
    return record


def int8_psnr(entry: dict[str, Any], threads: int) -> dict[str, float]:
    """PSNR-Y of onnxruntime's own static int8 quantization of the FP model.

    A model whose ONNX graph fixes its input size (team09_imdtn's window partition bakes the traced sizes into
    its reshapes, team20_mobilesr its paddings: found by running the graph on odd sides) is exported and
    quantized once per image size, calibrated on the same BSD100 patches reflect-padded to that size.
    """
    import onnxruntime as ort
    import torch

    from srbinarize.export.qdq import fp32_onnx
    from srbinarize.models.input_range import with_input_range
    from srbinarize.models.load import load_pretrained

    folder = str(MODELS / entry["folder"])
    sys.path.insert(0, folder)
    try:
        model, _ = load_pretrained(MODELS / entry["folder"] / entry["weights"], arch=entry["import"],
                                   arch_kwargs=entry["kwargs"])
    finally:
        sys.path.remove(folder)
    model = with_input_range(model, entry["input_range"]).eval()
    calibration = patches(entry["scale"], 16, 32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    with tempfile.TemporaryDirectory() as tmp:
        def session_for(size: tuple[int, int] | None) -> ort.InferenceSession:
            """The int8 session of a size-dynamic export (``size`` None) or of one exported at ``size``."""
            h, w = size or (32, 32)
            stem = Path(tmp) / f"{h}x{w}"
            fp32 = fp32_onnx(model, stem.with_suffix(".fp32.onnx"), torch.rand(1, 3, h, w))
            pad = ((0, 0), (0, 0), (0, max(0, h - 32)), (0, max(0, w - 32)))
            cal = np.pad(calibration, pad, mode="reflect")[..., :h, :w]
            int8 = ort_int8(fp32, stem.with_suffix(".int8.onnx"), cal)
            return ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])

        dynamic = session_for(None)
        try:
            dynamic.run(None, {"x": np.zeros((1, 3, 37, 23), np.float32)})  # odd sides: baked paddings fail too
        except Exception:  # onnxruntime raises its own Fail / RuntimeException types
            dynamic = None
        by_size: dict[tuple[int, int], ort.InferenceSession] = {}

        class Int8(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                session = dynamic
                if session is None:
                    size = tuple(x.shape[-2:])
                    if size not in by_size:
                        by_size[size] = session_for(size)
                    session = by_size[size]
                return torch.from_numpy(session.run(None, {"x": x.numpy().astype(np.float32)})[0])

        return {s: evaluate_model(Int8(), EvalSet.load(DATA / s, entry["scale"]), ssim=False).psnr for s in SETS}


def table(results: dict[str, dict[str, Any]], arms: list[str]) -> tuple[str, dict[str, float]]:
    head = "| model | FP Set5 / Set14 | ORT int8 | " + " | ".join(
        f"{a}: converted | {a}: final | {a}: steps | {a}: load before / after" for a in arms) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    gaps: dict[str, list[float]] = {a: [] for a in arms}
    for name, r in results.items():
        fp = r["arms"][arms[0]]["fp"]

        def pair(d: dict[str, float]) -> str:
            return " / ".join(f"{d[s]:.2f}" for s in SETS)

        cells = [name, pair(fp), pair(r["int8"])]
        for a in arms:
            arm = r["arms"][a]
            cells += [pair(arm["converted"]), pair(arm["final"]), str(arm["steps"]),
                      f"{arm['load_before']} / {arm['load_after']}"]
            gaps[a].append(fp["Set5"] - arm["final"]["Set5"])
        lines.append("| " + " | ".join(cells) + " |")
    mean_gap = {a: mean(g) for a, g in gaps.items()}
    lines.append("")
    lines.append("Mean Set5 gap to FP: " + ", ".join(f"{a} {g:.2f} dB" for a, g in mean_gap.items()))
    return "\n".join(lines), mean_gap


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="names in ../shared/models/models.yaml (default: all)")
    p.add_argument("--recipe", default="scales")
    p.add_argument("--arm", action="append", help="NAME[:KEY=VALUE,...] (repeatable; default: the recipe as is)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=12.0, help="wall-clock budget per run (default 12)")
    budget.add_argument("--steps", type=int, help="a step budget instead (ablations independent of the load)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/quality_real")
    p.add_argument("-o", "--output", required=True, help="report prefix (writes .md and .json)")
    args = p.parse_args(argv)
    entries = manifest()
    names = args.models or list(entries)
    unknown = sorted(set(names) - set(entries))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {sorted(entries)}")
    arms = dict(parse_arm(a) for a in (args.arm or ["default"]))
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = entries[name]
        results[name] = {"int8": int8_psnr(entry, args.threads),
                         "arms": {a: run_arm(entry, args.recipe, a, sets, args) for a, sets in arms.items()}}
    text, gaps = table(results, list(arms))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    command = "python benchmarks/quality_real.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    markdown = (
        f"# Quality on ../shared/models: recipe `{args.recipe}`, x4\n\n`{command}`\n\n"
        f"Budget: {f'{args.steps} steps' if args.steps else f'{args.minutes:g} wall-clock minutes'} per run on "
        f"{args.threads} torch threads, BSD100 training "
        f"patches (batch and patch from the recipe/CLI defaults), one run at a time; CPU: {cpu}, "
        f"{os.cpu_count()} logical cores. PSNR-Y in dB on Set5 / Set14 x4 (final model, not the best "
        f"validation). ORT int8: onnxruntime quantize_static, 16 calibration patches.\n\n{text}\n"
    )
    write_report(args.output, markdown, {"command": command, "cpu": cpu, "results": results, "mean_set5_gap": gaps})


if __name__ == "__main__":
    main()
