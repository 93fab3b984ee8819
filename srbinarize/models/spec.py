"""`ModelSpec`: how to rebuild an FP architecture, stored beside the weights of every checkpoint."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import SrbinarizeError


class ModelSpecError(SrbinarizeError):
    """An architecture that cannot be imported or built from its description."""


@dataclass(frozen=True)
class ModelSpec:
    """An importable class and the keyword arguments that build the FP model.

    ``target`` is ``"package.module:Class"`` (e.g. ``"basicsr.archs.edsr_arch:EDSR"``).
    """

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        module_name, _, class_name = self.target.partition(":")
        if not class_name:
            raise ModelSpecError(f"architecture '{self.target}' must be written 'package.module:Class'")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise ModelSpecError(f"cannot import architecture '{self.target}': {err}") from None
        try:
            return cls(**self.kwargs)
        except TypeError as err:
            raise ModelSpecError(f"cannot build {self.target}(**{self.kwargs}): {err}") from None

    def to_json(self) -> str:
        return json.dumps({"target": self.target, "kwargs": self.kwargs}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        return cls(data["target"], data.get("kwargs", {}))
