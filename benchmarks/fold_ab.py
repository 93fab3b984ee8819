"""A/B of one export fold: the channel vectors' global means inside BinaryConv2d (``channel_mean``) or as ReduceMean.

Both files are SCALES + int8 remainder exports of the same converted model; they run interleaved in
onnxruntime (1 thread, spinning off), two sessions each, and the medians are printed with the load average.

    python benchmarks/fold_ab.py edsr|efdn [--runs 15]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from e2e import edsr, efdn, patches  # benchmarks/e2e.py

import srbinarize
import srbinarize.export.onnx as onnx_export
from srbinarize.runtime import ort_session


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("edsr", "efdn"))
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    case = edsr() if args.model == "edsr" else efdn()
    if case is None:
        raise SystemExit("../shared/models/team01_efdn not found")
    model, scale, size, _ = case
    calib = torch.from_numpy(patches(scale, 8, 48, seed=1))
    binary = srbinarize.convert(model, "scales", calibration_data=calib)
    tmp = Path(tempfile.mkdtemp())
    example = torch.rand(1, 3, 32, 32)
    fold = onnx_export.export_onnx(binary, tmp / "fold.onnx", example, remainder="int8", calibration_data=calib)
    original = onnx_export._fold_channel_means
    onnx_export._fold_channel_means = lambda graph: []
    try:
        plain = onnx_export.export_onnx(binary, tmp / "plain.onnx", example, remainder="int8", calibration_data=calib)
    finally:
        onnx_export._fold_channel_means = original
    x = patches(1, 1, size, seed=2)
    config = {"session.intra_op.allow_spinning": "0"}
    sessions = {name: ort_session(path, config=config, intra_op_num_threads=1, inter_op_num_threads=1)
                for name, path in (("ReduceMean", plain.path), ("folded", fold.path),
                                   ("ReduceMean 2", plain.path), ("folded 2", fold.path))}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"x": x})
    for _ in range(args.runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"x": x})
            times[k].append(time.perf_counter() - t0)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"{args.model}, loadavg {load}, median ms of {args.runs}: "
          + ", ".join(f"{k} {1e3 * float(np.median(v)):.2f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
