"""Phase 2: the converted student trained end to end against HR and its FP teacher (`srbinarize.train.losses`).

The optimizer and schedule come from the recipe's ``train`` section. With a ``steps`` budget the phase gets
what reconstruction left; with ``minutes`` the step count that fits is measured before step 0 and checked
once after a few real steps (other jobs may have slowed the machine); when reconstruction used up the time
budget, the phase says so and validates the model as it is. After reconstruction the learning rate warms up
over a tenth of the steps (at least 5): Adam's first full-size steps would undo much of what reconstruction
reached (one step at lr 1e-3 took Set5 x4 from 28.0 to 24.5 dB). With ``train.progressive`` the layers
start as their FP equivalent and are blended into the binary layers over that share of the steps
(`BinarizationRamp`); validations and checkpoints always see the binary model. It validates every ``val_every`` steps,
checkpoints every ``save_every`` steps (and every ``save_seconds``) under ``<run>/checkpoints/`` and writes
``<run>/final.safetensors`` at its end.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import load_train_state
from ..config import FinetuneError, RunConfig
from ..data import patch_loader
from ..losses import FeatureTap, Objective, resolve_extra_loss
from ..optim import parameter_groups
from ..session import Session
from . import Phase, PhaseEnd
from .reconstruction import RECONSTRUCTED

FINAL = "final.safetensors"


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``params``: parameters or groups (`parameter_groups`); ``lr`` and ``weight_decay`` are the defaults."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)  # the recipe allows no other


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``: linear warmup, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t


class Schedule:
    """A picklable LambdaLR function (its state is just the step the scheduler keeps)."""

    def __init__(self, total: int, schedule: str, warmup: int):
        self.total, self.schedule, self.warmup = total, schedule, warmup

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.schedule, self.warmup)


def feature_layers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Converted layers with an FP counterpart of the same name in the teacher (not inserted skip adds)."""
    from ...convert import conversion_info

    info = conversion_info(student)
    teacher_modules = dict(teacher.named_modules())
    return [r.name for r in info.plan.rows if r.replaced_by and r.name in teacher_modules] if info else []


class BinarizationRamp:
    """``train.progressive``: over the first ``share`` of the steps, every layer that offers
    ``set_binarization`` goes linearly from its FP equivalent (level 0 at step 0) to the binary layer (1);
    from then on, and whenever the model is validated or saved, it is the binary layer alone.
    ``weights_first``: the first half of the ramp binarizes the FP side's weights, the second blends in the
    binary layer (binary activations)."""

    def __init__(self, student: nn.Module, share: float, order: str = "together"):
        self.share, self.order = share, order
        self.layers = [m for m in student.modules() if hasattr(m, "set_binarization")] if share else []

    def levels(self, step: int, total: int) -> tuple[float, float]:
        """(blend level of the binary layer, binarization of the FP side's weights) at ``step`` of ``total``."""
        ramp = self.share * total
        if step >= ramp:
            return 1.0, 1.0
        t = step / ramp
        return (t, 0.0) if self.order == "together" else (max(0.0, 2 * t - 1), min(1.0, 2 * t))

    def set(self, level: float, weights: float = 0.0) -> None:
        for layer in self.layers:
            layer.set_binarization(level, weights)

    @contextmanager
    def binary(self) -> Iterator[None]:
        levels = [(layer.binarization, layer.fp_side_weights) for layer in self.layers]
        self.set(1.0, 1.0)
        try:
            yield
        finally:
            for layer, (level, weights) in zip(self.layers, levels, strict=True):
                layer.set_binarization(level, weights)


class EndToEnd(Phase):
    name = "end_to_end"

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: torch.optim.lr_scheduler.LambdaLR | None = None

    def root(self, run_dir: Path) -> Path:
        return run_dir

    def finished(self, run_dir: Path) -> bool:
        return (run_dir / FINAL).is_file()

    def resume_from(self, s: Session) -> Path | None:
        ckpt = s.latest_checkpoint(s.run_dir)
        return ckpt[1] / "model.safetensors" if ckpt else None

    def check(self, cfg: RunConfig, student: nn.Module, teacher: nn.Module) -> None:
        train = cfg.recipe.train
        for name, weight in train.extra_losses.items():
            if weight:
                resolve_extra_loss(name)
        if train.feature_distill_weight and not feature_layers(student, teacher):
            raise FinetuneError("feature distillation: no converted layer has a counterpart in the teacher")
        if train.progressive and not BinarizationRamp(student, train.progressive).layers:
            raise FinetuneError(f"train.progressive={train.progressive:g}: recipe {cfg.recipe.name!r} converted no "
                                "layer that can be blended from FP to binary (SCALES layers can); set it to 0")

    def plan(self, s: Session) -> dict[str, int]:
        cfg, train = s.cfg, s.cfg.recipe.train
        recon = cfg.plan.get("reconstruction", {})
        if cfg.budget.steps is not None:
            steps = max(0, cfg.budget.steps - recon.get("units", 0) * recon.get("steps_per_unit", 0))
        elif train.reconstruct >= 1.0:
            steps = 0
        else:
            # a resumed run does not know how long its first call took: the end-to-end share of the budget
            end = (s.started + cfg.budget.minutes * 60 if s.fresh
                   else time.time() + (1 - train.reconstruct) * cfg.budget.minutes * 60)
            steps = _steps_for_budget(s, end)
        warmup = train.warmup_steps
        if (s.run_dir / RECONSTRUCTED).is_file():
            warmup = max(warmup, min(steps, max(5, steps // 10)))
        return {"steps": steps, "warmup_steps": warmup}

    def _objective(self, s: Session) -> tuple[Objective, list[FeatureTap]]:
        train = s.cfg.recipe.train
        taps: list[FeatureTap] = []
        if train.feature_distill_weight:
            names = feature_layers(s.student, s.teacher)
            taps = [FeatureTap(s.student, names), FeatureTap(s.teacher, names)]
        objective = Objective(train.l1_weight, train.distill_weight, train.feature_distill_weight,
                              dict(train.extra_losses), *taps)
        return objective, taps

    def run(self, s: Session, plan: dict[str, int]) -> PhaseEnd:
        train = s.cfg.recipe.train
        objective, taps = self._objective(s)
        self.optimizer = build_optimizer(parameter_groups(s.student, train.lr, train.interval_lr), train.optimizer,
                                         train.lr, train.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, Schedule(plan["steps"], train.schedule, plan["warmup_steps"]))
        start = 0
        ckpt = s.latest_checkpoint(s.run_dir)
        if ckpt is not None:
            start, extra = load_train_state(ckpt[1], self.optimizer, self.schedule)
            s.best = extra.get("best")
            s.baselines = extra.get("baselines", s.baselines)
            s.log.truncate_after(start)
            s.log.say(f"resumed from {ckpt[1].name} at step {start}/{plan['steps']}")
        else:
            s.log.truncate_after(0)
            for name, b in s.baselines.items():
                s.log.say(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()) + " (PSNR-Y dB)")
        s.log.say(f"training {plan['steps']} steps (batch {s.cfg.data.batch}, LR patch {s.cfg.data.patch}), "
                  f"{train.optimizer} lr {train.lr:g} {train.schedule}, warmup {plan['warmup_steps']}; loss: l1 "
                  f"{train.l1_weight:g}, distill {train.distill_weight:g}, feature {train.feature_distill_weight:g}, "
                  f"extra {dict(train.extra_losses)}")
        ramp = BinarizationRamp(s.student, train.progressive, train.progressive_order)
        if ramp.layers:
            s.log.say(f"progressive binarization ({train.progressive_order}): {len(ramp.layers)} layers blended from "
                      f"FP to binary over the first {train.progressive:g} of the steps")
        try:
            return self._train(s, plan, objective, start, ramp)
        finally:
            ramp.set(1.0, 1.0)
            for tap in taps:
                tap.close()

    def _train(self, s: Session, plan: dict[str, int], objective: Objective, start: int,
               ramp: BinarizationRamp) -> PhaseEnd:
        cfg = s.cfg
        total = plan["steps"]
        val_every = cfg.run.val_every or max(1, total // 5)
        deadline = s.started + cfg.budget.minutes * 60 if (cfg.budget.minutes and s.fresh) else None
        # Unbounded: the loop decides where to stop (a time-budget run may re-plan its length twice).
        loader = patch_loader(s.dataset, cfg.data.batch, start_step=start, steps=None, workers=cfg.data.workers)
        replans_left = 2 if deadline is not None else 0
        replan_at = start + min(8, max(3, total // 10)) if replans_left else None
        step, stopped, out_of_time, last_val, last_save, ema = start, False, False, -1, time.time(), None
        step_times: list[float] = []
        bar = s.progress_bar(total, start)
        try:
            while step < total:
                reason = s.stop_reason()
                if reason is not None:
                    s.log.say(f"{reason}: stopping at step {step}")
                    stopped = True
                    break
                if deadline is not None and time.time() > deadline:
                    s.log.say(f"time budget of {cfg.budget.minutes} min reached at step {step}/{total}: finishing here")
                    out_of_time = True
                    break
                t_step = time.time()
                ramp.set(*ramp.levels(step, total))
                value, parts, lr = self._step(s, next(loader), objective, step)
                step += 1
                s.count_step()
                step_times.append(time.time() - t_step)
                parts["sec"] = round(step_times[-1], 4)
                if step == replan_at:
                    if self._replan(s, plan, step, step_times, deadline):
                        total = plan["steps"]
                        val_every = cfg.run.val_every or max(1, total // 5)
                        if bar is not None:
                            bar.total = total
                    # Once after a few steps (the plan's probe may be off), once more a fifth of the way on
                    # (the first steps run slower than the steady state: 0.66 against 0.47 s on EFDN).
                    replans_left -= 1
                    replan_at = step + max(1, (total - step) // 5) if replans_left else None
                s.log.record({"step": step, "loss": value, "lr": lr, **parts})
                ema = value if ema is None else 0.95 * ema + 0.05 * value
                if bar is not None:
                    bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)
                with ramp.binary():
                    if step % val_every == 0 or step == total:
                        s.validate(step)
                        last_val = step
                    if step % cfg.run.save_every == 0 or step == total or \
                            time.time() - last_save > cfg.run.save_seconds:
                        self.checkpoint(s, step)
                        last_save = time.time()
        finally:
            ramp.set(1.0, 1.0)
            if bar is not None:
                bar.close()
        if out_of_time and step == start == 0:
            s.log.say("no time was left for end-to-end training (the phases before it used the budget): give more "
                      "minutes or a smaller reconstruct share")
        if (out_of_time and last_val != step) or (total == 0 and not stopped):
            s.validate(step)  # the last model, also when reconstruction took the whole budget
        if step > start or stopped:
            self.checkpoint(s, step)
        if step == total or out_of_time:
            s.save_model(FINAL, s.student, role="final", step=step)
        return PhaseEnd(not stopped, step, total, out_of_time)

    def _step(self, s: Session, batch, objective: Objective, step: int) -> tuple[float, dict[str, float], float]:
        """One optimizer step; returns the loss, its parts and the learning rate it used."""
        lr_b, hr_b = (t.to(s.device, non_blocking=True) for t in batch)
        teacher_sr = None
        if objective.needs_teacher:
            with torch.no_grad():
                teacher_sr = s.teacher(lr_b)
        sr = s.student(lr_b)
        loss, parts = objective(s.student, sr, hr_b, teacher_sr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}: lower the learning rate")
        current_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.schedule.step()
        return float(loss.detach()), parts, current_lr

    def _replan(self, s: Session, plan: dict[str, int], step: int, step_times: list[float], deadline: float) -> bool:
        """A time-budget run checks its plan against the steps it has timed (other jobs may have slowed it,
        the first steps are slower); True when the plan changed (by more than 15 %: the schedule and the
        stored config follow)."""
        total = plan["steps"]
        recent = step_times[1:][-200:]  # the warm-up step left out
        per_step = sorted(recent)[len(recent) // 2]
        val_every = s.cfg.run.val_every or max(1, total // 5)
        n_val = (total - step) // val_every + 1
        left = deadline - time.time() - 1.3 * n_val * s.t_val - 5.0
        new_total = step + max(1, int(left / per_step))
        if abs(new_total - total) <= 0.15 * total:
            return False
        s.log.say(f"re-planned at step {step}: {per_step:.3f} s/step measured in training -> {new_total} steps "
                  f"instead of {total}")
        plan["steps"] = new_total
        self.schedule.lr_lambdas[0].total = new_total  # saved with the scheduler state
        s.save_config()
        return True

    def checkpoint(self, s: Session, step: int) -> None:
        extra: dict[str, Any] = {"best": s.best, "baselines": s.baselines}
        s.save_checkpoint(s.run_dir, step, self.optimizer, self.schedule, extra)


def _steps_for_budget(s: Session, end: float) -> int:
    """How many steps fit before the time ``end``: time 3 steps on a copy (the student is not touched)."""
    train, batch = s.cfg.recipe.train, s.cfg.data.batch
    probe = copy.deepcopy(s.student).train()
    probe_opt = build_optimizer([p for p in probe.parameters() if p.requires_grad], train.optimizer, 0.0, 0.0)
    x, y = (torch.stack(t) for t in zip(*[s.dataset[2**40 + i] for i in range(batch)], strict=True))
    x, y = x.to(s.device), y.to(s.device)
    needs_teacher = bool(train.distill_weight or train.feature_distill_weight)
    times = []
    for _ in range(3):
        t0 = time.time()
        ts = None
        if needs_teacher:
            with torch.no_grad():
                ts = s.teacher(x)
        sr = probe(x)
        loss = torch.nn.functional.l1_loss(sr, y) + (torch.nn.functional.l1_loss(sr, ts) if ts is not None else 0)
        probe_opt.zero_grad()
        loss.backward()
        probe_opt.step()
        times.append(time.time() - t0)
    del probe, probe_opt
    per_step = min(times[1:]) * 1.1 + 0.002 * batch  # + data loading, which the workers mostly hide
    n_val = 6  # about 5 periodic validations and the final one, with SSIM (about 1.3x the timed PSNR pass)
    left = end - time.time() - 1.3 * n_val * s.t_val - 5.0
    steps = max(1, int(left / per_step))
    s.log.say(f"{left / 60:.1f} min left: {per_step:.3f} s/step measured, validation {s.t_val:.1f} s -> {steps} steps")
    return steps
