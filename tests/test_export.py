"""ONNX export of SCALES models: onnxruntime (with the kernel library) against the PyTorch converted model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import shared_zoo
import torch
from conftest import DATA, edsr, msrresnet
from onnx import numpy_helper
from PIL import Image
from recipe_checks import convert_small, msrresnet_x2

import srbinarize
from srbinarize.checkpoint import save_model
from srbinarize.cli import main
from srbinarize.export.onnx import EXACT, OnnxExportError, export_onnx
from srbinarize.export.qdq import fp32_onnx
from srbinarize.layers import QuantLayer, ScalesConv2d, ScalesLinear
from srbinarize.models.spec import ModelSpec
from srbinarize.runtime import DOMAIN, ort_session

TOL = 1e-4


def set5_crops(size: tuple[int, int], n: int = 2) -> torch.Tensor:
    """Crops of Set5 x2 LR images (real image statistics), as a batch in [0, 1]."""
    crops = []
    for name in ("baby", "butterfly", "head", "woman")[:n]:
        img = np.asarray(Image.open(DATA / "Set5" / "LR_bicubic" / "X2" / f"{name}x2.png").convert("RGB"))
        top, left = (img.shape[0] - size[0]) // 2, (img.shape[1] - size[1]) // 2
        crops.append(img[top : top + size[0], left : left + size[1]])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


def with_active_branches(model: torch.nn.Module) -> torch.nn.Module:
    """Give the re-scaling branches (zero at initialisation: sigmoid = 0.5 everywhere) a signal to carry."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, srbinarize.layers.scales._ScalesBase):
                for branch in (m.spatial, m.channel):
                    if branch is not None:
                        for p in branch.parameters():
                            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def check_parity(model, path, sizes=((24, 24), (17, 29))) -> None:
    session = ort_session(path)
    for size in sizes:
        x = set5_crops(size)
        with torch.no_grad():
            ref = model(x).numpy()
        y = session.run(None, {"x": x.numpy()})[0]
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() <= TOL, f"size {size}: max abs {np.abs(y - ref).max()}"


def binary_nodes(path) -> list[onnx.NodeProto]:
    """The binary ops of a file (its srbinarize nodes other than the upsampler's ShuffleTaps)."""
    return [n for n in onnx.load(str(path)).graph.node if n.domain == DOMAIN and n.op_type != "ShuffleTaps"]


CASES = {
    "edsr-auto": (edsr, {}),
    "edsr-skip-always": (edsr, {"skip": "always"}),
    "edsr-skip-never-no-spatial": (edsr, {"skip": "never", "spatial_rescale": False}),
    "edsr-no-channel": (edsr, {"channel_rescale": False}),
    "edsr-spatial-3x3": (edsr, {"spatial_kernel_size": 3}),
    "edsr-plain": (edsr, {"skip": "never", "spatial_rescale": False, "channel_rescale": False}),
    "msrresnet-auto": (msrresnet, {}),
    "msrresnet-skip-never": (msrresnet, {"skip": "never"}),
}


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scales_parity_at_two_sizes(case, fold, tmp_path):
    factory, overrides = CASES[case]
    model = with_active_branches(srbinarize.convert(factory(num_block=2), "scales", **overrides).eval())
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, torch.rand(1, 3, 16, 16), fold=fold, **EXACT)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ScalesConv2d)}
    nodes = {n.name: n for n in binary_nodes(path)}
    assert set(nodes) == set(layers) and len(report.packed) == len(layers) > 0
    for name, node in nodes.items():
        layer = layers[name]
        inputs = list(node.input) + [""] * (11 - len(node.input))
        # the spatial map: computed by standard ops (input 5), or a 1x1 conv C->1 inside the op (inputs 9, 10)
        inside = fold and layer.spatial is not None and layer.spatial.kernel_size == (1, 1)
        assert bool(inputs[5]) == (layer.spatial is not None and not inside) and bool(inputs[9]) == inside
        assert bool(inputs[6]) == (layer.channel is not None)
        skip = next(a.i for a in node.attribute if a.name == "skip")
        assert skip == int(layer.use_skip)
    if overrides.get("skip") in ("always", "never"):
        assert {bool(m.use_skip) for m in layers.values()} == {overrides["skip"] == "always"}
    check_parity(model, path)


def test_partial_binarization_exports_as_fp_ops(tmp_path):
    model = srbinarize.convert(edsr(num_block=1), "scales", binarize_weights=False).eval()
    report = export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 16, 16), **EXACT)
    assert not report.packed and not binary_nodes(tmp_path / "m.onnx")
    assert any("w32a1" in line for line in report.fp)
    check_parity(model, tmp_path / "m.onnx")


def test_dynamic_batch_and_packed_weights(tmp_path):
    model = srbinarize.convert(edsr(num_block=1, num_feat=70), "scales").eval()  # 70 channels: two words
    path = tmp_path / "m.onnx"
    export_onnx(model, path, torch.rand(1, 3, 16, 16), **EXACT)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3] and dims[1] == ""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in binary_nodes(path):
        weight = inits[node.input[2]]
        assert weight.data_type == onnx.TensorProto.UINT64 and list(weight.dims) == [70, 3, 3, 2]
        layer = dict(model.named_modules())[node.name]
        w = layer.binary_weight().permute(0, 2, 3, 1).numpy() > 0  # bit c of word c // 64, +1 -> 1
        words = numpy_helper.to_array(weight)
        bits = (words[..., :, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
        np.testing.assert_array_equal(bits.reshape(70, 3, 3, 128)[..., :70].astype(bool), w)
        assert not bits.reshape(70, 3, 3, 128)[..., 70:].any()
    x = torch.rand(3, 3, 11, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ort_session(path).run(None, {"x": x.numpy()})[0] - ref).max() <= TOL


def test_binary_file_is_much_smaller_than_fp(tmp_path):
    fp = edsr(num_block=4, num_feat=64).eval()
    binary = srbinarize.convert(fp, "scales", calibrate=False).eval()  # the size does not depend on the values
    example = torch.rand(1, 3, 16, 16)
    fp_bytes = fp32_onnx(fp, tmp_path / "fp.onnx", example).stat().st_size
    report = export_onnx(binary, tmp_path / "bin.onnx", example)
    body = sum(m.weight.numel() for m in binary.modules() if isinstance(m, ScalesConv2d))
    # The body's FP32 weights (4 bytes each) shrink to 1 bit each; head and upsampler stay FP32; the slack is
    # the per-channel vectors (threshold, scale, bias) and the re-scaling branches.
    assert report.file_bytes < fp_bytes - 4 * body + body / 8 + 32 * 1024
    assert report.file_bytes < fp_bytes / 2.5


def fp32_elements(path) -> int:
    """FP32 numbers stored in an ONNX file (initializers and Constant nodes)."""
    proto = onnx.load(str(path))
    tensors = list(proto.graph.initializer) + [n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type == onnx.TensorProto.FLOAT)


DEPLOYED_CASES = {
    "bam": (msrresnet_x2, "bam", {}),
    "bam-fp-activations": (msrresnet_x2, "bam", {"binarize_activations": False}),
    "lmb": (edsr, "lmb", {}),
    "lmb-fp-activations": (edsr, "lmb", {"binarize_activations": False}),
    "ma": (edsr, "ma", {}),
}


@pytest.mark.parametrize("case", sorted(DEPLOYED_CASES))
def test_bam_lmb_ma_deployed_forms(case, tmp_path):
    factory, recipe, overrides = DEPLOYED_CASES[case]
    model = convert_small(factory(), recipe, **overrides).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, torch.rand(1, 3, 16, 16), **EXACT)
    assert len(report.packed) == len(layers) > 0
    nodes = {n.name for n in binary_nodes(path)}
    binary_acts = recipe != "ma" and "binarize_activations" not in overrides
    assert nodes == (set(layers) if binary_acts else set())  # weight-only layers: standard Conv, bits unpacked
    # Every replaced conv's weights are stored as bits, not as FP32 numbers.
    fp_path = fp32_onnx(factory().eval(), tmp_path / "fp.onnx", torch.rand(1, 3, 16, 16))
    body = sum(m.weight.numel() for m in layers.values())
    assert fp32_elements(path) < fp32_elements(fp_path) - 0.9 * body
    check_parity(model, path)


def test_layers_without_a_deployed_form_are_refused(tmp_path):
    model = srbinarize.convert(edsr(num_block=1), "lmb", binarize_weights=False).eval()
    with pytest.raises(OnnxExportError, match=r"body\.0\.conv1: LMB conv with binarize_weights off"):
        export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 16, 16))
    assert not list(tmp_path.iterdir()), "a failed export left a file behind"


def test_cli_export_from_checkpoint(tmp_path, capsys):
    spec = ModelSpec("basicsr.archs.edsr_arch:EDSR", {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 16,
                                                       "num_block": 2, "upscale": 2})
    model = srbinarize.convert(spec.build().eval(), "scales").eval()
    ckpt = save_model(model, tmp_path / "edsr.safetensors", spec)
    out = tmp_path / "edsr.onnx"
    assert main(["export", str(ckpt), "-o", str(out), "--activations", "float32", "--remainder", "fp32"]) == 0
    assert "packed (1-bit weights): 5" in capsys.readouterr().out
    check_parity(model, out, sizes=((20, 20),))
    assert main(["export", str(ckpt), "-o", str(tmp_path / "q.onnx"), "--remainder", "int8"]) == 0
    assert "int8 QDQ (onnxruntime QLinearConv): upsample.0, conv_last" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2


@pytest.mark.parametrize("skip", ["auto", "never", "always"])
def test_scales_swinir_binary_linears_at_sizes_other_than_the_export_size(skip, tmp_path):
    from test_transformers import swinir

    model = srbinarize.convert(swinir().eval(), "scales", example_input=torch.rand(1, 3, 16, 16), skip=skip)
    model = with_active_branches(model.eval())
    path = tmp_path / "swinir.onnx"
    report = export_onnx(model, path, torch.rand(1, 3, 16, 16), **EXACT)
    linears = {n for n, m in model.named_modules() if isinstance(m, ScalesLinear)}
    nodes = binary_nodes(path)
    assert {n.name for n in nodes if n.op_type == "BinaryLinear"} == linears and len(linears) == 16
    assert sum(line.split(":")[1].strip().startswith("BinaryLinear") for line in report.packed) == 16
    layers = dict(model.named_modules())
    for node in nodes:
        assert next(a.i for a in node.attribute if a.name == "skip") == int(layers[node.name].use_skip)
    if skip != "auto":
        same = [layers[n] for n in linears if layers[n].same_shape]
        assert same and all(m.use_skip == (skip == "always") for m in same)
    # The export size, a size the blocks were not built for (the shifted-window mask is computed in the
    # graph from the runtime size), and a batch of 2 (the batch is not baked into the window reshapes).
    check_parity(model, path, sizes=((16, 16), (12, 20), (20, 8)))


def test_int8_remainder_runs_as_qlinearconv_within_tolerance(tmp_path):
    """remainder="int8": head, upsampler and tail as int8 QDQ. Tolerance against the same export with an FP32
    remainder, on images like the calibration batch, relative to the output's range: mean |error| <= 1%, RMS
    <= 2%, max <= 25% (a small change of the head's output flips some activation signs of the binary layers
    after it, which moves single pixels much more than the int8 rounding itself)."""
    model = with_active_branches(srbinarize.convert(edsr(num_block=2), "scales").eval())
    calib = set5_crops((24, 24), n=4)
    fp = export_onnx(model, tmp_path / "fp.onnx", torch.rand(1, 3, 16, 16), remainder="fp32")
    q = export_onnx(model, tmp_path / "q.onnx", torch.rand(1, 3, 16, 16), remainder="int8", calibration_data=calib)
    # conv_first (3->16 3x3: 27 products per output) stays FP32, measured faster than int8 for so few
    assert q.int8 == ["upsample.0", "conv_last"] and not fp.int8
    assert not any(line.startswith(("upsample.0:", "conv_last:")) for line in q.fp)
    assert any(line.startswith("conv_first:") and "FP32 in the int8 remainder" in line for line in q.fp)
    optimized = tmp_path / "q_opt.onnx"
    ort_session(q.path, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                optimized_model_filepath=str(optimized))
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("QLinearConv") == 2
    x = set5_crops((20, 28), n=2).numpy()
    ref = ort_session(fp.path).run(None, {"x": x})[0]
    y = ort_session(q.path).run(None, {"x": x})[0]
    err, span = np.abs(y - ref), float(ref.max() - ref.min())
    rms = float(np.sqrt((err**2).mean()))
    assert 0 < err.mean() <= 0.01 * span and rms <= 0.02 * span and err.max() <= 0.25 * span, (rms, err.max(), span)


def test_int8_remainder_bad_arguments(tmp_path):
    model = srbinarize.convert(edsr(num_block=1), "scales").eval()
    with pytest.raises(OnnxExportError, match="remainder='int4'"):
        export_onnx(model, tmp_path / "m.onnx", remainder="int4")
    with pytest.raises(OnnxExportError, match="remainder_weight_bits=4"):
        export_onnx(model, tmp_path / "m.onnx", remainder="int8", remainder_weight_bits=4)
    with pytest.raises(OnnxExportError, match=r"calibration_data must be \(N, 3, H, W\)"):
        export_onnx(model, tmp_path / "m.onnx", remainder="int8", calibration_data=torch.rand(2, 1, 8, 8))


def test_default_remainder_is_int8_where_it_holds(tmp_path, monkeypatch):
    """remainder=None: int8 where the calibration batch's output stays within INT8_AGREEMENT_DB of the FP32
    remainder's; FP32, with the reason in the report, where it does not or where there is no batch."""
    import srbinarize.export.onnx as onnx_export
    from srbinarize.convert import INFO_ATTR

    model = with_active_branches(srbinarize.convert(edsr(num_block=1), "scales").eval())
    example = torch.rand(1, 3, 16, 16)

    def ops(path) -> list[str]:
        return [n.op_type for n in onnx.load(str(path)).graph.node]

    default = export_onnx(model, tmp_path / "d.onnx", example)
    explicit = export_onnx(model, tmp_path / "q.onnx", example, remainder="int8")
    assert default.int8 == explicit.int8 == ["upsample.0", "conv_last"]
    assert not default.int8_refused and "QuantizeLinear" in ops(default.path)
    monkeypatch.setattr(onnx_export, "INT8_AGREEMENT_DB", 1000.0)
    refused = export_onnx(model, tmp_path / "r.onnx", example)
    assert not refused.int8 and "dB from the FP32 remainder's, under 1000 dB" in refused.int8_refused
    assert "remainder left FP32" in str(refused) and "QuantizeLinear" not in ops(refused.path)
    delattr(model, INFO_ATTR)
    bare = export_onnx(model, tmp_path / "b.onnx", example)
    assert not bare.int8 and bare.int8_refused.startswith("no calibration batch")
    with pytest.raises(OnnxExportError, match="needs calibration_data"):
        export_onnx(model, tmp_path / "b.onnx", example, remainder="int8")


def test_residual_add_and_relu_fold_into_the_binary_ops(tmp_path):
    """EDSR blocks: conv1 -> ReLU and identity + conv2 become the ops' relu / residual, and the global mean a
    channel vector takes of a binary conv's output its channel_mean output; output unchanged."""
    model = with_active_branches(srbinarize.convert(edsr(num_block=2), "scales").eval())
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, torch.rand(1, 3, 16, 16), fold=True, **EXACT)
    assert report.fused == ["body.0.conv1: + relu", "body.0.conv2: + residual", "body.1.conv1: + relu",
                            "body.1.conv2: + residual", "conv_after_body: + residual",
                            *(f"body.{b}.conv{c}: + channel_mean" for b in (0, 1) for c in (1, 2))]
    nodes = {n.name: n for n in binary_nodes(path)}
    relu = {name for name, n in nodes.items() if any(a.name == "relu" and a.i == 1 for a in n.attribute)}
    assert relu == {"body.0.conv1", "body.1.conv1"}
    assert {name for name, n in nodes.items() if len(n.input) > 7 and n.input[7]} == {
        "body.0.conv2", "body.1.conv2", "conv_after_body"}
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Relu" not in ops and ops.count("ReduceMean") == 1  # the first binary conv reads conv_first's output
    check_parity(model, path)


@pytest.mark.skipif(not shared_zoo.available("team01_efdn"), reason="../shared/models/team01_efdn is absent")
def test_efdn_prelu_and_relu_fold_and_match_pytorch(tmp_path):
    """A real lightweight model: its PReLUs after binary convs become the ops' prelu_slope; same output."""
    model = srbinarize.convert(shared_zoo.load("team01_efdn"), "scales").eval()
    path = tmp_path / "efdn.onnx"
    report = export_onnx(model, path, torch.rand(1, 3, 16, 16), fold=True, **EXACT)
    assert sum(line.count("+ PRelu") for line in report.fused) == 12
    assert "PRelu" not in [n.op_type for n in onnx.load(str(path)).graph.node]
    slopes = [n for n in binary_nodes(path) if len(n.input) > 8 and n.input[8]]
    assert len(slopes) == 12
    check_parity(model, path, sizes=((48, 48), (44, 52)))
