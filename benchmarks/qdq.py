"""8-bit FQSR QDQ export against the FP32 export of the same model in onnxruntime (CPU).

    python benchmarks/qdq.py [--feat 64 --blocks 16 --scale 2 --size 96 --threads 1 --repeats 15]
    python benchmarks/qdq.py --layouts [--size 96 --repeats 15]

Same model (basicsr EDSR, random weights: speed does not depend on their values), same input, same
thread count; the two sessions run alternately and the figure is the ratio of the medians.

``--layouts`` times one 3x3 conv 64->64 as a QDQ graph in each integer layout onnxruntime fuses
(activation and weight types, zero points, per-tensor or per-channel weights) against FP32, and checks
each against the exact integer result, on typical data (half-normal activations, normal weights) and on
full-range codes (uniform), where int16 saturation in a kernel shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from basicsr.archs.edsr_arch import EDSR
from onnx import helper, numpy_helper

import srbinarize
from srbinarize.export.qdq import BOUNDARIES, WEIGHT_LAYOUTS, export_qdq, fp32_onnx
from srbinarize.runtime import cpu_has_vnni


def _session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # side-by-side timings on a shared CPU
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _timed(sessions: dict[str, ort.InferenceSession], feeds: dict[str, dict], repeats: int) -> dict[str, float]:
    """Median ms of each session, the sessions alternating run by run after one warm-up run each."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@dataclass(frozen=True)
class Layout:
    """How a QDQ conv stores its integers: activation and weight container, zero points, weight granularity."""

    act: type  # np.uint8 or np.int8
    act_zp: int
    weight: type
    weight_zp: int
    weight_bits: int = 8
    per_channel: bool = False
    signed_data: bool = False  # activations with negative values (a conv output before ReLU)


LAYOUTS = {
    "u8 act, u8 weights zp 128 (export at 8 bits)": Layout(np.uint8, 0, np.uint8, 128),
    "u8 act, s8 weights, 7-bit codes (export at <= 7 bits)": Layout(np.uint8, 0, np.int8, 0, weight_bits=7),
    "u8 act, s8 weights": Layout(np.uint8, 0, np.int8, 0),
    "u8 act, s8 weights per channel": Layout(np.uint8, 0, np.int8, 0, per_channel=True),
    "u8 act, u8 weights zp 128 per channel": Layout(np.uint8, 0, np.uint8, 128, per_channel=True),
    "s8 act, s8 weights (signed data)": Layout(np.int8, 0, np.int8, 0, signed_data=True),
    "u8 act zp 128, u8 weights zp 128 (signed data)": Layout(np.uint8, 128, np.uint8, 128, signed_data=True),
}


def _graph(nodes: list, inits: list, shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _qdq_conv(layout: Layout, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[onnx.ModelProto, np.ndarray, float]:
    """``Q/DQ(x) -> Conv(DQ(w), DQ(b)) -> Q/DQ`` in ``layout``, the exact output codes and the output step."""
    lo, hi = (0, 255) if layout.act == np.uint8 else (-128, 127)
    sx = float(np.abs(x).max()) / (hi - layout.act_zp)
    n = 2 ** (layout.weight_bits - 1) - 1
    w_max = np.abs(w).reshape(len(w), -1).max(1) if layout.per_channel else np.abs(w).max()
    sw = np.asarray(w_max / n, np.float32)
    w_code = np.clip(np.round(w / sw.reshape(-1, 1, 1, 1)), -n - 1, n)
    sb = (sx * sw).astype(np.float32)
    b_code = np.round(b / sb).astype(np.int32)
    sy = 4 * float(np.abs(x).max()) / 255
    acc = torch.nn.functional.conv2d(torch.tensor(np.clip(np.round(x / sx), lo - layout.act_zp, hi - layout.act_zp)),
                                     torch.tensor(w_code), torch.tensor(b_code, dtype=torch.float64), padding=1)
    y_code = np.clip(np.round(acc.numpy() * (sx * sw.reshape(-1, 1, 1).astype(np.float64)) / sy),
                     lo - layout.act_zp, hi - layout.act_zp)
    per = {"axis": 0} if layout.per_channel else {}
    zw = np.full(sw.shape, layout.weight_zp, layout.weight)
    inits = [numpy_helper.from_array(np.asarray(v, t), k) for k, v, t in [
        ("sx", sx, np.float32), ("zx", layout.act_zp, layout.act), ("sy", sy, np.float32),
        ("w", w_code + layout.weight_zp, layout.weight), ("sw", sw, np.float32), ("zw", zw, layout.weight),
        ("b", b_code, np.int32), ("sb", sb, np.float32), ("zb", np.zeros(sb.shape), np.int32)]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], **per),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], **per),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1] * 4),
             helper.make_node("QuantizeLinear", ["c", "sy", "zx"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zx"], ["y"])]
    return _graph(nodes, inits, list(x.shape)), y_code, sy


def layouts(size: int, threads: int, repeats: int) -> None:
    """Time and check every `LAYOUTS` entry against FP32 on one conv; print a markdown table."""
    rng = np.random.default_rng(0)
    c = 64
    typical = {"w": rng.normal(0, 0.05, (c, c, 3, 3)), "x": np.abs(rng.normal(0, 1, (1, c, size, size)))}
    full = {"w": rng.uniform(-0.05, 0.05, (c, c, 3, 3)), "x": rng.uniform(0, 2, (1, c, size, size))}
    b = rng.normal(0, 0.1, c)
    sessions, feeds, errors, fused = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        fp = _graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 4)],
                    [numpy_helper.from_array(typical["w"].astype(np.float32), "w"),
                     numpy_helper.from_array(b.astype(np.float32), "b")], [1, c, size, size])
        onnx.save(fp, f"{tmp}/fp32.onnx")
        sessions["FP32"] = _session(Path(f"{tmp}/fp32.onnx"), threads)
        feeds["FP32"] = {"x": typical["x"].astype(np.float32)}
        for i, (name, layout) in enumerate(LAYOUTS.items()):
            errors[name] = []
            for data in (typical, full):
                x = data["x"] - (1.0 if layout.signed_data else 0.0)
                model, y_code, sy = _qdq_conv(layout, x, data["w"], b)
                path = Path(tmp) / f"l{i}.onnx"
                onnx.save(model, path)
                s = _session(path, threads, optimized=Path(tmp) / f"l{i}_opt.onnx")
                feed = {"x": x.astype(np.float32)}
                off = np.abs(np.round(s.run(None, feed)[0] / sy) - y_code)
                errors[name].append(f"{off.max():.0f} ({(off > 1).mean():.1%})")
                if data is typical:
                    sessions[name], feeds[name] = s, feed
                    fused[name] = Counter(n.op_type for n in onnx.load(Path(tmp) / f"l{i}_opt.onnx").graph.node)
        med = _timed(sessions, feeds, repeats)
    print(f"# onnxruntime {ort.__version__}, Conv 3x3 {c}->{c} on 1x{c}x{size}x{size}, {threads} thread(s), "
          f"median of {repeats} alternating runs")
    print("| layout | fused | median ms | speed-up vs FP32 | max error in steps (share > 1 step): typical data | "
          "full-range codes |")
    print("|---|---|---|---|---|---|")
    for name, ms in med.items():
        typ, rng_ = errors.get(name, ["-", "-"])
        f = f"{fused[name]['QLinearConv']} QLinearConv" if name in fused else "-"
        print(f"| {name} | {f} | {ms:.1f} | {med['FP32'] / ms:.2f}x | {typ} | {rng_} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feat", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--size", type=int, default=96, help="LR input side")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--bits-w", type=int, default=8, help="weight bits (7: int8 weights, onnxruntime's u8s8 kernels)")
    ap.add_argument("--bits-a", type=int, default=8, help="activation bits (skips stay 8)")
    ap.add_argument("--int4", action="store_true", help="4-bit codes in int4/uint4 containers (export_qdq int4=True)")
    ap.add_argument("--layouts", action="store_true", help="one conv in each integer QDQ layout instead of the model")
    ap.add_argument("--weight-layout", default="auto", choices=WEIGHT_LAYOUTS, help="8-bit weight codes (export_qdq)")
    ap.add_argument("--no-ort-int8", action="store_true", help="skip onnxruntime's own quantize_static peer")
    ap.add_argument("--boundary", default="fp32", choices=BOUNDARIES,
                    help="int8: Q/DQ at the first conv's input and the last conv's output too (export_qdq)")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/qdq.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {cmd.strip()}")
    if args.layouts:
        layouts(args.size, args.threads, args.repeats)
        return

    torch.manual_seed(0)
    fp = EDSR(3, 3, num_feat=args.feat, num_block=args.blocks, upscale=args.scale).eval()
    q = srbinarize.convert(fp, "fqsr", bits_w=args.bits_w, bits_a=args.bits_a)  # w/a/8
    x = torch.rand(1, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp_path = fp32_onnx(fp, tmp / "fp32.onnx", x)
        q_path = export_qdq(q, tmp / "qdq.onnx", x, int4=args.int4, weight_layout=args.weight_layout,
                            boundary=args.boundary)
        sessions = {"fp32": _session(fp_path, args.threads),
                    "qdq": _session(q_path, args.threads, optimized=tmp / "qdq_opt.onnx")}
        sizes = {"fp32": fp_path.stat().st_size, "qdq": q_path.stat().st_size}
        if not args.no_ort_int8:  # the one-call alternative: QDQ, per-channel QInt8 weights, QUInt8 activations
            from e2e import ort_int8, patches  # benchmarks/e2e.py

            peer = ort_int8(fp_path, tmp / "ort_int8.onnx", patches(args.scale, 8, 48, seed=3))
            sessions["ort_int8"] = _session(peer, args.threads)
            sizes["ort_int8"] = peer.stat().st_size
        fused = Counter(n.op_type for n in onnx.load(tmp / "qdq_opt.onnx").graph.node)
        feed = {"x": x.numpy()}
        med = _timed(sessions, {k: feed for k in sessions}, args.repeats)
    containers = "int4/uint4 for 4-bit codes" if args.int4 else "int8/uint8"
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"# loadavg before timing: {load}; intra-op spinning off; boundary {args.boundary};"
          f" 8-bit weight layout {args.weight_layout}"
          f" (this CPU has VNNI: {cpu_has_vnni()})")
    print(f"# onnxruntime {ort.__version__}, FQSR w{args.bits_w}a{args.bits_a}s8 ({containers}) EDSR "
          f"{args.feat}x{args.blocks} x{args.scale}, input 1x3x{args.size}x{args.size}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"# fused: {fused['QLinearConv']} QLinearConv, {fused['QLinearAdd']} QLinearAdd, "
          f"{fused['Conv'] + fused['FusedConv']} float Conv / FusedConv left")
    peer = "ort_int8" in med
    print("| export | file bytes | median ms | speed-up vs FP32 |" + (" speed vs ORT int8 |" if peer else ""))
    print("|---|---|---|---|" + ("---|" if peer else ""))
    for name in sessions:
        print(f"| {name} | {sizes[name]:,} | {med[name]:.1f} | {med['fp32'] / med[name]:.2f}x |"
              + (f" {med['ort_int8'] / med[name]:.2f}x |" if peer else ""))
    print("# fp32 and qdq alternate run by run; ratios of medians, not single timings, are the figure")


if __name__ == "__main__":
    main()
