"""Phase 1: block-wise reconstruction of the body units (`srbinarize.train.reconstruct`), resumable at any step.

With a ``steps`` budget, ``reconstruct`` x ``steps`` unit steps are shared by the units (at least one each;
a budget that then leaves no end-to-end step is refused); with ``minutes``, the steps per unit that fit in
``reconstruct`` x the time left are measured. Checkpoints go to ``<run>/reconstruction/checkpoints/``
(the student, the unit's optimizer and schedule, the unit and step). Each unit's line is logged as it ends.
When the last unit ends, the "reconstructed" validation row is stored in ``baselines.json`` and then
``<run>/reconstructed.safetensors`` is written: that file marks the phase as done. A body that is one unit
only is not reconstructed (`phase_units`): the end-to-end phase gets the whole budget.
"""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import load_train_state, read_extra
from ..config import FinetuneError, RunConfig
from ..data import patch_loader
from ..reconstruct import MAX_POOL, Unit, UnitResult, pool_size, reconstruct_unit, reconstruction_units
from ..session import Session
from . import Phase, PhaseEnd

RECONSTRUCTED = "reconstructed.safetensors"


def phase_units(student: nn.Module) -> list[Unit]:
    """The units the phase reconstructs: `reconstruction_units`, or none where there is only one. A single unit
    holds every converted layer, so fitting its output to the teacher's is what the end-to-end phase's
    distillation does, with the L1 loss too: on team03_fmen (one unit, `model`) 12 minutes gave Set5 x4 29.12
    dB with reconstruct 0.5 against 29.34 end to end only (`benchmarks/results/quality_real_scales_fmen_pair_*`).
    Splitting that unit into FMEN's 11 blocks did not pay either: 29.17 (`quality_real_scales_fmen_units_e9a1ace`)."""
    units = reconstruction_units(student)
    return units if len(units) > 1 else []


def steps_per_unit(reconstruct: float, steps: int, units: int) -> int:
    """The unit steps a ``steps`` budget gives each of ``units`` units."""
    return max(1, round(reconstruct * steps / units))


class Reconstruction(Phase):
    name = "reconstruction"

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule = None
        self.position: tuple[int, Unit, int] | None = None  # (unit index, unit, steps done in it)
        self._pool: list[torch.Tensor] | None = None
        self.last_save = time.time()

    def root(self, run_dir: Path) -> Path:
        return run_dir / "reconstruction"

    def finished(self, run_dir: Path) -> bool:
        return (run_dir / RECONSTRUCTED).is_file()

    def resume_from(self, s: Session) -> Path | None:
        if self.finished(s.run_dir):
            return s.run_dir / RECONSTRUCTED
        ckpt = s.latest_checkpoint(self.root(s.run_dir))
        return ckpt[1] / "model.safetensors" if ckpt else None

    def check(self, cfg: RunConfig, student: nn.Module, teacher: nn.Module) -> None:
        share, steps, n = cfg.recipe.train.reconstruct, cfg.budget.steps, len(phase_units(student))
        if steps is None or n == 0 or share >= 1:
            return
        taken = n * steps_per_unit(share, steps, n)
        if steps - taken < 1:
            enough = next(k for k in itertools.count(steps + 1) if k - n * steps_per_unit(share, k, n) >= 1)
            raise FinetuneError(
                f"a budget of {steps} steps is too small for reconstruct {share:g}: the {n} units take {taken} "
                f"steps (at least one each), leaving no end-to-end step; give at least {enough} steps, or "
                "reconstruct 0 (end-to-end only) or 1 (reconstruction only)")

    def pool(self, s: Session) -> list[torch.Tensor]:
        """The LR batches the units train on (fixed by the seed, apart from the end-to-end samples)."""
        if self._pool is None:
            batch = s.cfg.data.batch
            loader = patch_loader(s.dataset, batch, start_step=2**32 // batch, workers=0)
            self._pool = [next(loader)[0].to(s.device) for _ in range(MAX_POOL)]
        return self._pool

    def plan(self, s: Session) -> dict[str, int]:
        units = phase_units(s.student)
        if not units:
            return {"units": 0, "steps_per_unit": 0}
        share, steps = s.cfg.recipe.train.reconstruct, s.cfg.budget.steps
        per_unit = (steps_per_unit(share, steps, len(units)) if steps is not None
                    else _steps_per_unit_in_time(s, units, self.pool(s)))
        return {"units": len(units), "steps_per_unit": per_unit}

    def run(self, s: Session, plan: dict[str, int]) -> PhaseEnd:
        units = phase_units(s.student)
        if not units:
            found = [u.path for u in reconstruction_units(s.student)]
            why = (f"one body unit only ({found[0]}): its output is what the end-to-end phase fits" if found
                   else "the model has no traced body units")
            s.log.say(f"reconstruction: {why}; skipping the phase")
            return PhaseEnd(True)
        steps, train = plan["steps_per_unit"], s.cfg.recipe.train
        ckpt = s.latest_checkpoint(self.root(s.run_dir))
        s.log.truncate_after(ckpt[0] if ckpt else 0, key="recon_step")
        start_unit, restore = 0, None
        if ckpt is not None:
            extra = read_extra(ckpt[1])[1]
            start_unit = extra["unit"] + (extra["unit_step"] == steps)
            if extra["unit_step"] < steps:
                restore = _restorer(ckpt[1])
        s.log.say(f"reconstruction: {len(units)} units ({', '.join(u.path for u in units)}), {steps} Adam steps "
                  f"each, lr {train.reconstruct_lr:g}, {pool_size(steps)} batches of {s.cfg.data.batch}")
        bar = s.progress_bar(len(units) * steps, desc="reconstruction")
        self.last_save = time.time()
        previous: UnitResult | None = None
        try:
            for k in range(start_unit, len(units)):
                result = reconstruct_unit(s.student, s.teacher, units[k], self.pool(s), steps, train.reconstruct_lr,
                                          restore=restore, on_step=self._after_step(s, k, units[k], steps, bar),
                                          previous=previous, interval_lr=train.interval_lr)
                restore = None
                if previous is not None:
                    previous.examples = []  # only the last unit's examples are kept
                previous = result
                state = f"stopped at step {self.position[2]}/{steps}" if result.stopped else f"{steps} steps"
                s.log.say(f"reconstruction {units[k].path}: relative MSE {result.first_loss:.4f} -> "
                          f"{result.last_loss:.4f} ({state})")
                if result.stopped or (s.stop_reason() and k + 1 < len(units)):
                    s.log.say(f"reconstruction stopped; continue with: srbinarize finetune --resume {s.run_dir}")
                    return PhaseEnd(False)
        finally:
            if bar is not None:
                bar.close()
        s.add_baseline("reconstructed", s.student)
        s.save_baselines()  # before the file that marks the phase done: a kill in between loses no row
        s.save_model(RECONSTRUCTED, s.student, role="reconstructed")
        for name, b in s.baselines.items():
            s.log.say(f"{name}: reconstructed {b['reconstructed']:.2f} dB (PSNR-Y)")
        return PhaseEnd(True)

    def _after_step(self, s: Session, k: int, unit: Unit, steps: int, bar):
        """The unit's per-step callback: log, progress, checkpoint; True asks the unit to stop."""
        run = s.cfg.run

        def after_step(step: int, loss: float, optimizer, schedule) -> bool:
            s.count_step()
            position = k * steps + step + 1
            s.log.record({"phase": "reconstruction", "recon_step": position, "unit": unit.path, "unit_loss": loss})
            if bar is not None:
                bar.n = position
                bar.set_postfix(unit=unit.path, loss=f"{loss:.4f}", refresh=False)
                bar.refresh()
            self.optimizer, self.schedule, self.position = optimizer, schedule, (k, unit, step + 1)
            stop = s.stop_reason() is not None
            if stop or step + 1 == steps or (step + 1) % run.save_every == 0 \
                    or time.time() - self.last_save > run.save_seconds:
                self.checkpoint(s, position)
            return stop

        return after_step

    def checkpoint(self, s: Session, step: int) -> None:
        k, unit, unit_step = self.position
        s.save_checkpoint(self.root(s.run_dir), step, self.optimizer, self.schedule,
                          {"unit": k, "unit_path": unit.path, "unit_step": unit_step})
        self.last_save = time.time()


def _restorer(ckpt: Path):
    def restore(optimizer, schedule) -> int:
        _, extra = load_train_state(ckpt, optimizer, schedule)
        return extra["unit_step"]

    return restore


def _steps_per_unit_in_time(s: Session, units: list[Unit], pool: list[torch.Tensor]) -> int:
    """Steps per unit that fit in ``reconstruct`` x the minutes left: times unit steps and teacher/student passes."""
    probe = copy.deepcopy(s.student)
    with torch.no_grad():
        probe(pool[0])  # warm-up
        t0 = time.time()
        s.teacher(pool[0])
        probe(pool[0])
    per_pass = time.time() - t0  # both networks on one batch
    per_step = 0.0  # one step of every unit: units differ (a whole transformer body, a single conv)
    for unit in units:
        times: list[float] = []

        def timed(*_args, times=times) -> bool:
            times.append(time.time())
            return len(times) >= 3

        reconstruct_unit(probe, s.teacher, unit, pool[:1], 3, 0.0, on_step=timed)
        per_step += min(b - a for a, b in itertools.pairwise(times)) * 1.1
    del probe
    share = s.cfg.recipe.train.reconstruct
    left = s.cfg.budget.minutes * 60 - (time.time() - s.started)
    # Preparing the units runs each unit of both networks once per pool batch (the units after the first
    # start from the previous unit's outputs): about one pass of both, plus slack for other graph shapes.
    budget = share * left - s.t_val
    steps = 1
    for _ in range(3):  # the pool grows with the steps
        preparing = 2 * per_pass * pool_size(steps)
        steps = max(1, int((budget - preparing) / per_step))
    s.log.say(f"reconstruction: {share:g} of {left / 60:.1f} min left, {per_step:.3f} s per step of all units, "
              f"{preparing:.0f} s to prepare the units -> {steps} steps per unit")
    return steps
