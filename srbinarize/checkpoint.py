"""Converted-model checkpoints: safetensors weights with the recipe and the FP architecture beside them.

The metadata holds what `load_model` needs to rebuild the module before loading the tensors:
the `ModelSpec` of the FP architecture, the recipe (as data) and the image channel count. Files are
written to a temporary name in the same folder and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .atomic import atomic_output
from .convert import conversion_info, convert
from .errors import SrbinarizeError
from .models.load import CheckpointError, load_weights
from .models.spec import ModelSpec, ModelSpecError
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
    """safetensors ``save_file`` to a temporary sibling, then an atomic rename onto ``path`` (umask honoured)."""
    with atomic_output(path) as tmp:
        save_file(_unshare(tensors), str(tmp), metadata=metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_model(path: str | Path, allow: Iterable[str] = ()) -> nn.Module:
    """Rebuild a model saved by `save_model`: the FP architecture, converted by its recipe, then its weights.

    The architecture the file names must come from an allowed source (`srbinarize.models.spec`); ``allow``
    adds ``package.module:Class`` entries (or packages) the caller trusts. Nothing else is imported.
    """
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an srbinarize model checkpoint (metadata format {meta.get('format')!r})")
    try:
        spec = ModelSpec.from_metadata(meta, "model", str(path))
        model = spec.build(allow=allow, source=str(path))
    except ModelSpecError as err:
        raise CheckpointError(str(err)) from None
    recipe_text = meta.get("recipe", "")
    if recipe_text:
        try:
            recipe_data = json.loads(recipe_text)
            in_channels = int(meta.get("in_channels", ""))
        except ValueError as err:
            raise CheckpointError(f"{path}: unreadable recipe or channel count in its metadata ({err})") from None
        if not isinstance(recipe_data, dict) or not 1 <= in_channels <= 64:
            raise CheckpointError(f"{path}: its metadata needs a recipe object and 1-64 input channels, got "
                                  f"{type(recipe_data).__name__} and {in_channels}")
        recipe = recipe_from_dict(recipe_data, source=f"{path} (stored recipe)")
        example = torch.zeros(1, in_channels, 48, 48)
        try:
            model = convert(model, recipe, example_input=example, calibrate=False)
        except SrbinarizeError:
            raise
        except Exception as err:  # a stored recipe that does not fit the stored architecture
            raise CheckpointError(f"{path}: its stored recipe does not convert {spec.target}: "
                                  f"{type(err).__name__}: {err}") from None
    arch = spec.target if not recipe_text else f"{spec.target} converted by its stored recipe"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read its tensors ({err}; corrupt or truncated?)") from None
    load_weights(model, tensors, str(path), arch)
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
