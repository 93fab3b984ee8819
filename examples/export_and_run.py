"""From the shipped FP EDSR x2 to a 1-bit ONNX file and an upscaled image, in onnxruntime with the kernel library.

    .venv/bin/python examples/export_and_run.py

The same steps on the command line:

    srbinarize convert zoo:edsr-x2 -o runs/example/edsr_scales.safetensors
    srbinarize export runs/example/edsr_scales.safetensors -o runs/example/edsr_scales.onnx
    srbinarize upscale runs/example/edsr_scales.onnx ../shared/data/Set5/LR_bicubic/X2/butterflyx2.png out.png

(convert only calibrates the binary layers; `srbinarize finetune` trains them before export.)
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import srbinarize
from srbinarize.checkpoint import load_model, save_model
from srbinarize.export.qdq import fp32_onnx
from srbinarize.models import load_pretrained

OUT = Path("runs/example")
IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "Set5" / "LR_bicubic" / "X2" / "butterflyx2.png"


def main() -> None:
    fp, spec = load_pretrained("zoo:edsr-x2")
    binary = srbinarize.convert(fp, "scales")
    ckpt = save_model(binary, OUT / "edsr_scales.safetensors", spec)

    report = srbinarize.export_onnx(load_model(ckpt), OUT / "edsr_scales.onnx")
    print(report)
    fp_path = fp32_onnx(fp, OUT / "edsr_fp32.onnx", torch.rand(1, 3, 32, 32))
    print(f"FP32 export: {fp_path.stat().st_size / 1024:.1f} KiB")

    # onnxruntime with the srbinarize kernels: the PyTorch model's function (on an AVX-512 CPU the default file
    # keeps the activations between binary convs in float16: a rounding of each, see the README's Deploy).
    session = srbinarize.ort_session(report.path, intra_op_num_threads=2)
    x = np.asarray(Image.open(IMAGE).convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 255
    y = session.run(None, {"x": x})[0]
    with torch.no_grad():
        ref = binary.eval()(torch.from_numpy(x)).numpy()
    error = np.abs(y - ref)
    print(f"onnxruntime vs PyTorch on {IMAGE.name}: max abs difference {error.max():.2e}, mean {error.mean():.2e}")

    out = srbinarize.upscale_file(report.path, IMAGE, OUT / "butterfly_x2.png", tile=64, overlap=16)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
