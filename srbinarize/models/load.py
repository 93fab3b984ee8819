"""Load a pretrained FP super-resolution checkpoint and find out what it is.

`load_pretrained(path, arch=None, arch_kwargs=None)` returns ``(model, spec)``: the FP model in eval mode with
its weights loaded (strictly) and the `ModelSpec` that rebuilds it. What it reads:

- files: PyTorch pickles (``.pth``, ``.pt``, ``.ckpt``; loaded with ``weights_only=True``, never executing
  code) and ``.safetensors``; ``zoo:<name>`` for the project's own models (`srbinarize.models.zoo`);
- containers: BasicSR training files (``params_ema`` preferred over ``params``), ``state_dict`` / ``model`` /
  ``net`` / ``generator`` wrappers, plain state dicts; a ``module.`` prefix (DataParallel) is stripped;
- architectures, in this order: ``arch`` given (``package.module:Class`` + ``arch_kwargs``); a ModelSpec in
  the safetensors metadata (files written by this project; only from an allowed source, see
  `srbinarize.models.spec`: a file is data and must not name code to run); basicsr's EDSR, MSRResNet, RCAN
  and RRDBNet detected from key names, with num_feat / num_block / upscale read off the tensor shapes; then spandrel,
  which knows about 40 SR architectures (SwinIR, HAT, DAT, ESRGAN variants, ...).

Hyper-parameters that leave no trace in the weights (EDSR/RCAN ``res_scale``, ``img_range``, ``rgb_mean``)
take basicsr's defaults, except EDSR-L (256 features, 32 blocks), which basicsr trains with ``res_scale`` 0.1;
``arch_kwargs`` overrides any detected value. The scale is measured by running the model, never guessed
from the file name; `model_scale` does that.
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SrbinarizeError
from .probe import fitting_size
from .spec import ModelSpec, ModelSpecError
from .zoo import SPEC_KEY, is_zoo_name, zoo_path


class CheckpointError(SrbinarizeError):
    """A checkpoint that cannot be read, recognised or loaded: says which file and why."""


WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model_state_dict", "model", "net", "network", "generator")


# ---------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a checkpoint file (unwrapped, ``module.`` stripped) and its safetensors metadata."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                obj: Any = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {path} as safetensors: {err} (corrupt or truncated?)") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            if "Unsupported global" in str(err) or "GLOBAL" in str(err):
                raise CheckpointError(
                    f"{path} holds pickled Python objects besides tensors (a whole pickled model?); srbinarize "
                    "only reads tensors. Save `model.state_dict()` instead, or convert the file to safetensors."
                ) from None
            if "Weights only load failed" in str(err):
                msg = "not a readable PyTorch checkpoint"
            raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {msg} (corrupt or truncated?)") from None
    return unwrap_state_dict(obj, str(path)), meta


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def unwrap_state_dict(obj: Any, source: str = "<object>") -> dict[str, torch.Tensor]:
    """Find the weights in a checkpoint object: BasicSR ``params_ema``/``params``, common wrappers."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in WRAPPER_KEYS:
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = sorted(map(str, obj))[:8]
        raise CheckpointError(
            f"{source}: no tensors found (top-level keys {keys}); expected a state dict or a BasicSR file with "
            "'params'/'params_ema'"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


# -------------------------------------------------------------------------------------------- detection


def _count(keys: set[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _upsample_scale(sd: Mapping[str, torch.Tensor], prefix: str, num_feat: int) -> int | None:
    """Scale of basicsr's ``Upsample`` (conv to r^2 * F channels + PixelShuffle(r), repeated)."""
    scale, i = 1, 0
    while f"{prefix}.{i}.weight" in sd:
        ratio = sd[f"{prefix}.{i}.weight"].shape[0] / num_feat
        r = round(ratio**0.5)
        if r * r * num_feat != sd[f"{prefix}.{i}.weight"].shape[0]:
            return None
        scale *= r
        i += 2  # conv, PixelShuffle, conv, PixelShuffle, ...
    return scale if i else None


def detect_basicsr(sd: Mapping[str, torch.Tensor]) -> ModelSpec | None:
    """basicsr's EDSR / MSRResNet / RCAN / RRDBNet from key names and shapes, or None."""
    keys = set(sd)
    if "conv_first.weight" not in keys or "conv_last.weight" not in keys:
        return None
    first, last = sd["conv_first.weight"], sd["conv_last.weight"]
    num_feat, in_ch, out_ch = first.shape[0], first.shape[1], last.shape[0]
    if "body.0.residual_group.0.rcab.0.weight" in keys:
        scale = _upsample_scale(sd, "upsample", num_feat)
        squeeze = sd["body.0.residual_group.0.rcab.3.attention.1.weight"].shape[0]
        kwargs = {
            "num_in_ch": in_ch, "num_out_ch": out_ch, "num_feat": num_feat,
            "num_group": _count(keys, r"body\.(\d+)\.residual_group\."),
            "num_block": _count(keys, r"body\.0\.residual_group\.(\d+)\.rcab\."),
            "squeeze_factor": num_feat // squeeze, "upscale": scale,
        }
        return ModelSpec("basicsr.archs.rcan_arch:RCAN", kwargs) if scale else None
    if "body.0.rdb1.conv1.weight" in keys:
        num_grow = sd["body.0.rdb1.conv1.weight"].shape[0]
        # basicsr's RRDBNet pixel-unshuffles the input for x2 (4x channels) and x1 (16x channels).
        scale = {1: 4, 4: 2, 16: 1}.get(in_ch // out_ch if in_ch % out_ch == 0 else 0)
        if scale is None:
            return None
        kwargs = {"num_in_ch": in_ch * scale * scale // 16, "num_out_ch": out_ch, "scale": scale,
                  "num_feat": num_feat, "num_block": _count(keys, r"body\.(\d+)\.rdb1\."), "num_grow_ch": num_grow}
        return ModelSpec("basicsr.archs.rrdbnet_arch:RRDBNet", kwargs)
    if "conv_after_body.weight" in keys and "body.0.conv1.weight" in keys:
        scale = _upsample_scale(sd, "upsample", num_feat)
        num_block = _count(keys, r"body\.(\d+)\.conv1\.")
        kwargs = {"num_in_ch": in_ch, "num_out_ch": out_ch, "num_feat": num_feat, "num_block": num_block,
                  "upscale": scale}
        if num_feat == 256 and num_block == 32:
            kwargs["res_scale"] = 0.1  # EDSR-L as basicsr trains it (res_scale leaves no trace in the weights)
        return ModelSpec("basicsr.archs.edsr_arch:EDSR", kwargs) if scale else None
    if "upconv1.weight" in keys and "conv_hr.weight" in keys and "body.0.conv1.weight" in keys:
        r2 = sd["upconv1.weight"].shape[0] // num_feat
        scale = {4: 4 if "upconv2.weight" in keys else 2, 9: 3}.get(r2)
        if scale is None:
            return None
        kwargs = {"num_in_ch": in_ch, "num_out_ch": out_ch, "num_feat": num_feat,
                  "num_block": _count(keys, r"body\.(\d+)\.conv1\."), "upscale": scale}
        return ModelSpec("basicsr.archs.srresnet_arch:MSRResNet", kwargs)
    return None


def detect_spandrel(sd: Mapping[str, torch.Tensor]) -> tuple[nn.Module, ModelSpec] | None:
    """Ask spandrel; returns its model and a spec built from its recorded hyper-parameters."""
    try:
        import spandrel
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            desc = spandrel.ModelLoader().load_from_state_dict(dict(sd))
    except spandrel.UnsupportedModelError:
        return None
    except Exception as err:  # spandrel recognised the keys but could not build the model
        msg = f"spandrel recognised the keys but failed to load them: {type(err).__name__}: {err}"
        raise CheckpointError(msg) from None
    model = desc.model
    cls = type(model)
    hyper = dict(getattr(model, "hyperparameters", {}) or {})
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    kwargs: dict[str, Any] = {}
    for key, value in hyper.items():
        if key in defaults and _same(defaults[key], value):
            continue
        try:
            json.dumps(value)
        except TypeError:
            warnings.warn(f"{cls.__name__}.{key}={value!r} cannot be stored in a ModelSpec", stacklevel=3)
            continue
        kwargs[key] = list(value) if isinstance(value, tuple) else value
    return model, ModelSpec(f"{cls.__module__}:{cls.__qualname__}", kwargs)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (isinstance(a, (list, tuple)) and list(a) == list(b))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------- loading


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not match.

    Keys are matched by ``load_state_dict`` itself, so a layer's ``_load_from_state_dict`` can supply the
    default of a buffer that files written before it existed lack.
    """
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    parts = [f"{len(shapes)} of another shape (e.g. {shapes[:3]})"] if shapes else []
    if not shapes:
        result = model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()},
                                       strict=False)
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:4]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:4]})")
    if parts:
        raise CheckpointError(
            f"{source} does not match {arch}: " + "; ".join(parts) + ". Check --arch / --arch-kwargs."
        )


def model_scale(model: nn.Module, in_channels: int = 3, size: int = 16) -> int:
    """The upscaling factor, measured by running the model on a ``size`` x ``size`` input (fitted to its window)."""
    size = fitting_size(model, size)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(torch.rand(1, in_channels, size, size, device=device))
    finally:
        model.train(was_training)
    h, w = y.shape[-2:]
    if h % size or w % size or h // size != w // size:
        raise CheckpointError(f"the model maps {size}x{size} to {h}x{w}: not an integer super-resolution scale")
    return h // size


def model_in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def load_pretrained(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | str | None = None,
    scale: int | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """The FP model of a checkpoint (eval mode, weights loaded strictly) and its `ModelSpec`.

    ``arch`` (``package.module:Class``) and ``arch_kwargs`` (dict or JSON text) name the architecture when it
    cannot be detected, or override detected keyword arguments. ``scale``, when given, must match the
    scale the model actually has.
    """
    if isinstance(arch_kwargs, str):
        try:
            arch_kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"--arch-kwargs is not valid JSON: {err}") from None
        if not isinstance(arch_kwargs, dict):
            raise CheckpointError("--arch-kwargs must be a JSON object, e.g. '{\"num_feat\": 64}'")
    arch_kwargs = dict(arch_kwargs or {})
    if is_zoo_name(str(path)):
        path = zoo_path(str(path))
    sd, meta = read_state_dict(path)
    source = str(path)

    model: nn.Module | None = None
    if arch:
        spec = ModelSpec(arch, arch_kwargs)
    elif SPEC_KEY in meta:
        try:
            spec = ModelSpec.from_metadata(meta, SPEC_KEY, source)
        except ModelSpecError as err:
            raise CheckpointError(str(err)) from None
        spec = ModelSpec(spec.target, {**spec.kwargs, **arch_kwargs})
    else:
        spec = detect_basicsr(sd)
        if spec is not None:
            spec = ModelSpec(spec.target, {**spec.kwargs, **arch_kwargs})
        else:
            found = detect_spandrel(sd)
            if found is None:
                sample = sorted(sd)[:6]
                raise CheckpointError(
                    f"unknown architecture in {source} ({len(sd)} tensors, e.g. {sample}): not basicsr EDSR / "
                    "MSRResNet / RCAN / RRDBNet and not one spandrel knows. Name it: --arch package.module:Class "
                    "--arch-kwargs '{...}'"
                )
            model, spec = found
            if arch_kwargs:
                spec, model = ModelSpec(spec.target, {**spec.kwargs, **arch_kwargs}), None
    if model is None:
        try:
            # --arch is the caller's own choice; a spec read from the file must come from an allowed source.
            model = spec.build(allow=(arch,) if arch else (), source=source)
        except ModelSpecError as err:
            raise CheckpointError(str(err)) from None
        load_weights(model, sd, source, spec.target)
    model = model.float().eval()
    if scale is not None:
        actual = model_scale(model, model_in_channels(model))
        if actual != scale:
            raise CheckpointError(f"{source} is a x{actual} model ({spec.target}), but --scale {scale} was given")
    return model, spec
