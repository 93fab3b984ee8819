"""Kernel benchmark: srbinarize's BinaryConv2d / BinaryLinear against onnxruntime's FP32 Conv / MatMul.

For each thread count and each kernel path this CPU supports, the binary op and the FP32 op run on
the same input, interleaved run by run (so background load hits both alike), one pair of sessions at
a time; the table reports medians and the ratio FP32 / binary. Results go to stdout and benchmarks/results/kernels.md.

    python benchmarks/kernels.py [--threads 1 2] [--runs 15] [--paths avx2 scalar] [--channels 64 48 24]

Intra-op spinning is off for both sessions unless --spinning (on a shared 2-core machine two spinning
pools that alternate steal the cores from each other); the load average is recorded with every row.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from srbinarize.runtime import KERNEL_ENV, KERNEL_PATHS, kernel_supported, ort_session
from srbinarize.runtime.opmodels import conv_model, fp32_conv_model, fp32_linear_model, linear_model
from srbinarize.runtime.packing import pack_conv_weight, pack_linear_weight

OUT = Path(__file__).resolve().parent / "results" / "kernels.md"
FLAGS = ("popcnt", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq", "avx512_vnni")
HALF_NATIVE = ("avx512",)  # paths whose rows read and write float16 activations (others convert: slower)


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    have = ", ".join(f for f in FLAGS if f in flags) or "none of " + ", ".join(FLAGS)
    return f"{model}, {os.cpu_count()} logical CPUs; flags: {have}"


CONFIG = {"session.intra_op.allow_spinning": "0"}  # session config entries (--spinning: none)


def session(model: bytes, threads: int, path: str | None = None):
    if path is not None:
        os.environ[KERNEL_ENV] = path  # read when the session creates its kernels
    return ort_session(model, config=CONFIG, intra_op_num_threads=threads, inter_op_num_threads=1)


def interleaved_medians(sessions: dict, feeds: dict, runs: int, cpu: dict | None = None,
                        own_feeds: dict | None = None) -> dict:
    """Median wall time (ms) of each session, runs interleaved; one warm-up run each.

    `own_feeds` maps a session's name to its own inputs (else it runs on `feeds`). `cpu`, when given,
    receives the median CPU time (ms) of this process per run: on a machine shared with other work it is
    not inflated by waiting for a core, so at 1 thread its ratio is the ratio of work.
    """
    inputs = {name: (own_feeds or {}).get(name, feeds) for name in sessions}
    times = {name: [] for name in sessions}
    cpu_times = {name: [] for name in sessions}
    for name, s in sessions.items():
        s.run(None, inputs[name])
    for _ in range(runs):
        for name, s in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s.run(None, inputs[name])
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    if cpu is not None:
        cpu.update({name: 1e3 * float(np.median(t)) for name, t in cpu_times.items()})
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def conv_case(rng, c: int = 64):
    """Title, input, FP32 model, binary model and the binary model with float16 X and Y."""
    n, o, k, h, w = 1, c, 3, 256, 256
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, k, k)).astype(np.float32) * 0.05
    bias = rng.standard_normal(o).astype(np.float32)
    scale = np.abs(weight).mean(axis=(1, 2, 3)).astype(np.float32)
    binary = {dtype: conv_model(np.zeros(c, np.float32), pack_conv_weight(weight), scale, bias, kernel_shape=(k, k),
                                in_channels=c, x_dtype=dtype) for dtype in (np.float32, np.float16)}
    return f"Conv {k}x{k} {c}->{o}, {n}x{c}x{h}x{w}", x, fp32_conv_model(weight, bias), binary[np.float32], \
        binary[np.float16]


def linear_case(rng):
    tokens, k, o = 4096, 180, 180
    x = rng.standard_normal((1, tokens, k)).astype(np.float32)
    weight = rng.standard_normal((o, k)).astype(np.float32) * 0.05
    bias = rng.standard_normal(o).astype(np.float32)
    scale = np.abs(weight).mean(axis=1).astype(np.float32)
    binary = linear_model(np.zeros(k, np.float32), pack_linear_weight(weight), scale, bias, in_features=k)
    return f"Linear {k}->{o}, 1x{tokens}x{k}", x, fp32_linear_model(weight, bias), binary, None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per op (median reported)")
    parser.add_argument("--paths", nargs="+", choices=KERNEL_PATHS, help="kernel paths (default: all supported)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 48], help="conv channels (in = out)")
    parser.add_argument("--no-linear", action="store_true", help="skip the BinaryLinear case")
    parser.add_argument(
        "--spinning", action="store_true", help="idle intra-op threads spin (onnxruntime's default; both ops)"
    )
    parser.add_argument("--no-spinning", action="store_true", help=argparse.SUPPRESS)  # the default now
    args = parser.parse_args(argv)
    if args.spinning:
        CONFIG.clear()
    paths = [p for p in (args.paths or KERNEL_PATHS) if kernel_supported(p)]
    if not paths:
        raise SystemExit("none of the requested kernel paths is supported by this CPU")
    forced = os.environ.get(KERNEL_ENV)

    load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} CPUs)"
    rng = np.random.default_rng(0)
    rows = []
    cases = [conv_case(rng, c) for c in args.channels] + ([] if args.no_linear else [linear_case(rng)])
    for title, x, fp32_model, binary_model, half_model in cases:
        for threads in args.threads:
            for p in paths:
                # One group of sessions at a time: the idle thread pools of other sessions would spin on
                # the same cores. Float16 activations where this path reads and writes them natively.
                sessions = {"fp32": session(fp32_model, threads), p: session(binary_model, threads, p)}
                half = f"{p}, float16 X and Y"
                if half_model is not None and p in HALF_NATIVE:
                    sessions[half] = session(half_model, threads, p)
                now = " ".join(Path("/proc/loadavg").read_text().split()[:3])
                cpu: dict = {}
                ms = interleaved_medians(sessions, {"X": x}, args.runs, cpu, {half: {"X": x.astype(np.float16)}})
                for name in list(sessions)[1:]:
                    ratio, cpu_ratio = ms["fp32"] / ms[name], cpu["fp32"] / cpu[name]
                    rows.append(f"| {title} | {threads} | {name} | {now} | {ms['fp32']:.2f} | {ms[name]:.2f} |"
                                f" {ratio:.2f}x | {cpu['fp32']:.2f} | {cpu[name]:.2f} | {cpu_ratio:.2f}x |")
                    print(rows[-1], flush=True)
                del sessions
    if forced is None:
        os.environ.pop(KERNEL_ENV, None)
    else:
        os.environ[KERNEL_ENV] = forced

    import onnxruntime

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])])
    report = "\n".join(
        [
            "# Kernel benchmark",
            "",
            f"Command: `{command}`  ",
            f"CPU: {cpu_description()}  ",
            f"Load average before the run: {load}; intra-op thread spinning "
            + ("off" if CONFIG else "on (onnxruntime's default)")
            + "  ",
            f"onnxruntime {onnxruntime.__version__}; median of {args.runs} runs, FP32 and binary runs interleaved;"
            " speed-up = FP32 ms / binary ms. Binary ops include binarizing and packing the FP32 input and the"
            " fused scale + bias epilogue; the FP32 ops include their bias. Rows \"float16 X and Y\": the same"
            " binary op on float16 activations (the export's `activations=\"float16\"`), against the same FP32 op.",
            "",
            "CPU ms: CPU time of the process per run (all its threads), not inflated by waiting for a core on"
            " a shared machine; at 1 thread its ratio is the ratio of work.",
            "",
            "| op | threads | kernel path | loadavg before | onnxruntime FP32 ms | srbinarize ms | speed-up |"
            " FP32 CPU ms | srbinarize CPU ms | CPU ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(report)
    tmp.replace(args.out)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
