"""Ma et al.'s binary-weight recipe: residual-block convs only, learnable per-filter scale, FP activations."""

from __future__ import annotations

import pytest
import torch
from conftest import edsr
from recipe_checks import assert_deployed_matches, assert_fp_when_off, assert_trains, convert_small, msrresnet_x2

import srbinarize
from srbinarize.layers import MaConv2d

MODELS = {"edsr": edsr, "msrresnet": msrresnet_x2}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converts_trains_and_switches_off(name):
    fp = MODELS[name]().eval()
    model = convert_small(fp, "ma")
    blocks = {f"body.{b}.conv{i}" for b in range(len(fp.body)) for i in (1, 2)}
    assert {n for n, m in model.named_modules() if isinstance(m, MaConv2d)} == blocks
    assert_trains(model, fp)
    assert_fp_when_off(fp, "ma", binarize_weights=False)


def test_residual_blocks_only_and_weight_only_bits():
    model = convert_small(edsr(), "ma")
    rows = {s.row.name: s for s in srbinarize.summary(model).layers}
    # EDSR's conv after the body sits only in the global residual, not in a residual block: it stays FP.
    assert rows["conv_after_body"].became == "FP" and "outside residual blocks" in rows["conv_after_body"].row.note
    assert (rows["body.0.conv1"].weight_bits, rows["body.0.conv1"].act_bits) == (1, 32)
    everything = convert_small(edsr(), "ma", residual_blocks_only=False)
    assert isinstance(everything.get_submodule("conv_after_body"), MaConv2d)


def test_scale_init_and_deployed_form():
    fp = edsr()
    paper = convert_small(fp, "ma", scale_init="mean_abs")
    conv = paper.get_submodule("body.1.conv2")
    torch.testing.assert_close(conv.scale.detach(), conv.weight.detach().abs().mean(dim=(1, 2, 3)))
    fitted = convert_small(fp, "ma").get_submodule("body.1.conv2")
    assert not torch.allclose(fitted.scale, conv.scale)  # least squares on the calibration batch moved it
    deployed = conv.deployed()
    assert set(deployed.weight_pm1.unique().tolist()) == {-1.0, 1.0}
    assert_deployed_matches(paper)
