"""Quantization-aware finetuning of a converted model, with its FP original as the teacher.

    from srbinarize.train.config import Budget, DataConfig, RunSettings
    run = srbinarize.finetune("edsr.pth", "scales", DataConfig(train="../shared/data/BSD100",
                              val="../shared/data/Set5"), Budget(minutes=10), RunSettings(out="runs/edsr_scales"))

The settings are one object per concern (`srbinarize.train.config`); the method's training defaults come
from the recipe's ``train`` section (`srbinarize.recipe.TrainSpec`), and keyword arguments override them
(``lr=1e-3``, ``reconstruct=0``). Everything is checked, and the model, data and conversion prepared,
before anything is written. What a run does (``<run>`` is the output folder):

1. loads the pretrained FP model and measures its scale; writes it to ``<run>/teacher.safetensors`` so
   that the run can be resumed and evaluated without the original file;
2. converts it with the recipe, calibrated on LR patches of the training data, and writes
   ``<run>/converted.safetensors`` (the converted-before-finetune model) and ``config.json``;
3. runs the phases (`srbinarize.train.phases`), each resumable at any step: block-wise reconstruction
   when the recipe's ``reconstruct`` share is > 0, then end-to-end training; the session they share
   (`srbinarize.train.session`) validates (PSNR/SSIM-Y on the ``val`` sets), keeps
   ``<run>/best.safetensors``, checkpoints, and writes ``train.log``, ``metrics.jsonl`` (one line per
   step, one per validation), ``curves.png``, ``crops.png`` and ``summary.json``.

``resume=<run>`` continues from the newest intact checkpoint with the run's stored settings and plan, and
gives the same loss curve as an uninterrupted run (every sample depends only on the seed and its index;
optimizer, scheduler and RNG states are restored); a finished run is left as it is. Ctrl-C (SIGINT) or
SIGTERM finishes the current step, saves a checkpoint and returns (``result.interrupted``); a second
Ctrl-C aborts at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_model, read_metadata
from ..convert import convert
from ..models.input_range import resolve_input_range
from ..models.load import load_pretrained, model_in_channels, model_scale
from ..models.probe import input_multiple
from ..models.spec import ModelSpec
from ..recipe import Recipe, RecipeError, TrainSpec, load_recipe
from .checkpoints import clean_temporaries
from .config import (
    Budget,
    DataConfig,
    FinetuneError,
    ModelConfig,
    RunConfig,
    RunSettings,
    check_new_run_folder,
    default_patch,
    run_exists,
)
from .data import DataError, EvalSet, TrainPatches
from .phases import Phase, PhaseEnd
from .phases.end_to_end import FINAL, EndToEnd
from .phases.reconstruction import Reconstruction
from .session import SUMMARY_FILE, FinetuneResult, Session, hardware

TEACHER, CONVERTED = "teacher.safetensors", "converted.safetensors"
NO_SPEC = "<module given to finetune: no spec>"


def finetune(
    model: str | Path | nn.Module | ModelConfig | None = None,
    recipe: str | Path | Recipe = "scales",
    data: DataConfig | None = None,
    budget: Budget | None = None,
    run: RunSettings | None = None,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    max_steps_this_call: int | None = None,
    **train_overrides: Any,
) -> FinetuneResult:
    """Convert ``model`` with ``recipe`` and finetune it; see the module docstring.

    ``model``: a checkpoint path or ``zoo:<name>`` (or a `ModelConfig` with ``--arch`` and the expected
    scale), or an FP ``nn.Module`` (such a run cannot be resumed: no file rebuilds it). ``train_overrides``:
    fields of `TrainSpec` replacing the recipe's. ``resume=<run>`` continues a run with its stored settings
    (then give nothing else). ``max_steps_this_call`` stops early (with a checkpoint) after that many steps
    of any phase, as if interrupted (used by tests).
    """
    started = time.time()
    if resume is not None:
        if model is not None or data or budget or run or train_overrides:
            raise FinetuneError(f"resume={resume} continues with the run's stored settings: give nothing else")
        return _resume(Path(resume), progress, max_steps_this_call, started)
    cfg, module = _new_config(model, recipe, data, budget, run, train_overrides)
    run_dir = Path(cfg.run.out)
    check_new_run_folder(run_dir)
    _set_threads(cfg)
    teacher, spec, range_note = _load_teacher(cfg, module)
    dataset, val_sets = _data(cfg)
    torch.manual_seed(cfg.run.seed)
    cal = calibration_batch(cfg.data.train, cfg.model.scale, cfg.recipe, cfg.run.seed, cfg.data.train_lr)
    student = convert(teacher, cfg.recipe, calibration_data=cal)
    phases = _phases(cfg)
    for phase in phases:
        phase.check(cfg, student, teacher)
    # ---- everything is checked: the run folder is written from here on
    run_dir.mkdir(parents=True, exist_ok=True)
    s = Session(cfg, run_dir, _frozen(teacher, cfg), spec, dataset, val_sets, fresh=True, progress=progress,
                call_limit=max_steps_this_call, started=started)
    s.student = student.to(s.device).train()
    s.save_config()
    if spec.target == NO_SPEC:
        s.log.say("warning: no ModelSpec for this module: the run folder cannot rebuild the models on its own")
    else:
        s.save_model(TEACHER, s.teacher, role="teacher", source=cfg.model.source)
        s.save_model(CONVERTED, s.student, role="converted")
    s.add_baseline("bicubic")
    s.add_baseline("FP teacher", s.teacher)
    s.log.say(f"run {run_dir}: {cfg.model.source} x{cfg.model.scale}, recipe {cfg.recipe.name}, "
              f"{len(dataset.hr)} training images, val {[es.name for es in val_sets]}; {hardware()}")
    s.log.say(range_note)
    s.log.truncate_after(0)
    t_val = time.time()
    s.add_baseline("converted", s.student)
    s.t_val = time.time() - t_val
    s.save_baselines()
    return _run_phases(s, phases)


def _run_phases(s: Session, phases: list[Phase]) -> FinetuneResult:
    """Each phase not finished yet (and always the last, which ends the run): plan it on its first start, then
    run it; stop where one stops."""
    end = PhaseEnd(True)
    with s.stop:
        for phase in phases:
            if phase.finished(s.run_dir) and phase is not phases[-1]:
                continue
            if phase.name not in s.cfg.plan:
                s.cfg.plan[phase.name] = phase.plan(s)
                s.save_config()
            end = phase.run(s, s.cfg.plan[phase.name])
            if not end.finished:
                return s.finish(end.step, end.total, interrupted=True)
    return s.finish(end.step, end.total, interrupted=False, out_of_time=end.out_of_time)


def _resume(run_dir: Path, progress: bool, call_limit: int | None, started: float) -> FinetuneResult:
    cfg = RunConfig.load(run_dir)
    if not (run_dir / TEACHER).is_file():
        raise FinetuneError(f"cannot resume {run_dir}: {TEACHER} is missing (a run started from a module "
                            "without a file to rebuild it cannot be resumed)")
    if (run_dir / FINAL).is_file() and (run_dir / SUMMARY_FILE).is_file():
        return _finished(run_dir, started)
    _set_threads(cfg)
    teacher = load_model(run_dir / TEACHER)  # config.json is data: its --arch is not an allowance
    spec = ModelSpec.from_json(read_metadata(run_dir / TEACHER)["model"])
    dataset, val_sets = _data(cfg)
    s = Session(cfg, run_dir, _frozen(teacher, cfg), spec, dataset, val_sets, fresh=False, progress=progress,
                call_limit=call_limit, started=started)
    s.load_baselines()
    phases = _phases(cfg)
    for phase in phases:
        clean_temporaries(phase.root(run_dir))
    student_file = next((f for f in (p.resume_from(s) for p in reversed(phases)) if f is not None),
                        run_dir / CONVERTED)
    s.student = load_model(student_file).to(s.device).train()
    return _run_phases(s, phases)


def _finished(run_dir: Path, started: float) -> FinetuneResult:
    """A finished run, as its summary records it (nothing in the folder is written)."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    model = load_model(run_dir / FINAL).eval()
    return FinetuneResult(run_dir, model, summary["step"], summary["total_steps"], False, summary["best"],
                          summary["baselines"], summary["final_val"], time.time() - started)


def _new_config(model: Any, recipe: Any, data: Any, budget: Any, run: Any,
                train_overrides: dict[str, Any]) -> tuple[RunConfig, nn.Module | None]:
    """The validated config of a new run (and the FP module, when one was given instead of a file)."""
    if model is None:
        raise FinetuneError("give the pretrained model (a checkpoint path, zoo:<name> or an nn.Module)")
    for value, cls, name in ((data, DataConfig, "data"), (budget, Budget, "budget"), (run, RunSettings, "run")):
        if not isinstance(value, cls):
            raise FinetuneError(f"give {name}={cls.__name__}(...), got {value!r}")
    known = {f.name for f in dataclasses.fields(TrainSpec)}
    unknown = sorted(set(train_overrides) - known)
    if unknown:
        raise FinetuneError(f"unknown training setting(s) {unknown}; the recipe's train settings are {sorted(known)}")
    try:
        rec = load_recipe(recipe).with_overrides(**{f"train.{k}": v for k, v in train_overrides.items()})
    except RecipeError as err:
        raise FinetuneError(str(err)) from None
    module = model if isinstance(model, nn.Module) else None
    if module is not None:
        model_cfg = ModelConfig(f"<{type(module).__name__} module>")
    else:
        model_cfg = model if isinstance(model, ModelConfig) else ModelConfig(str(model))
    return RunConfig(model_cfg, rec, data, budget, run), module


def _set_threads(cfg: RunConfig) -> None:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


def _load_teacher(cfg: RunConfig, module: nn.Module | None) -> tuple[nn.Module, ModelSpec, str]:
    """The FP teacher as a [0, 1] model, its spec and the sentence saying which input range it takes; fixes
    ``cfg.model.scale`` and ``cfg.model.input_range`` to what was measured (checked where given)."""
    m = cfg.model
    if module is not None:
        teacher, spec = copy.deepcopy(module).float().eval(), ModelSpec(NO_SPEC, {})
    else:
        teacher, spec = load_pretrained(m.source, arch=m.arch, arch_kwargs=m.arch_kwargs, scale=m.scale)
    teacher, input_range, range_note = resolve_input_range(teacher, m.input_range, name=m.source)
    spec = dataclasses.replace(spec, input_range=input_range)
    measured = model_scale(teacher, model_in_channels(teacher))
    if m.scale is not None and m.scale != measured:
        raise FinetuneError(f"the model is x{measured}, but scale {m.scale} was given")
    window = input_multiple(teacher)
    if cfg.data.patch is None:
        cfg.data = dataclasses.replace(cfg.data, patch=default_patch(window))
    elif cfg.data.patch % window:
        raise FinetuneError(f"the model works on windows of {window} pixels: the LR patch ({cfg.data.patch}) must "
                            f"be a multiple of {window}")
    cfg.model = dataclasses.replace(m, scale=measured, input_range=input_range)
    return teacher, spec, range_note


def _data(cfg: RunConfig) -> tuple[TrainPatches, list[EvalSet]]:
    """The training patches and validation sets (errors about the folders come before any expensive work)."""
    d, scale = cfg.data, cfg.model.scale
    dataset = TrainPatches(list(d.train), scale, d.patch, seed=cfg.run.seed, lr_dirs=d.train_lr)
    return dataset, [EvalSet.load(v, scale, limit=d.val_limit) for v in d.val]


def _frozen(teacher: nn.Module, cfg: RunConfig) -> nn.Module:
    """The teacher, frozen and on the run's device (only after conversion: the student must not inherit it)."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(torch.device(cfg.run.device)).eval()


def _phases(cfg: RunConfig) -> list[Phase]:
    return ([Reconstruction()] if cfg.recipe.train.reconstruct else []) + [EndToEnd()]


def calibration_batch(dataset_dirs: list[str] | tuple[str, ...], scale: int, recipe: Recipe, seed: int,
                      lr_dirs: list[str] | tuple[str, ...] | None) -> torch.Tensor:
    """LR patches of the training data (deterministic, independent of the training samples)."""
    cal = recipe.calibration
    data = TrainPatches(list(dataset_dirs), scale, min(cal.patch_size, 48), seed=seed + 1_000_003, lr_dirs=lr_dirs,
                        augment=False)
    return torch.stack([data[i][0] for i in range(cal.batches * cal.batch_size)])


__all__ = ["Budget", "DataConfig", "DataError", "FinetuneError", "FinetuneResult", "ModelConfig", "RunConfig",
           "RunSettings", "finetune", "run_exists"]
