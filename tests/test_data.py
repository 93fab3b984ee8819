"""Image reading, training patches and benchmark folders: conversions, determinism, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA
from PIL import Image

from srbinarize.train.data import (
    DataError,
    EvalSet,
    TrainPatches,
    decode_image,
    downsample,
    matlab_downsample,
    patch_loader,
    read_image,
)


def _photo(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth colour image (bicubic-friendly) with some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 7.0 + c) * np.cos(y / 5.0 - c) for c in range(3)], axis=2)
    img = 127 + 100 * base + rng.normal(0, 5, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def hr_dir(tmp_path):
    folder = tmp_path / "HR"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_photo(64 + 8 * i, 80, seed=i)).save(folder / f"img{i}.png")
    return tmp_path


# ------------------------------------------------------------------------------------------------ reading


def test_greyscale_rgba_palette_are_converted(tmp_path):
    rgb = _photo()
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(tmp_path / "pal.png")

    grey = read_image(tmp_path / "grey.png")
    assert grey.shape == (*rgb.shape[:2], 3) and grey.dtype == np.uint8
    assert np.array_equal(grey[..., 0], rgb[..., 0]) and np.array_equal(grey[..., 0], grey[..., 2])
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, colours kept
    pal = read_image(tmp_path / "pal.png")
    assert pal.shape == rgb.shape and np.abs(pal.astype(int) - rgb.astype(int)).mean() < 30


def test_16bit_images_keep_their_precision(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(20, 30, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    grey16 = rng.integers(0, 65536, size=(20, 30), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")

    out = read_image(tmp_path / "rgb16.png")
    assert out.dtype == np.uint16 and np.array_equal(out, rgb16)
    g = read_image(tmp_path / "grey16.png")
    assert g.dtype == np.uint16 and np.array_equal(g[..., 1], grey16)
    # and they train: the LR of a 16-bit image is 8-bit, within a level of the LR of its 8-bit rounding
    lr16 = matlab_downsample(out[:16, :16], 2)
    lr8 = matlab_downsample(np.round(out[:16, :16] / 257).astype(np.uint8), 2)
    assert lr16.dtype == np.uint8 and np.abs(lr16.astype(int) - lr8.astype(int)).max() <= 1


def test_corrupt_and_missing_files_are_named(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_photo()).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all" * 10)
    for path in (truncated, junk):
        with pytest.raises(DataError, match=path.name):
            read_image(path)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "absent.png")


def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_size_limit_is_read_from_the_header(tmp_path):
    """A header claiming 100000x100000 is one DataError (not Pillow's DecompressionBombError), before decoding."""
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(DataError, match=r"bomb\.png is 100000x100000 \(10000\.0 megapixels\), above the limit"):
        read_image(tmp_path / "bomb.png")
    Image.fromarray(_photo(20, 30)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"30x20 \(600 pixels\), above the limit of 599 pixels; raise it"):
        decode_image(tmp_path / "small.png", max_pixels=599, limit_hint="raise it")
    assert decode_image(tmp_path / "small.png", max_pixels=600).pixels.shape == (20, 30, 3)
    assert read_image(tmp_path / "small.png", max_pixels=None).shape == (20, 30, 3)


def test_decode_keeps_channels_alpha_and_16_bits(tmp_path):
    import cv2

    rng = np.random.default_rng(1)
    rgba16 = rng.integers(0, 65536, size=(12, 9, 4), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgba16.png"), rgba16[..., [2, 1, 0, 3]])
    d = decode_image(tmp_path / "rgba16.png")
    assert d.pixels.dtype == np.uint16 and np.array_equal(d.pixels, rgba16[..., :3])
    assert np.array_equal(d.alpha, rgba16[..., 3])
    la = np.stack([_photo(12, 9)[..., 0], np.full((12, 9), 77, np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    d = decode_image(tmp_path / "la.png")
    assert d.grey and d.pixels.dtype == np.uint8 and np.array_equal(d.pixels[..., 0], la[..., 0])
    assert np.array_equal(d.alpha, la[..., 1])
    grey16 = rng.integers(0, 65536, size=(12, 9), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.tif")
    d = decode_image(tmp_path / "grey16.tif")
    assert d.grey and np.array_equal(d.pixels[..., 0], grey16) and d.alpha is None


def test_float_images_with_nan_are_refused(tmp_path):
    img = np.full((6, 5), 0.25, np.float32)
    Image.fromarray(img, "F").save(tmp_path / "ok.tif")
    assert np.all(read_image(tmp_path / "ok.tif") == round(0.25 * 65535))
    img[2, 2] = np.nan
    Image.fromarray(img, "F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan\.tif holds NaN"):
        read_image(tmp_path / "nan.tif")


def test_empty_folder_and_small_images(tmp_path, hr_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        TrainPatches(empty, 2, 16)
    with pytest.raises(DataError, match="folder not found"):
        TrainPatches(tmp_path / "absent", 2, 16)
    with pytest.raises(DataError, match=r"smaller than the HR patch 96x96.*--patch"):
        TrainPatches(hr_dir, 2, 48)  # the 64-pixel-high image cannot give a 96-pixel HR patch
    TrainPatches(hr_dir, 2, 32)  # but a 64-pixel patch is fine


# ------------------------------------------------------------------------------------------------ patches


def test_patches_are_a_function_of_seed_and_index(hr_dir):
    data = TrainPatches(hr_dir, 2, 16, seed=3)
    lr, hr = data[5]
    assert lr.shape == (3, 16, 16) and hr.shape == (3, 32, 32) and lr.dtype == torch.float32
    assert torch.equal(data[5][0], lr) and torch.equal(data[5][1], hr)
    assert not torch.equal(data[6][1], hr)
    assert not torch.equal(TrainPatches(hr_dir, 2, 16, seed=4)[5][1], hr)
    # LR values are 8-bit levels, as the benchmark LR files
    assert torch.allclose(lr * 255, torch.round(lr * 255), atol=1e-4)


def test_lr_and_hr_are_augmented_together(hr_dir):
    data = TrainPatches(hr_dir, 2, 24, seed=0)
    seen_transposed = False
    for i in range(24):
        lr, hr = data[i]
        hr_np = np.round(hr.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        again = downsample(hr_np, 2).astype(np.float32) / 255
        # away from the patch border (the kernel reaches 3 LR pixels) the LR is the HR patch downsampled
        err = np.abs(again[3:-3, 3:-3] - lr.permute(1, 2, 0).numpy()[3:-3, 3:-3]).max()
        assert err <= 1.5 / 255, (i, err)
        seen_transposed |= not np.allclose(hr_np, np.round(data.hr[0][: 48, : 48]))
    assert seen_transposed


def test_paired_lr_folders(tmp_path, hr_dir):
    lr_dir = tmp_path / "LR"
    lr_dir.mkdir()
    for p in sorted((hr_dir / "HR").glob("*.png")):
        Image.fromarray(downsample(read_image(p), 2)).save(lr_dir / f"{p.stem}x2.png")
    paired = TrainPatches(hr_dir, 2, 16, seed=1, lr_dirs=[lr_dir])
    fly = TrainPatches(hr_dir, 2, 16, seed=1)
    for i in range(4):
        assert torch.equal(paired[i][1], fly[i][1])
        assert (paired[i][0] - fly[i][0]).abs().max() < 1e-6  # the same MATLAB-style LR, from file or on the fly
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(lr_dir / "img0x2.png")
    with pytest.raises(DataError, match=r"img0x2.png is 5x5, expected 40x32"):
        TrainPatches(hr_dir, 2, 16, lr_dirs=[lr_dir])


def test_loader_batches_follow_the_global_sample_index(hr_dir):
    data = TrainPatches(hr_dir, 2, 16, seed=0)
    from_start = list(patch_loader(data, 3, start_step=0, steps=4, workers=0))
    resumed = list(patch_loader(data, 3, start_step=2, steps=2, workers=2))
    assert len(from_start) == 4 and len(resumed) == 2
    for a, b in zip(from_start[2:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------- eval sets


@pytest.mark.skipif(not (DATA / "Set5").is_dir(), reason="../shared/data not present")
def test_eval_set_uses_the_given_lr_files():
    es = EvalSet.load(DATA / "Set5", 4)
    assert es.name == "Set5" and len(es.images) == 5 and "files" in es.lr_source
    for im in es.images:
        assert im.hr.shape[0] == 4 * im.lr.shape[0] and im.hr.shape[1] == 4 * im.lr.shape[1]


def test_eval_set_without_lr_files_and_with_bad_ones(tmp_path, hr_dir):
    es = EvalSet.load(hr_dir, 2)
    assert "bicubic" in es.lr_source and es.images[0].lr.shape == (32, 40, 3)
    lr = tmp_path / "LR_bicubic" / "X2"
    lr.mkdir(parents=True)
    with pytest.raises(DataError, match=r"no LR image for img0\.png"):
        EvalSet.load(hr_dir, 2)
    for i, p in enumerate(sorted((hr_dir / "HR").glob("*.png"))):
        size = (10, 10, 3) if i == 1 else (read_image(p).shape[0] // 2, read_image(p).shape[1] // 2, 3)
        Image.fromarray(np.zeros(size, np.uint8)).save(lr / f"{p.stem}x2.png")
    with pytest.raises(DataError, match=r"img1x2\.png is 10x10"):
        EvalSet.load(hr_dir, 2)
