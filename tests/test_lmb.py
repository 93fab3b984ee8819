"""LMB recipe: activations binarized against the local mean of their FP neighbourhood."""

from __future__ import annotations

import pytest
import torch
from conftest import edsr
from recipe_checks import assert_deployed_matches, assert_fp_when_off, assert_trains, convert_small, msrresnet_x2
from torch import nn

from srbinarize.layers import LmbConfig, LmbConv2d

MODELS = {"edsr": edsr, "msrresnet": msrresnet_x2}
OFF = {"binarize_weights": False, "binarize_activations": False}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converts_trains_and_switches_off(name):
    fp = MODELS[name]().eval()
    model = convert_small(fp, "lmb")
    assert all(isinstance(model.get_submodule(f"body.{b}.conv{i}"), LmbConv2d)
               for b in range(len(fp.body)) for i in (1, 2))
    assert_trains(model, fp)
    assert_fp_when_off(fp, "lmb", **OFF)


def test_threshold_is_the_local_mean_border_included():
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 0.0], [3.0, 0.0, 8.0]]).view(1, 1, 3, 3)
    layer = LmbConv2d.from_float(nn.Conv2d(1, 1, 3, padding=1), LmbConfig(window=3))
    # By hand: the mean over the window's pixels inside the image (4 at corners, 6 at edges, 9 inside).
    expected = torch.tensor([[5 / 4, 7 / 6, 6 / 4], [8 / 6, 18 / 9, 14 / 6], [7 / 4, 15 / 6, 12 / 4]])
    torch.testing.assert_close(layer.threshold(x)[0, 0], expected)
    signs = torch.tensor([[-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])  # x >= mean -> +1
    torch.testing.assert_close(torch.where(x >= layer.threshold(x), 1.0, -1.0)[0, 0], signs)
    wide = LmbConv2d.from_float(nn.Conv2d(1, 1, 3, padding=1), LmbConfig(window=5))
    torch.testing.assert_close(wide.threshold(x), torch.full_like(x, 2.0))  # every window covers the image


def test_binary_activations_and_gradient_approximator():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.5)  # binary weight +1: the output is the binary activation times the scale
    layer = LmbConv2d.from_float(conv, LmbConfig(window=3))
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 0.0], [3.0, 0.0, 8.0]]).view(1, 1, 3, 3)
    y = layer(x) / layer.output_scale().view(1, -1, 1, 1)
    expected = torch.tensor([[-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    torch.testing.assert_close(y[0, 0], expected)
    # The gradient approximator: ApproxSign whose window for the weights is max|W| of each filter.
    big = LmbConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), LmbConfig())
    assert big.config.ste == "approx"
    torch.testing.assert_close(big.weight_window().flatten(), big.weight.detach().abs().amax(dim=(1, 2, 3)))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    big(x).square().sum().backward()
    assert big.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_deployed_form_matches():
    model = convert_small(edsr(), "lmb")
    deployed = model.get_submodule("body.0.conv1").deployed()
    assert deployed.window == 3 and deployed.binary_activations
    assert set(deployed.weight_pm1.unique().tolist()) == {-1.0, 1.0}
    assert_deployed_matches(model)
