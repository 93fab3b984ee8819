"""SCALES (and FQSR) on the six pretrained x4 models of ../shared/models: roles, OPs, file sizes, parity.

    python benchmarks/shared_models.py [--size 64] [--out benchmarks/results/shared_models]

Per model: the input range found by probing and the FP model's Set5 PSNR-Y with it; `srbinarize.convert`
with SCALES (default calibration batch); the summary at a ``size`` x ``size`` input (layers replaced, OPs =
BOPs/64 + FLOPs before and after); the exported ONNX files (FP32, SCALES binary, FQSR 8/8/8 QDQ) and their
sizes; max |onnxruntime - PyTorch| of the SCALES file at two input sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import shared_zoo  # noqa: E402  (tests/shared_zoo.py: loads ../shared/models per models.yaml)

import srbinarize  # noqa: E402
from srbinarize.export.onnx import EXACT  # noqa: E402
from srbinarize.export.qdq import fp32_onnx  # noqa: E402
from srbinarize.models.input_range import probe_patches, resolve_input_range  # noqa: E402
from srbinarize.train.evaluate import load_sets, write_report  # noqa: E402
from srbinarize.train.metrics import evaluate_model  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def _kib(path: Path) -> float:
    return path.stat().st_size / 1024


def measure(name: str, size: int, set5) -> dict:
    fp = shared_zoo.load(name)
    t0 = time.time()
    model, rng, message = resolve_input_range(fp, None, name, strict=True)
    psnr = evaluate_model(model, set5, ssim=False).psnr if set5 is not None else float("nan")
    q = srbinarize.convert(model, "scales")
    s = srbinarize.summary(q, (size, size))
    fq = srbinarize.convert(model, "fqsr", bits_s=8)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        fp32_onnx(model, d / "fp.onnx", torch.rand(1, 3, 32, 32))
        srbinarize.export_onnx(q, d / "scales.onnx", **EXACT)  # the exact file: parity
        srbinarize.export_onnx(fq, d / "fqsr.onnx")
        session = srbinarize.ort_session(d / "scales.onnx")
        q.eval()
        parity = []
        for n in (24, 40):
            x = probe_patches(n=1, size=n, seed=3)
            with torch.no_grad():
                want = q(x)
            got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
            parity.append(float((got - want).abs().max()))
        sizes = {k: _kib(d / f"{k}.onnx") for k in ("fp", "scales", "fqsr")}
    body = s.count(role="body")
    return {
        "name": name, "input_range": rng, "detected": message, "fp_set5": psnr,
        "replaced": s.count(quantized=True), "layers": s.count(), "body": body,
        "body_replaced": s.count(role="body", quantized=True),
        "kept_fp_in_body": sorted({r.row.note for r in s.layers if r.row.role == "body" and not r.quantized}),
        "ops_before": s.ops_before, "ops_after": s.ops_after, "kib": sizes, "parity": parity,
        "seconds": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="input side for the OPs count")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shared_models"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = [e["name"] for e in shared_zoo.entries() if shared_zoo.available(e["name"])]
    if not names:
        raise SystemExit(f"no models in {shared_zoo.ROOT}")
    set5 = load_sets([str(DATA / "Set5")], 4)[0] if (DATA / "Set5").is_dir() else None
    rows = [measure(n, args.size, set5) for n in names]
    lines = [
        f"# SCALES on ../shared/models (x4), OPs at a {args.size}x{args.size} input",
        "",
        f"`python benchmarks/shared_models.py --size {args.size}`; {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}.",
        "",
        "| model | input range (detected) | FP Set5 PSNR-Y | layers replaced (body) | OPs FP -> SCALES | "
        "ONNX FP32 / SCALES / FQSR 8-bit | max abs ONNX - PyTorch (24, 40 px) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        k = r["kib"]
        lines.append(
            f"| {r['name']} | {r['input_range']:g} | {r['fp_set5']:.2f} | {r['replaced']}/{r['layers']} "
            f"({r['body_replaced']}/{r['body']}) | {r['ops_before'] / 1e6:.0f}M -> {r['ops_after'] / 1e6:.1f}M "
            f"({r['ops_before'] / r['ops_after']:.1f}x) | {k['fp']:.0f} / {k['scales']:.0f} / {k['fqsr']:.0f} KiB | "
            f"{r['parity'][0]:.1e}, {r['parity'][1]:.1e} |")
    lines += ["", "Body convs left FP, and why:", ""]
    lines += [f"- {r['name']}: {'; '.join(r['kept_fp_in_body']) or 'none'}" for r in rows]
    write_report(args.out, "\n".join(lines) + "\n", {"size": args.size, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
