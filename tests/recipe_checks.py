"""Checks every binary recipe must pass on a real model (shared by test_bam, test_ma, test_lmb)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import srbinarize
from srbinarize.convert import default_calibration_batch
from srbinarize.layers import QuantLayer
from srbinarize.recipe import Calibration


def sr_batch(n: int = 4, lr_size: int = 16, scale: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR, HR) patches of natural photos: HR crops and their antialiased bicubic downscale."""
    hr = default_calibration_batch(Calibration(batches=1, batch_size=n, patch_size=lr_size * scale), 3, seed)
    lr = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp(0, 1), hr


def convert_small(fp: nn.Module, recipe: str, **overrides) -> nn.Module:
    """Convert with a small calibration batch (fast enough for the test suite)."""
    return srbinarize.convert(fp, recipe, calibration_data=sr_batch(n=2, seed=1)[0], **overrides)


def quantized(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def assert_fp_when_off(fp: nn.Module, recipe: str, **off) -> None:
    """With binarization switched off by overrides, the converted model computes the FP model (1e-5)."""
    model = convert_small(fp, recipe, **off).eval()
    assert quantized(model), "the layers must still be replaced, only with binarization off"
    x = sr_batch(n=2, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), fp(x), rtol=0, atol=1e-5)


def assert_trains(model: nn.Module, teacher: nn.Module, steps: int = 12, lr: float = 1e-3) -> tuple[float, float]:
    """Gradients reach every replaced layer, and plain Adam on the replaced layers' parameters lowers the L1
    distance to the FP teacher's output on natural LR patches (mean of the last 3 steps below 0.97 x the
    first: the binary layers learn, not noise). Returns (first, mean of the last 3)."""
    layers = quantized(model)
    lr_img = sr_batch(n=2, seed=3)[0]
    with torch.no_grad():
        hr = teacher.eval()(lr_img)
    model.train()
    loss = (model(lr_img) - hr).abs().mean()
    loss.backward()
    for name, layer in layers.items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, f"no gradient reaches {name}"
    model.zero_grad()
    params = list({id(p): p for m in layers.values() for p in m.parameters()}.values())
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = (model(lr_img) - hr).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    last = sum(losses[-3:]) / 3
    assert last < 0.97 * losses[0], f"L1 loss did not decrease: {losses}"
    return losses[0], last


def assert_deployed_matches(model: nn.Module) -> None:
    """Every replaced layer's ``deployed().reference`` reproduces its eval forward on the FP inputs it sees."""
    model.eval()
    layers = quantized(model)
    seen: dict[str, tuple] = {}

    def keep(name):  # clone: the model may rewrite these tensors in place later (inplace ReLU)
        def hook(_module, args, out) -> None:
            seen.setdefault(name, (tuple(a.clone() for a in args), out.clone()))

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    with torch.no_grad():
        model(sr_batch(n=2, seed=4)[0])
    for h in hooks:
        h.remove()
    for name, (args, out) in seen.items():
        atol = 1e-5 * max(1.0, out.abs().max().item())  # EDSR's features reach hundreds (img_range 255)
        torch.testing.assert_close(layers[name].deployed().reference(*args), out, rtol=1e-5, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def msrresnet_x2() -> nn.Module:
    """basicsr MSRResNet x2 whose residual blocks carry signal, as in a trained model: basicsr initialises
    the block convs at 0.1x PyTorch's init, which leaves a random model's body near the identity."""
    from conftest import msrresnet

    model = msrresnet(upscale=2)
    for block in model.body:
        block.conv1.reset_parameters()
        block.conv2.reset_parameters()
    return model
