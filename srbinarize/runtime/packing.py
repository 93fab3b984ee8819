"""Bit packing of binary weights for the ``srbinarize`` ONNX ops, and NumPy references of the ops.

Sign convention shared with the PyTorch layers: a weight is +1 when ``w >= 0`` else -1; an activation
is +1 when ``x >= threshold[c]`` else -1. Bit ``c % 64`` of word ``c // 64`` is 1 for +1; unused high
bits of the last word are 0.
"""

from __future__ import annotations

import numpy as np


def _pack_last_axis(bits: np.ndarray) -> np.ndarray:
    """bool [..., C] -> uint64 [..., ceil(C / 64)], bit c % 64 of word c // 64."""
    c = bits.shape[-1]
    words = (c + 63) // 64
    padded = np.zeros((*bits.shape[:-1], words * 64), dtype=np.uint8)
    padded[..., :c] = bits
    packed = np.packbits(padded.reshape(*bits.shape[:-1], words, 64), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").reshape(*bits.shape[:-1], words).astype(np.uint64)


def pack_conv_weight(w) -> np.ndarray:
    """Conv weight [O, C, KH, KW] (real or +-1; sign taken as w >= 0) -> uint64 [O, KH, KW, ceil(C/64)]."""
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"conv weight must be [O, C, KH, KW], got shape {w.shape}")
    return _pack_last_axis(np.transpose(w >= 0, (0, 2, 3, 1)))


def pack_linear_weight(w) -> np.ndarray:
    """Linear weight [O, K] (real or +-1; sign taken as w >= 0) -> uint64 [O, ceil(K/64)]."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"linear weight must be [O, K], got shape {w.shape}")
    return _pack_last_axis(w >= 0)


def sign_pm1(x: np.ndarray) -> np.ndarray:
    """+1 where x >= 0 else -1 (int32)."""
    return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int32)


def binary_conv2d_dot(x: np.ndarray, threshold: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Integer dot of BinaryConv2d: conv2d(sign(x - thr), sign(w), padding=K//2) with zero padding.

    x float32 [N, C, H, W], threshold [C], w real [O, C, KH, KW] -> int64 [N, O, H, W].
    """
    a = np.where(x >= threshold[None, :, None, None], 1, -1).astype(np.int64)
    wb = sign_pm1(w).astype(np.int64)
    n, c, h, wd = a.shape
    o, _, kh, kw = wb.shape
    ph, pw = kh // 2, kw // 2
    ap = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=np.int64)
    ap[:, :, ph : ph + h, pw : pw + wd] = a
    out = np.zeros((n, o, h, wd), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", ap[:, :, i : i + h, j : j + wd], wb[:, :, i, j])
    return out
