"""Fuzz every reader with random bytes, truncated and byte-flipped copies of real files (seeded, bounded).

Each reader either reads the file (a flipped byte inside tensor data or pixels is still a valid file) or raises
one `SrbinarizeError`; never another exception, and never a file written.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import srbinarize
from srbinarize.checkpoint import load_model, read_metadata, save_model
from srbinarize.errors import SrbinarizeError
from srbinarize.export.upscale import upscale_file
from srbinarize.models import load_pretrained, read_state_dict
from srbinarize.models.spec import ModelSpec
from srbinarize.models.zoo import save_fp_model
from srbinarize.recipe import recipe_dir
from srbinarize.runtime import OnnxModelError
from srbinarize.train.data import decode_image, read_image

SEED = 14
SPEC = ModelSpec("basicsr.archs.edsr_arch:EDSR", {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1,
                                                   "upscale": 2})


def _picture(h: int = 24, w: int = 20) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([np.sin(x / 3.0 + c) * np.cos(y / 2.0 - c) for c in range(3)], axis=2)
    return np.clip(127 + 100 * rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    """Real files of every kind a reader takes, as bytes."""
    root = tmp_path_factory.mktemp("originals")
    torch.manual_seed(0)
    fp = SPEC.build().eval()
    converted = srbinarize.convert(fp, "scales").eval()
    save_model(converted, root / "conv.safetensors", SPEC)
    torch.save({"params": fp.state_dict()}, root / "fp.pth")
    save_fp_model(fp, SPEC, root / "fp.safetensors", dtype=torch.float32)
    srbinarize.export_onnx(converted, root / "m.onnx", torch.rand(1, 3, 16, 16))
    out = {
        "safetensors": (root / "conv.safetensors").read_bytes(),
        "pth": (root / "fp.pth").read_bytes(),
        "fp_safetensors": (root / "fp.safetensors").read_bytes(),
        "yaml": (recipe_dir() / "scales.yaml").read_bytes(),
        "onnx": (root / "m.onnx").read_bytes(),
    }
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(_picture()).save(buf, format=fmt)
        out[fmt.lower()] = buf.getvalue()
    return out


def _variants(data: bytes, rng: np.random.Generator, n_trunc: int, n_flip: int, n_random: int) -> list[bytes]:
    """Truncations (incl. empty and one byte short), copies with a few bytes changed, and random bytes."""
    cuts = {0, 1, len(data) - 1, *rng.integers(1, len(data), n_trunc).tolist()}
    out = [data[:c] for c in sorted(cuts)]
    for _ in range(n_flip):
        b = bytearray(data)
        for pos in rng.integers(0, len(b), int(rng.integers(1, 8))):
            b[pos] = int(rng.integers(0, 256))
        out.append(bytes(b))
    out += [rng.bytes(int(rng.integers(1, 4096))) for _ in range(n_random)]
    out.append(data[:8] + rng.bytes(64))  # a valid signature / header length, then garbage
    return out


def _fuzz(tmp_path: Path, suffix: str, variants: list[bytes], read: Callable[[Path], object]) -> dict[str, int]:
    """Feed each variant through ``read``; only success or a SrbinarizeError is allowed, and no new file."""
    folder = tmp_path / "fuzz"
    folder.mkdir(parents=True)
    counts = {"read": 0, "refused": 0}
    for i, data in enumerate(variants):
        path = folder / f"case{i}{suffix}"
        path.write_bytes(data)
        try:
            read(path)
            counts["read"] += 1
        except SrbinarizeError as err:
            assert str(err).strip(), i
            counts["refused"] += 1
        except Exception as err:
            pytest.fail(f"case {i} ({len(data)} bytes) of {suffix}: {type(err).__name__}: {err}")
        path.unlink()
        left = list(folder.iterdir())
        assert not left, f"case {i} of {suffix} wrote {left}"
    return counts


def test_checkpoint_readers(originals, tmp_path):
    rng = np.random.default_rng(SEED)
    st = _variants(originals["safetensors"], rng, 30, 12, 20)
    counts = _fuzz(tmp_path / "a", ".safetensors", st, load_model)
    counts_meta = _fuzz(tmp_path / "b", ".safetensors", st, read_metadata)
    counts_fp = _fuzz(tmp_path / "c", ".safetensors", _variants(originals["fp_safetensors"], rng, 20, 12, 10),
                      load_pretrained)
    pth = _variants(originals["pth"], rng, 30, 12, 20)
    counts_pth = _fuzz(tmp_path / "d", ".pth", pth, read_state_dict)
    counts_pth_fp = _fuzz(tmp_path / "e", ".pth", pth[::3], load_pretrained)
    for c in (counts, counts_meta, counts_fp, counts_pth, counts_pth_fp):
        assert c["refused"] > 0
    assert counts["refused"] >= 50  # truncations and random bytes are all refused


def test_recipe_reader(originals, tmp_path):
    rng = np.random.default_rng(SEED + 1)
    variants = _variants(originals["yaml"], rng, 40, 30, 20)
    variants += [b"layers: [1, 2", b"\xff\xfe\x00bad utf-8", b"- a\n- b\n", b"name: 3\nlayers: {}\n", b"{}"]
    counts = _fuzz(tmp_path, ".yaml", variants, srbinarize.load_recipe)
    assert counts["refused"] >= 60


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_image_readers(originals, tmp_path, fmt):
    rng = np.random.default_rng(SEED + 2)
    variants = _variants(originals[fmt], rng, 40, 30, 20)
    counts = _fuzz(tmp_path / "a", f".{fmt}", variants, read_image)
    _fuzz(tmp_path / "b", f".{fmt}", variants[::2], lambda p: decode_image(p, max_pixels=10_000))
    assert counts["refused"] >= 40


def test_onnx_reader_of_upscale(originals, tmp_path):
    rng = np.random.default_rng(SEED + 3)
    image = tmp_path / "in.png"
    Image.fromarray(_picture(10, 12)).save(image)
    out = tmp_path / "out" / "o.png"
    # truncations and random bytes only: onnxruntime trusts the structure of a well-formed graph it loads
    variants = _variants(originals["onnx"], rng, 40, 0, 20)

    def upscale(path: Path) -> None:
        upscale_file(path, image, out, progress=False)
        out.unlink()

    counts = _fuzz(tmp_path, ".onnx", variants, upscale)
    assert counts["refused"] >= 55 and not out.exists()


def test_onnx_reader_of_ort_session(originals, tmp_path):
    rng = np.random.default_rng(SEED + 4)
    variants = [b"", *_variants(originals["onnx"], rng, 20, 0, 10)]
    counts = _fuzz(tmp_path / "a", ".onnx", variants, srbinarize.ort_session)
    assert counts["refused"] >= 30
    with pytest.raises(OnnxModelError, match="the model bytes: not a loadable ONNX model"):
        srbinarize.ort_session(rng.bytes(256))
    with pytest.raises(OnnxModelError, match=r"absent\.onnx: no such model file"):
        srbinarize.ort_session(tmp_path / "absent.onnx")


def test_the_command_line_over_broken_files(originals, tmp_path, capsys):
    """The same files through the commands: exit 0 or 2 with one line, never a traceback or a stray file."""
    from srbinarize.cli import main

    rng = np.random.default_rng(SEED + 4)
    image = tmp_path / "in.png"
    Image.fromarray(_picture(10, 12)).save(image)
    good_onnx = tmp_path / "good.onnx"
    good_onnx.write_bytes(originals["onnx"])
    fp = tmp_path / "fp.pth"
    fp.write_bytes(originals["pth"])
    folder = tmp_path / "cases"
    folder.mkdir()
    out = tmp_path / "out"
    plans = [
        ("safetensors", ".safetensors", lambda f: ["inspect", str(f), "--input-size", "16", "16"]),
        ("safetensors", ".safetensors", lambda f: ["export", str(f), "-o", str(out / "m.onnx")]),
        ("pth", ".pth", lambda f: ["convert", str(f), "-o", str(out / "c.safetensors")]),
        ("yaml", ".yaml", lambda f: ["convert", str(fp), "--recipe", str(f), "-o", str(out / "c.safetensors")]),
        ("png", ".png", lambda f: ["upscale", str(good_onnx), str(f), str(out / "o.png")]),
        ("onnx", ".onnx", lambda f: ["upscale", str(f), str(image), str(out / "o.png")]),
    ]
    for kind, suffix, argv in plans:
        for i, data in enumerate(_variants(originals[kind], rng, 5, 2, 3)):
            path = folder / f"case{i}{suffix}"
            path.write_bytes(data)
            code = main(argv(path))
            err = capsys.readouterr().err.strip()
            assert code in (0, 2), (kind, i, code, err)
            if code == 2:
                assert len(err.splitlines()) == 1 and "Traceback" not in err, (kind, i, err)
            path.unlink()
            assert not list(folder.iterdir()), (kind, i)
            written = list(out.iterdir()) if out.exists() else []
            assert code == 0 or not written, (kind, i, written)  # a refused command writes nothing
            assert not [p for p in written if p.name.endswith(".tmp")], (kind, i, written)
            for p in written:
                p.unlink()
