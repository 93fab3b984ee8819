"""Quantization-aware finetuning of a converted model, with its FP original as the teacher.

    run = srbinarize.finetune("edsr.pth", recipe="scales", train="../shared/data/BSD100",
                              val="../shared/data/Set5", minutes=10, out="runs/edsr_scales")

What a run does (``<run>`` is the output folder):

1. loads the pretrained FP model (any checkpoint `load_pretrained` reads, or a module with its spec) and
   measures its scale; writes it to ``<run>/teacher.safetensors`` so that the run can be resumed and
   evaluated without the original file;
2. converts it with the recipe, calibrated on LR patches of the training data, and writes
   ``<run>/converted.safetensors`` (the converted-before-finetune model);
3. if ``reconstruct`` > 0, first spends that share of the budget on block-wise reconstruction (each body
   unit trained alone to reproduce its FP counterpart; `srbinarize.train.reconstruct`), writing
   ``<run>/reconstructed.safetensors`` and checkpoints under ``<run>/reconstruction/`` (a killed run
   resumes from the unit and step it was on); with a ``steps`` budget, ``reconstruct`` x ``steps`` unit
   steps are shared by the units and the rest are end-to-end steps; the end-to-end phase that follows
   warms its learning rate up over a tenth of its steps (at least 5);
4. trains the converted student end to end: L1 to HR + L1 to the teacher's output (+ optional body-feature
   distillation, + the recipe's extra losses; see `srbinarize.train.losses`), optimizer and schedule from
   the recipe's ``train`` section unless overridden, for ``steps`` optimizer steps or ``minutes`` of wall
   time (the step count that fits is measured before step 0 and checked once after a few real steps, when
   other jobs may have slowed the machine; it is stored with the run, so a resumed run follows the same
   schedule);
5. validates every ``val_every`` steps (PSNR/SSIM-Y on the ``val`` sets), keeps ``<run>/best.safetensors``
   (best mean validation PSNR-Y) and writes ``<run>/final.safetensors`` at the end;
6. writes ``train.log``, ``metrics.jsonl`` (one line per step, one per validation), ``curves.png``,
   ``crops.png`` (bicubic | FP | binary | HR) and ``summary.json``.

Checkpoints (`srbinarize.train.checkpoints`) are written atomically every ``save_every`` steps and at
least every ``save_seconds``; ``resume=<run>`` continues from the newest one with the run's stored
settings and gives the same loss curve as an uninterrupted run (every sample depends only on the seed and
its index; optimizer, scheduler and RNG states are restored). Ctrl-C (SIGINT) or SIGTERM finishes the
current step, saves a checkpoint and returns (``result.interrupted``); a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_model, save_model
from ..convert import conversion_info, convert
from ..errors import SrbinarizeError
from ..models.load import load_pretrained, model_in_channels, model_scale
from ..models.spec import ModelSpec
from ..recipe import Recipe, TrainSpec, load_recipe, recipe_from_dict
from .checkpoints import (
    clean_temporaries,
    latest_checkpoint,
    load_train_state,
    prune,
    save_checkpoint,
)
from .data import DataError, EvalSet, TrainPatches, patch_loader
from .losses import FeatureTap, Objective
from .metrics import SetResult, evaluate_bicubic, evaluate_model, input_multiple, super_resolve
from .optim import parameter_groups
from .reconstruct import MAX_POOL, PhaseResult, Unit, pool_size, reconstruct_unit, reconstruction_units, run_phase
from .report import plot_curves, save_crops, textured_window

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant", "linear")
CONFIG_FILE = "config.json"


class FinetuneError(SrbinarizeError):
    """Settings that cannot make a run (both or neither of steps/minutes, unknown optimizer, ...)."""


@dataclass
class RunConfig:
    """Everything that defines a run; stored as ``<run>/config.json`` and reused by ``resume``."""

    model: str
    recipe: dict[str, Any]
    train: list[str]
    val: list[str]
    scale: int
    steps: int | None = None
    minutes: float | None = None
    batch: int = 16
    patch: int = 32
    train_lr: list[str] | None = None
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    l1_weight: float = 1.0
    distill_weight: float = 1.0
    feature_distill_weight: float = 0.0
    extra_losses: dict[str, float] = field(default_factory=dict)
    reconstruct: float = 0.0  # share of the budget for block-wise reconstruction (phase 1)
    reconstruct_lr: float = 5e-3
    interval_lr: float | None = None  # relative rate of learnable quantizer intervals (train.optim)
    seed: int = 0
    val_every: int | None = None
    val_limit: int | None = None
    save_every: int = 500
    save_seconds: float = 120.0
    keep: int = 2
    workers: int | None = None
    threads: int | None = None
    device: str = "cpu"
    reconstruct_steps: int | None = None  # per unit, fixed before the reconstruction phase
    total_steps: int | None = None  # end-to-end steps, fixed before step 0 (from ``steps`` or ``minutes``)


@dataclass
class FinetuneResult:
    run_dir: Path
    model: nn.Module  # the student after the last step
    step: int
    total_steps: int
    interrupted: bool
    best: dict[str, Any] | None
    baselines: dict[str, dict[str, float]]
    final_val: dict[str, dict[str, float]]
    seconds: float


# --------------------------------------------------------------------------------------------- helpers


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``params``: parameters or groups (`parameter_groups`); ``lr`` and ``weight_decay`` are the defaults."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise FinetuneError(f"unknown optimizer '{name}'; known: {list(OPTIMIZERS)}")


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``: linear warmup, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - t
    raise FinetuneError(f"unknown schedule '{schedule}'; known: {list(SCHEDULES)}")


class _Schedule:
    """A picklable LambdaLR function (its state is just the step the scheduler keeps)."""

    def __init__(self, total: int, schedule: str, warmup: int):
        self.total, self.schedule, self.warmup = total, schedule, warmup

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.schedule, self.warmup)


class _Stop:
    """SIGINT/SIGTERM -> finish the step, save, return. A second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, torch threads: {torch.get_num_threads()}"


def _as_list(x: str | Path | Sequence[str | Path] | None) -> list[str]:
    if x is None:
        return []
    if isinstance(x, (str, Path)):
        return [str(x)]
    return [str(v) for v in x]


def calibration_batch(dataset_dirs: list[str], scale: int, recipe: Recipe, seed: int,
                      lr_dirs: list[str] | None) -> torch.Tensor:
    """LR patches of the training data (deterministic, independent of the training samples)."""
    cal = recipe.calibration
    data = TrainPatches(dataset_dirs, scale, min(cal.patch_size, 48), seed=seed + 1_000_003, lr_dirs=lr_dirs,
                        augment=False)
    return torch.stack([data[i][0] for i in range(cal.batches * cal.batch_size)])


class RunLog:
    """``train.log`` (text) and ``metrics.jsonl`` (machine-readable) of a run, with echo through tqdm."""

    def __init__(self, run_dir: Path, echo: bool):
        self.text = (run_dir / "train.log").open("a")
        self.metrics_path = run_dir / "metrics.jsonl"
        self.echo = echo
        self.metrics = self.metrics_path.open("a")

    def truncate_after(self, step: int, key: str = "step") -> None:
        """Drop records whose ``key`` is past ``step`` (a killed run may have logged steps its last checkpoint
        lacks); records without ``key`` stay."""
        self.metrics.close()
        keep = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the half-written last line of a killed run
                if rec.get(key, 0) <= step:  # a validation at ``step`` ran before that step's checkpoint
                    keep.append(line)
        _atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))
        self.metrics = self.metrics_path.open("a")

    def records(self) -> list[dict[str, Any]]:
        self.metrics.flush()
        out = []
        for line in self.metrics_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def say(self, msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.text.write(f"{stamp} {msg}\n")
        self.text.flush()
        if self.echo:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def record(self, rec: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()

    def close(self) -> None:
        self.text.close()
        self.metrics.close()


# ----------------------------------------------------------------------------------------------- finetune


def finetune(
    model: str | Path | nn.Module | None = None,
    recipe: str | Path | Recipe = "scales",
    *,
    train: str | Path | Sequence[str | Path] | None = None,
    val: str | Path | Sequence[str | Path] | None = None,
    out: str | Path | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    batch: int = 16,
    patch: int = 32,
    train_lr: str | Path | Sequence[str | Path] | None = None,
    scale: int | None = None,
    spec: ModelSpec | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    warmup_steps: int | None = None,
    l1_weight: float | None = None,
    distill_weight: float | None = None,
    feature_distill_weight: float | None = None,
    extra_losses: dict[str, float] | None = None,
    reconstruct: float | None = None,
    reconstruct_lr: float | None = None,
    interval_lr: float | None = None,
    recipe_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    val_every: int | None = None,
    val_limit: int | None = None,
    save_every: int = 500,
    save_seconds: float = 120.0,
    keep: int = 2,
    workers: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    resume: str | Path | None = None,
    progress: bool = True,
    max_steps_this_call: int | None = None,
) -> FinetuneResult:
    """Convert ``model`` with ``recipe`` and finetune it; see the module docstring. Returns a `FinetuneResult`.

    ``model``: a checkpoint path, ``zoo:<name>``, or an FP ``nn.Module`` (then give ``spec`` to make the run
    resumable without it). Training options left ``None`` come from ``recipe.train``. ``resume=<run>``
    continues a run with its stored settings (other settings are ignored; ``model`` is needed only for a
    run started from a module without a spec). ``max_steps_this_call`` stops early (with a checkpoint) after
    that many steps, as if interrupted (used by tests).
    """
    t_start = time.time()
    if resume is not None:
        run_dir = Path(resume)
        cfg_path = run_dir / CONFIG_FILE
        if not cfg_path.is_file():
            raise FinetuneError(f"cannot resume {run_dir}: no {CONFIG_FILE} (not a finetune run folder?)")
        cfg = RunConfig(**json.loads(cfg_path.read_text()))
    else:
        if out is None:
            raise FinetuneError("give an output folder (out=...) for the run")
        if (steps is None) == (minutes is None):
            raise FinetuneError("give exactly one budget: steps=N or minutes=M")
        if steps is not None and steps < 1:
            raise FinetuneError(f"steps must be >= 1, got {steps}")
        if minutes is not None and minutes <= 0:
            raise FinetuneError(f"minutes must be > 0, got {minutes}")
        if model is None:
            raise FinetuneError("give the pretrained model (a checkpoint path, zoo:<name> or an nn.Module)")
        run_dir = Path(out)
        if (run_dir / CONFIG_FILE).exists():
            raise FinetuneError(f"{run_dir} already holds a run: resume it (--resume {run_dir}) or pick another -o")
        rec = load_recipe(recipe).with_overrides(**(recipe_overrides or {}))
        ts: TrainSpec = rec.train
        train_dirs = _as_list(train)
        if not train_dirs:
            raise FinetuneError("give training data: train=<folder of HR images> (or several)")
        cfg = RunConfig(
            model=str(model) if not isinstance(model, nn.Module) else f"<{type(model).__name__} module>",
            recipe=rec.to_dict(),
            train=train_dirs,
            val=_as_list(val),
            scale=scale or 0,
            steps=steps,
            minutes=minutes,
            batch=batch,
            patch=patch,
            train_lr=_as_list(train_lr) or None,
            optimizer=optimizer or ts.optimizer,
            lr=lr if lr is not None else ts.lr,
            weight_decay=weight_decay if weight_decay is not None else ts.weight_decay,
            schedule=schedule or ts.schedule,
            warmup_steps=warmup_steps if warmup_steps is not None else ts.warmup_steps,
            l1_weight=l1_weight if l1_weight is not None else ts.l1_weight,
            distill_weight=distill_weight if distill_weight is not None else ts.distill_weight,
            feature_distill_weight=(feature_distill_weight if feature_distill_weight is not None
                                    else ts.feature_distill_weight),
            extra_losses=dict(extra_losses if extra_losses is not None else ts.extra_losses),
            reconstruct=reconstruct if reconstruct is not None else ts.reconstruct,
            reconstruct_lr=reconstruct_lr if reconstruct_lr is not None else ts.reconstruct_lr,
            interval_lr=interval_lr if interval_lr is not None else ts.interval_lr,
            seed=seed,
            val_every=val_every,
            val_limit=val_limit,
            save_every=save_every,
            save_seconds=save_seconds,
            keep=keep,
            workers=workers,
            threads=threads,
            device=device,
        )
        if cfg.optimizer not in OPTIMIZERS:
            raise FinetuneError(f"unknown optimizer '{cfg.optimizer}'; known: {list(OPTIMIZERS)}")
        if cfg.schedule not in SCHEDULES:
            raise FinetuneError(f"unknown schedule '{cfg.schedule}'; known: {list(SCHEDULES)}")
        if not 0.0 <= cfg.reconstruct <= 1.0:
            raise FinetuneError(f"reconstruct is the share of the budget for reconstruction, in [0, 1]; got "
                                f"{cfg.reconstruct}")
        if cfg.batch < 1 or cfg.patch < 4:
            raise FinetuneError(f"batch must be >= 1 and patch >= 4, got {cfg.batch} and {cfg.patch}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device_t = torch.device(cfg.device)
    recipe_obj = recipe_from_dict(cfg.recipe, source=f"{run_dir}/{CONFIG_FILE}")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir, echo=progress)

    # ---- teacher
    teacher_file = run_dir / "teacher.safetensors"
    if resume is not None and teacher_file.is_file():
        teacher = load_model(teacher_file)
        spec = _read_spec(teacher_file)
    elif isinstance(model, nn.Module):
        teacher = copy.deepcopy(model).float().eval()
        if resume is None and scale is not None and model_scale(teacher, model_in_channels(teacher)) != scale:
            raise FinetuneError(f"the model is x{model_scale(teacher, model_in_channels(teacher))}, not x{scale}")
    else:
        if resume is not None:
            raise FinetuneError(f"cannot resume {run_dir}: {teacher_file} is missing and no model was given")
        teacher, spec = load_pretrained(model, arch=arch, arch_kwargs=arch_kwargs, scale=scale)
    in_ch = model_in_channels(teacher)
    window = input_multiple(teacher)
    if cfg.patch % window:
        raise FinetuneError(f"the model works on windows of {window} pixels: the LR patch ({cfg.patch}) must be a "
                            f"multiple of {window}")
    measured = model_scale(teacher, in_ch)
    if cfg.scale and cfg.scale != measured:
        raise FinetuneError(f"the model is x{measured}, but scale {cfg.scale} was given")
    cfg.scale = measured

    # ---- data (errors about the folders come before any expensive work)
    train_lr_dirs = cfg.train_lr
    if train_lr_dirs is not None and len(train_lr_dirs) != len(cfg.train):
        raise FinetuneError(f"{len(train_lr_dirs)} LR folders for {len(cfg.train)} training folders")
    dataset = TrainPatches(cfg.train, cfg.scale, cfg.patch, seed=cfg.seed, lr_dirs=train_lr_dirs)
    val_sets = [EvalSet.load(v, cfg.scale, limit=cfg.val_limit) for v in cfg.val]

    # ---- student
    recon_dir, reconstructed = run_dir / "reconstruction", run_dir / "reconstructed.safetensors"
    ckpt = latest_checkpoint(run_dir) if resume is not None else None
    recon_ckpt = latest_checkpoint(recon_dir) if resume is not None else None
    if resume is not None:
        clean_temporaries(run_dir)
        clean_temporaries(recon_dir)
    if ckpt is not None:
        student = load_model(ckpt[1] / "model.safetensors")
    elif resume is not None and reconstructed.is_file():
        student = load_model(reconstructed)
    elif recon_ckpt is not None:
        student = load_model(recon_ckpt[1] / "model.safetensors")
    elif resume is not None and (run_dir / "converted.safetensors").is_file():
        student = load_model(run_dir / "converted.safetensors")
    else:
        torch.manual_seed(cfg.seed)
        cal = calibration_batch(cfg.train, cfg.scale, recipe_obj, cfg.seed, train_lr_dirs)
        student = convert(teacher, recipe_obj, calibration_data=cal)
    # Frozen only now: the converted copy must not inherit requires_grad=False.
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.to(device_t).eval()
    if spec is None:
        spec = ModelSpec("<module given to finetune: no spec>", {})
    student.to(device_t).train()
    if resume is None:
        _atomic_write_text(run_dir / CONFIG_FILE, json.dumps(asdict(cfg), indent=1))
        if spec.target.startswith("<"):
            log.say("warning: no ModelSpec for this module: the run folder cannot rebuild the models on its own")
        else:
            save_model(teacher, teacher_file, spec, extra={"role": "teacher", "source": cfg.model})
            save_model(student, run_dir / "converted.safetensors", spec, extra={"role": "converted"})
    info = conversion_info(student)

    # ---- objective, optimizer, schedule
    taps = (None, None)
    if cfg.feature_distill_weight and info is not None:
        # converted layers that have an FP counterpart of the same name in the teacher (not inserted skip adds)
        teacher_modules = dict(teacher.named_modules())
        names = [r.name for r in info.plan.rows if r.replaced_by and r.name in teacher_modules]
        if not names:
            raise FinetuneError("feature distillation: no converted layer has a counterpart in the teacher")
        taps = (FeatureTap(student, names), FeatureTap(teacher, names))
    objective = Objective(cfg.l1_weight, cfg.distill_weight, cfg.feature_distill_weight, cfg.extra_losses, *taps)
    opt = build_optimizer(parameter_groups(student, cfg.lr, cfg.interval_lr), cfg.optimizer, cfg.lr,
                          cfg.weight_decay)

    # ---- baselines (bicubic, FP teacher, converted) on the validation sets
    baselines: dict[str, dict[str, float]] = {}
    for es in val_sets:
        baselines[es.name] = {"bicubic": evaluate_bicubic(es, ssim=False).psnr,
                              "FP teacher": evaluate_model(teacher, es, device_t, ssim=False).psnr}
    log.say(f"run {run_dir}: {cfg.model} x{cfg.scale}, recipe {recipe_obj.name}, {len(dataset.hr)} training "
            f"images, val {[es.name for es in val_sets]}; {hardware()}")

    start_step = 0
    t_val = 0.0
    best: dict[str, Any] | None = None
    if ckpt is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _Schedule(cfg.total_steps, cfg.schedule, cfg.warmup_steps))
        start_step, extra = load_train_state(ckpt[1], opt, sched)
        best = extra.get("best")
        baselines = extra.get("baselines", baselines)
        log.truncate_after(start_step)
        log.say(f"resumed from {ckpt[1].name} at step {start_step}/{cfg.total_steps}")
    else:
        baselines_file = run_dir / "baselines.json"
        if recon_ckpt is None and not reconstructed.is_file():  # a fresh start
            log.truncate_after(0)
            t_val = time.time()
            for es in val_sets:
                baselines[es.name]["converted"] = evaluate_model(student, es, device_t, ssim=False).psnr
            t_val = time.time() - t_val
            _atomic_write_text(baselines_file, json.dumps({"baselines": baselines, "t_val": t_val}))
        else:
            stored = json.loads(baselines_file.read_text())
            baselines, t_val = stored["baselines"], stored["t_val"]
        if cfg.reconstruct and not reconstructed.is_file():
            phase = _reconstruction_phase(cfg, run_dir, student, teacher, spec, dataset, val_sets, baselines, t_val,
                                          t_start, log, progress, max_steps_this_call)
            if phase is not None and not phase.finished:
                log.say(f"reconstruction stopped; continue with: srbinarize finetune --resume {run_dir}")
                log.close()
                return FinetuneResult(run_dir, student.eval(), 0, cfg.total_steps or 0, True, None, baselines, {},
                                      time.time() - t_start)
            if max_steps_this_call is not None and phase is not None:
                max_steps_this_call -= phase.steps_this_call
            _atomic_write_text(baselines_file, json.dumps({"baselines": baselines, "t_val": t_val}))
        if cfg.total_steps is None:
            if cfg.steps is not None:
                cfg.total_steps = max(0, cfg.steps - _reconstruction_steps(student, cfg))
            elif cfg.reconstruct >= 1.0:
                cfg.total_steps = 0
            else:
                # a resumed run does not know how long its first call took: the end-to-end share of the budget
                end = (t_start + cfg.minutes * 60 if resume is None
                       else time.time() + (1 - cfg.reconstruct) * cfg.minutes * 60)
                cfg.total_steps = _steps_for_budget(cfg, student, teacher, objective, dataset, device_t, end,
                                                    t_val, log)
            if reconstructed.is_file():
                # Adam's first full-size steps would undo much of what reconstruction reached (one step at
                # lr 1e-3 took Set5 x4 from 28.0 to 24.5 dB): warm up over a tenth of the steps, at least 5
                cfg.warmup_steps = max(cfg.warmup_steps, min(cfg.total_steps, max(5, cfg.total_steps // 10)))
        _atomic_write_text(run_dir / CONFIG_FILE, json.dumps(asdict(cfg), indent=1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _Schedule(cfg.total_steps, cfg.schedule, cfg.warmup_steps))
        for name, b in baselines.items():
            log.say(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()) + " (PSNR-Y dB)")
    total = cfg.total_steps
    val_every = cfg.val_every or max(1, total // 5)
    log.say(f"training {total} steps (batch {cfg.batch}, LR patch {cfg.patch}), {cfg.optimizer} lr {cfg.lr:g} "
            f"{cfg.schedule}, warmup {cfg.warmup_steps}; loss: l1 {cfg.l1_weight:g}, distill {cfg.distill_weight:g}, "
            f"feature {cfg.feature_distill_weight:g}, extra {cfg.extra_losses}; validation every {val_every} steps")

    # ---- the loop
    deadline = t_start + cfg.minutes * 60 if (cfg.minutes and resume is None) else None
    # Unbounded: the loop decides where to stop (a time-budget run may re-plan its length once).
    loader = patch_loader(dataset, cfg.batch, start_step=start_step, steps=None, workers=cfg.workers)
    step_times: list[float] = []
    replan_at = start_step + min(8, max(3, total // 10)) if deadline is not None else None
    step = start_step
    interrupted = out_of_time = False
    last_val = -1
    last_save = time.time()
    ema = None
    final_val: dict[str, dict[str, float]] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, unit="it", dynamic_ncols=True, file=sys.stderr)

    def extra_state() -> dict[str, Any]:
        return {"best": best, "baselines": baselines}

    def save(step_: int) -> None:
        nonlocal last_save
        save_checkpoint(run_dir, step_, student, spec, opt, sched, extra_state())
        prune(run_dir, cfg.keep)
        last_save = time.time()

    def validate(step_: int) -> dict[str, dict[str, float]]:
        nonlocal best, last_val
        last_val = step_
        res: dict[str, SetResult] = {es.name: evaluate_model(student, es, device_t) for es in val_sets}
        vals = {k: {"psnr": r.psnr, "ssim": r.ssim} for k, r in res.items()}
        log.record({"kind": "val", "step": step_, **{k: v for k, v in vals.items()}})
        msg = ", ".join(f"{k} {v['psnr']:.3f} dB / {v['ssim']:.4f}" for k, v in vals.items())
        log.say(f"step {step_}: validation PSNR/SSIM-Y {msg}")
        if vals:
            mean = sum(v["psnr"] for v in vals.values()) / len(vals)
            if best is None or mean > best["mean_psnr"]:
                best = {"step": step_, "mean_psnr": mean, "val": vals}
                save_model(student, run_dir / "best.safetensors", spec, extra={"role": "best", **best})
            _pictures(run_dir, log, val_sets[0], teacher, student, device_t, baselines, cfg)
        return vals

    try:
        with _Stop() as stop:
            while step < total:
                if stop.requested:
                    log.say(f"{stop.requested}: stopping at step {step}")
                    interrupted = True
                    break
                if deadline is not None and time.time() > deadline:
                    log.say(f"time budget of {cfg.minutes} min reached at step {step}/{total}: finishing here")
                    out_of_time = True
                    break
                if max_steps_this_call is not None and step - start_step >= max_steps_this_call:
                    interrupted = True
                    break
                t_step = time.time()
                lr_b, hr_b = next(loader)
                lr_b, hr_b = lr_b.to(device_t, non_blocking=True), hr_b.to(device_t, non_blocking=True)
                teacher_sr = None
                if objective.needs_teacher:
                    with torch.no_grad():
                        teacher_sr = teacher(lr_b)
                sr = student(lr_b)
                loss, parts = objective(student, sr, hr_b, teacher_sr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}: lower the learning rate")
                current_lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                step += 1
                step_times.append(time.time() - t_step)
                parts["sec"] = round(step_times[-1], 4)
                if step == replan_at:
                    new_total = _replan(step, total, step_times, deadline, t_val, cfg, log)
                    if new_total != total:
                        total = cfg.total_steps = new_total
                        sched.lr_lambdas[0].total = total  # saved with the scheduler state
                        _atomic_write_text(run_dir / CONFIG_FILE, json.dumps(asdict(cfg), indent=1))
                        val_every = cfg.val_every or max(1, total // 5)
                        if bar is not None:
                            bar.total = total
                value = float(loss.detach())
                log.record({"step": step, "loss": value, "lr": current_lr, **parts})
                ema = value if ema is None else 0.95 * ema + 0.05 * value
                if bar is not None:
                    bar.set_postfix(loss=f"{ema:.4f}", lr=f"{current_lr:.2e}", refresh=False)
                    bar.update(1)
                if step % val_every == 0 or step == total:
                    final_val = validate(step)
                if step % cfg.save_every == 0 or step == total or time.time() - last_save > cfg.save_seconds:
                    save(step)
    finally:
        if bar is not None:
            bar.close()
        for tap in taps:
            if tap is not None:
                tap.close()
    if (out_of_time and step > start_step and last_val != step) or (total == 0 and not interrupted):
        final_val = validate(step)  # the last model, also when reconstruction took the whole budget
    if step > start_step or interrupted:
        save(step)
    if step == total or out_of_time:
        save_model(student, run_dir / "final.safetensors", spec, extra={"role": "final", "step": step})
    seconds = time.time() - t_start
    summary = {
        "run_dir": str(run_dir), "step": step, "total_steps": total, "interrupted": interrupted,
        "stopped_by_time_budget": out_of_time, "best": best, "final_val": final_val, "baselines": baselines,
        "seconds_this_call": round(seconds, 1),
        "hardware": hardware(), "config": asdict(cfg),
    }
    _atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    if interrupted:
        log.say(f"saved step {step}; continue with: srbinarize finetune --resume {run_dir}")
    else:
        log.say(f"done: {step} steps in {seconds / 60:.1f} min; best {best}")
    log.close()
    return FinetuneResult(run_dir, student.eval(), step, total, interrupted, best, baselines, final_val, seconds)


def _read_spec(path: Path) -> ModelSpec:
    from ..checkpoint import read_metadata

    return ModelSpec.from_json(read_metadata(path)["model"])


def _steps_for_budget(cfg: RunConfig, student, teacher, objective, dataset, device, end: float, t_val: float,
                      log: RunLog) -> int:
    """How many steps fit before the time ``end``: time 3 steps on a copy (the student is not touched)."""
    probe = copy.deepcopy(student).train()
    probe_opt = build_optimizer([p for p in probe.parameters() if p.requires_grad], cfg.optimizer, 0.0, 0.0)
    x, y = (torch.stack(t) for t in zip(*[dataset[2**40 + i] for i in range(cfg.batch)], strict=True))
    x, y = x.to(device), y.to(device)
    times = []
    for _ in range(3):
        t0 = time.time()
        ts = None
        if objective.needs_teacher:
            with torch.no_grad():
                ts = teacher(x)
        sr = probe(x)
        loss = torch.nn.functional.l1_loss(sr, y) + (torch.nn.functional.l1_loss(sr, ts) if ts is not None else 0)
        probe_opt.zero_grad()
        loss.backward()
        probe_opt.step()
        times.append(time.time() - t0)
    del probe, probe_opt
    per_step = min(times[1:]) * 1.1 + 0.002 * cfg.batch  # + data loading, which the workers mostly hide
    n_val = 6  # about 5 periodic validations and the final one, with SSIM (about 1.3x the timed PSNR pass)
    left = end - time.time() - 1.3 * n_val * t_val - 5.0
    steps = max(1, int(left / per_step))
    log.say(f"{left / 60:.1f} min left: {per_step:.3f} s/step measured, validation {t_val:.1f} s -> {steps} steps")
    return steps


def _reconstruction_steps(student: nn.Module, cfg: RunConfig) -> int:
    """Optimizer steps of the reconstruction phase in all (0 without one)."""
    return len(reconstruction_units(student)) * (cfg.reconstruct_steps or 0) if cfg.reconstruct else 0


def _reconstruction_phase(cfg: RunConfig, run_dir: Path, student, teacher, spec: ModelSpec, dataset: TrainPatches,
                          val_sets: list[EvalSet], baselines: dict[str, dict[str, float]], t_val: float,
                          t_start: float, log: RunLog, progress: bool, max_steps: int | None) -> PhaseResult | None:
    """Phase 1: block-wise reconstruction of the body units (`srbinarize.train.reconstruct`), resumable.

    Fixes ``cfg.reconstruct_steps`` (per unit) on a fresh start: ``reconstruct`` x ``steps`` shared by the
    units, or what fits in ``reconstruct`` x ``minutes``. When the phase ends it writes
    ``reconstructed.safetensors`` and adds the "reconstructed" validation figures to ``baselines``.
    """
    units = reconstruction_units(student)
    if not units:
        log.say("reconstruction: the model has no traced body units; skipping the phase")
        return None
    device = next(student.parameters()).device
    loader = patch_loader(dataset, cfg.batch, start_step=2**32 // cfg.batch, workers=0)
    pool = [next(loader)[0].to(device) for _ in range(MAX_POOL)]
    if cfg.reconstruct_steps is None:
        if cfg.steps is not None:
            cfg.reconstruct_steps = max(1, round(cfg.reconstruct * cfg.steps / len(units)))
        else:
            cfg.reconstruct_steps = _reconstruction_steps_for_budget(cfg, student, teacher, units, pool, t_start,
                                                                     t_val, log)
        _atomic_write_text(run_dir / CONFIG_FILE, json.dumps(asdict(cfg), indent=1))
    steps = cfg.reconstruct_steps
    ckpt = latest_checkpoint(run_dir / "reconstruction")
    log.truncate_after(ckpt[0] if ckpt else 0, key="recon_step")
    log.say(f"reconstruction: {len(units)} units ({', '.join(u.path for u in units)}), {steps} Adam steps each, "
            f"lr {cfg.reconstruct_lr:g}, {pool_size(steps)} batches of {cfg.batch}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(units) * steps, unit="it", desc="reconstruction", dynamic_ncols=True, file=sys.stderr)
    index = {u.path: i for i, u in enumerate(units)}

    def on_step(unit: Unit, step: int, loss: float) -> None:
        position = index[unit.path] * steps + step + 1
        log.record({"phase": "reconstruction", "recon_step": position, "unit": unit.path, "unit_loss": loss})
        if bar is not None:
            bar.n = position
            bar.set_postfix(unit=unit.path, loss=f"{loss:.4f}", refresh=False)
            bar.refresh()

    with _Stop() as stop:
        def should_stop(done: int) -> bool:
            return stop.requested is not None or (max_steps is not None and done >= max_steps)

        phase = run_phase(student, teacher, pool, steps, cfg.reconstruct_lr, run_dir / "reconstruction", spec,
                          save_every=cfg.save_every, save_seconds=cfg.save_seconds, should_stop=should_stop,
                          on_step=on_step, interval_lr=cfg.interval_lr)
    if bar is not None:
        bar.close()
    for r in phase.units:
        log.say(f"reconstruction {r.unit.path}: relative MSE {r.first_loss:.4f} -> {r.last_loss:.4f}")
    if phase.finished:
        save_model(student, run_dir / "reconstructed.safetensors", spec, extra={"role": "reconstructed"})
        for es in val_sets:
            baselines[es.name]["reconstructed"] = evaluate_model(student, es, device, ssim=False).psnr
            log.say(f"{es.name}: reconstructed {baselines[es.name]['reconstructed']:.2f} dB (PSNR-Y)")
    return phase


def _reconstruction_steps_for_budget(cfg: RunConfig, student, teacher, units: list[Unit], pool, t_start: float,
                                     t_val: float, log: RunLog) -> int:
    """Steps per unit that fit in ``reconstruct`` x ``minutes``: times unit steps and teacher/student passes."""
    probe = copy.deepcopy(student)
    with torch.no_grad():
        probe(pool[0])  # warm-up
        t0 = time.time()
        teacher(pool[0])
        probe(pool[0])
    per_pass = time.time() - t0  # both networks on one batch
    times: list[float] = []

    def timed(*_args) -> bool:
        times.append(time.time())
        return len(times) >= 5

    reconstruct_unit(probe, teacher, units[len(units) // 2], pool[:1], 5, 0.0, on_step=timed)
    per_step = min(b - a for a, b in itertools.pairwise(times)) * 1.1
    del probe
    left = cfg.minutes * 60 - (time.time() - t_start)
    # Preparing the units runs each unit of both networks once per pool batch (the units after the first
    # start from the previous unit's outputs): about one pass of both, plus slack for other graph shapes.
    budget = cfg.reconstruct * left - t_val
    steps = 1
    for _ in range(3):  # the pool grows with the steps
        preparing = 2 * per_pass * pool_size(steps)
        steps = max(1, int((budget - preparing) / (len(units) * per_step)))
    log.say(f"reconstruction: {cfg.reconstruct:g} of {left / 60:.1f} min left, {per_step:.3f} s per unit step, "
            f"{preparing:.0f} s to prepare the units -> {steps} steps per unit")
    return steps


def _replan(step: int, total: int, step_times: list[float], deadline: float, t_val: float, cfg: RunConfig,
            log: RunLog) -> int:
    """A time-budget run checks its plan once, after a few real steps (other jobs may have slowed it)."""
    per_step = sorted(step_times[1:])[len(step_times[1:]) // 2]  # the median, the first (warm-up) step left out
    val_every = cfg.val_every or max(1, total // 5)
    n_val = (total - step) // val_every + 1
    left = deadline - time.time() - 1.3 * n_val * t_val - 5.0
    new_total = step + max(1, int(left / per_step))
    if abs(new_total - total) <= 0.15 * total:
        return total
    log.say(f"re-planned at step {step}: {per_step:.3f} s/step measured in training -> {new_total} steps "
            f"instead of {total}")
    return new_total


def _pictures(run_dir, log, es: EvalSet, teacher, student, device, baselines, cfg) -> None:
    """curves.png from metrics.jsonl and crops.png on the first image of the first validation set."""
    try:
        records = log.records()
        steps = [r["step"] for r in records if "loss" in r]
        losses = [r["loss"] for r in records if "loss" in r]
        val: dict[str, list[tuple[int, float]]] = {
            k: [(0, b["converted"])] for k, b in baselines.items() if "converted" in b
        }
        for r in records:
            if r.get("kind") == "val":
                for k, v in r.items():
                    if isinstance(v, dict):
                        val.setdefault(k, []).append((r["step"], v["psnr"]))
        title = f"{cfg.model} x{cfg.scale}, {cfg.recipe['name']}: lr {cfg.lr:g}, distill {cfg.distill_weight:g}"
        plot_curves(run_dir / "curves.png", steps, losses, val, baselines, title)
        im = es.images[0]
        from .metrics import bicubic_upscale

        size = min(96, im.hr.shape[0], im.hr.shape[1])
        top, left = textured_window(im.hr, size)
        panels = [
            ("bicubic", bicubic_upscale(im.lr, es.scale)),
            ("FP teacher", super_resolve(teacher, im.lr, es.scale, device)),
            (f"{cfg.recipe['name']} finetuned", _eval_sr(student, im.lr, es.scale, device)),
            ("HR", im.hr),
        ]
        save_crops(run_dir / "crops.png", panels, top, left, size, zoom=max(1, 256 // size))
    except Exception as err:  # pictures never stop a run
        log.say(f"warning: could not draw the pictures: {type(err).__name__}: {err}")


def _eval_sr(model, lr, scale, device):
    was = model.training
    model.eval()
    try:
        return super_resolve(model, lr, scale, device)
    finally:
        model.train(was)


def run_exists(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


__all__ = ["DataError", "FinetuneError", "FinetuneResult", "RunConfig", "finetune", "run_exists"]
