"""Does a finetuned binary body carry signal? Set5 x4 PSNR of finished runs, with and without the binary products.

    python benchmarks/body_use.py runs/offset240/team01_efdn/e2e runs/quality_real2/team01_efdn/rec05 \\
        -o benchmarks/results/body_use

For each run folder: Set5 x4 PSNR-Y (MATLAB LR files) of its conversion and of its final model, each as it
is and with every binary layer's product set to zero (each layer gives its bias, plus its input where the
identity skip is on: the *floor*, what the FP head, tail and side branches score alone). A final model at its
own floor has learnt to route around its binary body. The run's architecture is imported from the model
folder next to its weights (the run's ``config.json`` names both), as `quality_real.py` runs them.
Writes ``<out>.md`` / ``<out>.json`` with the command and the CPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def psnr_and_floor(model, set5) -> tuple[float, float]:
    """Set5 PSNR of ``model`` and of the same model with every binary product zeroed."""
    import torch

    from srbinarize.layers.scales import _ScalesBase
    from srbinarize.train.metrics import evaluate_model

    def score() -> float:
        return round(evaluate_model(model, set5, ssim=False).psnr, 2)

    full = score()
    hooks = [m.register_forward_hook(lambda mod, inp, y: mod._finish(torch.zeros_like(y), inp[0]))
             for m in model.modules() if isinstance(m, _ScalesBase)]
    try:
        floor = score()
    finally:
        for h in hooks:
            h.remove()
    return full, floor


def measure(run: Path, set5) -> dict:
    from srbinarize.checkpoint import load_model

    config = json.loads((run / "config.json").read_text())["model"]
    sys.path.insert(0, str(Path(config["source"]).parent))  # the model's own code, next to its weights
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    row: dict = {"run": str(run), "steps": summary.get("step")}
    for name in ("converted", "final"):
        model = load_model(run / f"{name}.safetensors", allow=[config["arch"]]).eval()
        row[name], row[f"{name}_floor"] = psnr_and_floor(model, set5)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="finished run folders (converted.safetensors and final.safetensors)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args()
    import torch

    from srbinarize.train.evaluate import load_sets, write_report
    from srbinarize.train.session import hardware

    torch.set_num_threads(args.threads)
    set5 = load_sets([str(SHARED / "data" / "Set5")], 4)[0]
    rows = []
    for run in map(Path, args.runs):
        if not (run / "final.safetensors").is_file():
            raise SystemExit(f"{run}: no final.safetensors (not a finished run folder)")
        rows.append(measure(run, set5))
        print(f"{run}: {rows[-1]}", flush=True)
    command = "python benchmarks/body_use.py " + shlex.join(sys.argv[1:])
    lines = ["# Signal through the finetuned binary body (Set5 x4 PSNR-Y, dB)", "", f"`{command}`", "",
             f"CPU: {hardware()}. Floor: the same model with every binary layer's product set to zero.", "",
             "| run | steps | converted | its floor | final | its floor | final - floor |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| `{r['run']}` | {r['steps']} | {r['converted']:.2f} | {r['converted_floor']:.2f} | {r['final']:.2f} | "
              f"{r['final_floor']:.2f} | {r['final'] - r['final_floor']:+.2f} |" for r in rows]
    write_report(args.out, "\n".join(lines) + "\n", {"command": command, "cpu": hardware(), "runs": rows})


if __name__ == "__main__":
    main()
