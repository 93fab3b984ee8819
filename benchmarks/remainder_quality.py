"""What the int8 remainder costs in quality: finetuned SCALES models exported with the FP32 and the int8 remainder.

For each finetune run folder given (its ``final.safetensors``; the architecture it names must be importable,
e.g. ``PYTHONPATH=../shared/models/team01_efdn``), PSNR-Y on Set5 / Set14 of the PyTorch model, the
`export_onnx` file with an FP32 remainder and the one with ``remainder="int8"`` (calibrated on the batch
`srbinarize.convert` calibrates on by default), run whole in onnxruntime. Writes a Markdown table and JSON.

    python benchmarks/remainder_quality.py RUN [RUN ...] --sets ../shared/data/Set5 ../shared/data/Set14
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from srbinarize.checkpoint import load_model, read_metadata
from srbinarize.export.onnx import export_onnx
from srbinarize.runtime import ort_session
from srbinarize.train.data import EvalSet
from srbinarize.train.metrics import evaluate_model, psnr_ssim_y, super_resolve


def onnx_psnr(path: Path, eval_set: EvalSet) -> float:
    session = ort_session(path, config={"session.intra_op.allow_spinning": "0"}, intra_op_num_threads=1)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

    scores = [psnr_ssim_y(super_resolve(run, im.lr, eval_set.scale, pad_to=1), im.hr, eval_set.scale, False,
                          im.grey)[0] for im in eval_set.images]
    return float(np.mean(scores))


def measure(run: Path, sets: list[EvalSet]) -> dict:
    checkpoint = run / "final.safetensors"
    arch = json.loads(read_metadata(checkpoint)["model"])["target"]
    model = load_model(checkpoint, allow=[arch]).eval()
    row: dict = {"run": str(run), "arch": arch, "psnr": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp = export_onnx(model, Path(tmp) / "fp.onnx")
        q = export_onnx(model, Path(tmp) / "q.onnx", remainder="int8")
        row["int8"], row["shuffle_folded"] = q.int8, q.shuffle_folded
        for s in sets:
            with torch.no_grad():
                torch_psnr = evaluate_model(model, s, ssim=False).psnr
            row["psnr"][s.name] = {"pytorch": torch_psnr, "onnx_fp32_remainder": onnx_psnr(fp.path, s),
                                   "onnx_int8_remainder": onnx_psnr(q.path, s)}
            print(run.name, s.name, row["psnr"][s.name], flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finetune run folders (with final.safetensors)")
    p.add_argument("--sets", nargs="+", default=["../shared/data/Set5", "../shared/data/Set14"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/remainder_quality.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run in args.runs:
        scale = json.loads((run / "config.json").read_text())["model"]["scale"]
        sets = [EvalSet.load(root, scale) for root in args.sets]
        rows.append(measure(run, sets))
    names = list(rows[0]["psnr"])
    lines = ["# The int8 remainder's quality cost on finetuned SCALES models (PSNR-Y, dB)", "",
             f"`python benchmarks/{Path(__file__).name} {' '.join(str(r) for r in args.runs)}`", "",
             "| model | int8 remainder | " + " | ".join(f"{n} PyTorch | {n} ONNX FP32 rem. | {n} ONNX int8 rem. | "
                                                         f"{n} int8 - FP32" for n in names) + " |",
             "|---|---|" + "---|" * 4 * len(names)]
    for r in rows:
        cells = []
        for n in names:
            v = r["psnr"][n]
            cells += [f"{v['pytorch']:.3f}", f"{v['onnx_fp32_remainder']:.3f}", f"{v['onnx_int8_remainder']:.3f}",
                      f"{v['onnx_int8_remainder'] - v['onnx_fp32_remainder']:+.3f}"]
        lines.append(f"| {r['arch']} | {', '.join(r['int8'])} | " + " | ".join(cells) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
