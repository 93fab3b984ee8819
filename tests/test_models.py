"""Checkpoint loading: containers, architecture detection from shapes, --arch, clear errors, the zoo."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from srbinarize.models import CheckpointError, load_pretrained, model_scale, zoo_names
from srbinarize.models.zoo import zoo_info


def _edsr(num_feat=16, num_block=3, upscale=2):
    from basicsr.archs.edsr_arch import EDSR

    return EDSR(3, 3, num_feat=num_feat, num_block=num_block, upscale=upscale)


def _msrresnet(upscale):
    from basicsr.archs.srresnet_arch import MSRResNet

    return MSRResNet(3, 3, num_feat=16, num_block=2, upscale=upscale)


def _rcan(upscale):
    from basicsr.archs.rcan_arch import RCAN

    return RCAN(3, 3, num_feat=16, num_group=2, num_block=3, squeeze_factor=4, upscale=upscale)


def _rrdb(scale):
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet(3, 3, scale=scale, num_feat=16, num_block=2, num_grow_ch=8)


def _swinir():
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(upscale=2, img_size=16, window_size=8, embed_dim=24, depths=[2], num_heads=[2],
                  upsampler="pixelshuffledirect")


CASES = {
    "edsr_x2": (lambda: _edsr(upscale=2), "EDSR", {"num_feat": 16, "num_block": 3, "upscale": 2}),
    "edsr_x3": (lambda: _edsr(num_block=2, upscale=3), "EDSR", {"num_block": 2, "upscale": 3}),
    "edsr_x4": (lambda: _edsr(num_feat=8, upscale=4), "EDSR", {"num_feat": 8, "upscale": 4}),
    "msrresnet_x2": (lambda: _msrresnet(2), "MSRResNet", {"upscale": 2, "num_block": 2}),
    "msrresnet_x3": (lambda: _msrresnet(3), "MSRResNet", {"upscale": 3}),
    "msrresnet_x4": (lambda: _msrresnet(4), "MSRResNet", {"upscale": 4}),
    "rcan_x2": (lambda: _rcan(2), "RCAN", {"num_group": 2, "num_block": 3, "squeeze_factor": 4, "upscale": 2}),
    "rrdb_x2": (lambda: _rrdb(2), "RRDBNet", {"scale": 2, "num_block": 2, "num_grow_ch": 8}),
    "rrdb_x4": (lambda: _rrdb(4), "RRDBNet", {"scale": 4, "num_feat": 16}),
}


def _same_output(a, b, size=16):
    x = torch.rand(1, 3, size, size)
    a.eval()
    b.eval()
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_basicsr_architectures_are_detected_from_shapes(tmp_path, case):
    make, cls, expected = CASES[case]
    original = make()
    # a BasicSR training file: params + params_ema (EMA preferred), saved from DataParallel ("module.")
    ema = {f"module.{k}": v + 0.01 for k, v in original.state_dict().items()}
    path = tmp_path / "net_g_latest.pth"
    torch.save({"params": {f"module.{k}": v for k, v in original.state_dict().items()}, "params_ema": ema}, path)
    model, spec = load_pretrained(path)
    assert spec.target.endswith(f":{cls}")
    assert expected.items() <= spec.kwargs.items(), spec.kwargs
    assert torch.equal(model.state_dict()["conv_first.weight"], ema["module.conv_first.weight"])
    original.load_state_dict({k[len("module."):]: v for k, v in ema.items()})
    assert _same_output(model, original)
    assert model_scale(model) == next(v for k, v in expected.items() if k in ("upscale", "scale"))
    assert spec.build().__class__.__name__ == cls  # the spec rebuilds the architecture


def test_plain_state_dict_and_safetensors(tmp_path):
    original = _edsr(upscale=4)
    torch.save(original.state_dict(), tmp_path / "plain.pth")
    save_file(original.state_dict(), str(tmp_path / "weights.safetensors"))
    for name in ("plain.pth", "weights.safetensors"):
        model, spec = load_pretrained(tmp_path / name)
        assert spec.kwargs["upscale"] == 4 and _same_output(model, original)


def test_spandrel_knows_the_rest(tmp_path):
    original = _swinir()
    torch.save({"params": original.state_dict()}, tmp_path / "swinir.pth")
    model, spec = load_pretrained(tmp_path / "swinir.pth")
    assert spec.target.endswith(":SwinIR") and spec.kwargs["embed_dim"] == 24
    assert model_scale(model) == 2 and _same_output(model, original)
    rebuilt = spec.build()  # a JSON-able spec that rebuilds the same architecture
    rebuilt.load_state_dict(model.state_dict())
    assert _same_output(rebuilt, original)
    json.dumps(spec.kwargs)


def test_arch_given_explicitly(tmp_path):
    from basicsr.archs.srvgg_arch import SRVGGNetCompact

    original = SRVGGNetCompact(num_feat=8, num_conv=3, upscale=2)
    torch.save(original.state_dict(), tmp_path / "compact.pth")
    target = "basicsr.archs.srvgg_arch:SRVGGNetCompact"
    model, spec = load_pretrained(tmp_path / "compact.pth", arch=target,
                                  arch_kwargs='{"num_feat": 8, "num_conv": 3, "upscale": 2}')
    assert spec.target == target and _same_output(model, original)
    with pytest.raises(CheckpointError, match=r"does not match .*SRVGGNetCompact.*of another shape"):
        load_pretrained(tmp_path / "compact.pth", arch=target, arch_kwargs={"num_feat": 16, "num_conv": 3})
    with pytest.raises(CheckpointError, match="cannot import"):
        load_pretrained(tmp_path / "compact.pth", arch="no_such_package.mod:Net")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(tmp_path / "compact.pth", arch=target, arch_kwargs="{num_feat: 8")


def test_unknown_architecture_says_how_to_name_it(tmp_path):
    torch.save({"encoder.w": torch.zeros(3, 3), "decoder.w": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"unknown architecture.*--arch package.module:Class"):
        load_pretrained(tmp_path / "odd.pth")


def test_scale_is_measured_and_checked(tmp_path):
    torch.save(_edsr(upscale=4).state_dict(), tmp_path / "x4.pth")
    with pytest.raises(CheckpointError, match=r"is a x4 model .*--scale 2"):
        load_pretrained(tmp_path / "x4.pth", scale=2)
    load_pretrained(tmp_path / "x4.pth", scale=4)


def test_corrupt_and_odd_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_edsr().state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 100)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    st = tmp_path / "model.safetensors"
    save_file(_edsr().state_dict(), str(st))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(st.read_bytes()[:300])
    for path, pattern in ((truncated, "corrupt or truncated"), (junk, "corrupt or truncated"), (empty, "empty"),
                          (bad_st, "corrupt or truncated"), (tmp_path / "absent.pth", "not found")):
        with pytest.raises(CheckpointError, match=pattern):
            load_pretrained(path)
    torch.save(_edsr(), tmp_path / "pickled_module.pth")  # a whole module: never unpickled
    with pytest.raises(CheckpointError, match="state_dict"):
        load_pretrained(tmp_path / "pickled_module.pth")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty_dict.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        load_pretrained(tmp_path / "empty_dict.pth")


@pytest.mark.skipif("edsr-x2" not in zoo_names(), reason="zoo model not built yet")
def test_the_zoo_edsr_is_shipped_with_its_record():
    model, spec = load_pretrained("zoo:edsr-x2")
    assert spec.target == "basicsr.archs.edsr_arch:EDSR" and model_scale(model) == 2
    info = zoo_info("zoo:edsr-x2")
    assert info["scale"] == 2 and info["results"]["Set5"]["psnr_y"] > info["results"]["Set5"]["bicubic_psnr_y"]
    with pytest.raises(ValueError, match="no model 'edsr-x9'"):
        load_pretrained("zoo:edsr-x9")
    if "edsr-x4" in zoo_names():
        model4, _ = load_pretrained("zoo:edsr-x4")
        info4 = zoo_info("zoo:edsr-x4")
        assert model_scale(model4) == 4
        assert info4["results"]["Set5"]["psnr_y"] > info4["results"]["Set5"]["bicubic_psnr_y"]


@pytest.mark.skipif("swinir-x2" not in zoo_names(), reason="zoo model not built yet")
def test_the_zoo_swinir_is_shipped_with_its_record_and_converts():
    import srbinarize
    from srbinarize.layers import ScalesLinear

    model, spec = load_pretrained("zoo:swinir-x2")
    assert spec.target == "basicsr.archs.swinir_arch:SwinIR" and model_scale(model) == 2
    info = zoo_info("zoo:swinir-x2")
    assert info["scale"] == 2 and info["results"]["Set5"]["psnr_y"] > info["results"]["Set5"]["bicubic_psnr_y"] + 1
    binary = srbinarize.convert(model, "scales", calibration_data=torch.rand(2, 3, 16, 16))
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert n_linear > 0 and sum(isinstance(m, ScalesLinear) for m in binary.modules()) == n_linear
    with torch.no_grad():  # a size other than the traced one (multiples of the window, 8)
        assert binary.eval()(torch.rand(1, 3, 24, 40)).shape == (1, 3, 48, 80)
