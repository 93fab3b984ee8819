"""Kernel A/B in one process: BinaryConv2d as built from two or more revisions of kernels/src, runs interleaved.

On a shared machine the speed of one op drifts by 30% between minutes, so separate runs of
`benchmarks/kernels.py` cannot resolve a change of a few percent. Here each revision (a git revision, or "."
for the working tree) is built with its op domain renamed (srbinarize -> ab0, ab1, ...), so that the builds
load side by side into one onnxruntime process, and the runs alternate between them. A 64 MB write before
each run evicts the caches (as in kernels.py, where the FP32 session does). Reported: the median time of
each build and the median over runs of its time divided by the first build's in the same round, which
cancels the slow phases; outputs are compared bit for bit.

    python benchmarks/kernel_ab.py 2342617 . [--channels 64] [--size 256] [--threads 1] [--form plain] [--runs 200]

Forms: plain (bias only); conv1 and conv2, the epilogues of EDSR's SCALES blocks (spatial map from the input,
channel scale, channel mean, and ReLU or a residual). Activations float16 unless --float32.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from kernels import cpu_description  # benchmarks/kernels.py
from srbinarize.runtime.opmodels import conv_model
from srbinarize.runtime.packing import pack_conv_weight

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))
from build import build  # noqa: E402  (kernels/build.py)

DOMAIN_LINE = 'constexpr const char* kDomain = "srbinarize";'


def sources(rev: str, into: Path) -> Path:
    """kernels/src of `rev` ("." : the working tree) copied to `into`."""
    if rev == ".":
        shutil.copytree(ROOT / "kernels" / "src", into)
        return into
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kernels/src"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"git archive {rev} kernels/src failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into.parent / "tar", filter="data")
    shutil.move(into.parent / "tar" / "kernels" / "src", into)
    return into


def build_as(rev: str, domain: str, tmp: Path) -> Path:
    src = sources(rev, tmp / domain / "src")
    ops = src / "ops.cc"
    text = ops.read_text()
    if DOMAIN_LINE not in text:
        raise SystemExit(f"{rev}: kernels/src/ops.cc does not declare its domain as `{DOMAIN_LINE}`")
    ops.write_text(text.replace(DOMAIN_LINE, f'constexpr const char* kDomain = "{domain}";'))
    print(f"building {rev} as domain {domain} ...", flush=True)
    return build(tmp / domain / "lib.so", src=src)


def op_case(form: str, c: int, size: int, dtype, rng) -> tuple[bytes, dict]:
    x = rng.standard_normal((1, c, size, size)).astype(dtype)
    w = rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.05
    bias = rng.standard_normal(c).astype(np.float32)
    scale = np.abs(w).mean(axis=(1, 2, 3)).astype(np.float32)
    extra, feeds = {}, {"X": x}
    if form in ("conv1", "conv2"):
        extra = dict(spatial_weight=(0.1 * rng.standard_normal(c)).astype(np.float32),
                     spatial_bias=np.array([0.1], np.float32), channel_scale=True, channel_mean=True,
                     residual=form == "conv2", **({"relu": 1} if form == "conv1" else {}))
        feeds["channel_scale"] = rng.uniform(0.5, 1.5, (1, c)).astype(np.float32)
        if form == "conv2":
            feeds["residual"] = rng.standard_normal(x.shape).astype(dtype)
    model = conv_model(np.zeros(c, np.float32), pack_conv_weight(w), scale, bias, kernel_shape=(3, 3),
                       in_channels=c, x_dtype=dtype, **extra)
    return model, feeds


def in_domain(model: bytes, domain: str) -> bytes:
    m = onnx.load_from_string(model)
    for item in (*m.graph.node, *m.opset_import):
        if item.domain == "srbinarize":
            item.domain = domain
    return m.SerializeToString()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help='git revisions, "." for the working tree; the first is the base')
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--form", choices=["plain", "conv1", "conv2"], default="plain")
    parser.add_argument("--float32", action="store_true", help="float32 activations (default float16)")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    if len(args.revs) < 2:
        parser.error("give at least two revisions")

    dtype = np.float32 if args.float32 else np.float16
    model, feeds = op_case(args.form, args.channels, args.size, dtype, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for i, rev in enumerate(args.revs):
            domain = f"ab{i}"
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.register_custom_ops_library(str(build_as(rev, domain, Path(tmp))))
            sessions[f"{rev} ({domain})"] = ort.InferenceSession(in_domain(model, domain), options,
                                                                 providers=["CPUExecutionProvider"])
        outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
        first = next(iter(outputs.values()))
        evict = np.ones(64 << 20, np.uint8)
        times = {name: [] for name in sessions}
        for _ in range(args.runs):
            for name, s in sessions.items():
                evict[::64] += 1
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t0)

    base = np.array(next(iter(times.values())))
    print(f"\nBinaryConv2d 3x3 {args.channels}->{args.channels} on 1x{args.channels}x{args.size}x{args.size}, "
          f"{np.dtype(dtype).name}, form {args.form}, {args.threads} thread(s), {args.runs} interleaved runs; "
          f"{cpu_description()}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| build | median ms | median of per-run ratios to the first | output |")
    print("|---|---|---|---|")
    for name, t in times.items():
        same = "same" if np.array_equal(outputs[name], first) else "DIFFERS"
        print(f"| {name} | {1e3 * np.median(t):.3f} | {np.median(np.array(t) / base):.3f} | {same} |")


if __name__ == "__main__":
    main()
