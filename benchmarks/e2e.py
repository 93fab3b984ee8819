"""End-to-end benchmark: the srbinarize export against FP32 and against onnxruntime's own int8, in one run.

For each model three ONNX files run in onnxruntime on the same input with the same session options
(intra-op spinning off for every session, so that alternating sessions do not steal each other's cores):

- FP32: torch's exporter (TorchScript, opset 17);
- ORT int8: ``onnxruntime.quantization.quantize_static`` of that file (QDQ, per-channel QInt8 weights,
  QUInt8 activations, MinMax calibration on LR patches of BSD100, the finetuning split) -- the one-call
  alternative a user has;
- SCALES: ``srbinarize.convert(model, "scales")`` written by `export_onnx` (float32 activations), also with
  the int8 remainder (``remainder="int8"``) and with the int8 remainder and float16 activations between the
  chained binary convs (``activations="float16"``).

Runs are interleaved (background load hits all alike), one warm-up each; the table reports medians and the
speed-up of SCALES over both peers. Models: basicsr EDSR x2 16x64 (random weights: speed does not depend on
them) on 1x3x256x256, and the lightweight ``team01_efdn`` x4 from ``../shared/models`` on 1x3x128x128 (skipped
when absent). Results go to stdout and benchmarks/results/e2e.md.

    python benchmarks/e2e.py [--threads 1 2] [--runs 10] [--models edsr efdn]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import srbinarize
from kernels import cpu_description, interleaved_medians  # benchmarks/kernels.py
from srbinarize.export.onnx import EXACT, export_onnx
from srbinarize.export.qdq import fp32_onnx
from srbinarize.runtime import kernel_path, ort_session
from srbinarize.train.evaluate import write_report

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "e2e.md"
SHARED = ROOT.parent / "shared"
NO_SPIN = {"session.intra_op.allow_spinning": "0"}


def patches(scale: int, count: int, size: int, seed: int = 0) -> np.ndarray:
    """`count` random size x size crops of BSD100's LR x`scale` images (scale 1: the HR images),
    (N, 3, size, size) in [0, 1]."""
    from PIL import Image

    folder = SHARED / "data" / "BSD100" / ("HR" if scale == 1 else f"LR_bicubic/X{scale}")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise SystemExit(f"no images in {folder}: the calibration patches and the input come from there")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = np.asarray(Image.open(files[i * 7 % len(files)]).convert("RGB"), np.float32) / 255
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        out.append(img[y:y + size, x:x + size].transpose(2, 0, 1))
    return np.stack(out)


def ort_int8(fp32_path: Path, out: Path, patches: np.ndarray) -> Path:
    """onnxruntime's static QDQ quantization of `fp32_path`, calibrated on `patches` one at a time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(patches[i:i + 1] for i in range(len(patches)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    quantize_static(str(fp32_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return out


def time_by_op(path: Path, x: np.ndarray, threads: int, runs: int = 3) -> dict[str, float]:
    """Mean ms per run spent in each op type (onnxruntime's profiler, after one warm-up run)."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, config=NO_SPIN, intra_op_num_threads=threads, inter_op_num_threads=1,
                              enable_profiling=True, profile_file_prefix=str(Path(tmp) / "profile"))
        for _ in range(runs + 1):
            session.run(None, {"x": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 1)
    totals: dict[str, float] = {}
    for e in nodes[per_run:]:  # skip the warm-up run
        totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def edsr() -> tuple[torch.nn.Module, int, int, str]:
    from basicsr.archs.edsr_arch import EDSR

    torch.manual_seed(0)
    return EDSR(3, 3, num_feat=64, num_block=16, upscale=2).eval(), 2, 256, "basicsr EDSR x2 16x64, random weights"


def efdn() -> tuple[torch.nn.Module, int, int, str] | None:
    folder = SHARED / "models" / "team01_efdn"
    if not (folder / "team01_efdn_x4.safetensors").is_file():
        return None
    from safetensors.torch import load_file

    sys.path.insert(0, str(folder))
    from team01_efdn import EFDN

    model = EFDN()
    model.load_state_dict(load_file(str(folder / "team01_efdn_x4.safetensors")), strict=True)
    return model.eval(), 4, 128, "team01_efdn x4 (NTIRE 2022 ESR), pretrained"


def run_model(name: str, model: torch.nn.Module, scale: int, size: int, threads: list[int], runs: int,
              tmp: Path, fold: bool | None = None) -> dict:
    calib = torch.from_numpy(patches(scale, 8, 48, seed=1))
    binary = srbinarize.convert(model, "scales", calibration_data=calib)
    x = patches(1, 1, size, seed=2)  # a natural image of the timed size
    example = torch.rand(1, 3, 32, 32)
    paths = {"fp32": fp32_onnx(model, tmp / f"{name}_fp32.onnx", example)}
    paths["int8"] = ort_int8(paths["fp32"], tmp / f"{name}_int8.onnx", patches(scale, 8, 64, seed=3))
    report = export_onnx(binary, tmp / f"{name}_scales.onnx", example, fold=fold, **EXACT)
    paths["scales"] = report.path
    mixed = export_onnx(binary, tmp / f"{name}_scales_int8.onnx", example, remainder="int8", calibration_data=calib,
                        fold=fold, activations="float32")
    paths["scales_int8"] = mixed.path
    half = export_onnx(binary, tmp / f"{name}_scales_int8_f16.onnx", example, remainder="int8",
                       calibration_data=calib, fold=fold, activations="float16")
    paths["scales_int8_f16"] = half.path
    rows = []
    for t in threads:
        load = Path("/proc/loadavg").read_text().split()[:3]
        sessions = {k: ort_session(p, config=NO_SPIN, intra_op_num_threads=t, inter_op_num_threads=1)
                    for k, p in paths.items()}
        cpu: dict = {}
        ms = interleaved_medians(sessions, {"x": x}, runs, cpu)
        del sessions
        rows.append({"threads": t, "loadavg": " ".join(load), **ms, "cpu": cpu})
        print(name, rows[-1], flush=True)
    profile = {k: time_by_op(paths[k], x, threads[0]) for k in ("int8", "scales", "scales_int8", "scales_int8_f16")}
    return {"rows": rows, "profile": profile, "packed": len(report.packed), "fp": len(report.fp),
            "int8_remainder": mixed.int8, "folded": len(report.fused), "shuffle_folded": report.shuffle_folded,
            "float16": len(half.float16), "bytes": {k: p.stat().st_size for k, p in paths.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model (median reported)")
    parser.add_argument("--models", nargs="+", choices=("edsr", "efdn"), default=["edsr", "efdn"])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--fold", choices=("auto", "on", "off"), default="auto",
                        help="export_onnx(fold=...): auto = whether this CPU runs the fused AVX-512 kernel")
    args = parser.parse_args(argv)
    if args.runs < 5:
        raise SystemExit("--runs must be at least 5")
    results, titles = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            case = edsr() if name == "edsr" else efdn()
            if case is None:
                print(f"{name}: ../shared/models/team01_efdn not found, skipped")
                continue
            model, scale, size, title = case
            titles[name] = f"{title}; input 1x3x{size}x{size}"
            fold = {"auto": None, "on": True, "off": False}[args.fold]
            results[name] = run_model(name, model, scale, size, args.threads, args.runs, Path(tmp), fold)

    import onnxruntime

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])])
    nice = os.nice(0)
    lines = [
        "# End-to-end benchmark: SCALES export vs FP32 and vs onnxruntime's own int8",
        "",
        f"Command: `{command}`" + (f" (under `nice -n {nice}`)" if nice else "") + "  ",
        f"CPU: {cpu_description()}; srbinarize kernel path: {kernel_path()}  ",
        f"onnxruntime {onnxruntime.__version__}; intra-op spinning off for every session; median of {args.runs}"
        " runs per model, the five files' runs interleaved; load average (1/5/15 min) read before each row."
        " ORT int8 = `quantize_static` (QDQ, per-channel QInt8 weights, QUInt8 activations, 8 LR patches of"
        " BSD100 64x64).",
        "",
    ]
    for name, r in results.items():
        lines += [
            f"## {titles[name]}",
            "",
            f"SCALES export: {r['packed']} binary ops, {r['fp']} entries kept FP, {r['folded']} ops folded into them;"
            " SCALES + int8 remainder"
            f" (`remainder=\"int8\"`): {', '.join(r['int8_remainder']) or 'none'} as int8 QDQ; output conv folded"
            f" through the pixel shuffle: {', '.join(r['shuffle_folded']) or 'none'}; SCALES + int8 rem. + f16"
            f" (`activations=\"float16\"`): {r['float16']} float16 tensors between chained binary convs.",
            "",
            "| threads | loadavg | FP32 ms | ORT int8 ms | SCALES ms | SCALES + int8 rem. ms |"
            " SCALES + int8 rem. + f16 ms | SCALES / FP32 | SCALES / ORT int8 | SCALES + int8 rem. / FP32 |"
            " SCALES + int8 rem. / ORT int8 | SCALES + int8 rem. + f16 / FP32 | SCALES + int8 rem. + f16 / ORT int8 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *(f"| {row['threads']} | {row['loadavg']} | {row['fp32']:.1f} | {row['int8']:.1f} | {row['scales']:.1f} |"
              f" {row['scales_int8']:.1f} | {row['scales_int8_f16']:.1f} | {row['fp32'] / row['scales']:.2f}x |"
              f" {row['int8'] / row['scales']:.2f}x | {row['fp32'] / row['scales_int8']:.2f}x |"
              f" {row['int8'] / row['scales_int8']:.2f}x | {row['fp32'] / row['scales_int8_f16']:.2f}x |"
              f" {row['int8'] / row['scales_int8_f16']:.2f}x |"
              for row in r["rows"]),
            "",
            "CPU time per run (ms, all threads of the process; not inflated by waiting for a core, so at 1 thread"
            " its ratio is the ratio of work):",
            "",
            "| threads | FP32 | ORT int8 | SCALES | SCALES + int8 rem. | SCALES + int8 rem. + f16 |"
            " SCALES + int8 rem. / ORT int8 | SCALES + int8 rem. + f16 / ORT int8 |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {row['threads']} | {row['cpu']['fp32']:.1f} | {row['cpu']['int8']:.1f} | {row['cpu']['scales']:.1f} |"
              f" {row['cpu']['scales_int8']:.1f} | {row['cpu']['scales_int8_f16']:.1f} |"
              f" {row['cpu']['int8'] / row['cpu']['scales_int8']:.2f}x |"
              f" {row['cpu']['int8'] / row['cpu']['scales_int8_f16']:.2f}x |"
              for row in r["rows"]),
            "",
            "File bytes: " + ", ".join(f"{k} {v:,}" for k, v in r["bytes"].items()) + "  ",
            f"Where the time goes ({args.threads[0]} thread(s), onnxruntime profiler, mean of 3 runs, ms by op type):",
            "",
            *(f"- {k}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:7])
              for k, ops in r["profile"].items()),
            "",
        ]
    write_report(args.out, "\n".join(lines), {"command": command, "cpu": cpu_description(), "results": results})


if __name__ == "__main__":
    main()
