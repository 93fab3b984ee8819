"""The phases of a finetune run: one class each, with one interface, run in order by `finetune`.

A phase

- ``check``s, before anything is written, that it can run with these settings (a budget too small for
  its share, an extra loss that does not exist, ...);
- ``plan``s its share of the budget once, when it first starts (stored in ``config.json`` under its
  ``name``, so a resumed run follows the same plan);
- ``run``s from its newest checkpoint to its end, or until the session says stop, writing a
  ``checkpoint`` as it goes (under ``root``/checkpoints);
- says where a resumed run takes the student from (``resume_from``) and whether it is ``finished`` in a
  run folder.

Logging, checkpoint files, the stop signal and validation belong to the `Session`
(`srbinarize.train.session`); a new phase is one subclass in one file, added to `finetune`'s list.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..session import Session


@dataclass
class PhaseEnd:
    """Where a phase stands when its `Phase.run` returns."""

    finished: bool  # False: stopped (signal or step limit), resumable
    step: int = 0  # end-to-end steps done (the summary's step and total)
    total: int = 0
    out_of_time: bool = False  # the time budget ended it


class Phase(ABC):
    name: ClassVar[str]  # its key in the stored plan

    @abstractmethod
    def root(self, run_dir: Path) -> Path:
        """The folder whose ``checkpoints/`` holds this phase's checkpoints."""

    def check(self, cfg: RunConfig, student: nn.Module, teacher: nn.Module) -> None:  # noqa: B027 (optional)
        """Raise `FinetuneError` if the phase cannot run with ``cfg``; called before anything is written."""

    @abstractmethod
    def plan(self, s: Session) -> dict[str, int]:
        """Its share of the budget, fixed when the phase first starts."""

    @abstractmethod
    def run(self, s: Session, plan: dict[str, int]) -> PhaseEnd:
        """Train from the newest checkpoint (if any) until done or stopped."""

    @abstractmethod
    def checkpoint(self, s: Session, step: int) -> None:
        """Write the phase's state (student, optimizer, schedule, position) at ``step``."""

    @abstractmethod
    def resume_from(self, s: Session) -> Path | None:
        """The model file a resumed run takes the student from when this is the latest phase with state."""

    @abstractmethod
    def finished(self, run_dir: Path) -> bool:
        """Whether this phase is done in ``run_dir`` (a resumed run skips it)."""

