"""How far tiled `upscale` is from whole-image inference for a model that pools over the whole image.

    python benchmarks/tiling.py --tile 64 --overlap 16

Converts the zoo EDSR x2 with SCALES (whose channel re-scaling averages over the image), exports it to ONNX
and upscales each Set5 LR x2 image whole and in tiles, both to 8 bits; prints the largest difference and the
share of values that differ. The figures in the module doc of ``srbinarize/export/upscale.py`` come from it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import srbinarize  # noqa: E402
from srbinarize.export.upscale import upscale_array  # noqa: E402
from srbinarize.models import load_pretrained  # noqa: E402
from srbinarize.runtime import ort_session  # noqa: E402
from srbinarize.train.data import list_images, read_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--model", default="zoo:edsr-x2")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "Set5" / "LR_bicubic" / "X2"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_pretrained(args.model)
    binary = srbinarize.convert(model, "scales").eval()
    worst, differing, total = 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        srbinarize.export_onnx(binary, path, torch.rand(1, 3, 32, 32))
        session = ort_session(path, intra_op_num_threads=1)
        for image in list_images(args.data):
            img = read_image(image).astype(np.float32).transpose(2, 0, 1) / 255
            whole = upscale_array(session, img, tile=0, dtype=np.uint8).astype(int)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tiled = upscale_array(session, img, tile=args.tile, overlap=args.overlap, progress=False,
                                      dtype=np.uint8).astype(int)
            diff = np.abs(whole - tiled)
            print(f"{image.name}: largest difference {diff.max()}/255, {(diff > 0).mean():.2%} of the values differ")
            worst, differing, total = max(worst, int(diff.max())), differing + int((diff > 0).sum()), total + diff.size
    print(f"{args.model} + SCALES, tile {args.tile}, overlap {args.overlap}: largest difference {worst}/255, "
          f"{differing / total:.1%} of the values differ")


if __name__ == "__main__":
    main()
