"""End-to-end benchmark: SCALES EDSR x2 exported with 1-bit srbinarize ops against the FP EDSR from torch's exporter.

EDSR x2 (basicsr, 16 blocks, 64 channels, random weights: speed does not depend on them) runs on one
1x3x256x256 input in onnxruntime, FP32 and binary sessions with the same thread count, runs interleaved
(so background load hits both alike), one warm-up each; the table reports medians and the ratio FP32 / binary,
and the file sizes. Results go to stdout and benchmarks/results/e2e.md.

    python benchmarks/e2e.py [--threads 1 2] [--runs 10]
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
from srbinarize.export.onnx import export_onnx
from srbinarize.export.qdq import fp32_onnx
from srbinarize.runtime import kernel_path, ort_session

OUT = Path(__file__).resolve().parent / "results" / "e2e.md"


def time_by_op(path: Path, x: np.ndarray, threads: int, runs: int = 3) -> dict[str, float]:
    """Mean ms per run spent in each op type (onnxruntime's profiler, after one warm-up run)."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, intra_op_num_threads=threads, inter_op_num_threads=1, enable_profiling=True,
                              profile_file_prefix=str(Path(tmp) / "profile"))
        for _ in range(runs + 1):
            session.run(None, {"x": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 1)
    totals: dict[str, float] = {}
    for e in nodes[per_run:]:  # skip the warm-up run
        totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model (median reported)")
    parser.add_argument("--size", type=int, default=256, help="input height and width")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.runs < 10:
        raise SystemExit("--runs must be at least 10")

    from basicsr.archs.edsr_arch import EDSR

    torch.manual_seed(0)
    fp = EDSR(3, 3, num_feat=64, num_block=16, upscale=2).eval()
    binary = srbinarize.convert(fp, "scales")
    x = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} CPUs)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = fp32_onnx(fp, Path(tmp) / "edsr_fp32.onnx", torch.rand(1, 3, 32, 32))
        report = export_onnx(binary, Path(tmp) / "edsr_scales.onnx", torch.rand(1, 3, 32, 32))
        sizes = fp_path.stat().st_size, report.file_bytes
        for threads in args.threads:
            sessions = {
                name: ort_session(path, intra_op_num_threads=threads, inter_op_num_threads=1)
                for name, path in (("fp32", fp_path), ("scales", report.path))
            }
            ms = interleaved_medians(sessions, {"x": x}, args.runs)
            del sessions
            rows.append(f"| {threads} | {ms['fp32']:.1f} | {ms['scales']:.1f} | {ms['fp32'] / ms['scales']:.2f}x |")
            print(rows[-1], flush=True)
        profile = {name: time_by_op(path, x, args.threads[0]) for name, path in (("FP32", fp_path),
                                                                                  ("SCALES", report.path))}

    import onnxruntime

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])])
    nice = os.nice(0)
    text = "\n".join(
        [
            "# End-to-end benchmark: SCALES EDSR x2 vs FP32 EDSR x2 in onnxruntime",
            "",
            f"Command: `{command}`" + (f" (under `nice -n {nice}`)" if nice else "") + "  ",
            f"CPU: {cpu_description()}; srbinarize kernel path: {kernel_path()}  ",
            f"Load average before the run: {load} (the machine is shared with other work)  ",
            f"onnxruntime {onnxruntime.__version__}; basicsr EDSR x2, 16 blocks, 64 channels, random weights; input"
            f" 1x3x{args.size}x{args.size}; FP32: torch's exporter (TorchScript, opset 17); SCALES: `export_onnx`"
            f" ({len(report.packed)} BinaryConv2d ops, head and upsampler FP32). Median of {args.runs} runs per"
            " model, FP32 and SCALES runs interleaved, same session options; speed-up = FP32 ms / SCALES ms.",
            "",
            "| threads | FP32 ms | SCALES ms | speed-up |",
            "|---|---|---|---|",
            *rows,
            "",
            "| file | bytes | ratio |",
            "|---|---|---|",
            f"| FP32 EDSR x2 | {sizes[0]:,} | 1.00x |",
            f"| SCALES EDSR x2 | {sizes[1]:,} | {sizes[0] / sizes[1]:.2f}x smaller |",
            "",
            f"Where the time goes ({args.threads[0]} thread(s), onnxruntime profiler, mean of 3 runs after a warm-up;"
            " ms per run by op type, top 6):",
            "",
            "| model | " + " | ".join(f"op {i + 1}" for i in range(6)) + " |",
            "|---|" + "---|" * 6,
            *(f"| {name} | " + " | ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:6]) + " |"
              for name, ops in profile.items()),
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
