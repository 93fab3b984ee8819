"""The project's own FP models, shipped in the package (``srbinarize/models/zoo/*.safetensors``).

Each file is a plain safetensors state dict (fp16 to stay small) whose metadata holds the `ModelSpec`
(``srbinarize.model_spec``), the scale, how it was trained and what it measured, so `load_pretrained`
rebuilds it with no detection. They were trained by ``python -m srbinarize.train.zoo_trainer`` (see that
module and ``srbinarize/models/zoo/README.md``); ``zoo:edsr-x2`` names one wherever a checkpoint path is taken.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SrbinarizeError
from .spec import ModelSpec

ZOO_PREFIX = "zoo:"
SPEC_KEY = "srbinarize.model_spec"
INFO_KEY = "srbinarize.zoo_info"


class ZooError(SrbinarizeError):
    """An unknown zoo name or a zoo file that cannot be read."""


def zoo_dir() -> Path:
    return Path(str(resources.files("srbinarize.models") / "zoo"))


def zoo_names() -> list[str]:
    """Names of the shipped models (``edsr-x2`` for ``zoo/edsr_x2.safetensors``)."""
    folder = zoo_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem.replace("_", "-") for p in folder.glob("*.safetensors"))


def zoo_path(name: str) -> Path:
    """The file of a shipped model, by name (``edsr-x2`` or ``zoo:edsr-x2``)."""
    if name.startswith(ZOO_PREFIX):
        name = name[len(ZOO_PREFIX) :]
    path = zoo_dir() / f"{name.replace('-', '_')}.safetensors"
    if not path.is_file():
        raise ZooError(f"no model '{name}' in the zoo; shipped: {zoo_names() or 'none'}")
    return path


def is_zoo_name(text: str | Path) -> bool:
    return isinstance(text, str) and text.startswith(ZOO_PREFIX)


def save_fp_model(
    model: nn.Module,
    spec: ModelSpec,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state dict as safetensors (cast to ``dtype``) with its spec in the metadata."""
    from safetensors.torch import save_file

    from ..atomic import atomic_output

    path = Path(path)
    tensors = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    meta = {SPEC_KEY: spec.to_json()}
    if info is not None:
        meta[INFO_KEY] = json.dumps(info, sort_keys=True)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def zoo_info(name_or_path: str | Path) -> dict[str, Any]:
    """The training record stored with a zoo model (config, budget, measured PSNR)."""
    from safetensors import SafetensorError, safe_open

    path = zoo_path(name_or_path) if is_zoo_name(name_or_path) or not Path(name_or_path).exists() else name_or_path
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        info = json.loads(meta.get(INFO_KEY, "{}"))
    except (OSError, ValueError, SafetensorError) as err:
        raise ZooError(f"{path}: no readable zoo record ({type(err).__name__}: {err})") from None
    if not isinstance(info, dict):
        raise ZooError(f"{path}: the zoo record is a {type(info).__name__}, expected an object")
    return info


# The architectures of the zoo models (``python -m srbinarize.train.zoo_trainer --arch``).


def edsr_spec(scale: int, num_feat: int, num_block: int) -> ModelSpec:
    return ModelSpec(
        "basicsr.archs.edsr_arch:EDSR",
        {"num_in_ch": 3, "num_out_ch": 3, "num_feat": num_feat, "num_block": num_block, "upscale": scale},
    )


def swinir_spec(scale: int, img_size: int, embed_dim: int, depths: list[int], num_heads: list[int],
                window_size: int = 8, mlp_ratio: float = 2.0) -> ModelSpec:
    """A lightweight basicsr SwinIR (one conv closing each group, pixel-shuffle-direct upsampler, inputs in [0, 1]).

    ``img_size`` only sizes the attention masks kept as buffers; other input sizes are padded to the window.
    """
    return ModelSpec(
        "basicsr.archs.swinir_arch:SwinIR",
        {"upscale": scale, "in_chans": 3, "img_size": img_size, "window_size": window_size, "img_range": 1.0,
         "depths": depths, "embed_dim": embed_dim, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
         "upsampler": "pixelshuffledirect", "resi_connection": "1conv"},
    )
