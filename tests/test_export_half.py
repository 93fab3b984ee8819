"""export_onnx(activations="float16"): chained binary convs on float16 tensors (srbinarize/export/half.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import edsr
from onnx import TensorProto, helper
from test_export import set5_crops, with_active_branches
from torch import nn

import srbinarize
from srbinarize.checkpoint import save_model
from srbinarize.cli import main
from srbinarize.convert import INFO_ATTR
from srbinarize.export.onnx import OnnxExportError, export_onnx
from srbinarize.models.spec import ModelSpec
from srbinarize.runtime import DOMAIN, ort_session

U16 = 2.0**-11  # float16 unit roundoff: round to nearest moves a value by at most this, relative


class ChainThenLone(nn.Module):
    """Binary convs ``a -> b`` (a chain, nothing between them) and ``lone`` after a Tanh, whose residual is the
    head's output."""

    def __init__(self, feat: int = 16, r: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, feat, 3, padding=1)
        self.a = nn.Conv2d(feat, feat, 3, padding=1)
        self.b = nn.Conv2d(feat, feat, 3, padding=1)
        self.lone = nn.Conv2d(feat, feat, 3, padding=1)
        self.up = nn.Conv2d(feat, 3 * r * r, 3, padding=1)
        self.shuffle = nn.PixelShuffle(r)

    def forward(self, x):
        h = self.head(x)
        return self.shuffle(self.up(self.lone(torch.tanh(self.b(self.a(h)))) + h))


def binary_convs(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in graph.node if n.domain == DOMAIN and n.op_type == "BinaryConv2d"}


def dtypes(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every tensor: inputs and initializers as declared, Casts by ``to``, a BinaryConv2d's Y
    as its X (the op's two registrations) and channel_mean float32, the other (standard) ops float32.
    Asserts that no standard op reads a float16 tensor."""
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    types |= {i.name: i.data_type for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Cast":
            types[node.output[0]] = node.attribute[0].i
            continue
        if node.domain == DOMAIN and node.op_type == "BinaryConv2d":
            types[node.output[0]] = types[node.input[0]]
            types |= {o: TensorProto.FLOAT for o in node.output[1:]}
            continue
        assert all(types.get(i) != TensorProto.FLOAT16 for i in node.input), node
        types |= {o: TensorProto.FLOAT for o in node.output if o}
    return types


def assert_value_info_matches(graph: onnx.GraphProto, types: dict[str, int]) -> None:
    """No value_info entry contradicts a tensor's element type (a stale float32 one on a float16 tensor)."""
    for info in graph.value_info:
        assert info.name not in types or info.type.tensor_type.elem_type == types[info.name], info.name


def simulated(path) -> bytes:
    """The float16 file with every float16 tensor as float32 rounded to float16 (a Cast there and back) and
    the binary convs on float32: the contract's arithmetic (kernels/README.md) written with standard Casts."""
    proto = onnx.load(str(path))
    graph, nodes = proto.graph, []
    for node in graph.node:
        if node.op_type == "Cast" and node.attribute[0].i == TensorProto.FLOAT16:
            out = node.output[0]
            nodes += [helper.make_node("Cast", list(node.input), [f"{out}.r"], to=TensorProto.FLOAT16),
                      helper.make_node("Cast", [f"{out}.r"], [out], to=TensorProto.FLOAT)]
            continue
        nodes.append(node)
        if node.domain == DOMAIN and node.op_type == "BinaryConv2d" and node.output[0].endswith(".f16"):
            out = node.output[0]
            node.output[0] = f"{out}.raw"
            nodes += [helper.make_node("Cast", [f"{out}.raw"], [f"{out}.r"], to=TensorProto.FLOAT16),
                      helper.make_node("Cast", [f"{out}.r"], [out], to=TensorProto.FLOAT)]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return proto.SerializeToString()


@pytest.fixture(scope="module")
def edsr_files(tmp_path_factory):
    """A SCALES EDSR (2 blocks, 16 features), exported with float32 and with float16 activations."""
    torch.manual_seed(0)
    model = with_active_branches(srbinarize.convert(edsr(num_block=2), "scales").eval())
    root = tmp_path_factory.mktemp("half")
    example = torch.rand(1, 3, 16, 16)
    f32 = export_onnx(model, root / "f32.onnx", example, fold=True, activations="float32")
    f16 = export_onnx(model, root / "f16.onnx", example, fold=True, activations="float16")
    return f32, f16


def test_chained_binary_convs_run_on_float16_with_one_cast_per_tensor(edsr_files):
    f32, f16 = edsr_files
    assert not f32.float16
    proto = onnx.load(str(f16.path))
    onnx.checker.check_model(proto, full_check=True)
    graph = proto.graph
    types = dtypes(graph)
    convs = binary_convs(graph)
    # Every binary conv of EDSR's body is chained (X from one, or residual / Y to one), so all are float16.
    assert set(convs) == {f"body.{b}.conv{c}" for b in (0, 1) for c in (1, 2)} | {"conv_after_body"}
    for node in convs.values():
        inputs = list(node.input) + [""] * (11 - len(node.input))
        assert types[inputs[0]] == TensorProto.FLOAT16
        assert all(types[name] != TensorProto.FLOAT16 for name in inputs[1:] if name and name != inputs[7])
        assert not inputs[7] or types[inputs[7]] == TensorProto.FLOAT16
        assert all(types[o] == TensorProto.FLOAT for o in node.output[1:])  # channel_mean stays float32
    casts = [n for n in graph.node if n.op_type == "Cast"]
    assert all(c == 1 for c in Counter((n.input[0], n.attribute[0].i) for n in casts).values())
    to16 = [n for n in casts if n.attribute[0].i == TensorProto.FLOAT16]
    to32 = [n for n in casts if n.attribute[0].i == TensorProto.FLOAT]
    # In: conv_first's output (X of body.0.conv1, residual of body.0.conv2 and of conv_after_body), one Cast;
    # out: conv_after_body's output into the upsampler. Between the ops nothing converts.
    assert len(to16) == len(to32) == 1
    first = to16[0].output[0]
    assert [n.name for n in convs.values() if first in n.input] == ["body.0.conv1", "body.0.conv2", "conv_after_body"]
    assert to32[0].input[0] == convs["conv_after_body"].output[0]
    assert all(types[n.input[0]] == TensorProto.FLOAT for n in to16)
    assert all(types[n.input[0]] == TensorProto.FLOAT16 for n in to32)
    # x and y stay float32, and the file's float16 tensors are the report's
    for value in (*graph.input, *graph.output):
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT, value.name
    assert {line.split(":")[0] for line in f16.float16} == {t for t, e in types.items() if e == TensorProto.FLOAT16}
    assert_value_info_matches(graph, types)
    assert "float16 activations (chained binary convs): 6 tensors" in str(f16)


def test_a_lone_binary_conv_stays_float32(tmp_path):
    """``lone`` sits between a Tanh and the upsampler (its residual the head's output): two Casts for one op
    would cost what float16 saves there. The head's output is cast once, for ``a``; ``lone`` reads it as is."""
    model = srbinarize.convert(ChainThenLone().eval(), "scales").eval()
    report = export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 16, 16), fold=True, activations="float16")
    graph = onnx.load(str(report.path)).graph
    types, convs = dtypes(graph), binary_convs(graph)
    assert {name: types[n.input[0]] == TensorProto.FLOAT16 for name, n in convs.items()} == {
        "a": True, "b": True, "lone": False}
    lone = convs["lone"]
    assert types[lone.output[0]] == types[lone.input[7]] == TensorProto.FLOAT
    # torch typed a's and b's outputs (value_info): a's float32 name is gone (only b reads it), b's is the
    # Cast back for the Tanh; both float16 names are typed float16
    a_out, b_out = convs["a"].output[0], convs["b"].output[0]
    infos = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    assert infos[a_out] == infos[b_out] == TensorProto.FLOAT16
    assert infos[b_out.removesuffix(".f16")] == TensorProto.FLOAT
    assert a_out.removesuffix(".f16") not in infos and a_out.removesuffix(".f16") not in types
    assert_value_info_matches(graph, types)
    cast = next(n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16)
    assert lone.input[7] == cast.input[0] and convs["a"].input[0] == cast.output[0]
    x = set5_crops((20, 24)).numpy()
    simulated_y = ort_session(simulated(report.path)).run(None, {"x": x})[0]
    assert np.abs(ort_session(report.path).run(None, {"x": x})[0] - simulated_y).max() <= 1e-6


def test_the_default_follows_fold_and_bad_values_are_refused(tmp_path):
    model = srbinarize.convert(edsr(num_block=1), "scales").eval()
    example = torch.rand(1, 3, 16, 16)
    assert export_onnx(model, tmp_path / "a.onnx", example, fold=True).float16
    assert not export_onnx(model, tmp_path / "b.onnx", example, fold=False).float16
    # Without the folds a ReLU or an Add sits between any two binary convs of EDSR: nothing is chained.
    unfolded = export_onnx(model, tmp_path / "c.onnx", example, fold=False, activations="float16")
    assert not unfolded.float16 and "Cast" not in [n.op_type for n in onnx.load(str(unfolded.path)).graph.node]
    with pytest.raises(OnnxExportError, match=r"activations='bfloat16': expected one of \('float32', 'float16'\)"):
        export_onnx(model, tmp_path / "d.onnx", example, activations="bfloat16")
    assert not (tmp_path / "d.onnx").exists()


def test_the_overflow_guard_names_the_tensor(tmp_path):
    """float16 overflows above 65504; a tensor over 2**15 on the calibration batch is refused, by name, when
    float16 is asked for; by default the binary convs around it stay float32 and the report names them."""
    model = srbinarize.convert(edsr(num_block=1), "scales").eval()
    example = torch.rand(1, 3, 16, 16)
    calib = set5_crops((24, 24))
    path = tmp_path / "m.onnx"
    # The input scaled up: conv_first's output, read by the chain, is large
    with pytest.raises(OnnxExportError, match=r'tensor t\d+ \(X of body\.0\.conv1, .*\) reaches max \|value\| '
                       r'[\d.e+]+ on the calibration batch, above 32768 .* activations="float32"'):
        export_onnx(model, path, example, fold=True, calibration_data=calib * 3e4, activations="float16")
    assert not path.exists()
    export_onnx(model, path, example, fold=True, calibration_data=calib, activations="float16")  # unscaled: fine
    # A bias of the chain's last op scaled up: its output is refused (default calibration batch)
    with torch.no_grad():
        model.conv_after_body.bias.fill_(4e4)
    with pytest.raises(OnnxExportError, match=r"\(output of conv_after_body\) reaches max \|value\| 4"):
        export_onnx(model, tmp_path / "b.onnx", example, fold=True, activations="float16")
    # The default keeps the convs around that tensor on float32 and says so; the others stay float16
    report = export_onnx(model, tmp_path / "b.onnx", example, fold=True)
    assert report.float32_kept == [report.float32_kept[0]] and report.float32_kept[0].startswith("conv_after_body: ")
    assert report.float16 and not any("conv_after_body" in line for line in report.float16)
    assert "kept on float32 activations" in str(report)
    types = {n.name: n.input[0] for n in onnx.load(str(report.path)).graph.node if n.op_type == "BinaryConv2d"}
    assert types["body.0.conv1"].endswith(".f16") and not types["conv_after_body"].endswith(".f16")
    # No conversion record, no calibration_data: the example input is what the graph runs on
    bare = srbinarize.convert(edsr(num_block=1), "scales").eval()
    delattr(bare, INFO_ATTR)
    with pytest.raises(OnnxExportError, match=r"X of body\.0\.conv1"):
        export_onnx(bare, tmp_path / "c.onnx", example * 3e4, fold=True, activations="float16")
    assert export_onnx(bare, tmp_path / "c.onnx", example, fold=True).float16


def test_float16_file_computes_the_contract_and_stays_close_to_float32(edsr_files):
    """Two tolerances. (1) The kernel's contract: fp32 arithmetic on X read exactly, Y rounded to nearest even;
    so the float16 file computes the float32 graph with each float16 tensor rounded (`simulated`): the same
    floats (1e-6 absolute: fp32 reordering, far below one float16 step, 2**-11 relative). (2) Against the
    float32 file: each of the k float16 tensors is rounded once, by at most U16 relative; accumulated along the
    chain that bounds the median and the mean |error| by k * U16 of the output's range. A value rounded
    across its binarization threshold flips a sign, which moves the pixels around it more (measured here: 4%
    of the pixels of the 24x24 crops beyond k * U16, none of the 17x29 ones): max <= 25%, as for the int8
    remainder."""
    f32, f16 = edsr_files
    k = len(f16.float16)
    a, b, sim = ort_session(f32.path), ort_session(f16.path), ort_session(simulated(f16.path))
    for size in ((24, 24), (17, 29)):
        x = set5_crops(size).numpy()
        ref, y = a.run(None, {"x": x})[0], b.run(None, {"x": x})[0]
        assert y.dtype == np.float32 and y.shape == ref.shape
        assert np.abs(y - sim.run(None, {"x": x})[0]).max() <= 1e-6, size
        err, span = np.abs(y - ref), float(ref.max() - ref.min())
        bound = k * U16 * span
        assert 0 < err.mean() <= bound and np.median(err) <= bound and err.max() <= 0.25 * span, (
            size, err.mean() / span, np.median(err) / span, err.max() / span)


def test_cli_export_activations(tmp_path, capsys):
    spec = ModelSpec("basicsr.archs.edsr_arch:EDSR", {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 16,
                                                       "num_block": 1, "upscale": 2})
    ckpt = save_model(srbinarize.convert(spec.build().eval(), "scales").eval(), tmp_path / "m.safetensors", spec)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "a.onnx"), "--activations", "float16"]) == 0
    assert "float16 activations (chained binary convs)" in capsys.readouterr().out
    assert main(["export", str(ckpt), "-o", str(tmp_path / "b.onnx"), "--activations", "float32"]) == 0
    assert "float16" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), "-o", str(tmp_path / "c.onnx"), "--activations", "half"])
