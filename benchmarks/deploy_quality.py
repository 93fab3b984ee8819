"""What the deployment options cost in quality: finetuned SCALES models exported exactly and with the faster options.

For each finetune run folder given (its ``final.safetensors``; the architecture it names must be importable,
e.g. ``PYTHONPATH=../shared/models/team01_efdn``), PSNR-Y on Set5 / Set14 of the PyTorch model and of the
`export_onnx` file in each deployment variant, run whole in onnxruntime: the exact one (FP32 remainder, float32
activations), ``remainder="int8"`` (calibrated on the batch `srbinarize.convert` calibrates on by default),
float16 activations where they hold (``activations=None``, the default on an AVX-512 machine), and both.
Writes a Markdown table and JSON.

    python benchmarks/deploy_quality.py RUN [RUN ...] --sets ../shared/data/Set5 ../shared/data/Set14
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from srbinarize.atomic import atomic_output
from srbinarize.checkpoint import load_model, read_metadata
from srbinarize.export.onnx import export_onnx
from srbinarize.runtime import ort_session
from srbinarize.train.data import EvalSet
from srbinarize.train.metrics import evaluate_model, psnr_ssim_y, super_resolve

#: name -> export_onnx options; the first is the exact export the others are compared with.
VARIANTS = {
    "exact": {"remainder": "fp32", "activations": "float32"},
    "int8 rem.": {"remainder": "int8", "activations": "float32"},
    "float16": {"remainder": "fp32", "activations": None},  # the default: float16 where the values allow it
    "int8 rem. + float16": {"remainder": "int8", "activations": None},
}


def onnx_psnr(path: Path, eval_set: EvalSet) -> float:
    session = ort_session(path, config={"session.intra_op.allow_spinning": "0"}, intra_op_num_threads=1)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0].astype(np.float32))

    scores = [psnr_ssim_y(super_resolve(run, im.lr, eval_set.scale, pad_to=1), im.hr, eval_set.scale, False,
                          im.grey)[0] for im in eval_set.images]
    return float(np.mean(scores))


def measure(run: Path, sets: list[EvalSet]) -> dict:
    checkpoint = run / "final.safetensors"
    arch = json.loads(read_metadata(checkpoint)["model"])["target"]
    model = load_model(checkpoint, allow=[arch]).eval()
    row: dict = {"run": str(run), "arch": arch, "psnr": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, options in VARIANTS.items():
            report = export_onnx(model, Path(tmp) / f"{len(files)}.onnx", **options)
            files[name] = report.path
            row["int8"] = report.int8 or row.get("int8", [])
            row["float16_tensors"] = max(row.get("float16_tensors", 0), len(report.float16))
            row["float32_kept"] = report.float32_kept or row.get("float32_kept", [])
        for s in sets:
            with torch.no_grad():
                torch_psnr = evaluate_model(model, s, ssim=False).psnr
            row["psnr"][s.name] = {"pytorch": torch_psnr, **{n: onnx_psnr(f, s) for n, f in files.items()}}
            print(run.name, s.name, row["psnr"][s.name], flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finetune run folders (with final.safetensors)")
    p.add_argument("--sets", nargs="+", default=["../shared/data/Set5", "../shared/data/Set14"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/deploy_quality.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        scale = json.loads((run / "config.json").read_text())["model"]["scale"]
        sets = [EvalSet.load(root, scale) for root in args.sets]
        rows.append(measure(run, sets))
    sets = list(rows[0]["psnr"])
    others = list(VARIANTS)[1:]
    lines = ["# What the deployment options cost in quality on finetuned SCALES models (PSNR-Y, dB)", "",
             f"`python benchmarks/{Path(__file__).name} {' '.join(str(r) for r in args.runs)}`", "",
             "| model | int8 remainder | float16 tensors (binary convs kept float32) | set | PyTorch | exact ONNX | "
             + " | ".join(f"{n} (change)" for n in others) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(others)]
    for r in rows:
        for s in sets:
            v = r["psnr"][s]
            cells = [f"{v[n]:.3f} ({v[n] - v['exact']:+.3f})" for n in others]
            kept = sum(len(line.split(": ")[0].split(", ")) for line in r["float32_kept"])
            lines.append(f"| {r['arch']} | {', '.join(r['int8']) or '-'} | {r['float16_tensors']} ({kept}) | {s} | "
                         f"{v['pytorch']:.3f} | {v['exact']:.3f} | " + " | ".join(cells) + " |")
    outputs = {args.out: "\n".join(lines) + "\n", args.out.with_suffix(".json"): json.dumps(rows, indent=1)}
    for path, text in outputs.items():
        with atomic_output(path) as tmp:
            Path(tmp).write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
