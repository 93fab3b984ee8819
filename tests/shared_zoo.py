"""The pretrained x4 models of ``../shared/models`` (relative to the repo root), loaded per its models.yaml.

Each model's folder goes on ``sys.path`` only while its code is imported. team10_repafdn imports its code
as a top-level package named ``models``: a ``models`` imported before is set aside during the import and
restored after it (the model's classes keep their code), so neither shadows the other.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parents[2] / "shared" / "models"


def entries(root: Path = ROOT) -> list[dict[str, Any]]:
    """The models listed in ``root/models.yaml`` (empty when the folder is absent)."""
    manifest = root / "models.yaml"
    if not manifest.is_file():
        return []
    return yaml.safe_load(manifest.read_text())["models"]


def entry(name: str, root: Path = ROOT) -> dict[str, Any] | None:
    return next((e for e in entries(root) if e["name"] == name), None)


def available(name: str, root: Path = ROOT) -> bool:
    e = entry(name, root)
    return e is not None and (root / e["folder"] / e["weights"]).is_file()


def load(name: str, root: Path = ROOT) -> nn.Module:
    """The FP model ``name`` with its weights, in eval mode."""
    e = entry(name, root)
    if e is None:
        raise KeyError(f"{name} is not listed in {root / 'models.yaml'}")
    folder = str(root / e["folder"])
    module_name, _, class_name = e["import"].partition(":")
    top = module_name.split(".")[0]
    ours = getattr(sys.modules.get(top), "__file__", None) or ""
    saved = {} if ours.startswith(folder) else {
        k: v for k, v in sys.modules.items() if k == top or k.startswith(top + ".")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, folder)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    finally:
        sys.path.remove(folder)
        if saved:
            for k in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
                del sys.modules[k]
            sys.modules.update(saved)
    model = cls(**e["kwargs"])
    model.load_state_dict(load_file(str(root / e["folder"] / e["weights"])), strict=True)
    return model.eval()
