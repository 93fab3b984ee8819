"""Every recipe on the six pretrained x4 models of ../shared/models (each skipped when its folder is absent).

Per model and recipe: convert (the model's own input range), forward at two sizes, two optimizer steps of
a plain loop, export straight from training, onnxruntime parity at two sizes, and the share of MACs that
became binary / quantized. Per model: SCALES roles (every body conv replaced unless SCALES cannot take it),
OPs reduction, and the input range found by probing.
"""

from __future__ import annotations

import json

import pytest
import shared_zoo
import torch
import torch.nn.functional as F
from torch import nn

import srbinarize
from srbinarize.export.onnx import EXACT
from srbinarize.export.qdq import deployed_output as qdq_output
from srbinarize.models.input_range import detect_input_range, probe_patches
from srbinarize.summary import summary

NAMES = ["team01_efdn", "team03_fmen", "team06_v1", "team09_imdtn", "team10_repafdn", "team20_mobilesr"]
WITH_LINEARS = {"team09_imdtn", "team20_mobilesr"}  # Swin / MobileViT-style blocks: bibert applies
CASES = [(n, r) for n in NAMES for r in ("scales", "bam", "ma", "lmb", "fqsr", *(("bibert",) if n in WITH_LINEARS
                                                                                   else ()))]

# Share of conv/linear MACs (16x16 input) that became binary / quantized, as measured; asserted to 0.02.
# Below 1: head, upsampler and output conv stay FP; ESA's stride-2 conv is kept by SCALES, grouped and
# depthwise convs (IMDTN, MobileSR) by BAM, Ma, LMB and FQSR; those keep what their own rules leave out (Ma: residual
# blocks only; BAM: chains) and have no linear layer type (IMDTN's Swin linears stay FP). FQSR takes every
# plain conv, but not IMDTN's / MobileSR's grouped ones nor any linear.
SHARE = {
    "team01_efdn": {"scales": 0.909, "bam": 0.909, "ma": 0.859, "lmb": 0.909, "fqsr": 1.0},
    "team03_fmen": {"scales": 0.932, "bam": 0.932, "ma": 0.932, "lmb": 0.932, "fqsr": 1.0},
    "team06_v1": {"scales": 0.942, "bam": 0.942, "ma": 0.656, "lmb": 0.942, "fqsr": 1.0},
    "team09_imdtn": {"scales": 0.920, "bam": 0.191, "ma": 0.189, "lmb": 0.191, "fqsr": 0.461, "bibert": 0.920},
    "team10_repafdn": {"scales": 0.924, "bam": 0.924, "ma": 0.928, "lmb": 0.924, "fqsr": 1.0},
    "team20_mobilesr": {"scales": 0.757, "bam": 0.355, "ma": 0.240, "lmb": 0.355, "fqsr": 0.630, "bibert": 0.757},
}
# SCALES OPs reduction (BOPs/64 + FLOPs, srbinarize.summary): >= 4x on the pixel-shuffle models except
# MobileSR, whose upsampler and 4x-resolution output conv (tail, FP) hold 24% of its MACs (README).
MIN_OPS_REDUCTION = {"team01_efdn": 8.0, "team03_fmen": 10.0, "team06_v1": 11.0, "team09_imdtn": 9.0,
                     "team10_repafdn": 9.0, "team20_mobilesr": 3.5}
# SCALES (calibrated thresholds) and Ma (FP activations) reproduce PyTorch to float rounding; where
# activations are binarized at a fixed threshold (BiBERT-style: 0) or against data-dependent ones (BAM,
# LMB), or codes are rounded (FQSR), a float tie flips a sign or a code somewhere and the flip spreads:
# bounded on average instead.
TIGHT = {"scales", "ma"}
CAL = probe_patches(n=2, size=24)
_MODELS: dict[str, nn.Module] = {}


def fp_model(name: str) -> nn.Module:
    """The FP model, loaded once per session; skips when ../shared/models lacks it."""
    if not shared_zoo.available(name):
        pytest.skip(f"../shared/models/{name} not present")
    if name not in _MODELS:
        _MODELS[name] = shared_zoo.load(name)
    return _MODELS[name]


def mac_share(model: nn.Module) -> float:
    s = summary(model, (16, 16))
    return sum(x.macs for x in s.layers if x.quantized) / sum(x.macs for x in s.layers)


def dithered(size: int) -> torch.Tensor:
    """A natural LR patch with a little noise (flat regions would make every recipe's thresholds tie)."""
    x = probe_patches(n=1, size=size, seed=5)
    return (x + 0.02 * torch.rand(x.shape, generator=torch.Generator().manual_seed(size))).clamp(0, 1)


@pytest.mark.parametrize(("name", "recipe"), CASES)
def test_recipe_trains_exports_and_matches(name, recipe, tmp_path):
    fp = fp_model(name)
    rng = shared_zoo.entry(name)["input_range"]
    q = srbinarize.convert(fp, recipe, input_range=rng, calibration_data=CAL)
    assert mac_share(q) >= SHARE[name][recipe] - 0.02

    q.train()
    for size in (16, 24):
        assert q(CAL[:, :, :size, :size]).shape == (2, 3, 4 * size, 4 * size)
    x = CAL[:, :, :16, :16]
    with torch.no_grad():
        target = fp(x * rng) / rng
    opt = torch.optim.Adam(q.parameters(), lr=1e-7)  # small: FMEN's attention convs have weights near 1e-6
    for _ in range(2):
        loss = F.l1_loss(q(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    # straight from training; float32 activations: compared with the module at 1e-4 below
    report = srbinarize.export_onnx(q, tmp_path / "m.onnx", torch.rand(1, 3, 16, 16), **EXACT)
    assert report.file_bytes > 0 and (bool(report.qdq) == (recipe == "fqsr"))
    q.eval()
    if recipe == "fqsr":  # the graph is the layer: compared without onnxruntime's integer fusions
        import onnxruntime as ort

        session = srbinarize.ort_session(tmp_path / "m.onnx",
                                         graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    else:
        session = srbinarize.ort_session(tmp_path / "m.onnx")
    for size in (16, 24):
        x = dithered(size)
        with torch.no_grad():
            want = qdq_output(q, x) if recipe == "fqsr" else q(x)
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert got.shape == want.shape == (1, 3, 4 * size, 4 * size)
        d = (got - want).abs()
        if recipe in TIGHT and name != "team03_fmen":
            assert d.max() <= 1e-4, f"size {size}: max |onnx - torch| {d.max():.2e}"
        else:
            assert d.mean() <= 1e-2 and d.max() <= 0.5, f"size {size}: mean {d.mean():.2e}, max {d.max():.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_scales_roles_reach_the_upsampler(name):
    """Every conv before the upsampler is body and replaced, unless SCALES cannot take it (ESA's stride 2)."""
    q = srbinarize.convert(fp_model(name), "scales", calibrate=False)
    plan = q.srbinarize_info.plan
    body = plan.by_role("body")
    assert [r.name for r in plan.by_role("head")] == [plan.rows[0].name]
    for row in body:
        assert row.replaced_by or "stride and dilation must be 1" in row.note, (row.name, row.note)
    tail = plan.by_role("tail")
    assert 1 <= len(tail) <= 3, [r.name for r in tail]  # the upsampler's convs and the output conv only
    assert not any(part in r.name for r in tail for part in ("att", "esa", "cells", "B1", "hfab", "body"))
    s = summary(q, (16, 16))
    assert s.ops_before / s.ops_after >= MIN_OPS_REDUCTION[name]


@pytest.mark.parametrize("name", NAMES)
def test_input_range_is_detected(name):
    found, message = detect_input_range(fp_model(name), name)
    assert found == shared_zoo.entry(name)["input_range"]
    assert message.startswith(f"{name}: input range [0, {found:g}] detected")


@pytest.mark.skipif(not shared_zoo.available("team03_fmen"), reason="../shared/models/team03_fmen absent")
def test_finetune_evaluates_a_255_model_in_its_detected_range(tmp_path, monkeypatch):
    """FMEN takes [0, 255]: finetune detects it (nothing given) and its FP teacher scores the published PSNR."""
    from srbinarize.train.config import Budget, DataConfig, ModelConfig, RunSettings

    e = shared_zoo.entry("team03_fmen")
    folder = shared_zoo.ROOT / e["folder"]
    data = shared_zoo.ROOT.parent / "data"
    monkeypatch.syspath_prepend(str(folder))
    run = srbinarize.finetune(
        ModelConfig(str(folder / e["weights"]), arch=e["import"]), "scales",
        DataConfig(train=[str(data / "BSD100")], val=[str(data / "Set5")], batch=2, patch=16, workers=0),
        Budget(steps=1), RunSettings(out=str(tmp_path / "run"), threads=1), progress=False, reconstruct=0.0)
    assert abs(run.baselines["Set5"]["FP teacher"] - e["psnr_y"]["Set5"]) <= 0.05
    assert "input range [0, 255] detected" in (tmp_path / "run" / "train.log").read_text()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["input_range"] == 255.0


@pytest.mark.skipif(not shared_zoo.available("team03_fmen"), reason="../shared/models/team03_fmen absent")
def test_convert_and_inspect_take_the_range_from_the_command_line(tmp_path, monkeypatch, capsys):
    """`convert` and `inspect` share finetune's --input-range: detected when absent, checked when given."""
    from cli_checks import one_line_exit_2

    from srbinarize.checkpoint import read_metadata
    from srbinarize.cli import main

    e = shared_zoo.entry("team03_fmen")
    folder = shared_zoo.ROOT / e["folder"]
    monkeypatch.syspath_prepend(str(folder))
    source = [str(folder / e["weights"]), "--arch", e["import"]]
    assert main(["inspect", *source, "--input-size", "16", "16"]) == 0
    assert "input range [0, 255] detected" in capsys.readouterr().out
    one_line_exit_2(["convert", *source, "--input-range", "7", "-o", str(tmp_path / "q.safetensors")], capsys,
                    "--input-range", "1 (RGB in [0, 1]) or 255", "7")
    assert not (tmp_path / "q.safetensors").exists()
    out = tmp_path / "q.safetensors"
    assert main(["convert", *source, "--input-range", "255", "-o", str(out), "--set", "spatial_rescale=false"]) == 0
    assert json.loads(read_metadata(str(out))["model"])["input_range"] == 255.0
