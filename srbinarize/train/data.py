"""Images, training patches and evaluation sets.

Reading: every image becomes an RGB array (H, W, 3) of ``uint8`` or ``uint16`` (16-bit files keep their
precision until they are turned into floats); greyscale is replicated to three channels, palette images are
expanded, an alpha channel is dropped. Corrupt or unreadable files, empty folders and images smaller than
the training patch are errors that name the file.

Training (`TrainPatches`): sample ``i`` of a run is a pure function of ``(seed, i)``: its own RNG picks the
image, the crop and one of the 8 flips/90-degree rotations. So a run resumed at step ``k`` reads exactly the
samples ``k * batch ...`` the uninterrupted run would have read, whatever the number of loader workers.
LR patches are made on the fly from the HR crop with MATLAB-style bicubic (basicsr's kernel weights, the
degradation of the benchmark LR files, including MATLAB's rounding to uint8 after each of its two passes),
computed on the crop plus a margin so that the patch equals the same window of the whole image downsampled. Or, with
``lr_dir``, read from paired LR files (``<name>x<s>.png`` or ``<name>.png``).

Evaluation (`EvalSet`): ``../shared/data``-style folders, ``HR/`` + ``LR_bicubic/X<s>/``; the given LR
files are used when present, otherwise LR is made from the modcropped HR the same way.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import SrbinarizeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# LR samples are drawn within this many LR pixels of the crop so the bicubic kernel sees real neighbours:
# the MATLAB kernel reaches 2 + 1/scale LR pixels from a pixel's centre.
_MARGIN = 3


class DataError(SrbinarizeError):
    """A data folder or image that cannot be used: says which and why."""


# ---------------------------------------------------------------------------------------------- reading


#: The largest image (width x height) the readers decode unless told otherwise: a header can claim any size,
#: and Pillow's own guard is an exception of its own. 2^28 pixels (16384 x 16384) is 805 MB as RGB uint8.
MAX_PIXELS = 1 << 28


@dataclass(frozen=True)
class DecodedImage:
    """An image file's pixels: (H, W, 1) greyscale or (H, W, 3) RGB, ``uint8`` or ``uint16``, and its alpha
    channel (H, W) of the same type, or None."""

    pixels: np.ndarray
    alpha: np.ndarray | None

    @property
    def grey(self) -> bool:
        return self.pixels.shape[2] == 1


def decode_image(path: str | Path, max_pixels: int | None = MAX_PIXELS, limit_hint: str = "") -> DecodedImage:
    """Decode an image file, keeping its channels, alpha and bit depth (16-bit PNG/TIFF stay 16-bit).

    Files with more than ``max_pixels`` pixels are refused from their header, before decoding; ``limit_hint``
    (e.g. "raise it with --max-pixels") ends that message. Float images must hold finite values in [0, 1].
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise DataError(f"image not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an image file")
    try:
        with _own_size_limit():
            im = Image.open(path)
        with im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise DataError(f"image {path} is empty ({w}x{h})")
            if max_pixels is not None and w * h > max_pixels:
                hint = f"; {limit_hint}" if limit_hint else ""
                raise DataError(f"image {path} is {w}x{h} ({_count_pixels(w * h)}), above the limit of "
                                f"{_count_pixels(max_pixels)}{hint}")
            with _own_size_limit():
                im.load()
            decoded = _pixels(im, path)
            deep = _sixteen_bit_colour(path, im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Exception as err:  # Pillow's decoders raise many types on corrupt files (OSError, SyntaxError, ...)
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err} (corrupt or not an image?)") from None
    if deep:  # Pillow reduces 48/64-bit PNGs (and 16-bit colour TIFFs) to 8 bits; OpenCV keeps the 16
        decoded = _read_sixteen_bit(path, decoded)
    if decoded.pixels.shape[0] != h or decoded.pixels.shape[1] != w:
        raise DataError(f"cannot read image {path}: decoded {decoded.pixels.shape} for a {w}x{h} header")
    return decoded


def _count_pixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels" if n >= 100_000 else f"{n} pixels"


def read_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """An image file as RGB (H, W, 3), ``uint8`` or ``uint16``; greyscale/palette/alpha converted."""
    pixels = decode_image(path, max_pixels).pixels
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels)


@contextlib.contextmanager
def _own_size_limit() -> Iterator[None]:
    """Pillow's decompression-bomb check off inside: `decode_image` applies its own ``max_pixels``."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _pixels(im, path: Path) -> DecodedImage:
    """A loaded PIL image as `DecodedImage` (8-bit modes as uint8, 16/32-bit greyscale as uint16)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return DecodedImage(_to_uint16(np.asarray(im))[..., None], None)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise DataError(f"image {path} holds NaN or infinite values (a float image must hold [0, 1])")
        return DecodedImage(_float_to_uint16(arr)[..., None], None)
    if mode in ("1", "L"):
        return DecodedImage(np.asarray(im.convert("L"))[..., None], None)
    if mode in ("LA", "La"):
        arr = np.asarray(im.convert("LA"))
        return DecodedImage(arr[..., :1], arr[..., 1].copy())
    has_alpha = mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        arr = np.asarray(im.convert("RGBA"))
        return DecodedImage(arr[..., :3], arr[..., 3].copy())
    return DecodedImage(np.asarray(im.convert("RGB")), None)


def is_greyscale_file(path: str | Path) -> bool:
    """Whether an image file stores one channel (greyscale, with or without alpha)."""
    from PIL import Image

    try:
        with _own_size_limit(), Image.open(path) as im:
            return im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
    except Exception:
        return False


def _to_uint16(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        return arr
    return np.clip(arr, 0, 65535).astype(np.uint16)


def _float_to_uint16(arr: np.ndarray) -> np.ndarray:
    return np.round(np.clip(arr, 0, 1) * 65535).astype(np.uint16)


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


def _sixteen_bit_colour(path: Path, im) -> bool:
    """Whether Pillow decoded a 16-bit colour (or grey + alpha) file to 8 bits."""
    if im.mode not in ("RGB", "RGBA", "LA"):
        return False
    if im.format == "PNG":
        return _png_bit_depth(path) == 16
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)
        return bool(bits) and all(b == 16 for b in (bits if isinstance(bits, tuple) else (bits,)))
    return False


def _read_sixteen_bit(path: Path, eight: DecodedImage) -> DecodedImage:
    """The 16-bit pixels of ``path`` through OpenCV (BGR(A) -> RGB), or ``eight`` when OpenCV cannot."""
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        return eight
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] not in (1, 3, 4):
        return eight
    alpha = np.ascontiguousarray(arr[..., 3]) if arr.shape[2] == 4 else None
    pixels = arr[..., :1] if arr.shape[2] == 1 else arr[..., 2::-1]  # BGR(A) -> RGB
    if eight.grey:  # grey + alpha: OpenCV expands it to BGRA
        pixels = pixels[..., :1]
    return DecodedImage(np.ascontiguousarray(pixels), alpha if eight.alpha is not None else None)


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 / uint16 image -> float32 in [0, 1]."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    return img.astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Any image -> uint8 (16-bit rounded to the nearest 8-bit level)."""
    if img.dtype == np.uint8:
        return img
    return np.round(np.clip(to_float(img), 0, 1) * 255).astype(np.uint8)


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a folder (sorted), or a clear error."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def hr_folder(root: str | Path) -> Path:
    """``root/HR`` when it exists (the ``../shared/data`` layout), else ``root`` itself."""
    root = Path(root)
    return root / "HR" if (root / "HR").is_dir() else root


def lr_folder(root: str | Path, scale: int) -> Path | None:
    """``root/LR_bicubic/X<scale>`` when it exists."""
    path = Path(root) / "LR_bicubic" / f"X{scale}"
    return path if path.is_dir() else None


def find_lr_file(lr_dir: Path, hr_path: Path, scale: int) -> Path:
    for name in (f"{hr_path.stem}x{scale}{hr_path.suffix}", hr_path.name):
        if (lr_dir / name).is_file():
            return lr_dir / name
    candidates = sorted(lr_dir.glob(f"{hr_path.stem}x{scale}.*")) + sorted(lr_dir.glob(f"{hr_path.stem}.*"))
    if candidates:
        return candidates[0]
    raise DataError(f"no LR image for {hr_path.name} in {lr_dir} (expected {hr_path.stem}x{scale}{hr_path.suffix})")


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


# ------------------------------------------------------------------------------------------- degradation


def bicubic_resize(img: np.ndarray | torch.Tensor, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` (antialiased when shrinking), float32 HWC in [0, 1] out.

    basicsr's port; ``img`` is HWC (uint8, uint16 or float in [0, 1]). Not rounded.
    """
    from basicsr.utils.matlab_functions import imresize

    arr = to_float(img) if isinstance(img, np.ndarray) else img.numpy()
    return imresize(np.ascontiguousarray(arr), scale)


@functools.lru_cache(maxsize=256)
def _resize_weights(in_length: int, scale: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    from basicsr.utils.matlab_functions import calculate_weights_indices

    out_length = math.ceil(in_length * scale)
    weights, indices, sym_s, sym_e = calculate_weights_indices(in_length, out_length, scale, "cubic", 4, True)
    return weights.double().numpy(), indices.long().numpy(), int(sym_s), int(sym_e)


def _resize_axis(x: np.ndarray, scale: float, axis: int) -> np.ndarray:
    """One MATLAB imresize pass along ``axis`` (basicsr's kernel weights, symmetric padding)."""
    n = x.shape[axis]
    weights, indices, sym_s, sym_e = _resize_weights(n, scale)
    x = np.moveaxis(x, axis, 0)
    parts = [x[:sym_s][::-1], x]
    if sym_e > 0:
        parts.append(x[n - sym_e :][::-1])
    padded = np.concatenate(parts, axis=0)
    out = np.einsum("ok,ok...->o...", weights, padded[indices])
    return np.moveaxis(out, 0, axis)


def matlab_downsample(img: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(img_uint8, 1/scale, 'bicubic')`` as the benchmark LR files were made; uint8 out.

    MATLAB resizes a uint8 image one dimension at a time (rows first when the scales are equal) and
    rounds to uint8 after each pass; doing the same brings the port to within one level of the shipped
    LR files on all but 1-2% of pixels (basicsr's ``imresize``, which keeps the intermediate in float,
    differs on about 15%). A 16-bit image is resized at 16-bit precision (MATLAB on uint16) and the
    result rounded to 8 bits, the depth of the LR inputs the models see at test time.
    """
    if img.dtype == np.uint16:
        x = np.clip(np.round(_resize_axis(img.astype(np.float64), 1.0 / scale, 0)), 0, 65535)
        x = np.clip(np.round(_resize_axis(x, 1.0 / scale, 1)), 0, 65535)
        return np.round(x / 257.0).astype(np.uint8)
    x = img.astype(np.float64) if img.dtype == np.uint8 else np.round(to_float(img).astype(np.float64) * 255)
    x = np.clip(np.round(_resize_axis(x, 1.0 / scale, 0)), 0, 255)
    x = np.clip(np.round(_resize_axis(x, 1.0 / scale, 1)), 0, 255)
    return x.astype(np.uint8)


def downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """LR of a (modcropped) HR image as the benchmark files are made (uint8 RGB)."""
    return matlab_downsample(hr, scale)


def degrade_window(hr: np.ndarray, scale: int, top: int, left: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The LR window ``[top:top+size, left:left+size]`` (LR pixels) of ``downsample(hr)`` and its HR window.

    Computed from the HR crop plus a margin (clamped at the image border), which gives the same pixels as
    downsampling the whole image at a fraction of the cost. Both float32 in [0, 1].
    """
    H, W = hr.shape[0] // scale, hr.shape[1] // scale  # LR size of the modcropped image
    t0, l0 = max(0, top - _MARGIN), max(0, left - _MARGIN)
    t1, l1 = min(H, top + size + _MARGIN), min(W, left + size + _MARGIN)
    region = hr[t0 * scale : t1 * scale, l0 * scale : l1 * scale]
    lr = matlab_downsample(region, scale)[top - t0 : top - t0 + size, left - l0 : left - l0 + size]
    hr_win = to_float(hr[top * scale : (top + size) * scale, left * scale : (left + size) * scale])
    return to_float(lr), hr_win


def augment(arrays: Sequence[np.ndarray], code: int) -> list[np.ndarray]:
    """One of the 8 dihedral transforms (bit 0: horizontal flip, bit 1: vertical flip, bit 2: transpose)."""
    out = []
    for a in arrays:
        if code & 1:
            a = a[:, ::-1]
        if code & 2:
            a = a[::-1]
        if code & 4:
            a = a.transpose(1, 0, 2)
        out.append(np.ascontiguousarray(a))
    return out


def hwc_to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(to_float(img).transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------------------ training


class TrainPatches(Dataset):
    """Random (LR, HR) patch pairs from HR folders; item ``i`` depends only on ``(seed, i)``.

    ``patch`` is the LR patch side (the HR patch is ``patch * scale``). ``lr_dirs`` (one per HR folder,
    or None) switches from on-the-fly bicubic to paired LR files.
    """

    def __init__(
        self,
        hr_dirs: str | Path | Sequence[str | Path],
        scale: int,
        patch: int = 48,
        seed: int = 0,
        lr_dirs: Sequence[str | Path | None] | None = None,
        augment: bool = True,
    ):
        if isinstance(hr_dirs, (str, Path)):
            hr_dirs = [hr_dirs]
        if scale < 1:
            raise DataError(f"scale must be a positive integer, got {scale}")
        if patch < 1:
            raise DataError(f"patch must be a positive integer, got {patch}")
        self.scale, self.patch, self.seed, self.augment = int(scale), int(patch), int(seed), augment
        lr_dirs = list(lr_dirs) if lr_dirs is not None else [None] * len(hr_dirs)
        if len(lr_dirs) != len(hr_dirs):
            raise DataError(f"{len(lr_dirs)} LR folders for {len(hr_dirs)} HR folders")
        self.names: list[str] = []
        self.hr: list[np.ndarray] = []
        self.lr: list[np.ndarray | None] = []
        hr_side = patch * scale
        for folder, lr_dir in zip(hr_dirs, lr_dirs, strict=True):
            folder = hr_folder(folder)
            for path in list_images(folder):
                img = modcrop(read_image(path), scale)
                if img.shape[0] < hr_side or img.shape[1] < hr_side:
                    raise DataError(
                        f"image {path} is {img.shape[1]}x{img.shape[0]} (after cropping to a multiple of "
                        f"{scale}), smaller than the HR patch {hr_side}x{hr_side} (patch {patch} x scale {scale}): "
                        "remove it or lower --patch"
                    )
                lr = None
                if lr_dir is not None:
                    lr_path = find_lr_file(Path(lr_dir), path, scale)
                    lr = read_image(lr_path)
                    want = (img.shape[0] // scale, img.shape[1] // scale)
                    if lr.shape[:2] != want:
                        raise DataError(
                            f"LR image {lr_path} is {lr.shape[1]}x{lr.shape[0]}, expected {want[1]}x{want[0]} "
                            f"for {path.name} at x{scale}"
                        )
                self.names.append(str(path))
                self.hr.append(img)
                self.lr.append(lr)
        # Sample images in proportion to their area, so every HR pixel is equally likely.
        areas = np.array([im.shape[0] * im.shape[1] for im in self.hr], dtype=np.float64)
        self.cum = np.cumsum(areas / areas.sum())

    def __len__(self) -> int:  # samples are indexed by a global counter; any index is valid
        return 2**62

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        k = min(int(np.searchsorted(self.cum, rng.random(), side="right")), len(self.hr) - 1)
        hr = self.hr[k]
        H, W = hr.shape[0] // self.scale, hr.shape[1] // self.scale
        top = int(rng.integers(0, H - self.patch + 1))
        left = int(rng.integers(0, W - self.patch + 1))
        code = int(rng.integers(0, 8)) if self.augment else 0
        if self.lr[k] is None:
            lr, hr_win = degrade_window(hr, self.scale, top, left, self.patch)
        else:
            lr = to_float(self.lr[k][top : top + self.patch, left : left + self.patch])
            s = self.scale
            hr_win = to_float(hr[top * s : (top + self.patch) * s, left * s : (left + self.patch) * s])
        lr, hr_win = augment([lr, hr_win], code)
        return hwc_to_tensor(lr), hwc_to_tensor(hr_win)


def _worker_init(_worker_id: int) -> None:
    import signal

    torch.set_num_threads(1)
    # Ctrl-C is the main process's business (it finishes the step and saves); a worker killed by it
    # would make the next batch fail instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def patch_loader(
    dataset: TrainPatches, batch_size: int, start_step: int = 0, steps: int | None = None, workers: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for steps ``start_step, start_step + 1, ...`` (``steps`` of them, or without end).

    Batch ``k`` holds samples ``k * batch_size ... (k + 1) * batch_size - 1``, so resuming is exact.
    """
    first = start_step * batch_size
    indices = itertools.count(first) if steps is None else range(first, first + steps * batch_size)
    workers = default_workers() if workers is None else workers
    return iter(
        DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=indices,
            num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
            drop_last=False,
        )
    )


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalImage:
    name: str
    lr: np.ndarray  # uint8 RGB
    hr: np.ndarray  # uint8 RGB, modcropped
    grey: bool = False  # the HR file is greyscale: scored on luma, not Y (see metrics.psnr_ssim_y)


@dataclass
class EvalSet:
    """A benchmark set at one scale: LR inputs and modcropped HR targets (both uint8 RGB)."""

    name: str
    scale: int
    images: list[EvalImage]
    lr_source: str  # "files: <dir>" or "MATLAB-style bicubic from HR"

    @classmethod
    def load(cls, root: str | Path, scale: int, limit: int | None = None, name: str | None = None) -> EvalSet:
        root = Path(root)
        hr_dir = hr_folder(root)
        lr_dir = lr_folder(root, scale)
        images = []
        for path in list_images(hr_dir)[:limit]:
            hr = to_uint8(modcrop(read_image(path), scale))
            if hr.shape[0] < scale or hr.shape[1] < scale:
                raise DataError(f"image {path} is smaller than the scale {scale}")
            if lr_dir is not None:
                lr_path = find_lr_file(lr_dir, path, scale)
                lr = to_uint8(read_image(lr_path))
                want = (hr.shape[0] // scale, hr.shape[1] // scale)
                if lr.shape[:2] != want:
                    raise DataError(
                        f"LR image {lr_path} is {lr.shape[1]}x{lr.shape[0]}, expected {want[1]}x{want[0]} "
                        f"(HR {path.name} cropped to a multiple of {scale}, divided by {scale})"
                    )
            else:
                lr = downsample(hr, scale)
            images.append(EvalImage(path.stem, lr, hr, is_greyscale_file(path)))
        source = f"files: {lr_dir}" if lr_dir is not None else "MATLAB-style bicubic from HR"
        set_name = name or (root.name if root.name != "HR" else root.parent.name)
        return cls(set_name, scale, images, source)
