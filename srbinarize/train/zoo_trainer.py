"""Train the project's own FP model for the zoo: ``python -m srbinarize.train.zoo_trainer``.

    nice -n 10 python -m srbinarize.train.zoo_trainer --scale 2 --steps 2000 -o runs/zoo_edsr_x2
    nice -n 5 python -m srbinarize.train.zoo_trainer --arch swinir --batch 8 --steps 1400 --lr 5e-4 --warmup 100 \\
        -o runs/zoo_swinir_x2

A small basicsr EDSR (``--arch edsr``) or lightweight SwinIR (``--arch swinir``: window 8, pixel-shuffle-direct
upsampler, ``img_size`` = the LR patch), L1 loss, Adam with a cosine schedule, random patches of the HR images of
``../shared/data/BSD100`` with on-the-fly MATLAB-style bicubic LR (`srbinarize.train.data.TrainPatches`).
At the end it measures PSNR/SSIM-Y on the benchmark sets (their given LR files) *after* the fp16 round trip
that the shipped file goes through, and writes ``<run>/<arch>_x<s>.safetensors`` (``--install`` copies it into
``srbinarize/models/zoo/``), with the config, the budget and those figures in its metadata.
``--init`` starts from another zoo model (x4 from x2: every tensor whose shape matches is copied).
The run folder keeps ``last.pt`` every ``--save-every`` steps; ``--resume`` continues from it.
(Until the training loop was split into `srbinarize.train`, this was ``srbinarize.models.train_zoo``.)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_output
from ..models.load import load_pretrained
from ..models.spec import ModelSpec
from ..models.zoo import edsr_spec, save_fp_model, swinir_spec, zoo_dir
from .data import EvalSet, TrainPatches, patch_loader
from .metrics import evaluate_bicubic, evaluate_model

DEFAULT_DATA = "../shared/data/BSD100"
DEFAULT_SETS = ("../shared/data/Set5", "../shared/data/Set14")
ARCHS = ("edsr", "swinir")
PROG = "python -m srbinarize.train.zoo_trainer"


def arch_spec(args: argparse.Namespace) -> ModelSpec:
    """The spec ``--arch`` and its size options describe."""
    if args.arch == "swinir":
        return swinir_spec(args.scale, args.patch, args.embed_dim, args.depths, args.heads, args.window,
                           args.mlp_ratio)
    return edsr_spec(args.scale, args.num_feat, args.num_block)


def cosine_lr(step: int, total: int, base: float, warmup: int, final_ratio: float = 0.01) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="edsr")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--num-feat", type=int, default=32, help="EDSR features")
    p.add_argument("--num-block", type=int, default=8, help="EDSR residual blocks")
    p.add_argument("--embed-dim", type=int, default=48, help="SwinIR embedding width")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 4], help="SwinIR blocks per residual group")
    p.add_argument("--heads", type=int, nargs="+", default=[4, 4], help="SwinIR attention heads per group")
    p.add_argument("--window", type=int, default=8, help="SwinIR window side (the LR patch must be a multiple)")
    p.add_argument("--mlp-ratio", type=float, default=2.0, help="SwinIR MLP hidden width / embedding width")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=32, help="LR patch side")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--data", nargs="+", default=[DEFAULT_DATA])
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS))
    p.add_argument("--init", help="a zoo file or name to start from (tensors of matching shape are copied)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--install", action="store_true", help="copy the result into srbinarize/models/zoo/")
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)
    if args.arch == "swinir" and args.patch % args.window:
        p.error(f"--patch {args.patch} must be a multiple of --window {args.window}")
    if args.arch == "swinir" and len(args.heads) != len(args.depths):
        p.error(f"--heads {args.heads} needs one entry per group of --depths {args.depths}")
    return args


def train(args: argparse.Namespace, model: torch.nn.Module, out: Path,
          say: Callable[[str], None]) -> tuple[float, float]:
    """The L1 training loop (resumable from ``<out>/last.pt``); returns (CPU seconds, wall seconds) in all."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    start, cpu_used, wall_used = 0, 0.0, 0.0
    ckpt = out / "last.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, cpu_used, wall_used = state["step"], state["cpu_s"], state["wall_s"]
        say(f"resumed at step {start}")
    data = TrainPatches(args.data, args.scale, args.patch, seed=args.seed)
    say(f"config {json.dumps(vars(args))}; {len(data.hr)} training images; "
        f"{sum(p.numel() for p in model.parameters())} parameters")
    loader = patch_loader(data, args.batch, start_step=start, steps=args.steps - start, workers=args.workers)
    model.train()
    cpu0, wall0 = time.process_time(), time.time()
    running = 0.0

    def save(step: int) -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                 "cpu_s": cpu_used + time.process_time() - cpu0, "wall_s": wall_used + time.time() - wall0}
        with atomic_output(ckpt) as tmp:
            torch.save(state, tmp)

    for step in range(start, args.steps):
        lr_img, hr_img = next(loader)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup)
        loss = (model(lr_img) - hr_img).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = 0.98 * running + 0.02 * loss.item() if step > start else loss.item()
        if (step + 1) % 50 == 0:
            el = time.time() - wall0
            say(f"step {step + 1}/{args.steps} loss {running:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(step + 1 - start) / el:.2f} it/s cpu {cpu_used + time.process_time() - cpu0:.0f}s")
        if (step + 1) % args.save_every == 0:
            save(step + 1)
    save(args.steps)
    return cpu_used + time.process_time() - cpu0, wall_used + time.time() - wall0


def ship(args: argparse.Namespace, model: torch.nn.Module, spec: ModelSpec, out: Path, info: dict[str, Any],
         say: Callable[[str], None]) -> Path:
    """Write the fp16 zoo file and measure what a user gets from it (the figures go into its metadata)."""
    name = f"{args.arch}_x{args.scale}"
    path = save_fp_model(model, spec, out / f"{name}.safetensors", info=info)
    shipped, _ = load_pretrained(path)
    for root in args.sets:
        es = EvalSet.load(root, args.scale)
        r = evaluate_model(shipped, es)
        b = evaluate_bicubic(es)
        info["results"][es.name] = {"psnr_y": round(r.psnr, 3), "ssim_y": round(r.ssim, 4),
                                    "bicubic_psnr_y": round(b.psnr, 3)}
        say(f"{es.name} x{args.scale}: PSNR-Y {r.psnr:.3f} SSIM-Y {r.ssim:.4f} (bicubic {b.psnr:.3f})")
    save_fp_model(model, spec, path, info=info)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train.log").open("a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    spec = arch_spec(args)
    model = spec.build()
    if args.init:
        src, _ = load_pretrained(args.init)
        own = model.state_dict()
        copied = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(copied, strict=False)
        say(f"init from {args.init}: {len(copied)}/{len(own)} tensors copied")
    cpu_s, wall_s = train(args, model, out, say)
    info = {
        "arch": spec.target, "kwargs": spec.kwargs, "scale": args.scale,
        "trained_by": f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": args.data, "steps": args.steps, "batch": args.batch, "lr_patch": args.patch, "lr": args.lr,
        "cpu_seconds": round(cpu_s), "wall_seconds": round(wall_s), "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "init": args.init, "stored_dtype": "float16", "results": {},
    }
    path = ship(args, model, spec, out, info, say)
    say(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB); {cpu_s / 60:.1f} CPU-min, {wall_s / 60:.1f} min wall")
    if args.install:
        dest = zoo_dir() / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        say(f"installed {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
