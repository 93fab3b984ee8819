"""Deployment: `srbinarize upscale` / `upscale_file` with an exported SCALES model in onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_line_exit_2
from conftest import DATA, edsr
from PIL import Image

import srbinarize
from srbinarize.cli import main
from srbinarize.errors import UsageError
from srbinarize.export.onnx import EXACT, export_onnx
from srbinarize.export.upscale import (
    WHOLE_IMAGE_PIXELS,
    ImageError,
    UpscaleModelError,
    global_nodes,
    upscale_array,
    upscale_file,
)
from srbinarize.runtime import ort_session

LR = DATA / "Set5" / "LR_bicubic" / "X2" / "butterflyx2.png"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = srbinarize.convert(edsr(num_block=1), "scales").eval()
    path = tmp_path_factory.mktemp("onnx") / "edsr.onnx"
    export_onnx(model, path, torch.rand(1, 3, 16, 16), **EXACT)  # compared with the module at 1e-4
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
    with pytest.raises(ImageError, match=r"bad\.png: UnidentifiedImageError.*corrupt or not an image"):
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


# ------------------------------------------------------------------------------ issue 14: safe and exact


# Measured by test_tiling_a_globally_pooling_model_is_bounded (and the module doc of srbinarize.export.upscale).
TILING_BOUND_255 = 4  # measured 3/255 on butterfly at tile 64 / overlap 16
TILING_SHARE = 0.02  # measured 1.3% of the values


def _small() -> Image.Image:
    """A 20x14 RGB photo crop (a synthetic picture when ../shared/data is absent)."""
    if LR.is_file():
        return Image.open(LR).convert("RGB").crop((0, 0, 20, 14))
    y, x = np.mgrid[0:14, 0:20]
    rgb = np.stack([np.sin(x / 3.0 + c) * np.cos(y / 2.0 - c) for c in range(3)], axis=2)
    return Image.fromarray(np.clip(127 + 100 * rgb, 0, 255).astype(np.uint8))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}



def test_16bit_colour_in_gives_16bit_out(exported, tmp_path):
    import cv2

    _, path = exported
    rgb = np.asarray(_small(), np.uint16) * 257 + 100
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1])
    rgba = np.concatenate([rgb, np.full((14, 20, 1), 40000, np.uint16)], axis=2)
    cv2.imwrite(str(tmp_path / "rgba16.png"), rgba[..., [2, 1, 0, 3]])
    Image.fromarray(np.round(rgb / 257).astype(np.uint8)).save(tmp_path / "rgb8.png")
    ref8 = np.asarray(Image.open(upscale_file(path, tmp_path / "rgb8.png", tmp_path / "o8.png", progress=False)))
    for name in ("rgb16", "rgba16"):
        out = cv2.imread(str(upscale_file(path, tmp_path / f"{name}.png", tmp_path / f"o_{name}.png",
                                          progress=False)), cv2.IMREAD_UNCHANGED)
        assert out.dtype == np.uint16 and out.shape == (28, 40, 3 if name == "rgb16" else 4)
        colour = out[..., 2::-1].astype(np.float64)
        assert len(np.unique(colour % 257)) > 10  # real 16-bit values, not 8-bit ones scaled up
        diff = np.abs(colour / 257 - ref8)
        assert diff.mean() < 1.0 and diff.max() < 6  # same picture as the 8-bit run
        if name == "rgba16":
            assert np.abs(out[..., 3].astype(int) - 40000).max() <= 1
    # a format without 16 bits gets the nearest 8-bit levels
    jpg = Image.open(upscale_file(path, tmp_path / "rgb16.png", tmp_path / "o.jpg", progress=False))
    assert jpg.mode == "RGB" and jpg.size == (40, 28)


def test_small_images_run_whole_and_equal_the_model(exported):
    """The default (tile=None) runs an image up to WHOLE_IMAGE_PIXELS in one piece: equal to the module."""
    model, path = exported
    session = ort_session(path)
    img = np.asarray(Image.open(LR).convert("RGB"), np.float32)[:61, :70].transpose(2, 0, 1) / 255
    assert img.shape[1] * img.shape[2] <= WHOLE_IMAGE_PIXELS
    with torch.no_grad():
        ref = model(torch.from_numpy(img)[None])[0].numpy()
    np.testing.assert_allclose(upscale_array(session, img), ref, atol=1e-4)
    assert global_nodes(path), "SCALES pools its channel re-scaling over the whole image"
    with pytest.warns(UserWarning, match="pools over the whole image"):
        upscale_array(session, img, tile=32, overlap=8, progress=False, global_ops=global_nodes(path))


@pytest.mark.skipif(not (DATA / "Set5").is_dir(), reason="../shared/data not present")
def test_tiling_a_globally_pooling_model_is_bounded(tmp_path):
    """The bound the module doc states: zoo EDSR x2 + SCALES, Set5 LR x2 butterfly, tiles 64 / overlap 16."""
    from srbinarize.models import load_pretrained

    model, _ = load_pretrained("zoo:edsr-x2")
    binary = srbinarize.convert(model, "scales").eval()
    export_onnx(binary, tmp_path / "zoo.onnx", torch.rand(1, 3, 32, 32))
    session = ort_session(tmp_path / "zoo.onnx")
    img = np.asarray(Image.open(LR).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    whole = upscale_array(session, img, tile=0, dtype=np.uint8).astype(int)
    with pytest.warns(UserWarning, match="pools over the whole image"):
        tiled = upscale_array(session, img, tile=64, overlap=16, progress=False, dtype=np.uint8,
                              global_ops=global_nodes(tmp_path / "zoo.onnx")).astype(int)
    diff = np.abs(whole - tiled)
    assert diff.max() <= TILING_BOUND_255 and (diff > 0).mean() <= TILING_SHARE


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width x height`` (valid CRC), then an empty IDAT and IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_image_size_limit_and_the_flag_that_raises_it(exported, tmp_path, capsys):
    _, path = exported
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageError, match=r"bomb\.png is 100000x100000 \(10000\.0 megapixels\), above the limit.*"
                                         r"--max-pixels"):
        upscale_file(path, tmp_path / "bomb.png", tmp_path / "out.png", progress=False)
    one_line_exit_2(["upscale", str(path), str(tmp_path / "bomb.png"), str(tmp_path / "out.png")], capsys,
                     "bomb.png", "above the limit")
    _small().save(tmp_path / "small.png")
    one_line_exit_2(["upscale", str(path), str(tmp_path / "small.png"), str(tmp_path / "out.png"),
                      "--max-pixels", "100"], capsys, "20x14", "--max-pixels")
    assert not (tmp_path / "out.png").exists()
    assert main(["upscale", str(path), str(tmp_path / "small.png"), str(tmp_path / "out.png"),
                 "--max-pixels", "280"]) == 0
    assert Image.open(tmp_path / "out.png").size == (40, 28)


def _onnx_model(tmp_path: Path, name: str, nodes, c_in: int = 3, c_out: int = 3) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, None, None])
    graph = helper.make_graph(nodes, name, [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, str(path))
    return path


def test_a_model_that_is_not_super_resolution_is_refused(tmp_path, capsys):
    from onnx import helper

    _small().save(tmp_path / "in.png")
    identity = _onnx_model(tmp_path, "identity", [helper.make_node("Identity", ["x"], ["y"])])
    grey = _onnx_model(tmp_path, "to_grey", [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Concat", ["m", "m", "m", "m"], ["m4"], axis=1),
        helper.make_node("DepthToSpace", ["m4"], ["y"], blocksize=2),
    ], c_out=1)
    four = _onnx_model(tmp_path, "four", [helper.make_node("Identity", ["x"], ["y"])], c_in=4, c_out=4)
    cases = {identity: "maps 16x16 to 16x16: not a super-resolution model",
             grey: "maps 3-channel images to 1 channels", four: "4-channel inputs"}
    for model, message in cases.items():
        with pytest.raises(UpscaleModelError, match=rf"{model.name}: .*{message}"):
            upscale_file(model, tmp_path / "in.png", tmp_path / "out.png", progress=False)
        one_line_exit_2(["upscale", str(model), str(tmp_path / "in.png"), str(tmp_path / "out.png")], capsys,
                         message, str(model))
    nan = _onnx_model(tmp_path, "nan", [
        helper.make_node("Constant", [], ["z"], value_float=0.0),
        helper.make_node("Div", ["z", "z"], ["n"]),
        helper.make_node("Constant", [], ["sc"], value_floats=[1.0, 1.0, 2.0, 2.0]),
        helper.make_node("Resize", ["x", "", "sc"], ["r"], mode="nearest"),
        helper.make_node("Mul", ["r", "n"], ["y"]),
    ])
    with pytest.raises(UpscaleModelError, match=r"nan\.onnx: the model gave NaN or infinite values"):
        upscale_file(nan, tmp_path / "in.png", tmp_path / "out.png", progress=False)
    assert not (tmp_path / "out.png").exists()


def test_unreadable_onnx_files_are_one_message(exported, tmp_path, capsys):
    _, path = exported
    _small().save(tmp_path / "in.png")
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    cases = {"empty.onnx": b"", "truncated.onnx": data[: len(data) // 2], "random.onnx": rng.bytes(4096),
             "text.onnx": b"not a model\n"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UpscaleModelError, match=name.replace(".", r"\.")):
            upscale_file(tmp_path / name, tmp_path / "in.png", tmp_path / "out.png", progress=False)
        one_line_exit_2(["upscale", str(tmp_path / name), str(tmp_path / "in.png"), str(tmp_path / "out.png")],
                         capsys, name)
    one_line_exit_2(["upscale", str(tmp_path / "absent.onnx"), str(tmp_path / "in.png"), str(tmp_path / "o.png")],
                     capsys, "absent.onnx")
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "o.png").exists()


def test_bad_tiling_values_are_one_message(exported, tmp_path, capsys):
    _, path = exported
    _small().save(tmp_path / "in.png")
    before = _files(tmp_path)
    for flag, value, needle in (("--overlap", "-1", "overlap must be >= 0"), ("--tile", "-2", "tile must be >= 0"),
                                ("--threads", "-1", "threads must be >= 0")):
        one_line_exit_2(["upscale", str(path), str(tmp_path / "in.png"), str(tmp_path / "out.png"), flag, value],
                         capsys, needle, value)
    assert _files(tmp_path) == before


def test_nan_input_is_refused(exported, tmp_path, capsys):
    _, path = exported
    img = np.full((14, 20), 0.5, np.float32)
    img[3, 4] = np.nan
    Image.fromarray(img, "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match=r"nan\.tif holds NaN"):
        upscale_file(path, tmp_path / "nan.tif", tmp_path / "out.png", progress=False)
    one_line_exit_2(["upscale", str(path), str(tmp_path / "nan.tif"), str(tmp_path / "out.png")], capsys, "NaN")
    with pytest.raises(ImageError, match="NaN or infinite"):
        upscale_array(ort_session(path), np.full((3, 8, 8), np.nan, np.float32))
    assert not (tmp_path / "out.png").exists()


def test_upscale_never_writes_onto_its_inputs(exported, tmp_path, capsys):
    _, onnx_src = exported
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx_src.read_bytes())
    _small().save(tmp_path / "s.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "s.png")
    os.link(tmp_path / "s.png", tmp_path / "hard.png")
    before = _files(tmp_path)
    for out, role in ((tmp_path / "s.png", "input image"), (tmp_path / "sub" / ".." / "s.png", "input image"),
                      (tmp_path / "link.png", "input image"), (tmp_path / "hard.png", "input image"),
                      (model, "model")):
        one_line_exit_2(["upscale", str(model), str(tmp_path / "s.png"), str(out)], capsys, str(out), role)
        with pytest.raises(UsageError, match="would be overwritten"):
            upscale_file(model, tmp_path / "s.png", out, progress=False)
    one_line_exit_2(["upscale", str(model), str(tmp_path / "s.png"), str(tmp_path / "sub")], capsys,
                     "is an existing folder")
    assert _files(tmp_path) == before and not list(tmp_path.glob(".*.tmp"))
