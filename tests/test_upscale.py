"""Deployment: `srbinarize upscale` / `upscale_file` with an exported SCALES model in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA, edsr
from PIL import Image

import srbinarize
from srbinarize.cli import main
from srbinarize.export.onnx import export_onnx
from srbinarize.export.upscale import ImageError, upscale_array, upscale_file
from srbinarize.runtime import ort_session

LR = DATA / "Set5" / "LR_bicubic" / "X2" / "butterflyx2.png"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = srbinarize.convert(edsr(num_block=1), "scales").eval()
    path = tmp_path_factory.mktemp("onnx") / "edsr.onnx"
    export_onnx(model, path, torch.rand(1, 3, 16, 16))
    return model, path


def test_tiles_with_overlap_equal_the_whole_image(exported):
    model, path = exported
    session = ort_session(path)
    img = np.asarray(Image.open(LR).convert("RGB"), np.float32)[:45, :37].transpose(2, 0, 1) / 255
    whole = upscale_array(session, img, tile=0)
    tiled = upscale_array(session, img, tile=16, overlap=8, progress=False)
    assert tiled.shape == (3, 90, 74)
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    with torch.no_grad():
        ref = model(torch.from_numpy(img)[None])[0].numpy()
    np.testing.assert_allclose(whole, ref, atol=1e-4)
    # Without overlap the tile borders see zero padding instead of their neighbours: the seams differ.
    assert np.abs(upscale_array(session, img, tile=16, overlap=0, progress=False) - whole).max() > 1e-3


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_image_modes(exported, tmp_path, mode):
    _, path = exported
    src = Image.open(LR).convert("RGB").crop((0, 0, 20, 14))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(src.convert("L"), np.uint16) * 257)
    elif mode in ("RGBA", "LA"):
        img = src.convert(mode)
        img.putalpha(Image.linear_gradient("L").resize(src.size))
    else:
        img = src.convert(mode)
    img.save(tmp_path / "in.png")
    out = upscale_file(path, tmp_path / "in.png", tmp_path / "out.png", tile=8, overlap=4, progress=False)
    result = Image.open(out)
    assert result.size == (40, 28)
    expected = {"L": "L", "RGBA": "RGBA", "P": "RGB", "I;16": "I;16", "LA": "LA"}[mode]
    assert result.mode == expected
    if mode == "I;16":  # 16-bit in, 16-bit out, values on the same scale as the 8-bit result
        eight = upscale_file(path, tmp_path / "in.png", tmp_path / "o8.png", progress=False)
        del eight
        grey = Image.open(LR).convert("L").crop((0, 0, 20, 14))
        grey.save(tmp_path / "grey.png")
        ref = np.asarray(Image.open(upscale_file(path, tmp_path / "grey.png", tmp_path / "g.png", progress=False)))
        diff = np.abs(np.asarray(result, np.float64) / 257 - ref)  # 8-bit rounding; a rare threshold flip
        assert diff.mean() < 0.5 and diff.max() < 4
    if mode in ("RGBA", "LA"):
        alpha = np.asarray(result.getchannel("A"), np.float64)
        assert alpha[-1].mean() > alpha[0].mean() + 100  # the vertical gradient survived the upscale
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"


def test_unreadable_image_is_a_clear_error(exported, tmp_path):
    _, path = exported
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"bad\.png: not a readable image"):
        upscale_file(path, bad, tmp_path / "out.png")
    with pytest.raises(ImageError, match="unknown image extension"):
        upscale_file(path, LR, tmp_path / "out.xyz")
    assert main(["upscale", str(path), str(bad), str(tmp_path / "out.png")]) == 2
    assert not (tmp_path / "out.png").exists()


def test_cli_upscale(exported, tmp_path, capsys):
    _, path = exported
    out = tmp_path / "sub" / "butterfly_x2.png"
    assert main(["upscale", str(path), str(LR), str(out), "--tile", "48", "--overlap", "8", "--threads", "1"]) == 0
    assert Image.open(out).size == tuple(2 * s for s in Image.open(LR).size)
    assert "wrote" in capsys.readouterr().out
