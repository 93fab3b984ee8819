"""Progressive binarization (``train.progressive``): SCALES layers blended from their FP equivalent to binary."""

from __future__ import annotations

import json

import pytest
import shared_zoo
import torch
from conftest import DATA, edsr

import srbinarize
from srbinarize.errors import SrbinarizeError
from srbinarize.layers import ScalesConv2d
from srbinarize.recipe import load_recipe
from srbinarize.train.phases.end_to_end import BinarizationRamp


def _layers(model: torch.nn.Module) -> list[ScalesConv2d]:
    return [m for m in model.modules() if isinstance(m, ScalesConv2d)]


@pytest.fixture(scope="module", params=["auto", "always"])
def fp_and_binary(request):
    """An EDSR and its calibrated SCALES conversion; ``always``: every layer's latent weight is g * (w - I)."""
    torch.manual_seed(0)
    fp = edsr(num_feat=32).eval()
    binary = srbinarize.convert(fp, "scales", skip=request.param)
    layers = _layers(binary)
    assert layers and all(m.use_skip == (request.param == "always") for m in layers)
    assert all((m.fp_gain - 1).abs().max() > 0.1 for m in layers)  # calibration did scale the latent weights
    return fp, binary


def test_level_0_is_the_fp_model_and_level_1_the_binary_one(fp_and_binary):
    fp, binary = fp_and_binary
    x = torch.rand(2, 3, 24, 20)
    ramp = BinarizationRamp(binary, 0.5)
    assert len(ramp.layers) == len(_layers(binary))
    with torch.no_grad():
        y_binary = binary(x)
        ramp.set(0.0)
        y0 = binary(x)
        ramp.set(0.25)
        y_quarter = binary(x)
        ramp.set(1.0)
        y1 = binary(x)
        y_fp = fp(x)
    torch.testing.assert_close(y0, y_fp, rtol=1e-5, atol=1e-5)
    assert torch.equal(y1, y_binary)
    assert (y_binary - y_fp).abs().max() > 1e-2  # the two ends differ: the blend has something to do
    assert 0 < (y_quarter - y_fp).abs().mean() < (y_binary - y_fp).abs().mean()


@pytest.mark.parametrize("name", ["team01_efdn", "team06_v1"])
def test_pretrained_model_at_level_0_is_the_fp_model(name):
    """On a real pretrained model (calibrated with the recipe's offsets, the identity skip on every same-shape
    layer) level 0 is the FP model."""
    if not shared_zoo.available(name):
        pytest.skip(f"../shared/models/{name} not present")
    from srbinarize.models.input_range import probe_patches

    fp = shared_zoo.load(name).eval()
    binary = srbinarize.convert(fp, "scales", skip="always")
    assert any(m.use_skip for m in _layers(binary)) and any(m.fp_offset.abs().max() > 0 for m in _layers(binary))
    x = probe_patches(n=2, size=24)
    with torch.no_grad():
        y_fp = fp(x)
        BinarizationRamp(binary, 0.5).set(0.0)
        torch.testing.assert_close(binary(x), y_fp, rtol=1e-4, atol=1e-4)
        BinarizationRamp(binary, 0.5).set(1.0)
        assert (binary(x) - y_fp).abs().mean() > 1e-3
        # binary weights, FP activations (the first of two steps): calibrated, near the FP output, not far off
        BinarizationRamp(binary, 0.5).set(0.0, 1.0)
        err_side = (binary(x) - y_fp).abs().mean()
        for m in _layers(binary):
            m.fp_side_gain.fill_(1.0)
        assert err_side < 0.5 * (binary(x) - y_fp).abs().mean()
        BinarizationRamp(binary, 0.5).set(1.0)


def test_each_layer_at_level_0_is_its_fp_conv(fp_and_binary):
    fp, binary = fp_and_binary
    x = torch.randn(2, 32, 12, 12)
    for name, layer in binary.named_modules():
        if isinstance(layer, ScalesConv2d):
            layer.set_binarization(0.0)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), fp.get_submodule(name)(x), rtol=1e-5, atol=1e-5)
            layer.set_binarization(1.0)


def test_gradients_reach_the_latent_weights_at_every_level(fp_and_binary):
    _fp, binary = fp_and_binary
    x = torch.rand(2, 3, 16, 16)
    for level, weights in ((0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 0.0), (0.5, 1.0), (1.0, 1.0)):
        BinarizationRamp(binary, 0.5).set(level, weights)
        binary.zero_grad(set_to_none=True)
        binary(x).abs().mean().backward()
        for layer in _layers(binary):
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, (level, weights, layer)
            if level > 0:  # the binary side's own parameters learn once it is in the blend
                assert layer.alpha.grad is not None and layer.alpha.grad.abs() > 0
    BinarizationRamp(binary, 0.5).set(1.0)


def test_ramp_levels_and_binary_view(fp_and_binary):
    _fp, binary = fp_and_binary
    ramp = BinarizationRamp(binary, 0.5)
    assert [ramp.levels(step, 100) for step in (0, 25, 49, 50, 99)] == [
        (0.0, 0.0), (0.5, 0.0), (0.98, 0.0), (1.0, 1.0), (1.0, 1.0)]
    two_step = BinarizationRamp(binary, 0.5, "weights_first")
    assert [two_step.levels(step, 100) for step in (0, 10, 25, 40, 50)] == [
        (0.0, 0.0), (0.0, 0.4), (0.0, 1.0), (pytest.approx(0.6), 1.0), (1.0, 1.0)]
    assert not BinarizationRamp(binary, 0.0).layers
    ramp.set(0.3, 0.2)
    with ramp.binary():
        assert all(m.binarization == 1.0 for m in ramp.layers)
    assert all((m.binarization, m.fp_side_weights) == (0.3, 0.2) for m in ramp.layers)
    ramp.set(1.0, 1.0)


def test_weights_first_side_is_the_fp_conv_with_binary_weights(fp_and_binary):
    """Level 0 with the FP side's weights binarized: FP activations, g * mean|W| sign(W) weights of the FP conv,
    with g its own calibrated gain."""
    fp, binary = fp_and_binary
    x = torch.randn(2, 32, 12, 12)
    for name, layer in binary.named_modules():
        if not isinstance(layer, ScalesConv2d):
            continue
        conv = fp.get_submodule(name)
        w = conv.weight - (layer._identity_delta() if layer.use_skip else 0)
        w_bin = w.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
        w_bin = w_bin * layer.fp_side_gain.view(-1, 1, 1, 1)
        expected = torch.nn.functional.conv2d(x, w_bin, conv.bias, padding=1) + (x if layer.use_skip else 0)
        layer.set_binarization(0.0, 1.0)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        layer.set_binarization(0.0, 0.5)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), 0.5 * (expected + conv(x)), rtol=1e-4, atol=1e-4)
        layer.set_binarization(1.0)


def test_fp_gain_round_trips_and_older_files_load(fp_and_binary, tmp_path):
    _fp, binary = fp_and_binary
    state = binary.state_dict()
    gains = {k: v for k, v in state.items() if k.endswith(("fp_gain", "fp_side_gain"))}
    assert len(gains) == 2 * len(_layers(binary))
    fresh = srbinarize.convert(edsr(num_feat=32).eval(), "scales", calibrate=False)
    fresh.load_state_dict(state)
    for k, v in gains.items():
        assert torch.equal(fresh.state_dict()[k], v)
    older = {k: v for k, v in state.items() if k not in gains}  # written before the gains existed
    fresh.load_state_dict(older)
    assert all(torch.equal(m.fp_gain, torch.ones_like(m.fp_gain)) and torch.equal(m.fp_side_gain, m.fp_gain)
               for m in _layers(fresh))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), True, "half"])
def test_bad_progressive_value_names_the_option(value):
    with pytest.raises(SrbinarizeError, match="progressive"):
        load_recipe("scales").with_overrides(**{"train.progressive": value})


def test_bad_progressive_order_names_the_option():
    with pytest.raises(SrbinarizeError, match="progressive_order 'activations_first' is unknown"):
        load_recipe("scales").with_overrides(**{"train.progressive_order": "activations_first"})


def test_bad_level_is_refused(fp_and_binary):
    layer = _layers(fp_and_binary[1])[0]
    with pytest.raises(ValueError, match="binarization level"):
        layer.set_binarization(1.5)


@pytest.mark.skipif(not (DATA / "BSD100").is_dir(), reason="../shared/data/BSD100 not present")
def test_finetune_with_progressive_ends_binary(tmp_path):
    """A short run with the ramp: validations see the binary model and the final file is the binary layer."""
    from srbinarize.train.config import Budget, DataConfig, RunSettings
    from srbinarize.train.finetune import finetune

    fp = edsr(num_feat=16).eval()
    data = DataConfig(train=str(DATA / "BSD100"), val=str(DATA / "Set5"), val_limit=1, batch=2, patch=16, workers=0)
    res = finetune(fp, "scales", data, Budget(steps=6), RunSettings(out=str(tmp_path / "run"), val_every=2),
                   progressive=0.5, reconstruct=0.0, progress=False)
    assert all(m.binarization == 1.0 for m in _layers(res.model))
    vals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [v["Set5"]["psnr"] for v in vals if v.get("kind") == "val"]
    assert len(vals) == 3 and vals[-1] == pytest.approx(res.final_val["Set5"]["psnr"])
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["recipe"]["train"]["progressive"] == 0.5
    assert "progressive binarization" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.skipif(not (DATA / "BSD100").is_dir(), reason="../shared/data/BSD100 not present")
def test_progressive_refused_where_no_layer_can_blend(tmp_path):
    from srbinarize.train.config import Budget, DataConfig, RunSettings
    from srbinarize.train.finetune import finetune

    with pytest.raises(SrbinarizeError, match="progressive"):
        finetune(edsr(num_feat=16).eval(), "ma", DataConfig(train=str(DATA / "BSD100"), batch=2, patch=16, workers=0),
                 Budget(steps=2), RunSettings(out=str(tmp_path / "run")), progressive=0.5, progress=False)
