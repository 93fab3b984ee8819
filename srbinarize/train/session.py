"""What every phase of a finetune run uses, in one place: the run folder and its config, the log, the stop
signal, checkpoints, validation (best model, pictures) and the summary.

A phase (`srbinarize.train.phases`) trains; the `Session` keeps the run: phases log through
`Session.log`, ask `Session.stop_reason` after each step, write checkpoints with `Session.save_checkpoint`
(and find them with `Session.latest_checkpoint`, which passes over a damaged one), and validate with
`Session.validate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_text_atomic
from ..checkpoint import save_model
from ..models.spec import ModelSpec
from .checkpoints import checkpoint_problem, list_checkpoints, prune, save_checkpoint, set_aside
from .config import RunConfig
from .data import EvalSet, TrainPatches
from .metrics import SetResult, bicubic_upscale, evaluate_bicubic, evaluate_model, super_resolve
from .report import plot_curves, save_crops, textured_window

BASELINES_FILE = "baselines.json"
SUMMARY_FILE = "summary.json"


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, torch threads: {torch.get_num_threads()}"


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
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            if rec.get(key, 0) <= step:  # a validation at ``step`` ran before that step's checkpoint
                keep.append(line)
        write_text_atomic(self.metrics_path, "".join(k + "\n" for k in keep))
        self.metrics = self.metrics_path.open("a")

    def records(self) -> list[dict[str, Any]]:
        self.metrics.flush()
        out = []
        for line in self.metrics_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def say(self, msg: str) -> None:
        self.text.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
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


class StopSignal:
    """SIGINT/SIGTERM -> ``requested`` (the phase finishes its step, saves, returns). A second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
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


class Session:
    """One call of `finetune` on one run folder: the models, the data, and the services phases share."""

    def __init__(self, cfg: RunConfig, run_dir: Path, teacher: nn.Module, spec: ModelSpec, dataset: TrainPatches,
                 val_sets: list[EvalSet], fresh: bool, progress: bool, call_limit: int | None, started: float):
        self.cfg, self.run_dir, self.teacher, self.spec, self.dataset = cfg, run_dir, teacher, spec, dataset
        self.val_sets, self.fresh, self.progress, self.call_limit, self.started = (
            val_sets, fresh, progress, call_limit, started)
        self.student: nn.Module  # the converted (or resumed) student, set before any phase runs
        self.device = torch.device(cfg.run.device)
        self.log = RunLog(run_dir, echo=progress)
        self.stop = StopSignal()
        self.steps_this_call = 0
        self.baselines: dict[str, dict[str, float]] = {}
        self.t_val = 0.0  # seconds of one PSNR pass over the validation sets (planning)
        self.best: dict[str, Any] | None = None
        self.final_val: dict[str, dict[str, float]] = {}

    # ---- the run folder
    def save_config(self) -> None:
        self.cfg.save(self.run_dir)

    def save_model(self, name: str, model: nn.Module, **extra: Any) -> None:
        save_model(model, self.run_dir / name, self.spec, extra=extra)

    def save_baselines(self) -> None:
        write_text_atomic(self.run_dir / BASELINES_FILE, json.dumps({"baselines": self.baselines, "t_val": self.t_val}))

    def load_baselines(self) -> None:
        stored = json.loads((self.run_dir / BASELINES_FILE).read_text())
        self.baselines, self.t_val = stored["baselines"], stored["t_val"]

    # ---- stop signal and the per-call step limit (tests)
    def count_step(self) -> None:
        self.steps_this_call += 1

    def stop_reason(self) -> str | None:
        """Why the phase should stop now: a signal, or the step limit of this call; None: go on."""
        if self.stop.requested:
            return self.stop.requested
        if self.call_limit is not None and self.steps_this_call >= self.call_limit:
            return "step limit of this call"
        return None

    # ---- checkpoints
    def save_checkpoint(self, folder: Path, step: int, optimizer: torch.optim.Optimizer, scheduler: Any,
                        extra: dict[str, Any]) -> None:
        """The student and the phase's state at ``step`` under ``folder``/checkpoints; the newest ``keep`` stay."""
        save_checkpoint(folder, step, self.student, self.spec, optimizer, scheduler, extra)
        prune(folder, self.cfg.run.keep)

    def latest_checkpoint(self, folder: Path) -> tuple[int, Path] | None:
        """The newest intact checkpoint under ``folder``; a damaged newer one is set aside and logged."""
        for step, path in reversed(list_checkpoints(folder)):
            problem = checkpoint_problem(path)
            if problem is None:
                return step, path
            moved = set_aside(path)
            self.log.say(f"checkpoint {path} is damaged ({problem}): moved to {moved.name}, using an older one")
        return None

    # ---- validation
    def add_baseline(self, label: str, model: nn.Module | None = None) -> None:
        """A reference row of the validation figures: ``bicubic``, or ``model`` under ``label``."""
        for es in self.val_sets:
            value = (evaluate_bicubic(es, ssim=False).psnr if model is None
                     else evaluate_model(model, es, self.device, ssim=False).psnr)
            self.baselines.setdefault(es.name, {})[label] = value

    def validate(self, step: int) -> dict[str, dict[str, float]]:
        """PSNR/SSIM-Y of the student at ``step``: logged, best model kept, pictures drawn."""
        res: dict[str, SetResult] = {es.name: evaluate_model(self.student, es, self.device) for es in self.val_sets}
        vals = {k: {"psnr": r.psnr, "ssim": r.ssim} for k, r in res.items()}
        self.log.record({"kind": "val", "step": step, **vals})
        msg = ", ".join(f"{k} {v['psnr']:.3f} dB / {v['ssim']:.4f}" for k, v in vals.items())
        self.log.say(f"step {step}: validation PSNR/SSIM-Y {msg}")
        if vals:
            mean = sum(v["psnr"] for v in vals.values()) / len(vals)
            if self.best is None or mean > self.best["mean_psnr"]:
                self.best = {"step": step, "mean_psnr": mean, "val": vals}
                self.save_model("best.safetensors", self.student, role="best", **self.best)
            self._pictures()
        self.final_val = vals
        return vals

    def _pictures(self) -> None:
        """curves.png from metrics.jsonl and crops.png on the first image of the first validation set."""
        cfg, device = self.cfg, self.device
        try:
            records = self.log.records()
            steps = [r["step"] for r in records if "loss" in r]
            losses = [r["loss"] for r in records if "loss" in r]
            val: dict[str, list[tuple[int, float]]] = {
                k: [(0, b["converted"])] for k, b in self.baselines.items() if "converted" in b}
            for r in records:
                if r.get("kind") == "val":
                    for k, v in r.items():
                        if isinstance(v, dict):
                            val.setdefault(k, []).append((r["step"], v["psnr"]))
            train = cfg.recipe.train
            title = (f"{cfg.model.source} x{cfg.model.scale}, {cfg.recipe.name}: lr {train.lr:g}, "
                     f"distill {train.distill_weight:g}")
            plot_curves(self.run_dir / "curves.png", steps, losses, val, self.baselines, title)
            es = self.val_sets[0]
            im = es.images[0]
            size = min(96, im.hr.shape[0], im.hr.shape[1])
            top, left = textured_window(im.hr, size)
            was = self.student.training
            self.student.eval()
            try:
                student_sr = super_resolve(self.student, im.lr, es.scale, device)
            finally:
                self.student.train(was)
            panels = [("bicubic", bicubic_upscale(im.lr, es.scale)),
                      ("FP teacher", super_resolve(self.teacher, im.lr, es.scale, device)),
                      (f"{cfg.recipe.name} finetuned", student_sr), ("HR", im.hr)]
            save_crops(self.run_dir / "crops.png", panels, top, left, size, zoom=max(1, 256 // size))
        except Exception as err:  # pictures never stop a run
            self.log.say(f"warning: could not draw the pictures: {type(err).__name__}: {err}")

    # ---- progress and the end of the call
    def progress_bar(self, total: int, initial: int = 0, desc: str | None = None):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="it", desc=desc, dynamic_ncols=True, file=sys.stderr)

    def finish(self, step: int, total: int, interrupted: bool, out_of_time: bool = False) -> FinetuneResult:
        """Write ``summary.json`` and close the log; the result of this call."""
        seconds = time.time() - self.started
        summary = {
            "run_dir": str(self.run_dir), "step": step, "total_steps": total, "interrupted": interrupted,
            "stopped_by_time_budget": out_of_time, "best": self.best, "final_val": self.final_val,
            "baselines": self.baselines, "seconds_this_call": round(seconds, 1), "hardware": hardware(),
            "config": self.cfg.to_dict(),
        }
        write_text_atomic(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
        if interrupted:
            self.log.say(f"saved step {step}; continue with: srbinarize finetune --resume {self.run_dir}")
        else:
            self.log.say(f"done: {step} steps in {seconds / 60:.1f} min; best {self.best}")
        self.log.close()
        return FinetuneResult(self.run_dir, self.student.eval(), step, total, interrupted, self.best, self.baselines,
                              self.final_val, seconds)
