"""Convert an EDSR to a SCALES binary network and finetune it with the FP model as teacher.

    python examples/finetune_edsr.py                       # the project's own EDSR x2, 3 minutes
    python examples/finetune_edsr.py my_edsr.pth --minutes 30 --data ../shared/data

Any checkpoint `srbinarize.models.load_pretrained` reads works (BasicSR ``net_g_*.pth`` with
``params``/``params_ema``, plain state dicts, .safetensors; the architecture is detected). The run folder
gets the logs, ``curves.png``, ``crops.png``, checkpoints and ``final.safetensors``; an interrupted run
continues with ``srbinarize finetune --resume RUN``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import srbinarize
from srbinarize.checkpoint import load_model
from srbinarize.models import model_scale
from srbinarize.train.evaluate import Entry, evaluate_entries, format_table, load_sets


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="zoo:edsr-x2", help="pretrained checkpoint or zoo:NAME")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("-o", "--out", type=Path, default=Path("runs/example_edsr_scales"))
    args = p.parse_args()

    run = srbinarize.finetune(
        args.model,
        "scales",                            # or a YAML file, or load_recipe(...).with_overrides(spatial_rescale=False)
        srbinarize.DataConfig(
            train=args.data / "BSD100",      # HR images; LR made on the fly with MATLAB-style bicubic
            val=args.data / "Set5",          # PSNR/SSIM-Y every few hundred steps, best.safetensors kept
            batch=16, patch=32,              # LR patch side
        ),
        srbinarize.Budget(minutes=args.minutes),  # or steps=N
        srbinarize.RunSettings(out=args.out),
        # lr=..., optimizer=..., distill_weight=...: the recipe's train settings, overridden here
    )

    sets = load_sets([str(args.data / "Set5"), str(args.data / "Set14")], scale=model_scale(run.model))
    entries = [Entry("FP teacher", load_model(run.run_dir / "teacher.safetensors")),
               Entry("SCALES, converted", load_model(run.run_dir / "converted.safetensors")),
               Entry("SCALES, finetuned", run.model)]
    print(format_table(evaluate_entries(entries, sets), sets))


if __name__ == "__main__":
    main()
