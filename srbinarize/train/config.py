"""The settings of a finetune run: one small object per concern, each checked where it is built.

    ModelConfig   the pretrained FP model: a file or ``zoo:NAME`` (``--arch`` when it cannot be detected)
    DataConfig    training and validation folders, LR patch, batch, loader workers
    Budget        optimizer steps or wall-clock minutes
    RunSettings   output folder, seed, validation and checkpoint cadence, device, threads

The method's own training defaults (optimizer, rates, loss weights, reconstruction share) stay in the recipe
(`srbinarize.recipe.TrainSpec`, overridable). `RunConfig` is the composition of the four and the recipe, plus
the plan each phase fixed before it started (its share of the budget); it is stored as ``<run>/config.json``
and read back by ``resume``, so every field is written once and a resumed run follows the same plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from ..errors import SrbinarizeError
from ..models.input_range import check_input_range
from ..recipe import Recipe, RecipeError, recipe_from_dict

CONFIG_FILE = "config.json"
FORMAT = "srbinarize.run/2"
DEFAULT_PATCH = 32  # LR patch side when none is given


def default_patch(window: int) -> int:
    """`DEFAULT_PATCH` rounded to the nearest multiple of a window-attention model's window (at least one)."""
    return max(window, round(DEFAULT_PATCH / window) * window)


class FinetuneError(SrbinarizeError):
    """Settings that cannot make a run (both or neither of steps/minutes, a negative rate, ...)."""


def _int(value: Any, name: str, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FinetuneError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FinetuneError(f"{name} must be a finite number > 0, got {value!r}")


def _paths(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        return (str(value),)
    if not isinstance(value, (list, tuple)):
        raise FinetuneError(f"{name} must be a folder or a list of folders, got {value!r}")
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class ModelConfig:
    """The pretrained FP model: a checkpoint path or ``zoo:NAME``; ``scale`` is checked against the model."""

    source: str
    arch: str | None = None  # package.module:Class when the architecture cannot be detected
    arch_kwargs: dict[str, Any] | None = None
    scale: int | None = None
    input_range: float | None = None  # 1 or 255; None: detected by probing the model (then recorded here)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise FinetuneError(f"the model must be a checkpoint path or zoo:NAME, got {self.source!r}")
        if isinstance(self.arch_kwargs, str):
            try:
                object.__setattr__(self, "arch_kwargs", json.loads(self.arch_kwargs))
            except json.JSONDecodeError as err:
                raise FinetuneError(f"--arch-kwargs {self.arch_kwargs!r} is not JSON: {err}") from None
        if self.arch_kwargs is not None and not isinstance(self.arch_kwargs, dict):
            raise FinetuneError(f"--arch-kwargs must be a JSON object, got {self.arch_kwargs!r}")
        _int(self.scale, "scale", 1, optional=True)
        if self.input_range is not None:
            object.__setattr__(self, "input_range", check_input_range(self.input_range, "--input-range"))


@dataclass(frozen=True)
class DataConfig:
    """What the run trains and validates on."""

    train: tuple[str, ...]  # folders of HR images (or <set>/HR layouts)
    val: tuple[str, ...] = ()  # validation sets
    train_lr: tuple[str, ...] | None = None  # paired LR folders, one per training folder (None: bicubic)
    val_limit: int | None = None  # first N images of each validation set
    batch: int = 16
    patch: int | None = None  # LR patch side; None: DEFAULT_PATCH, made a multiple of the model's window
    workers: int | None = None  # data loader processes (None: min(2, cores))

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", _paths(self.train, "train"))
        object.__setattr__(self, "val", _paths(self.val, "val"))
        object.__setattr__(self, "train_lr", _paths(self.train_lr, "train_lr") or None)
        if not self.train:
            raise FinetuneError("give training data: train=<folder of HR images> (or several)")
        if self.train_lr is not None and len(self.train_lr) != len(self.train):
            raise FinetuneError(f"{len(self.train_lr)} LR folders for {len(self.train)} training folders")
        bad_patch = self.patch is not None and (isinstance(self.patch, bool) or not isinstance(self.patch, int)
                                                or self.patch < 4)
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1 or bad_patch:
            raise FinetuneError(f"batch must be >= 1 and patch >= 4, got {self.batch} and {self.patch}")
        _int(self.val_limit, "val_limit", 1, optional=True)
        _int(self.workers, "workers", 0, optional=True)


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``steps`` (optimizer steps of all phases) or ``minutes`` (wall clock)."""

    steps: int | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise FinetuneError("give exactly one budget: steps=N or minutes=M")
        if self.steps is not None:
            _int(self.steps, "steps", 1)
        else:
            _positive(self.minutes, "minutes")


@dataclass(frozen=True)
class RunSettings:
    """Where the run goes and how it keeps itself: seed, validation and checkpoint cadence, device, threads."""

    out: str
    seed: int = 0
    val_every: int | None = None  # validate every N end-to-end steps (None: 5 times per run)
    save_every: int = 500  # checkpoint every N steps ...
    save_seconds: float = 120.0  # ... and at least this often
    keep: int = 2  # checkpoints kept
    threads: int | None = None  # torch threads
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.out, (str, Path)) or not str(self.out):
            raise FinetuneError("give an output folder (out=...) for the run")
        object.__setattr__(self, "out", str(self.out))
        _int(self.seed, "seed", 0)
        _int(self.val_every, "val_every", 1, optional=True)
        _int(self.save_every, "save_every", 1)
        _positive(self.save_seconds, "save_seconds")
        _int(self.keep, "keep", 1)
        _int(self.threads, "threads", 1, optional=True)
        check_device(self.device)


def check_device(device: Any) -> None:
    """``cpu``, or ``cuda`` / ``cuda:N`` where torch sees such a device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FinetuneError(f"device {device!r} is unknown: expected cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise FinetuneError(f"device {device!r} is not supported: expected cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device {device!r}: torch sees no CUDA device here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FinetuneError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")


@dataclass
class RunConfig:
    """Everything that defines a run; ``<run>/config.json``."""

    model: ModelConfig
    recipe: Recipe  # with its `TrainSpec` (overrides applied)
    data: DataConfig
    budget: Budget
    run: RunSettings
    plan: dict[str, dict[str, int]] = field(default_factory=dict)  # phase name -> what it fixed

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": dataclasses.asdict(self.model), "recipe": self.recipe.to_dict(),
                "data": dataclasses.asdict(self.data), "budget": dataclasses.asdict(self.budget),
                "run": dataclasses.asdict(self.run), "plan": self.plan}

    def save(self, run_dir: Path) -> None:
        write_text_atomic(run_dir / CONFIG_FILE, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> RunConfig:
        """The stored config of a run folder; a folder of an earlier format is refused with one message."""
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise FinetuneError(f"cannot resume {run_dir}: no {CONFIG_FILE} (not a finetune run folder?)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise FinetuneError(f"cannot resume {run_dir}: {path} is not readable JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise FinetuneError(
                f"cannot resume {run_dir}: {path} is in an earlier run format ({found or 'flat settings'}), this "
                f"srbinarize reads {FORMAT}; start a new run in another folder")
        try:
            return cls(ModelConfig(**data["model"]), recipe_from_dict(data["recipe"], source=str(path)),
                       DataConfig(**data["data"]), Budget(**data["budget"]), RunSettings(**data["run"]),
                       {k: dict(v) for k, v in data.get("plan", {}).items()})
        except (KeyError, TypeError, AttributeError, RecipeError) as err:
            raise FinetuneError(f"cannot resume {run_dir}: {path} does not hold a valid run config ({err})") from None


def check_new_run_folder(path: Path) -> None:
    """A new run goes into a folder that does not exist yet or is empty; anything else is refused."""
    if (path / CONFIG_FILE).exists():
        raise FinetuneError(f"{path} already holds a run: resume it (--resume {path}) or pick another -o")
    if path.exists() and not path.is_dir():
        raise FinetuneError(f"output folder {path} is an existing file: give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise FinetuneError(f"output folder {path} already holds files but no run ({CONFIG_FILE}): give a new or "
                            "empty folder")


def run_exists(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()
