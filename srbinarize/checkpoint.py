"""Converted-model checkpoints: safetensors weights with the recipe and the FP architecture beside them.

The metadata holds what `load_model` needs to rebuild the module before loading the tensors:
the `ModelSpec` of the FP architecture, the recipe (as data) and the image channel count. Files are
written to a temporary name in the same folder and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .convert import conversion_info, convert
from .models.load import CheckpointError, load_weights
from .models.spec import ModelSpec
from .recipe import recipe_from_dict

FORMAT = "srbinarize.model/1"


def save_model(model: nn.Module, path: str | Path, spec: ModelSpec, extra: dict[str, Any] | None = None) -> Path:
    """Write a converted (or FP) model to ``path`` (.safetensors) with what rebuilds it."""
    path = Path(path)
    info = conversion_info(model)
    meta = {
        "format": FORMAT,
        "model": spec.to_json(),
        "recipe": json.dumps(info.recipe.to_dict()) if info else "",
        "in_channels": str(info.in_channels if info else ""),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save_tensors(tensors, path, meta)
    return path


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` to a temporary sibling, then an atomic rename onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(_unshare(tensors), tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model saved by `save_model`: the FP architecture, converted by its recipe, then its weights."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an srbinarize model checkpoint (metadata format {meta.get('format')!r})")
    spec = ModelSpec.from_json(meta["model"])
    model = spec.build()
    if meta["recipe"]:
        recipe = recipe_from_dict(json.loads(meta["recipe"]), source=f"{path} (stored recipe)")
        example = torch.zeros(1, int(meta["in_channels"]), 48, 48)
        model = convert(model, recipe, example_input=example, calibrate=False)
    arch = spec.target if not meta["recipe"] else f"{spec.target} converted by its stored recipe"
    load_weights(model, load_file(str(path)), str(path), arch)
    return model.eval()


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): store such duplicates as copies."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
