"""Block-wise reconstruction alone: Set5 PSNR-Y of a SCALES conversion before and after it.

    python benchmarks/reconstruction.py --steps 40 --lr 5e-3 --threads 2

Converts the embedded EDSR x2 (calibrated on 8 BSD100 patches), reconstructs each body unit in dataflow
order against the FP teacher (LR patches of BSD100, batch 16, patch 32), and prints PSNR-Y on Set5 with
the wall time. A measurement for issue 8, not yet a phase of `srbinarize finetune`.
"""

from __future__ import annotations

import argparse
import time

import torch

import srbinarize
from srbinarize.models import load_pretrained
from srbinarize.train.data import EvalSet, TrainPatches, patch_loader
from srbinarize.train.metrics import evaluate_model
from srbinarize.train.reconstruct import reconstruct_unit, reconstruction_units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per unit")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="../shared/data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher, _ = load_pretrained("zoo:edsr-x2")
    teacher.eval()
    data = TrainPatches(f"{args.data}/BSD100", 2, 32, seed=0)
    calibration = torch.stack([data[100_000 + i][0] for i in range(8)])
    student = srbinarize.convert(teacher, "scales", calibration_data=calibration)
    set5 = EvalSet.load(f"{args.data}/Set5", 2)
    print(f"converted: Set5 PSNR-Y {evaluate_model(student, set5, ssim=False).psnr:.2f}", flush=True)

    batches = (lr for lr, _ in patch_loader(data, 16, workers=0))
    start = time.perf_counter()
    for unit in reconstruction_units(student):
        result = reconstruct_unit(student, teacher, unit, batches, steps=args.steps, pool=16, lr=args.lr)
        print(f"{unit.path}: relative MSE {result.first_loss:.4f} -> {result.last_loss:.4f}", flush=True)
    seconds = time.perf_counter() - start
    print(f"reconstructed: Set5 PSNR-Y {evaluate_model(student, set5, ssim=False).psnr:.2f} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
