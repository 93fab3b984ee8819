"""Training checkpoints of a finetune run: written atomically, resumed exactly.

A checkpoint is a folder ``<run>/checkpoints/step_<k>/`` holding

- ``model.safetensors``: the student, written by `srbinarize.checkpoint.save_model` (loadable on its own
  by ``srbinarize eval`` / `srbinarize.checkpoint.load_model`);
- ``state.safetensors``: the optimizer state tensors, the torch RNG state, and in its metadata (JSON) the
  step, the optimizer's param groups, the scheduler state, the numpy and Python RNG states and the recipe.

The folder is filled under a temporary name and renamed into place (a rename is atomic), so a checkpoint
folder either exists complete or not at all, whatever kills the process; `latest_checkpoint` ignores
leftover temporary folders, and `prune` keeps the newest few.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_save_tensors, save_model
from ..models.spec import ModelSpec

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    spec: ModelSpec,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
) -> Path:
    """Write the checkpoint of ``step`` (complete or not at all) and return its folder."""
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp / "model.safetensors", spec, extra={"step": step})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    meta = {
        "format": "srbinarize.train_state/1",
        "step": str(step),
        "optimizer": json.dumps(opt_meta),
        "scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else None),
        "rng": json.dumps(rng_meta),
        "extra": json.dumps(extra),
    }
    atomic_save_tensors({**opt_tensors, **rng_tensors}, tmp / "state.safetensors", meta)
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "model.safetensors").is_file() and (p / "state.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why the checkpoint folder cannot be resumed from (a truncated or damaged file), or None if it can."""
    from safetensors import SafetensorError, safe_open

    try:
        for name in ("model.safetensors", "state.safetensors"):
            with safe_open(str(ckpt / name), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    f.get_tensor(key)
        read_extra(ckpt)
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint folder out of the way (kept for inspection, no longer listed)."""
    dest = ckpt.with_name(f"damaged-{ckpt.name}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(ckpt, dest)
    return dest


def clean_temporaries(run_dir: Path) -> None:
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def load_train_state(
    ckpt: Path, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, dict[str, Any]]:
    """Restore optimizer, scheduler and RNG states from a checkpoint folder; returns (step, extra)."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "state.safetensors"), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    optimizer.load_state_dict(_unflatten_optimizer(tensors, json.loads(meta["optimizer"])))
    sched_state = json.loads(meta["scheduler"])
    if scheduler is not None and sched_state is not None:
        scheduler.load_state_dict(sched_state)
    set_rng_state(tensors, json.loads(meta["rng"]))
    return int(meta["step"]), json.loads(meta["extra"])


def read_extra(ckpt: Path) -> tuple[int, dict[str, Any]]:
    """The step and the ``extra`` dictionary of a checkpoint folder, without loading any tensor."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "state.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    return int(meta["step"]), json.loads(meta["extra"])
