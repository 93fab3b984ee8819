"""8-bit FQSR QDQ export against the FP32 export of the same model in onnxruntime (CPU).

    python benchmarks/qdq.py [--feat 64 --blocks 16 --scale 2 --size 96 --threads 1 --repeats 15]

Same model (basicsr EDSR, random weights: speed does not depend on their values), same input, same
thread count; the two sessions run alternately and the figure is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from basicsr.archs.edsr_arch import EDSR

import srbinarize
from srbinarize.export.qdq import export_qdq, fp32_onnx


def _session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feat", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--size", type=int, default=96, help="LR input side")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--bits-w", type=int, default=8, help="weight bits (7: int8 weights, onnxruntime's u8s8 kernels)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    fp = EDSR(3, 3, num_feat=args.feat, num_block=args.blocks, upscale=args.scale).eval()
    q = srbinarize.convert(fp, "fqsr", bits_w=args.bits_w)  # w/8/8
    x = torch.rand(1, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp_path = fp32_onnx(fp, tmp / "fp32.onnx", x)
        q_path = export_qdq(q, tmp / "qdq.onnx", x)
        sessions = {"fp32": _session(fp_path, args.threads),
                    "qdq8": _session(q_path, args.threads, optimized=tmp / "qdq_opt.onnx")}
        fused = Counter(n.op_type for n in onnx.load(tmp / "qdq_opt.onnx").graph.node)
        feed = {"x": x.numpy()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():  # warm-up
            s.run(None, feed)
        for _ in range(args.repeats):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    cmd = "python benchmarks/qdq.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {cmd.strip()}")
    print(f"# onnxruntime {ort.__version__}, FQSR w{args.bits_w}a8s8 EDSR {args.feat}x{args.blocks} x{args.scale}, "
          f"input 1x3x{args.size}x{args.size}, {args.threads} thread(s), median of {args.repeats}")
    print(f"# fused: {fused['QLinearConv']} QLinearConv, {fused['QLinearAdd']} QLinearAdd, "
          f"{fused['Conv']} float Conv left")
    print("| export | median ms | speed-up vs FP32 |")
    print("|---|---|---|")
    for name in sessions:
        print(f"| {name} | {med[name]:.1f} | {med['fp32'] / med[name]:.2f}x |")
    print("# fp32 and qdq8 alternate run by run; ratios of medians, not single timings, are the figure")


if __name__ == "__main__":
    main()
