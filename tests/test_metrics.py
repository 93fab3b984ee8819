"""PSNR/SSIM-Y in the field's convention and the MATLAB-style bicubic, checked against published figures."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA

from srbinarize.train.data import EvalSet, degrade_window, downsample, modcrop, read_image
from srbinarize.train.metrics import bicubic_upscale, evaluate_bicubic, luma8, psnr_ssim_y

needs_data = pytest.mark.skipif(not (DATA / "Set5").is_dir(), reason="../shared/data not present")

# Bicubic PSNR-Y of the literature (MATLAB bicubic, e.g. the tables of VDSR / EDSR / RCAN).
LITERATURE = {("Set5", 2): 33.66, ("Set5", 4): 28.42, ("Set14", 2): 30.24, ("Set14", 4): 26.00}


@needs_data
@pytest.mark.parametrize(("name", "scale"), sorted(LITERATURE))
def test_bicubic_reproduces_the_literature(name, scale):
    result = evaluate_bicubic(EvalSet.load(DATA / name, scale), ssim=False)
    assert abs(result.psnr - LITERATURE[name, scale]) < 0.05, result.psnr


@needs_data
def test_greyscale_images_are_scored_on_full_range_grey():
    # Set14's bridge is greyscale: the MATLAB scripts compare it as it is. Through the 16-235 Y conversion it
    # would score 20*log10(255/219) = 1.32 dB higher, and Set14 would miss the literature by 0.09 dB.
    es = EvalSet.load(DATA / "Set14", 2)
    bridge = next(im for im in es.images if im.name == "bridge")
    others = [im for im in es.images if im.name != "bridge"]
    assert bridge.grey and not any(im.grey for im in others)
    sr = bicubic_upscale(bridge.lr, 2)
    grey_psnr, _ = psnr_ssim_y(sr, bridge.hr, 2, ssim=False, grey=True)
    y_psnr, _ = psnr_ssim_y(sr, bridge.hr, 2, ssim=False, grey=False)
    assert y_psnr - grey_psnr == pytest.approx(20 * np.log10(255 / 219), abs=0.01)


def test_psnr_is_on_y_of_rgb_input():
    # basicsr converts BGR; the wrapper must flip RGB first. A change in blue alone moves Y by 24.966/255 of it,
    # a change in red by 65.481/255: swapping the channel order would swap the two PSNRs.
    rng = np.random.default_rng(0)
    hr = rng.integers(40, 200, size=(32, 32, 3), dtype=np.uint8)
    for channel, coeff in ((0, 65.481), (2, 24.966)):
        sr = hr.copy()
        sr[..., channel] += 10
        psnr, _ = psnr_ssim_y(sr, hr, 0, ssim=False)
        expected = 10 * np.log10(255**2 / (10 * coeff / 255) ** 2)
        assert psnr == pytest.approx(expected, abs=0.2), (channel, psnr, expected)


def test_crop_border_and_identity():
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    sr = hr.copy()
    sr[:2] = 0  # damage only the border rows
    assert psnr_ssim_y(sr, hr, 2)[0] == float("inf")
    assert psnr_ssim_y(sr, hr, 1)[0] < 60
    assert psnr_ssim_y(hr, hr, 0)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        psnr_ssim_y(sr[:-1], hr, 0)


def test_luma_of_grey_is_exact():
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(luma8(np.repeat(g[..., None], 3, 2)), g)


@needs_data
@pytest.mark.parametrize("scale", [2, 4])
def test_matlab_downsample_matches_the_given_lr_files(scale):
    # MATLAB rounds to uint8 after each of its two passes; emulating it leaves 1-4% of values different
    # (basicsr's float imresize differs on about 15%).
    for name in ("baby", "butterfly"):
        hr = modcrop(read_image(DATA / "Set5" / "HR" / f"{name}.png"), scale)
        given = read_image(DATA / "Set5" / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png")
        ours = downsample(hr, scale)
        assert ours.shape == given.shape
        diff = np.abs(ours.astype(int) - given.astype(int))
        assert (diff > 0).mean() < 0.04, (name, (diff > 0).mean())
        # Measured: under 1% of values differ by more than one level (mostly along the top LR row).
        assert (diff > 1).mean() < 0.01, (name, (diff > 1).mean())


@needs_data
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_patch_degradation_equals_whole_image_degradation(scale):
    hr = modcrop(read_image(DATA / "Set5" / "HR" / "bird.png"), scale)
    full = downsample(hr, scale)
    h, w = full.shape[:2]
    for top, left in ((0, 0), (5, 7), (h - 20, w - 20), (h // 2, 3)):
        lr, hr_win = degrade_window(hr, scale, top, left, 20)
        assert np.array_equal(np.round(lr * 255).astype(np.uint8), full[top : top + 20, left : left + 20])
        assert np.array_equal(np.round(hr_win * 255).astype(np.uint8),
                              hr[top * scale : (top + 20) * scale, left * scale : (left + 20) * scale])
