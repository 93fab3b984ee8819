"""PSNR / SSIM in the field's convention, computed by basicsr's implementation.

Convention (the one the SR papers report): the network output is clamped to [0, 1] and rounded to 8 bits;
PSNR and SSIM are computed on the Y channel of YCbCr (ITU-R BT.601, 16-235), after cropping ``scale``
pixels from every border of the modcropped HR and of the output. basicsr's ``calculate_psnr`` /
``calculate_ssim`` do the cropping and the Y conversion; note that they take **BGR** images (OpenCV order),
so the RGB arrays of `srbinarize.train.data` are flipped before the call.

Greyscale HR files (Set14's ``bridge``) follow the MATLAB evaluation scripts the literature's tables come
from: a one-channel image is compared as it is, on full-range grey (0-255), not through the 16-235 Y
conversion, which would compress its range by 219/255 and add 20*log10(255/219) = 1.32 dB. The model's
(RGB) output is turned into full-range BT.601 luma (``0.299 R + 0.587 G + 0.114 B``, rounded to 8 bits)
for that comparison. Measured: with this rule bicubic Set14 is 30.23 / 26.00 dB at x2 / x4 (literature
30.24 / 26.00); scoring ``bridge`` on Y instead gives 30.33 / 26.09.

The bicubic baseline upsamples the given LR files with basicsr's port of MATLAB ``imresize`` (the
baseline the papers quote: Set5 x4 28.42 dB).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..models.probe import input_multiple
from .data import EvalSet, bicubic_resize


def psnr_ssim_y(
    sr: np.ndarray, hr: np.ndarray, crop_border: int, ssim: bool = True, grey: bool = False
) -> tuple[float, float]:
    """PSNR and SSIM on Y of two uint8 RGB (H, W, 3) images, ``crop_border`` pixels cropped.

    ``grey``: the HR came from a one-channel file; compare full-range luma instead (see the module doc).
    """
    from basicsr.metrics import calculate_psnr, calculate_ssim

    if sr.shape != hr.shape:
        raise ValueError(f"output {sr.shape} and HR {hr.shape} differ in shape")
    if sr.dtype != np.uint8 or hr.dtype != np.uint8:
        raise TypeError(f"psnr_ssim_y takes uint8 images, got {sr.dtype} and {hr.dtype}")
    if grey:
        a, b, y_channel = luma8(sr), luma8(hr), False
    else:
        a, b, y_channel = sr[..., ::-1], hr[..., ::-1], True  # basicsr's Y conversion expects BGR
    p = float(calculate_psnr(a, b, crop_border, test_y_channel=y_channel))
    s = float(calculate_ssim(a, b, crop_border, test_y_channel=y_channel)) if ssim else float("nan")
    return p, s


def luma8(img: np.ndarray) -> np.ndarray:
    """Full-range BT.601 luma of a uint8 RGB image, rounded to uint8 (exact for R = G = B)."""
    y = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def float_to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline: MATLAB-style ``imresize(lr, scale)``, uint8 RGB out."""
    return float_to_uint8(bicubic_resize(lr, float(scale)))


def tensor_to_uint8(t: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) float in [0, 1] -> uint8 (H, W, 3), rounded as the papers do."""
    t = t.detach().float().cpu()
    if t.dim() == 4:
        t = t[0]
    return float_to_uint8(t.permute(1, 2, 0).numpy())


@dataclass
class SetResult:
    """Mean PSNR/SSIM-Y of one method on one set, with the per-image figures."""

    set_name: str
    scale: int
    psnr: float
    ssim: float
    per_image: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "set": self.set_name,
            "scale": self.scale,
            "psnr": self.psnr,
            "ssim": self.ssim,
            "per_image": {k: {"psnr": p, "ssim": s} for k, (p, s) in self.per_image.items()},
        }


def _summarise(eval_set: EvalSet, outputs: Sequence[np.ndarray], ssim: bool) -> SetResult:
    per = {
        im.name: psnr_ssim_y(sr, im.hr, eval_set.scale, ssim, im.grey)
        for im, sr in zip(eval_set.images, outputs, strict=True)
    }
    psnr = float(np.mean([p for p, _ in per.values()]))
    ssim_mean = float(np.mean([s for _, s in per.values()])) if ssim else float("nan")
    return SetResult(eval_set.name, eval_set.scale, psnr, ssim_mean, per)


def evaluate_bicubic(eval_set: EvalSet, ssim: bool = True) -> SetResult:
    outputs = [bicubic_upscale(im.lr, eval_set.scale) for im in eval_set.images]
    return _summarise(eval_set, outputs, ssim)


def _pad_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
    return x, h, w


@torch.no_grad()
def super_resolve(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    lr: np.ndarray,
    scale: int,
    device: str | torch.device = "cpu",
    pad_to: int | None = None,
) -> np.ndarray:
    """Run ``model`` on one uint8 RGB LR image; uint8 RGB output of size ``scale`` x LR.

    ``pad_to`` reflect-pads the input to a multiple (window-attention models) and crops the output back;
    ``None`` takes the model's window (`input_multiple`).
    """
    pad_to = input_multiple(model) if pad_to is None else pad_to
    x = torch.from_numpy(lr.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
    x, h, w = _pad_multiple(x, pad_to) if pad_to > 1 else (x, *lr.shape[:2])
    y = model(x)
    if y.shape[-2:] != (x.shape[-2] * scale, x.shape[-1] * scale):
        raise ValueError(
            f"the model turned a {tuple(x.shape[-2:])} input into {tuple(y.shape[-2:])}: not x{scale}. "
            "Is --scale right for this checkpoint?"
        )
    return tensor_to_uint8(y[..., : h * scale, : w * scale])


def evaluate_model(
    model: nn.Module,
    eval_set: EvalSet,
    device: str | torch.device = "cpu",
    ssim: bool = True,
    pad_to: int | None = None,
) -> SetResult:
    """Mean PSNR/SSIM-Y of ``model`` (eval mode during the call, restored after) on ``eval_set``."""
    was_training = model.training
    model.eval()
    try:
        outputs = [super_resolve(model, im.lr, eval_set.scale, device, pad_to) for im in eval_set.images]
    finally:
        model.train(was_training)
    return _summarise(eval_set, outputs, ssim)
