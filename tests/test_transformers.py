"""Transformer SR models (SwinIR from basicsr, HAT from spandrel, timm blocks): SCALES on their linears, finetuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import srbinarize
from srbinarize.layers import ScalesConv2d, ScalesLinear
from srbinarize.models.probe import input_multiple
from srbinarize.models.zoo import save_fp_model, swinir_spec
from srbinarize.train.config import Budget, DataConfig, RunSettings, default_patch
from srbinarize.train.evaluate import load_sets
from srbinarize.train.finetune import FinetuneError, finetune
from srbinarize.train.metrics import evaluate_model

ALL_OFF = {"binarize_weights": False, "binarize_activations": False, "spatial_rescale": False,
           "channel_rescale": False}
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def swinir() -> nn.Module:
    from basicsr.archs.swinir_arch import SwinIR

    return SwinIR(upscale=2, img_size=16, window_size=4, img_range=1.0, depths=[2, 2], embed_dim=24,
                  num_heads=[2, 2], mlp_ratio=2, upsampler="pixelshuffle")


def hat() -> nn.Module:
    from spandrel.architectures.HAT.__arch.HAT import HAT

    return HAT(img_size=16, embed_dim=24, depths=(1, 1), num_heads=(2, 2), window_size=4, compress_ratio=3,
               squeeze_factor=6, mlp_ratio=2, upscale=2, upsampler="pixelshuffle")


class TimmBlockSR(nn.Module):
    """An SR wrapper around timm's ViT `Block`s: conv head, tokens through the blocks, pixel-shuffle tail."""

    def __init__(self, dim: int = 24, depth: int = 2, scale: int = 2):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.head = nn.Conv2d(3, dim, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(dim, num_heads=2, mlp_ratio=2.0) for _ in range(depth)])
        self.body_end = nn.Conv2d(dim, dim, 3, padding=1)
        self.upsample = nn.Sequential(nn.Conv2d(dim, 3 * scale**2, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x):
        feat = self.head(x)
        b, c, h, w = feat.shape
        tokens = self.blocks(feat.flatten(2).transpose(1, 2))
        body = self.body_end(tokens.transpose(1, 2).reshape(b, c, h, w))
        return self.upsample(body + feat)


# model factory, traced size, a second size (for HAT not a multiple of the window), expected binary convs
CASES = {
    "swinir": (swinir, (16, 16), (12, 20), {"layers.0.conv", "layers.1.conv", "conv_after_body"}),
    "hat": (hat, (16, 16), (13, 18), None),
    "timm": (TimmBlockSR, (16, 16), (9, 14), {"body_end"}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    make, size, other, convs = CASES[request.param]
    fp = make().eval()
    binary = srbinarize.convert(fp, "scales", example_input=torch.rand(1, 3, *size))
    return request.param, fp, binary, size, other, convs


def test_every_block_linear_is_binary_and_the_rest_fp(case):
    name, fp, binary, size, _, convs = case
    table = srbinarize.summary(binary, input_size=size)
    for s in table.layers:
        if s.row.kind == "linear":
            # Every linear of these models sits in an attention or MLP block of the body.
            assert s.row.role == "body" and s.became == "ScalesLinear", s.row.name
            assert s.row.name.endswith(BLOCK_LINEARS) or "overlap_attn" in s.row.name
        elif s.row.role != "body":
            assert s.weight_bits == 32, f"{s.row.name} ({s.row.role}) must stay FP"
    binary_convs = {s.row.name for s in table.layers if s.row.kind == "conv2d" and s.weight_bits == 1}
    if convs is not None:
        assert binary_convs == convs
    assert {s.row.name for s in table.layers if s.row.role == "head"} == {"conv_first" if name != "timm" else "head"}
    n_linear = sum(isinstance(m, nn.Linear) and not isinstance(m, ScalesLinear) for m in fp.modules())
    assert sum(isinstance(m, ScalesLinear) for m in binary.modules()) == n_linear


def test_forward_backward_at_two_sizes(case):
    _, fp, binary, size, other, _ = case
    binary.train().zero_grad()
    binary(torch.rand(1, 3, *size)).abs().mean().backward()
    linear = next(m for m in binary.modules() if isinstance(m, ScalesLinear))
    for pname, p in linear.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    binary.eval()
    with torch.no_grad():
        y, ref = binary(torch.rand(1, 3, *other)), fp(torch.rand(1, 3, *other))
    assert y.shape == ref.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_binarization_off_reproduces_fp_at_two_sizes(name):
    torch.manual_seed(0)
    make, size, other, _ = CASES[name]
    fp = make().eval()
    same = srbinarize.convert(fp, "scales", example_input=torch.rand(1, 3, *size), **ALL_OFF).eval()
    assert any(isinstance(m, ScalesLinear) for m in same.modules())
    assert any(isinstance(m, ScalesConv2d) for m in same.modules())
    for hw in (size, other):
        x = torch.rand(1, 3, *hw)
        with torch.no_grad():
            torch.testing.assert_close(same(x), fp(x), atol=1e-5, rtol=1e-5)


def test_scales_linear_matches_its_definition():
    """alpha * sign(x - beta) @ (mean|w| sign(w))^T * sigmoid(x @ s + b) + bias, on random tokens."""
    torch.manual_seed(1)
    fc = nn.Linear(8, 8)
    layer = ScalesLinear.from_float(fc, srbinarize.load_recipe("scales").layers["linear"].config)
    with torch.no_grad():
        layer.beta.normal_()
        layer.alpha.fill_(0.7)
        layer.spatial.weight.normal_()
        x = torch.randn(2, 5, 8)
        sign = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
        w_b = fc.weight.abs().mean(1, keepdim=True) * sign(fc.weight)
        expected = (0.7 * sign(x - layer.beta)) @ w_b.T * torch.sigmoid(layer.spatial(x)) + fc.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_bibert_style_baseline_recipe():
    binary = srbinarize.convert(TimmBlockSR().eval(), "bibert", example_input=torch.rand(1, 3, 16, 16))
    linears = [m for m in binary.modules() if isinstance(m, ScalesLinear)]
    assert linears and all(m.spatial is None and not m.use_skip and not m.beta.requires_grad for m in linears)
    assert all(float(m.beta.abs().sum()) == 0 for m in linears)


def _smooth_images(folder: Path, sizes: list[tuple[int, int]], seed: int) -> Path:
    """PNG files of smooth random colour fields (upsampled noise) in ``folder/HR``."""
    rng = np.random.default_rng(seed)
    (folder / "HR").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        noise = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8))
        noise.resize((w, h), Image.BICUBIC).save(folder / "HR" / f"{i}.png")
    return folder


def test_swinir_finetunes_and_evaluates_at_a_size_off_the_window(tmp_path):
    """The zoo's SwinIR configuration, tiny, through the finetune loop; validation on a 13x18 LR image (window 4)."""
    spec = swinir_spec(2, img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4)
    torch.manual_seed(0)
    checkpoint = save_fp_model(spec.build(), spec, tmp_path / "swinir_x2.safetensors", dtype=torch.float32)
    train = _smooth_images(tmp_path / "train", [(96, 96)] * 2, seed=0)  # calibration takes 48x48 LR
    val = _smooth_images(tmp_path / "val", [(26, 36)], seed=1)
    run = tmp_path / "run"
    result = finetune(str(checkpoint), "scales", DataConfig(train=train, val=val, batch=2, patch=16, workers=0),
                      Budget(steps=3), RunSettings(out=str(run), val_every=3, threads=1, save_seconds=1e9),
                      progress=False, reconstruct=0.0)
    assert result.step == 3 and not result.interrupted
    assert all(np.isfinite(r["psnr"]) and r["psnr"] > 10 for r in result.final_val.values()), result.final_val
    assert "could not draw" not in (run / "train.log").read_text()
    (es,) = load_sets([str(val)], 2)
    assert es.images[0].lr.shape[:2] == (13, 18) and input_multiple(result.model) == 4
    assert np.isfinite(evaluate_model(result.model, es).psnr)
    with pytest.raises(FinetuneError, match="multiple of 4"):
        finetune(str(checkpoint), "scales", DataConfig(train=train, patch=18), Budget(steps=1),
                 RunSettings(out=str(tmp_path / "odd")), progress=False)


def test_the_default_patch_follows_the_window_and_a_given_one_must_fit_it(tmp_path):
    """No patch given: 32 rounded to the nearest multiple of the window (6 -> 30); a given one is checked."""
    assert [default_patch(w) for w in (1, 4, 6, 7, 48)] == [32, 32, 30, 35, 48]
    spec = swinir_spec(2, img_size=12, embed_dim=12, depths=[1], num_heads=[2], window_size=6)
    torch.manual_seed(0)
    checkpoint = save_fp_model(spec.build(), spec, tmp_path / "swinir_x2.safetensors", dtype=torch.float32)
    train = _smooth_images(tmp_path / "train", [(96, 96)] * 2, seed=0)
    run = tmp_path / "run"
    result = finetune(str(checkpoint), "scales", DataConfig(train=train, batch=2, workers=0), Budget(steps=1),
                      RunSettings(out=str(run), threads=1, save_seconds=1e9), progress=False, reconstruct=0.0)
    assert result.step == 1
    assert json.loads((run / "config.json").read_text())["data"]["patch"] == 30
    with pytest.raises(FinetuneError, match=r"windows of 6 pixels.*multiple of 6"):
        finetune(str(checkpoint), "scales", DataConfig(train=train, patch=32), Budget(steps=1),
                 RunSettings(out=str(tmp_path / "given")), progress=False)
