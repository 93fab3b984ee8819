"""Deployment: upscale images with an exported ONNX model in onnxruntime, tile by tile.

The image is cut into ``tile x tile`` input tiles; each runs with ``overlap`` extra input pixels on every side
(clamped at the image border) and only its centre is kept, so memory is bounded by the tile, and the result
equals whole-image inference wherever the network's receptive field is within the overlap.

Image modes: RGB models get RGB (greyscale and palette images are converted, an alpha channel is upscaled
bicubically beside and put back; greyscale inputs give greyscale outputs); 1-channel models get luminance.
16-bit greyscale images are read and written at 16 bits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..atomic import atomic_output
from ..errors import SrbinarizeError


class ImageError(SrbinarizeError):
    """An image that cannot be read or written, or a model/image mismatch."""


def _session(model, threads: int = 0):
    from ..runtime import ort_session

    if not isinstance(model, (str, os.PathLike, bytes)):
        return model  # already an InferenceSession
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise FileNotFoundError(f"{model}: no such model file")
    return ort_session(model, intra_op_num_threads=threads) if threads else ort_session(model)


def model_channels(session) -> int:
    """Image channels the model takes (the static channel axis of input ``x``)."""
    c = session.get_inputs()[0].shape[1]
    if not isinstance(c, int):
        raise ImageError(f"the model's input has no fixed channel count ({c!r})")
    return c


def upscale_array(
    session, image: np.ndarray, tile: int = 256, overlap: int = 16, progress: bool = True
) -> np.ndarray:
    """Upscale a float32 ``[C, H, W]`` image in [0, 1] tile by tile; returns ``[C, sH, sW]`` (not clipped).

    ``tile`` <= 0 runs the whole image at once.
    """
    from tqdm import tqdm

    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    h, w = image.shape[1:]
    tile = max(h, w) if tile <= 0 else tile
    name = session.get_inputs()[0].name
    boxes = [(top, left) for top in range(0, h, tile) for left in range(0, w, tile)]
    out = None
    scale = 0
    for top, left in tqdm(boxes, desc="upscale", unit="tile", disable=not progress or len(boxes) == 1):
        bottom, right = min(top + tile, h), min(left + tile, w)
        t0, l0 = max(top - overlap, 0), max(left - overlap, 0)
        t1, l1 = min(bottom + overlap, h), min(right + overlap, w)
        patch = np.ascontiguousarray(image[None, :, t0:t1, l0:l1], dtype=np.float32)
        y = session.run(None, {name: patch})[0][0]
        if out is None:
            scale = y.shape[1] // patch.shape[2]
            if y.shape[1] != scale * patch.shape[2] or y.shape[2] != scale * patch.shape[3]:
                raise ImageError(f"output {y.shape[1:]} of input {patch.shape[2:]} is not an integer upscale")
            out = np.empty((y.shape[0], h * scale, w * scale), np.float32)
        s = scale
        out[:, top * s : bottom * s, left * s : right * s] = y[
            :, (top - t0) * s : (bottom - t0) * s, (left - l0) * s : (right - l0) * s
        ]
    return out


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open and decode an image, with a clear error for anything PIL cannot read."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from None


def upscale_image(
    session, img: Image.Image, tile: int = 256, overlap: int = 16, progress: bool = True
) -> Image.Image:
    """Upscale a PIL image of any mode; see the module doc for how modes map to the model's channels."""
    channels = model_channels(session)
    sixteen = img.mode in ("I;16", "I;16B", "I;16L", "I")
    grey = img.mode in ("1", "L", "LA") or sixteen
    alpha = None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
    if sixteen:
        arr = np.asarray(img, dtype=np.float32)[None] / 65535.0
        if channels == 3:
            arr = np.repeat(arr, 3, axis=0)
    elif channels in (1, 3):
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    else:
        raise ImageError(f"the model takes {channels}-channel inputs; images give 1 (greyscale) or 3 (RGB)")
    y = np.clip(upscale_array(session, arr, tile, overlap, progress), 0.0, 1.0)
    if grey and y.shape[0] == 3:
        y = (y * np.array([0.299, 0.587, 0.114], np.float32)[:, None, None]).sum(0, keepdims=True)
    if sixteen and y.shape[0] == 1:
        out = Image.fromarray(np.round(y[0] * 65535).astype(np.uint16))
    else:
        u8 = np.round(y * 255).astype(np.uint8)
        out = Image.fromarray(u8[0]) if u8.shape[0] == 1 else Image.fromarray(u8.transpose(1, 2, 0))
    if alpha is not None and out.mode in ("L", "RGB"):
        out.putalpha(alpha.resize(out.size, Image.Resampling.BICUBIC))
    return out


def upscale_file(
    model,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    tile: int = 256,
    overlap: int = 16,
    threads: int = 0,
    progress: bool = True,
) -> Path:
    """Upscale ``input_path`` with ``model`` (an .onnx path or a session) and write ``output_path`` atomically."""
    output_path = Path(output_path)
    fmt = Image.registered_extensions().get(output_path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{output_path}: unknown image extension {output_path.suffix!r} (use .png, .jpg, ...)")
    session = _session(model, threads)
    out = upscale_image(session, read_image(input_path), tile, overlap, progress)
    if fmt == "JPEG" and out.mode not in ("L", "RGB"):
        out = out.convert("RGB")
    with atomic_output(output_path) as tmp:
        out.save(tmp, format=fmt)
    return output_path


__all__ = ["ImageError", "model_channels", "read_image", "upscale_array", "upscale_file", "upscale_image"]
