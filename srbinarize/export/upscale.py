"""Deployment: upscale images with an exported ONNX model in onnxruntime, whole or tile by tile.

Whole image or tiles: by default (``tile=None``) an image of at most `WHOLE_IMAGE_PIXELS` input pixels runs
in one piece, which is exact. Larger ones (or any, with ``tile=N``) are cut into ``tile x tile`` input tiles;
each runs with ``overlap`` extra input pixels on every side (clamped at the image border) and only its centre
is kept, so memory is bounded by the tile. That equals whole-image inference up to float rounding only for a
network whose receptive field fits in the overlap and that has no global operation. Models that pool over the
whole image (the channel re-scaling of SCALES, RCAN's channel attention: ``GlobalAveragePool`` / spatial
``ReduceMean`` in the graph) see per-tile statistics instead; `upscale_array` warns when it tiles one.
How far, measured on the five Set5 LR x2 images with the zoo EDSR x2 converted by SCALES (no finetune),
8-bit outputs, tiled versus whole (``python benchmarks/tiling.py --tile TILE --overlap OVERLAP``; the test
``tests/test_upscale.py::test_tiling_a_globally_pooling_model_is_bounded`` keeps one case within its bound):

======  =======  ==================  ========================
tile    overlap  largest difference  share of values differing
======  =======  ==================  ========================
32      8        13/255              50.4%
64      16       5/255               2.9%
128     16       4/255               0.8%
======  =======  ==================  ========================

So the default is exact up to 512 x 512 input pixels; beyond it, tiles are 512 pixels, larger than those
measured above. Why not whole images further: the zoo EDSR x2 (32 features) + SCALES on one thread of this
machine took 0.6 s and 0.55 GB more peak memory for a whole 512 x 512 input, but 11.1 s and 2.3 GB for a
whole 1024 x 1024 one, against 3.1 s and 0.7 GB for the same image in four 512 tiles (``ru_maxrss`` around
`upscale_array` on a random image; a model with more features needs proportionally more).

Image modes (`srbinarize.train.data.decode_image`): RGB models get RGB (greyscale and palette images are
converted; greyscale inputs give greyscale outputs, the luminance of the result); 1-channel models get
luminance. An alpha channel is upscaled bicubically beside and put back. 16-bit files (greyscale or colour
PNG/TIFF) give 16-bit PNG/TIFF outputs. Images above ``max_pixels`` (`MAX_UPSCALE_PIXELS`) are refused from
their header; the model must be an SR model (one image input of 1 or 3 channels, an output of the same
channels at an integer scale of at least 2) and give finite values.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_output
from ..errors import SrbinarizeError, check_output
from ..train.data import DataError, DecodedImage, decode_image

#: Images of at most this many input pixels run whole (exact) unless a tile size is given.
WHOLE_IMAGE_PIXELS = 512 * 512
#: The tile side used beyond `WHOLE_IMAGE_PIXELS`.
DEFAULT_TILE = 512
#: Largest input image `upscale_file` reads unless ``max_pixels`` says otherwise (4096 x 4096).
MAX_UPSCALE_PIXELS = 4096 * 4096
_PROBE = 16  # side of the small input that checks the model before the real work

# Operators that make every output pixel depend on the whole image (when they reduce the spatial axes).
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCES = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
            "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"}


class ImageError(SrbinarizeError):
    """An image that cannot be read or written, a bad tiling value, or a model/image mismatch."""


class UpscaleModelError(SrbinarizeError):
    """An .onnx file that cannot be loaded, or that is not a super-resolution model."""


def _session(model, threads: int = 0):
    """An onnxruntime session for ``model`` (path or bytes), or ``model`` itself when it is one."""
    from ..runtime import OnnxModelError, ort_session

    if not isinstance(model, (str, os.PathLike, bytes)):
        return model  # already an InferenceSession
    options = {"log_severity_level": 3}  # errors only: no notes about unused initializers on the terminal
    if threads:
        options["intra_op_num_threads"] = threads
    try:
        return ort_session(model, **options)
    except OnnxModelError as err:
        raise UpscaleModelError(str(err)) from None


def model_channels(session) -> int:
    """Image channels the model takes (the static channel axis of its one 4-D input)."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise UpscaleModelError(f"the model has {len(inputs)} inputs; an SR model has one image input")
    shape = inputs[0].shape
    if len(shape) != 4:
        raise UpscaleModelError(f"the model's input has shape {shape}; an SR model takes [N, C, H, W] images")
    c = shape[1]
    if not isinstance(c, int):
        raise UpscaleModelError(f"the model's input has no fixed channel count ({c!r})")
    if c not in (1, 3):
        raise UpscaleModelError(f"the model takes {c}-channel inputs; images give 1 (greyscale) or 3 (RGB)")
    return c


def global_nodes(model) -> list[str]:
    """Names (or op types) of the nodes of an ONNX model (path, bytes or ModelProto) that reduce over space."""
    import onnx

    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    elif isinstance(model, (str, os.PathLike)):
        proto = onnx.load(str(model), load_external_data=False)
    else:
        proto = model
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None:
            consts[node.output[0]] = onnx.numpy_helper.to_array(value)
    found = []
    for node in proto.graph.node:
        if node.op_type in _GLOBAL_POOLS:
            found.append(node.name or node.op_type)
        elif node.op_type in _REDUCES:
            axes = next((list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "axes"), None)
            if axes is None and len(node.input) > 1 and consts.get(node.input[1]) is not None:
                axes = [int(a) for a in np.ravel(consts[node.input[1]])]
            if axes is None or any(a in (2, 3, -1, -2) for a in axes):
                found.append(node.name or node.op_type)
    return found


def _run(session, name: str, patch: np.ndarray, where: str) -> np.ndarray:
    y = session.run(None, {name: patch})[0]
    if y.ndim != 4 or y.shape[0] != 1:
        raise UpscaleModelError(f"the model's output has shape {tuple(y.shape)}; an SR model gives [1, C, sH, sW]")
    if not np.isfinite(y).all():
        raise UpscaleModelError(f"the model gave NaN or infinite values for {where}")
    return y[0]


def check_sr_model(session, channels: int | None = None) -> int:
    """Run a small probe: the model must keep the channel count and upscale by an integer >= 2; the scale."""
    channels = channels or model_channels(session)
    name = session.get_inputs()[0].name
    probe = np.full((1, channels, _PROBE, _PROBE), 0.5, np.float32)
    try:
        y = _run(session, name, probe, "a flat grey probe image")
    except SrbinarizeError:
        raise
    except Exception as err:
        raise UpscaleModelError(f"the model fails on a 1x{channels}x{_PROBE}x{_PROBE} input: "
                                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    c, h, w = y.shape
    if h % _PROBE or w % _PROBE or h != w or h // _PROBE < 2:
        raise UpscaleModelError(f"the model maps {_PROBE}x{_PROBE} to {h}x{w}: not a super-resolution model "
                                "(an integer scale of at least 2 is expected)")
    if c != channels:
        raise UpscaleModelError(f"the model maps {channels}-channel images to {c} channels; an SR model keeps them")
    return h // _PROBE


def upscale_array(
    session,
    image: np.ndarray,
    tile: int | None = None,
    overlap: int = 16,
    progress: bool = True,
    dtype: type = np.float32,
    global_ops: list[str] | None = None,
    luminance: bool = False,
) -> np.ndarray:
    """Upscale a float32 ``[C, H, W]`` image in [0, 1]; returns ``[C, sH, sW]``.

    ``tile``: None runs images up to `WHOLE_IMAGE_PIXELS` whole and larger ones in `DEFAULT_TILE` tiles;
    0 always whole; N tiles of N input pixels. ``dtype`` float32 gives the raw (unclipped) output; uint8 or
    uint16 gives it clipped to [0, 1] and quantized tile by tile (a quarter or half of the float memory).
    ``global_ops`` (from `global_nodes`) makes tiling warn that tiles differ from the whole image.
    ``luminance`` turns each 3-channel output tile into its luma (``[1, sH, sW]``), clipped to [0, 1] first.
    """
    from tqdm import tqdm

    if tile is not None and tile < 0:
        raise ImageError(f"tile must be >= 0 (0: the whole image at once), got {tile}")
    if overlap < 0:
        raise ImageError(f"overlap must be >= 0 input pixels, got {overlap}")
    if image.ndim != 3 or 0 in image.shape:
        raise ImageError(f"expected a [C, H, W] image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ImageError("the input image holds NaN or infinite values")
    _, h, w = image.shape
    if tile is None:
        tile = 0 if h * w <= WHOLE_IMAGE_PIXELS else DEFAULT_TILE
    tile = max(h, w) if tile == 0 else tile
    name = session.get_inputs()[0].name
    boxes = [(top, left) for top in range(0, h, tile) for left in range(0, w, tile)]
    if len(boxes) > 1 and global_ops:
        warnings.warn(f"the model pools over the whole image ({len(global_ops)} nodes, e.g. {global_ops[0]}): "
                      f"{len(boxes)} tiles of {tile} pixels differ from whole-image inference (tile=0 is exact)",
                      stacklevel=2)
    out = None
    scale = 0
    levels = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype))
    for top, left in tqdm(boxes, desc="upscale", unit="tile", disable=not progress or len(boxes) == 1):
        bottom, right = min(top + tile, h), min(left + tile, w)
        t0, l0 = max(top - overlap, 0), max(left - overlap, 0)
        t1, l1 = min(bottom + overlap, h), min(right + overlap, w)
        patch = np.ascontiguousarray(image[None, :, t0:t1, l0:l1], dtype=np.float32)
        y = _run(session, name, patch, f"the tile at ({top}, {left})")
        if out is None:
            scale = y.shape[1] // patch.shape[2]
            if y.shape[1] != scale * patch.shape[2] or y.shape[2] != scale * patch.shape[3] or scale < 1:
                raise UpscaleModelError(f"output {y.shape[1:]} of input {patch.shape[2:]} is not an integer upscale")
            out = np.empty((1 if luminance else y.shape[0], h * scale, w * scale), dtype)
        s = scale
        part = y[:, (top - t0) * s : (bottom - t0) * s, (left - l0) * s : (right - l0) * s]
        if luminance:
            part = _luminance(np.clip(part, 0.0, 1.0))
        if levels is not None:
            part = np.round(np.clip(part, 0.0, 1.0) * levels)
        out[:, top * s : bottom * s, left * s : right * s] = part
    return out


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of a float [3, H, W] image (the weights Pillow's convert("L") uses), [1, H, W]."""
    return np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), rgb, axes=1)[None]


def upscale_decoded(
    session,
    decoded: DecodedImage,
    tile: int | None = None,
    overlap: int = 16,
    progress: bool = True,
    global_ops: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Upscale decoded pixels (``srbinarize.train.data.DecodedImage``); returns ``(pixels, alpha)`` as
    (sH, sW, C) and (sH, sW) arrays of the input's type, C 1 for greyscale inputs, else the model's channels."""
    channels = model_channels(session)
    scale = check_sr_model(session, channels)
    levels = 65535.0 if decoded.pixels.dtype == np.uint16 else 255.0
    arr = decoded.pixels.astype(np.float32).transpose(2, 0, 1) / levels
    if channels == 3 and arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    elif channels == 1 and arr.shape[0] == 3:
        arr = _luminance(arr)
    dtype = np.uint16 if levels > 255 else np.uint8
    luma = decoded.grey and channels == 3  # greyscale in, greyscale out: the luminance of the colour result
    y = upscale_array(session, arr, tile, overlap, progress, dtype, global_ops, luminance=luma)
    alpha = None
    if decoded.alpha is not None:
        a = Image.fromarray(decoded.alpha.astype(np.float32) / levels, "F")
        a = a.resize((decoded.alpha.shape[1] * scale, decoded.alpha.shape[0] * scale), Image.Resampling.BICUBIC)
        alpha = np.round(np.clip(np.asarray(a), 0.0, 1.0) * levels).astype(dtype)
    return np.ascontiguousarray(y.transpose(1, 2, 0)), alpha


def encode_image(pixels: np.ndarray, alpha: np.ndarray | None, fmt: str) -> bytes:
    """An (H, W, C) uint8/uint16 image (+ alpha) in Pillow format ``fmt``; 16 bits kept for PNG and TIFF."""
    import io

    sixteen = pixels.dtype == np.uint16
    if sixteen and fmt in ("PNG", "TIFF") and (pixels.shape[2] == 3 or alpha is not None):
        import cv2  # Pillow cannot write 16-bit colour: OpenCV can (BGR order)

        bgr = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., ::-1]
        if alpha is not None:
            bgr = np.concatenate([bgr, alpha[..., None]], axis=2)
        ok, buf = cv2.imencode(".png" if fmt == "PNG" else ".tiff", np.ascontiguousarray(bgr))
        if not ok:
            raise ImageError(f"OpenCV could not encode a {bgr.shape} 16-bit image as {fmt}")
        return buf.tobytes()
    if sixteen and fmt in ("PNG", "TIFF"):
        img = Image.fromarray(pixels[..., 0])  # 16-bit greyscale ("I;16")
    else:
        if sixteen:  # a format without 16 bits: the nearest 8-bit level
            pixels = np.round(pixels / 257.0).astype(np.uint8)
            alpha = None if alpha is None else np.round(alpha / 257.0).astype(np.uint8)
        img = Image.fromarray(pixels[..., 0]) if pixels.shape[2] == 1 else Image.fromarray(pixels)
        if alpha is not None and fmt != "JPEG":
            img.putalpha(Image.fromarray(alpha))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def upscale_file(
    model,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    tile: int | None = None,
    overlap: int = 16,
    threads: int = 0,
    progress: bool = True,
    max_pixels: int | None = MAX_UPSCALE_PIXELS,
) -> Path:
    """Upscale ``input_path`` with ``model`` (an .onnx path or a session) and write ``output_path`` atomically.

    The output must not be the input image or the model (compared as resolved paths and as files);
    ``max_pixels`` bounds the input size (None: no bound).
    """
    output_path = Path(output_path)
    inputs = {"input image": input_path}
    if isinstance(model, (str, os.PathLike)):
        inputs["model"] = model
    check_output(output_path, inputs, "output")
    fmt = Image.registered_extensions().get(output_path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ImageError(f"{output_path}: unknown image extension {output_path.suffix!r} (use .png, .jpg, ...)")
    if threads < 0:
        raise ImageError(f"threads must be >= 0 (0: onnxruntime's default), got {threads}")
    if overlap < 0:
        raise ImageError(f"overlap must be >= 0 input pixels, got {overlap}")
    if tile is not None and tile < 0:
        raise ImageError(f"tile must be >= 0 (0: the whole image at once), got {tile}")
    session = _session(model, threads)
    try:
        decoded = decode_image(input_path, max_pixels, "raise it with --max-pixels N (max_pixels=N in Python)")
    except DataError as err:
        raise ImageError(str(err)) from None
    global_ops = None
    if isinstance(model, (str, os.PathLike, bytes)):
        try:
            global_ops = global_nodes(model)
        except Exception:  # a model onnxruntime loads but onnx cannot parse: no tiling warning
            global_ops = None
    try:
        pixels, alpha = upscale_decoded(session, decoded, tile, overlap, progress, global_ops)
    except UpscaleModelError as err:
        label = str(model) if isinstance(model, (str, os.PathLike)) else "the given session"
        raise UpscaleModelError(f"{label}: {err}") from None
    data = encode_image(pixels, alpha, fmt)
    with atomic_output(output_path) as tmp:
        tmp.write_bytes(data)
    return output_path


__all__ = [
    "DEFAULT_TILE",
    "MAX_UPSCALE_PIXELS",
    "WHOLE_IMAGE_PIXELS",
    "ImageError",
    "UpscaleModelError",
    "check_sr_model",
    "encode_image",
    "global_nodes",
    "model_channels",
    "upscale_array",
    "upscale_decoded",
    "upscale_file",
]
