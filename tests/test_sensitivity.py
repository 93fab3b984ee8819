"""Per-layer sensitivity and mixed precision on a tiny EDSR (x2, 8 features, 16x16 crops)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import edsr
from safetensors.torch import save_file

import srbinarize
from srbinarize.analysis import calibration_crops, choose_keep_fp, crops_psnr, sensitivity
from srbinarize.cli import main
from srbinarize.errors import SrbinarizeError
from srbinarize.recipe import load_recipe

BODY = ["body.0.conv1", "body.0.conv2", "body.1.conv1", "body.1.conv2", "conv_after_body"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = edsr(num_block=2, num_feat=8, upscale=2).eval()
    crops = calibration_crops(None, scale=2, count=2, size=16)
    cal = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, crops, cal, sensitivity(model, "scales", crops, calibration_data=cal)


def _body_binary_share(model) -> float:
    table = srbinarize.summary(model, input_size=(16, 16))
    body = [s for s in table.layers if s.row.role == "body"]
    return sum(s.macs for s in body if s.quantized) / sum(s.macs for s in body)


def test_drops_match_converting_one_layer_alone(setup):
    model, crops, cal, report = setup
    assert [s.name for s in report.layers] == BODY
    assert all(math.isfinite(s.drop) for s in report.layers)
    assert report.fp_psnr == pytest.approx(crops_psnr(model, crops), abs=1e-9)
    full = srbinarize.convert(model, "scales", calibration_data=cal)
    assert report.converted_psnr == pytest.approx(crops_psnr(full, crops), abs=1e-9)
    assert report.converted_psnr < report.fp_psnr
    for layer in report.layers:
        alone = srbinarize.convert(model, "scales", calibration_data=cal, keep_fp=[n for n in BODY if n != layer.name])
        assert report.fp_psnr - crops_psnr(alone, crops) == pytest.approx(layer.drop, abs=1e-6), layer.name
        fp_alone = srbinarize.convert(model, "scales", calibration_data=cal, keep_fp=[layer.name])
        assert crops_psnr(fp_alone, crops) - report.converted_psnr == pytest.approx(layer.gain, abs=1e-6), layer.name
    assert all(math.isfinite(s.gain) for s in report.layers)
    assert 30 < report.bicubic_psnr < 60  # x2 bicubic of photos (the untrained tiny model is far below it)
    # MAC shares and OPs come from the summary of the full conversion.
    stats = {s.row.name: s for s in srbinarize.summary(full, input_size=(16, 16)).layers}
    for layer in report.layers:
        assert layer.macs == stats[layer.name].macs > 0
        assert layer.speedup == pytest.approx(stats[layer.name].macs / (stats[layer.name].bops / 64 +
                                                                          stats[layer.name].flops))
        assert layer.speedup > 1
    assert report.target_macs == sum(s.macs for s in stats.values() if s.row.role == "body")
    assert report.binary_macs == report.target_macs  # every body conv of EDSR is replaced


def test_keep_fp_layers_stay_fp(setup):
    model, _crops, cal, _report = setup
    kept = ["body.0.conv2", "conv_after_body"]
    mixed = srbinarize.convert(model, "scales", calibration_data=cal, keep_fp=kept)
    rows = {s.row.name: s for s in srbinarize.summary(mixed).layers}
    for name in BODY:
        assert rows[name].quantized == (name not in kept), name
    assert "keep_fp" in rows["conv_after_body"].row.note
    assert load_recipe("scales").with_overrides(keep_fp=kept).targets.keep_fp == tuple(kept)
    with pytest.raises(SrbinarizeError, match=r"body\.9\.conv1"):
        srbinarize.convert(model, "scales", calibration_data=cal, keep_fp=["body.9.conv1"])


@pytest.mark.parametrize("by", ["gain", "drop"])
def test_binary_share_choice_is_met_by_the_conversion(setup, by):
    model, _crops, cal, report = setup
    choice = choose_keep_fp(report, binary_share=0.6, by=by)
    # Five equal convs: 0.6 binary leaves room for the two with the largest measure.
    top = sorted(report.layers, key=lambda s: -getattr(s, by))[:2]
    assert set(choice.keep_fp) == {s.name for s in top if getattr(s, by) > 0}
    mixed = srbinarize.convert(model, "scales", calibration_data=cal, keep_fp=choice.keep_fp)
    assert _body_binary_share(mixed) >= 0.6
    assert choice.binary_share == pytest.approx(_body_binary_share(mixed))
    assert choice.met
    if by == "gain":
        full = report.fp_psnr - report.converted_psnr
        assert choice.estimated_drop == pytest.approx(full - sum(s.gain for s in top if s.gain > 0))
    else:
        assert choice.estimated_drop == pytest.approx(sum(s.drop for s in report.layers) - sum(s.drop for s in top))
    assert choose_keep_fp(report, binary_share=1.0).keep_fp == []
    assert choice.set_argument() == "keep_fp=[" + ", ".join(choice.keep_fp) + "]"


def test_target_speedup_choice_is_met_by_the_conversion(setup):
    model, _crops, cal, report = setup
    full = srbinarize.summary(srbinarize.convert(model, "scales", calibration_data=cal), input_size=(16, 16))
    reachable = full.ops_before / full.ops_after
    choice = report.keep_fp(target_speedup=0.8 * reachable, by="drop")  # gains of this untrained model may all be <= 0
    assert 0 < len(choice.keep_fp) < len(BODY)
    table = srbinarize.summary(srbinarize.convert(model, "scales", calibration_data=cal, keep_fp=choice.keep_fp),
                               input_size=(16, 16))
    assert table.ops_before / table.ops_after == pytest.approx(choice.speedup)
    assert choice.speedup >= 0.8 * reachable
    with pytest.raises(SrbinarizeError, match="speed-up"):
        report.keep_fp(target_speedup=1.01 * reachable)


def test_max_drop_choice(setup):
    _model, _crops, _cal, report = setup
    positive = {s.name for s in report.layers if s.drop > 0}
    assert set(choose_keep_fp(report, max_drop=0.0, by="drop").keep_fp) == positive
    smallest = min(s.drop for s in report.layers)
    choice = report.keep_fp(max_drop=sum(s.drop for s in report.layers) - smallest / 2, by="drop")
    assert choice.met and len(choice.keep_fp) == 1
    capped = report.keep_fp(binary_share=0.75, max_drop=0.0, by="drop")  # the share allows one layer FP
    assert len(capped.keep_fp) == 1 and not capped.met
    full = report.fp_psnr - report.converted_psnr
    assert report.keep_fp(max_drop=full).keep_fp == []  # by gain: the full conversion already meets it
    for bad in ({}, {"binary_share": 1.5}, {"max_drop": -1.0}, {"max_drop": 1.0, "by": "size"}):
        with pytest.raises(SrbinarizeError):
            choose_keep_fp(report, **bad)


def test_linked_recipe_marks_layers_it_cannot_measure_alone():
    torch.manual_seed(0)
    model = edsr(num_block=2, num_feat=8, upscale=2).eval()
    report = sensitivity(model, "bam", crops=1, crop_size=16, calibration_data=torch.rand(2, 3, 16, 16))
    linked = [s for s in report.layers if not math.isfinite(s.drop)]
    assert linked and all("not measured alone" in s.note and not math.isfinite(s.gain) for s in linked)
    for by in ("gain", "drop"):
        assert not set(report.keep_fp(max_drop=0.0, by=by).keep_fp) & {s.name for s in linked}


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_edsr.safetensors"
    save_file(edsr(num_block=2, num_feat=8, upscale=2).state_dict(), str(ckpt))
    prefix = tmp_path / "out" / "rep"
    rc = main(["inspect", "--sensitivity", str(ckpt), "--crops", "2", "--crop-size", "16",
               "--binary-share", "0.6", "--threads", "1", "-o", str(prefix)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "conv_after_body" in out and "--set 'keep_fp=[" in out
    assert (tmp_path / "out" / "rep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "out" / "rep.json").read_text())
    assert [row["name"] for row in record["layers"]] == BODY
    assert record["mixed"][0]["binary_share"] >= 0.6
    mixed = load_recipe(tmp_path / "out" / "rep_mixed.yaml")
    assert list(mixed.targets.keep_fp) == record["mixed"][0]["keep_fp"] and mixed.name == "scales-mixed"
    assert mixed.layers == load_recipe("scales").layers
    md = (tmp_path / "out" / "rep.md").read_text()
    assert "srbinarize inspect --sensitivity" in md and "| body.0.conv1 |" in md
    assert main(["inspect", "--sensitivity", str(ckpt), "--crop-size", "4000"]) == 2  # crop larger than images


def test_convert_cli_takes_keep_fp(tmp_path):
    from srbinarize.checkpoint import load_model

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_edsr.safetensors"
    save_file(edsr(num_block=2, num_feat=8, upscale=2).state_dict(), str(ckpt))
    out = tmp_path / "mixed.safetensors"
    assert main(["convert", str(ckpt), "--set", "keep_fp=[body.0.conv1, conv_after_body]", "-o", str(out)]) == 0
    rows = {s.row.name: s for s in srbinarize.summary(load_model(out)).layers}
    assert {n for n in BODY if not rows[n].quantized} == {"body.0.conv1", "conv_after_body"}
