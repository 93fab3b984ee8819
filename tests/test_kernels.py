"""The onnxruntime kernel library: every dispatch path against NumPy references, and bad models.

Integer checks use scale = 1 and no epilogue, so the output is the exact integer dot product.
Paths this CPU cannot run are skipped with the reason; on CPUs without AVX-512 the AVX-512 kernel code
still runs, built with emulated intrinsics. To run the file against another build of the library
(e.g. the sanitized one, see kernels/build_sanitized.sh) set SRBINARIZE_ORT_LIBRARY.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from srbinarize.runtime import (
    KERNEL_ENV,
    KERNEL_PATHS,
    LIBRARY_ENV,
    OnnxModelError,
    kernel_path,
    kernel_supported,
    ort_session,
)
from srbinarize.runtime.opmodels import conv_model, linear_model
from srbinarize.runtime.packing import binary_conv2d_dot, pack_conv_weight, pack_linear_weight

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def emulated_avx512_library(tmp_path_factory):
    """The library built with the AVX-512 kernels' intrinsics emulated in C++ (kernels/testing)."""
    spec = importlib.util.spec_from_file_location("kernels_build", ROOT / "kernels" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        return build.build(
            tmp_path_factory.mktemp("emulated") / "libsrbinarize_ort.so",
            sanitize=os.environ.get("SRBINARIZE_TEST_SANITIZE") == "1",  # set by kernels/build_sanitized.sh
            emulate_avx512=True,
        )
    except SystemExit as err:
        pytest.skip(f"cannot build the emulated AVX-512 library: {err}")


@pytest.fixture(params=[*KERNEL_PATHS, "avx512-emulated"])
def path(request, monkeypatch):
    """Forces one kernel path (skipped where the CPU lacks it).

    "avx512-emulated" runs the AVX-512 kernel code on CPUs without AVX-512, with its intrinsics
    emulated: it checks the kernel's logic, the real instructions being checked where they exist.
    """
    name = request.param
    if name == "avx512-emulated":
        if kernel_supported("avx512"):
            pytest.skip("this CPU runs the real AVX-512 kernels")
        if not kernel_supported("avx2"):
            pytest.skip("the emulated AVX-512 build needs AVX2")
        monkeypatch.setenv(LIBRARY_ENV, str(request.getfixturevalue("emulated_avx512_library")))
        name = "avx512"
    if not kernel_supported(name):
        pytest.skip(f"this CPU cannot run the {name} kernels")
    monkeypatch.setenv(KERNEL_ENV, name)
    assert kernel_path() == name
    return name


def _signs(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _linear_dot(x, thr, w):
    a = np.where(x >= thr, 1, -1).astype(np.int64)
    return a @ np.where(w >= 0, 1, -1).astype(np.int64).T


def _run_conv(x, thr, w, *, threads=1, **kw):
    o = w.shape[0]
    model = conv_model(
        thr,
        pack_conv_weight(w),
        kw.pop("scale", np.ones(o, np.float32)),
        kernel_shape=w.shape[2:],
        in_channels=w.shape[1],
        **kw,
    )
    return ort_session(model, intra_op_num_threads=threads).run(None, {"X": x})[0]


def _random_conv_case(rng):
    c = int(rng.choice([1, 3, 8, 63, 64, 65, 130]))
    o = int(rng.choice([1, 5, 8, 17, 64]))
    kh, kw = (int(k) for k in rng.choice([1, 3, 5], size=2))
    n, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 12)), int(rng.integers(1, 75))
    return c, o, (kh, kw), (n, h, w)


def test_conv_integer_dot_random_shapes(path):
    rng = np.random.default_rng(1)
    for _ in range(30):
        c, o, (kh, kw), (n, h, w) = _random_conv_case(rng)
        x = _signs(rng, (n, c, h, w))
        thr = (0.3 * rng.standard_normal(c)).astype(np.float32)
        wt = _signs(rng, (o, c, kh, kw))
        y = _run_conv(x, thr, wt)
        np.testing.assert_array_equal(y, binary_conv2d_dot(x, thr, wt), err_msg=f"{c=} {o=} {kh=} {kw=} {n=} {h=} {w=}")


@pytest.mark.parametrize(
    ("c", "o", "k", "hw"),
    [
        (3, 5, 3, (1, 1)),  # every tap but the centre is padding
        (65, 17, 3, (7, 1)),
        (130, 9, 5, (11, 13)),
        (200, 16, 5, (6, 70)),  # 25 taps x 4 words = 100 steps: AVX2 byte counters widen twice
        (64, 64, 3, (9, 67)),  # full 8x8 blocks, two pixel tiles
        (64, 200, 3, (3, 19)),  # O8 > 128: narrower pixel tiles
    ],
)
def test_conv_integer_dot_edge_shapes(path, c, o, k, hw):
    rng = np.random.default_rng(c * 1000 + o)
    x = _signs(rng, (2, c, *hw))
    thr = (0.3 * rng.standard_normal(c)).astype(np.float32)
    wt = _signs(rng, (o, c, k, k))
    np.testing.assert_array_equal(_run_conv(x, thr, wt, threads=2), binary_conv2d_dot(x, thr, wt))


def test_conv_threshold_ties_are_plus_one(path):
    x = np.zeros((1, 5, 3, 4), np.float32)  # x == threshold everywhere: +1 (x - thr >= 0)
    wt = np.ones((2, 5, 3, 3), np.float32)
    y = _run_conv(x, np.zeros(5, np.float32), wt)
    np.testing.assert_array_equal(y, binary_conv2d_dot(x, np.zeros(5, np.float32), wt))
    assert y[0, 0, 1, 1] == 45


def test_conv_full_epilogue(path):
    rng = np.random.default_rng(2)
    n, c, h, w, k = 2, 24, 9, 13, 3
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
    wt = _signs(rng, (c, c, k, k))
    scale = rng.uniform(0.01, 0.1, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    spatial = rng.uniform(0.5, 1.5, (n, 1, h, w)).astype(np.float32)
    chan = rng.uniform(0.5, 1.5, (n, c)).astype(np.float32)
    model = conv_model(
        thr,
        pack_conv_weight(wt),
        scale,
        bias,
        kernel_shape=(k, k),
        in_channels=c,
        skip=1,
        spatial=True,
        channel_scale=True,
    )
    y = ort_session(model).run(None, {"X": x, "spatial": spatial, "channel_scale": chan})[0]
    t = binary_conv2d_dot(x, thr, wt).astype(np.float32) * scale[None, :, None, None]
    t = t * spatial
    t = t * chan[:, :, None, None]
    t = t + bias[None, :, None, None]
    t = t + x
    np.testing.assert_allclose(y, t, rtol=0, atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "prelu"])
@pytest.mark.parametrize(("c", "o", "hw"), [(24, 24, (9, 13)), (48, 48, (7, 40)), (64, 64, (5, 67)), (70, 5, (4, 33))])
def test_conv_residual_and_activation_epilogue(path, c, o, hw, act):
    """The fused residual add and ReLU / PReLU: t = epilogue(dot); t += residual; then max(t, 0) or
    (t < 0 ? t * slope[o] : t), NaN kept."""
    rng = np.random.default_rng(c + o)
    n, k = 2, 3
    x = rng.standard_normal((n, c, *hw)).astype(np.float32)
    thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
    wt = _signs(rng, (o, c, k, k))
    scale = rng.uniform(0.01, 0.1, o).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    spatial = rng.uniform(0.5, 1.5, (n, 1, *hw)).astype(np.float32)
    res = rng.standard_normal((n, o, *hw)).astype(np.float32)
    res[0, 0, 0, :3] = np.nan
    slope = rng.uniform(-0.5, 0.5, o).astype(np.float32)
    extra = {"relu": 1} if act == "relu" else {"prelu_slope": slope}
    model = conv_model(thr, pack_conv_weight(wt), scale, bias, kernel_shape=(k, k), in_channels=c, spatial=True,
                       residual=True, **extra)
    y = ort_session(model).run(None, {"X": x, "spatial": spatial, "residual": res})[0]
    t = binary_conv2d_dot(x, thr, wt).astype(np.float32) * scale[None, :, None, None]
    t = t * spatial + bias[None, :, None, None]
    t = t + res
    t = np.where(t < 0, np.float32(0) if act == "relu" else t * slope[None, :, None, None], t)
    assert np.isnan(y[0, 0, 0, :3]).all()
    np.testing.assert_allclose(y, t, rtol=0, atol=1e-5)
    wrong = ort_session(model)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="input 'residual' must have shape"):
        wrong.run(None, {"X": x, "spatial": spatial, "residual": res[:, :, :-1]})


def _epilogue_inputs(rng: np.random.Generator, c: int, hw: tuple[int, int], with_bias: bool):
    """Input, thresholds, +-1 weights (C -> C, 3x3), scale and bias of an epilogue-shape case."""
    x = rng.standard_normal((2, c, *hw)).astype(np.float32)
    thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
    wt = _signs(rng, (c, c, 3, 3))
    scale = rng.uniform(0.01, 0.1, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32) if with_bias else None
    return x, thr, wt, scale, bias


def _epilogue_reference(x, thr, wt, scale, bias, add, res, act, slope=None, spatial=None, chan=None):
    """The op's output in its fp32 order: scale, spatial map, channel scale, bias, skip / residual, activation."""
    t = binary_conv2d_dot(x, thr, wt).astype(np.float32) * scale[None, :, None, None]
    if spatial is not None:
        t = t * spatial
    if chan is not None:
        t = t * chan[:, :, None, None]
    if bias is not None:
        t = t + bias[None, :, None, None]
    if add != "none":
        t = t + (x if add == "skip" else res)
    if act == "relu":
        t = np.where(t < 0, np.float32(0), t)
    elif act == "prelu":
        t = np.where(t < 0, t * slope[None, :, None, None], t)
    return t


@pytest.mark.parametrize("act", ["none", "relu", "prelu"])
@pytest.mark.parametrize("add", ["none", "skip", "residual"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_epilogue_shapes_exact(path, with_bias, add, act):
    """Every epilogue without spatial map or channel scale (the AVX-512 and AVX2 rows compile each such shape
    separately) equals the op's fp32 order computed by NumPy bit for bit, for channel counts whose
    windows are concatenated (12, 24, 48, 50) or not (64, 80), and widths with partial tiles."""
    for case, (c, hw) in enumerate([(64, (6, 37)), (48, (5, 16)), (50, (4, 70)), (24, (3, 33)), (12, (5, 9)),
                                    (80, (3, 48))]):
        rng = np.random.default_rng([case, with_bias, len(add), len(act)])
        x, thr, wt, scale, bias = _epilogue_inputs(rng, c, hw, with_bias)
        res = rng.standard_normal(x.shape).astype(np.float32)
        slope = rng.uniform(-0.5, 0.5, c).astype(np.float32)
        extra = {"relu": 1} if act == "relu" else {"prelu_slope": slope} if act == "prelu" else {}
        model = conv_model(thr, pack_conv_weight(wt), scale, bias, kernel_shape=(3, 3), in_channels=c,
                           skip=int(add == "skip"), residual=add == "residual", **extra)
        feeds = {"X": x, **({"residual": res} if add == "residual" else {})}
        y = ort_session(model).run(None, feeds)[0]
        t = _epilogue_reference(x, thr, wt, scale, bias, add, res, act, slope=slope)
        np.testing.assert_array_equal(y, t, err_msg=f"C = {c}, H x W = {hw}")


@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("add", ["none", "skip", "residual"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_map_epilogue_shapes_exact(path, with_bias, add, act):
    """Spatial map and channel scale together (SCALES' binary convs; the AVX-512 and AVX2 rows compile these
    shapes separately) with bias, skip or residual and ReLU: bit for bit the op's fp32 order, partial tiles;
    with the channel_mean output where there is a bias (the mean of Y)."""
    for case, (c, hw) in enumerate([(64, (5, 37)), (48, (4, 70)), (80, (3, 9))]):
        rng = np.random.default_rng([case, with_bias, len(add), len(act), 7])
        x, thr, wt, scale, bias = _epilogue_inputs(rng, c, hw, with_bias)
        spatial = rng.uniform(0.0, 1.0, (x.shape[0], 1, *hw)).astype(np.float32)
        chan = rng.uniform(0.5, 1.5, (x.shape[0], c)).astype(np.float32)
        res = rng.standard_normal(x.shape).astype(np.float32)
        model = conv_model(thr, pack_conv_weight(wt), scale, bias, kernel_shape=(3, 3), in_channels=c,
                           skip=int(add == "skip"), residual=add == "residual", spatial=True, channel_scale=True,
                           channel_mean=with_bias, **({"relu": 1} if act == "relu" else {}))
        feeds = {"X": x, "spatial": spatial, "channel_scale": chan, **({"residual": res} if add == "residual" else {})}
        out = ort_session(model).run(None, feeds)
        t = _epilogue_reference(x, thr, wt, scale, bias, add, res, act, spatial=spatial, chan=chan)
        np.testing.assert_array_equal(out[0], t, err_msg=f"C = {c}, H x W = {hw}")
        if with_bias:
            np.testing.assert_allclose(out[1], t.mean(axis=(2, 3), dtype=np.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["plain", "skip+relu", "residual", "maps+residual", "maps+relu+mean"])
def test_conv_float16_activations_exact(path, form):
    """X, residual and Y in float16 (the overload for float16 X) give, bit for bit, the float32 op on X and the
    residual converted exactly, rounded to nearest even (NumPy's astype), on every path (AVX-512 natively, the
    others at the op's boundary): epilogue shapes, the in-op spatial map, channel scale and channel_mean (the
    mean of the fp32 values); plain ones also equal NumPy's fp32 order."""
    for case, (c, hw) in enumerate([(64, (5, 37)), (48, (4, 70)), (24, (3, 9))]):
        rng = np.random.default_rng([case, len(form), 16])
        x, thr, wt, scale, bias = _epilogue_inputs(rng, c, hw, with_bias=True)
        x16, res16 = x.astype(np.float16), rng.standard_normal(x.shape).astype(np.float16)
        maps = form.startswith("maps")
        add = "skip" if "skip" in form else "residual" if "residual" in form else "none"
        act = "relu" if "relu" in form else "none"
        sw = (0.1 * rng.standard_normal(c)).astype(np.float32)
        chan = rng.uniform(0.5, 1.5, (x.shape[0], c)).astype(np.float32)
        runs = {}
        for dtype in (np.float16, np.float32):
            model = conv_model(thr, pack_conv_weight(wt), scale, bias, kernel_shape=(3, 3), in_channels=c,
                               skip=int(add == "skip"), residual=add == "residual", relu=int(act == "relu"),
                               channel_scale=maps, channel_mean="mean" in form, x_dtype=dtype,
                               **({"spatial_weight": sw, "spatial_bias": np.array([0.1], np.float32)} if maps else {}))
            feeds = {"X": x16.astype(dtype), **({"residual": res16.astype(dtype)} if add == "residual" else {}),
                     **({"channel_scale": chan} if maps else {})}
            runs[dtype] = ort_session(model).run(None, feeds)
        half, single = runs[np.float16], runs[np.float32]
        assert half[0].dtype == np.float16
        np.testing.assert_array_equal(half[0], single[0].astype(np.float16), err_msg=f"C = {c}, H x W = {hw}")
        if not maps:
            t = _epilogue_reference(x16.astype(np.float32), thr, wt, scale, bias, add, res16.astype(np.float32), act)
            np.testing.assert_array_equal(half[0], t.astype(np.float16))
        if "mean" in form:
            np.testing.assert_array_equal(half[1], single[1])


@pytest.mark.parametrize("add", ["none", "residual"])
def test_conv_float16_streamed_output_exact(path, add):
    """A float16 Y of 8 MB or more is written with streaming stores on AVX-512: the same values as the float32
    op rounded, including the partial last tile of each row (W = 264)."""
    rng = np.random.default_rng([len(add), 17])
    x, thr, wt, scale, bias = _epilogue_inputs(rng, 64, (128, 264), with_bias=True)  # Y: 2 x 64 x 128 x 264 x 2 B
    x16, res16 = x.astype(np.float16), rng.standard_normal(x.shape).astype(np.float16)
    runs = {}
    for dtype in (np.float16, np.float32):
        model = conv_model(thr, pack_conv_weight(wt), scale, bias, kernel_shape=(3, 3), in_channels=64,
                           residual=add == "residual", x_dtype=dtype)
        feeds = {"X": x16.astype(dtype), **({"residual": res16.astype(dtype)} if add == "residual" else {})}
        runs[dtype] = ort_session(model).run(None, feeds)[0]
    assert runs[np.float16].nbytes >= 8 << 20
    np.testing.assert_array_equal(runs[np.float16], runs[np.float32].astype(np.float16))


@pytest.mark.parametrize(("c", "o", "k", "hw"), [(260, 6, 3, (4, 41)), (130, 9, 5, (6, 35)), (200, 4, 3, (3, 8))])
def test_conv_long_windows_exact(path, c, o, k, hw):
    """Windows of many words: more steps than one byte counter holds (the AVX2 rows widen their byte
    counts every 31 steps) and more than the AVX2 rows split per chunk (64); bias, residual and ReLU
    fused, output channels not a multiple of 4, partial tiles: bit for bit the op's fp32 order."""
    rng = np.random.default_rng(c + o + k)
    n = 2
    x = rng.standard_normal((n, c, *hw)).astype(np.float32)
    thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
    wt = _signs(rng, (o, c, k, k))
    scale = rng.uniform(0.01, 0.1, o).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    res = rng.standard_normal((n, o, *hw)).astype(np.float32)
    model = conv_model(thr, pack_conv_weight(wt), scale, bias, kernel_shape=(k, k), in_channels=c, residual=True,
                       relu=1)
    y = ort_session(model).run(None, {"X": x, "residual": res})[0]
    t = binary_conv2d_dot(x, thr, wt).astype(np.float32) * scale[None, :, None, None] + bias[None, :, None, None]
    t = t + res
    np.testing.assert_array_equal(y, np.where(t < 0, np.float32(0), t))


@pytest.mark.parametrize(("c", "o", "hw"), [(24, 24, (9, 13)), (64, 64, (5, 67)), (70, 5, (4, 33)), (3, 8, (1, 1))])
def test_conv_fused_spatial_map(path, c, o, hw):
    """spatial_weight / spatial_bias: spatial = sigmoid(sum_c w[c] x[c] + b) computed inside the op."""
    rng = np.random.default_rng(c * 7 + o)
    n, k = 2, 3
    x = rng.standard_normal((n, c, *hw)).astype(np.float32)
    x[0, :, 0, 0] = 40.0  # saturated sigmoid ends
    x[1, :, 0, 0] = -40.0
    thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
    wt = _signs(rng, (o, c, k, k))
    scale = rng.uniform(0.5, 1.5, o).astype(np.float32)
    sw = (rng.standard_normal(c) / np.sqrt(c)).astype(np.float32)
    sb = np.array([0.3], np.float32)
    model = conv_model(thr, pack_conv_weight(wt), scale, None, kernel_shape=(k, k), in_channels=c,
                       spatial_weight=sw, spatial_bias=sb)
    y = ort_session(model).run(None, {"X": x})[0]
    logit = np.einsum("c,nchw->nhw", sw.astype(np.float64), x.astype(np.float64))[:, None] + sb[0]
    t = binary_conv2d_dot(x, thr, wt) * scale[None, :, None, None].astype(np.float64) / (1 + np.exp(-logit))
    np.testing.assert_allclose(y, t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="give one of them"):
        both = conv_model(thr, pack_conv_weight(wt), scale, None, kernel_shape=(k, k), in_channels=c, spatial=True,
                          spatial_weight=sw, spatial_bias=sb)
        ort_session(both).run(None, {"X": x, "spatial": np.ones((n, 1, *hw), np.float32)})


@pytest.mark.parametrize(("c", "o", "n", "hw"), [(24, 24, 2, (9, 13)), (64, 64, 1, (40, 67)), (70, 5, 3, (4, 33))])
def test_conv_channel_mean_output(path, c, o, n, hw):
    """The optional second output: the mean over H x W of every output channel, the same at 1 and 2 threads."""
    rng = np.random.default_rng(c + n)
    x = rng.standard_normal((n, c, *hw)).astype(np.float32)
    thr = (0.2 * rng.standard_normal(c)).astype(np.float32)
    wt = _signs(rng, (o, c, 3, 3))
    scale = rng.uniform(0.01, 0.1, o).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    model = conv_model(thr, pack_conv_weight(wt), scale, bias, kernel_shape=(3, 3), in_channels=c, relu=1,
                       channel_mean=True)
    y, mean = ort_session(model).run(None, {"X": x})
    np.testing.assert_allclose(mean, y.astype(np.float64).mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    y2, mean2 = ort_session(model, intra_op_num_threads=2).run(None, {"X": x})
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(y2, y)


def test_conv_optional_inputs_by_empty_name_and_graph_input_weight(path):
    rng = np.random.default_rng(3)
    c, o, k = 10, 6, 3
    x = rng.standard_normal((1, c, 5, 6)).astype(np.float32)
    thr = np.zeros(c, np.float32)
    wt = _signs(rng, (o, c, k, k))
    chan = rng.uniform(0.5, 1.5, (1, o)).astype(np.float32)
    # bias and spatial given as "" while channel_scale is present; weight fed at run time.
    packed = pack_conv_weight(wt)
    model = conv_model(
        thr, packed, np.ones(o, np.float32), kernel_shape=(k, k), in_channels=c, channel_scale=True, weight_input=True
    )
    y = ort_session(model).run(None, {"X": x, "channel_scale": chan, "weight": packed})[0]
    ref = binary_conv2d_dot(x, thr, wt).astype(np.float32) * chan[:, :, None, None]
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


def test_linear_integer_dot_random_shapes(path):
    rng = np.random.default_rng(4)
    for _ in range(20):
        k = int(rng.choice([1, 3, 63, 64, 65, 130, 180]))
        o = int(rng.choice([1, 7, 8, 64, 180]))
        b, t = int(rng.integers(1, 3)), int(rng.integers(1, 150))
        x = _signs(rng, (b, t, k))
        thr = (0.3 * rng.standard_normal(k)).astype(np.float32)
        w = _signs(rng, (o, k))
        model = linear_model(thr, pack_linear_weight(w), np.ones(o, np.float32), in_features=k)
        y = ort_session(model, intra_op_num_threads=2).run(None, {"X": x})[0]
        np.testing.assert_array_equal(y, _linear_dot(x, thr, w), err_msg=f"{k=} {o=} {b=} {t=}")


def test_linear_full_epilogue_rank2(path):
    rng = np.random.default_rng(5)
    t, k = 70, 90
    x = rng.standard_normal((t, k)).astype(np.float32)
    thr = (0.2 * rng.standard_normal(k)).astype(np.float32)
    w = _signs(rng, (k, k))
    scale = rng.uniform(0.01, 0.1, k).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32)
    spatial = rng.uniform(0.5, 1.5, (t, 1)).astype(np.float32)
    model = linear_model(thr, pack_linear_weight(w), scale, bias, in_features=k, skip=1, spatial=True, x_shape=["T", k])
    y = ort_session(model).run(None, {"X": x, "spatial": spatial})[0]
    ref = _linear_dot(x, thr, w).astype(np.float32) * scale
    ref = ref * spatial
    ref = ref + bias
    ref = ref + x
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


def test_all_paths_identical_and_threads_agree(monkeypatch):
    rng = np.random.default_rng(6)
    c, o, k = 96, 40, 3
    x = rng.standard_normal((2, c, 21, 37)).astype(np.float32)
    thr = (0.3 * rng.standard_normal(c)).astype(np.float32)
    wt = _signs(rng, (o, c, k, k))
    outputs = {}
    for p in KERNEL_PATHS:
        if kernel_supported(p):
            monkeypatch.setenv(KERNEL_ENV, p)
            for threads in (1, 2):
                outputs[p, threads] = _run_conv(x, thr, wt, threads=threads)
    first = next(iter(outputs.values()))
    for key, y in outputs.items():
        np.testing.assert_array_equal(y, first, err_msg=str(key))


# ---- robustness: bad models and inputs give onnxruntime errors naming the node ----------------------


def _conv_parts(c=8, o=4, k=3):
    rng = np.random.default_rng(7)
    return np.zeros(c, np.float32), pack_conv_weight(_signs(rng, (o, c, k, k))), np.ones(o, np.float32)


_ORT_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,  # checks at run time (input shapes)
    # Checks when the session creates the kernel (types, attributes, initializers): onnxruntime reports our
    # INVALID_ARGUMENT status as "Exception during initialization: <message>".
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
    OnnxModelError,  # what ort_session makes of any of these when the session cannot be created
)


def _expect_error(model_bytes, feeds, *needles):
    with pytest.raises(_ORT_ERRORS) as err:
        ort_session(model_bytes).run(None, feeds)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_error_wrong_input_dtype():
    thr, w, s = _conv_parts()
    model = conv_model(thr, w, s, kernel_shape=(3, 3), in_channels=8, x_dtype=np.float64, name="conv7")
    _expect_error(model, {"X": np.zeros((1, 8, 4, 4))}, "node (conv7)", "tensor(double)", "(X)")  # onnxruntime's
    model = conv_model(thr, w, s, kernel_shape=(3, 3), in_channels=8, x_dtype=np.float16, residual=True, name="conv9")
    proto = onnx.load_from_string(model)
    next(i for i in proto.graph.input if i.name == "residual").type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    _expect_error(proto.SerializeToString(), {"X": np.zeros((1, 8, 4, 4), np.float16),
                                              "residual": np.zeros((1, 4, 4, 4), np.float32)},
                  "'conv9'", "'residual' must be float16, got float32")
    model = conv_model(thr, w.astype(np.int64), s, kernel_shape=(3, 3), in_channels=8, name="conv8")
    _expect_error(model, {"X": np.zeros((1, 8, 4, 4), np.float32)}, "'conv8'", "'weight' must be uint64, got int64")


def test_error_wrong_rank_and_channels():
    thr, w, s = _conv_parts()
    model = conv_model(thr, w, s, kernel_shape=(3, 3), in_channels=8, x_shape=["N", "C", "H", "W"], name="conv1")
    _expect_error(
        model,
        {"X": np.zeros((1, 6, 4, 4), np.float32)},
        "BinaryConv2d node 'conv1'",
        "C = in_channels = 8",
        "[1, 6, 4, 4]",
    )
    model = conv_model(thr, w, s, kernel_shape=(3, 3), in_channels=8, x_shape=["N", 8, "H"], name="conv2")
    _expect_error(model, {"X": np.zeros((1, 8, 4), np.float32)}, "conv2", "[N, C, H, W]")


def test_error_weight_threshold_scale_mismatch():
    thr, w, s = _conv_parts()
    _expect_error(
        conv_model(thr, w[:, :2], s, kernel_shape=(3, 3), in_channels=8, name="cw"),
        {"X": np.zeros((1, 8, 4, 4), np.float32)},
        "BinaryConv2d node 'cw'",
        "weight",
        "[O, 3, 3, 1]",
    )
    _expect_error(
        conv_model(thr, w, s, kernel_shape=(3, 3), in_channels=70, x_shape=["N", 8, "H", "W"], name="cw2"),
        {"X": np.zeros((1, 8, 4, 4), np.float32)},
        "cw2",
    )
    _expect_error(
        conv_model(thr[:5], w, s, kernel_shape=(3, 3), in_channels=8, name="ct"),
        {"X": np.zeros((1, 8, 4, 4), np.float32)},
        "'ct'",
        "threshold",
        "[8]",
        "[5]",
    )
    _expect_error(
        conv_model(thr, w, s[:3], kernel_shape=(3, 3), in_channels=8, name="cs"),
        {"X": np.zeros((1, 8, 4, 4), np.float32)},
        "'cs'",
        "scale",
        "[4]",
    )
    bad_bits = w.copy()
    bad_bits[0, 0, 0, 0] |= np.uint64(1 << 40)  # above in_channels = 8
    _expect_error(
        conv_model(thr, bad_bits, s, kernel_shape=(3, 3), in_channels=8, name="cb"),
        {"X": np.zeros((1, 8, 4, 4), np.float32)},
        "'cb'",
        "bits set above in_channels",
    )


def test_error_attributes_and_skip():
    thr, w, s = _conv_parts()
    _expect_error(
        conv_model(thr, w, s, kernel_shape=(2, 2), in_channels=8, name="ck"),
        {"X": np.zeros((1, 8, 4, 4), np.float32)},
        "'ck'",
        "kernel_shape",
    )
    _expect_error(
        conv_model(thr, w, s, kernel_shape=(3, 3), in_channels=8, skip=1, name="cskip"),
        {"X": np.zeros((1, 8, 4, 4), np.float32)},
        "'cskip'",
        "skip",
    )
    model = conv_model(thr, w, s, kernel_shape=(3, 3), in_channels=8, spatial=True, name="csp")
    _expect_error(
        model,
        {"X": np.zeros((1, 8, 4, 4), np.float32), "spatial": np.zeros((1, 1, 4, 5), np.float32)},
        "'csp'",
        "spatial",
        "[1, 1, 4, 4]",
    )


def test_error_linear_mismatch():
    rng = np.random.default_rng(8)
    w = pack_linear_weight(_signs(rng, (6, 70)))
    thr, s = np.zeros(70, np.float32), np.ones(6, np.float32)
    _expect_error(
        linear_model(thr, w, s, in_features=70, x_shape=["B", "T", 69], name="lin"),
        {"X": np.zeros((1, 2, 69), np.float32)},
        "BinaryLinear node 'lin'",
        "K = in_features = 70",
    )
    _expect_error(
        linear_model(thr, w[:, :1], s, in_features=70, name="lw"),
        {"X": np.zeros((1, 2, 70), np.float32)},
        "'lw'",
        "[O, 2]",
    )
    _expect_error(
        linear_model(thr, w, s, in_features=70, skip=1, name="ls"),
        {"X": np.zeros((1, 2, 70), np.float32)},
        "'ls'",
        "skip",
    )


def test_forced_kernel_path_errors(monkeypatch):
    thr, w, s = _conv_parts()
    model = conv_model(thr, w, s, kernel_shape=(3, 3), in_channels=8)
    monkeypatch.setenv(KERNEL_ENV, "avx9000")
    with pytest.raises(RuntimeError, match="unknown kernel path"):
        kernel_path()
    _expect_error(model, {}, "unknown kernel path")
    missing = [p for p in KERNEL_PATHS if not kernel_supported(p)]
    if not missing:
        pytest.skip("this CPU supports every kernel path")
    monkeypatch.setenv(KERNEL_ENV, missing[0])
    _expect_error(model, {}, f"does not support the {missing[0]} kernels")
