"""FQSR: quantizer, DAIA, every conv and skip add of real SR architectures quantized, SQCL, checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import edsr, msrresnet, rcan
from torch import nn

import srbinarize
from srbinarize.graph.partition import is_add
from srbinarize.layers.fqsr import (
    SETTINGS,
    FqsrAdd,
    FqsrConv2d,
    FqsrConvConfig,
    IntervalQuantizer,
    restart_daia,
    sqcl_loss,
)

# skip adds per model: EDSR 4 blocks + global; MSRResNet 3 blocks (its final `out += base` is the output);
# RCAN 2 groups x 2 RCABs + 2 group skips + global
SKIP_ADDS = {"edsr": 5, "msrresnet": 3, "rcan": 7}
MODELS = {"edsr": edsr, "msrresnet": msrresnet, "rcan": rcan}


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_codes(bits, signed):
    q = IntervalQuantizer(bits, daia_iters=3, signed=None)
    v = torch.randn(4, 8, 16, 16) * 3 + (0 if signed else 3)
    v = v if signed else v.clamp_min(0)
    q.calibrate(v)
    assert q.signed == signed and q.ready
    # DAIA at convert: the calibration batch is one observation, I = max|v| over all of it (not the mean of
    # per-image maxima, which clipped whole test images)
    assert q.interval.item() == pytest.approx(v.abs().amax().item())
    q.eval()
    out = q(v * 1.5)  # some values beyond the interval: clipped
    assert out.unique().numel() <= 2**bits
    lo, hi = q.qrange()
    code = q.integer(v * 1.5)
    assert code.min() >= lo and code.max() <= hi and (code.max() == hi)
    torch.testing.assert_close(out, code * q.step())


def test_ste_gradients():
    q = IntervalQuantizer(4, daia_iters=1, signed=True)
    q.calibrate(torch.tensor([[2.0]]))
    v = torch.tensor([-3.0, -1.0, 0.3, 1.9, 2.5], requires_grad=True)
    q(v).sum().backward()
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the interval, 0 where clipped
    # d/dI: lo / n and hi / n = 1 where clipped (lo = -8, n = 7 at 4 bits), (round(u) - u) / n inside
    n = q.levels()
    u = v.detach()[1:4] / (q.interval.detach() / n)  # as the quantizer computes it (float ties)
    inside = ((u.round() - u) / n).sum()
    assert q.qrange() == (-8, 7)
    assert q.interval.grad.item() == pytest.approx(-8 / 7 + 1 + inside.item(), abs=1e-6)


def test_daia_schedule_in_training():
    q = IntervalQuantizer(8, daia_iters=3)
    with pytest.raises(RuntimeError, match="never calibrated"):
        q.eval()(torch.ones(2))
    q.train()
    maxima = []
    for i in range(3):
        v = torch.randn(2, 5) * (i + 1)
        maxima.append(v.abs().max().item())
        assert torch.equal(q(v), v)  # pass-through while the window is open
    assert q.ready and q.interval.item() == pytest.approx(sum(maxima) / 3, rel=1e-6)
    v = torch.randn(2, 5)
    assert not torch.equal(q(v), v)  # quantizes from the (l+1)-th iteration on
    assert int(q.daia_seen) == 3


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request):
    torch.manual_seed(0)
    fp = MODELS[request.param]().eval()
    return request.param, fp, srbinarize.convert(fp, "fqsr", **SETTINGS["4/4/8"])


def test_every_conv_and_skip_add_quantized(converted):
    name, _fp, q = converted
    modules = dict(q.named_modules())
    convs = [n for n in q.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]
    assert convs == []  # no FP conv left anywhere, attention convs included
    quant_convs = [m for m in q.modules() if isinstance(m, FqsrConv2d)]
    assert quant_convs and all(m.weight_q is not None and m.weight_bits == 4 for m in quant_convs)
    adds = [n for n in q.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], FqsrAdd)]
    assert len(adds) == SKIP_ADDS[name]
    # the adds left in the graph are the final output or involve a constant: nothing feeds a layer from them
    for node in q.graph.nodes:
        if is_add(node):
            later = list(node.users)
            while later:
                user = later.pop()
                assert not (user.op == "call_module" and isinstance(modules[user.target], (FqsrConv2d, FqsrAdd)))
                later.extend(user.users)
    # network input and final output are left as they are
    assert q.conv_first.input_q is None and q.conv_first.output_q is not None
    assert q.conv_last.output_q is None and q.conv_last.input_q is not None
    s = srbinarize.summary(q, (24, 24))
    assert s.count(quantized=True) == s.count() == len(quant_convs)
    assert s.count(quantized=True, kind="add") == s.count(kind="add") == SKIP_ADDS[name]
    assert f"{SKIP_ADDS[name]} of {SKIP_ADDS[name]} skip adds" in str(s)
    assert s.memory.peak < s.memory.peak_fp / 3  # 4- and 8-bit activations against FP32


def test_distinct_values_per_quantized_tensor(converted):
    _name, _fp, q = converted
    seen = {}

    def hook(module, _inputs, output):
        seen[module] = (module.bits, output.unique().numel())

    handles = [m.register_forward_hook(hook) for m in q.modules() if isinstance(m, IntervalQuantizer)]
    with torch.no_grad():
        q(torch.rand(1, 3, 20, 20))
    for h in handles:
        h.remove()
    assert len(seen) == len([m for m in q.modules() if isinstance(m, IntervalQuantizer)])
    assert all(n <= 2**bits for bits, n in seen.values())
    assert {bits for bits, _ in seen.values()} == {4, 8}


def test_fqsr_close_to_fp_at_8_bits():
    fp = edsr().eval()
    q = srbinarize.convert(fp, "fqsr")
    x = torch.rand(2, 3, 20, 20)
    with torch.no_grad():
        ref, got = fp(x), q(x)
    mse = (got - ref).pow(2).mean().item()
    assert 10 * torch.log10(torch.tensor(1 / mse)) > 45  # dB against the FP output, image range [0, 1]


def test_sqcl_loss_trains_intervals():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = FqsrConv2d.from_float(conv, FqsrConvConfig(bits_w=4, bits_a=4))
    x = torch.randn(2, 4, 8, 8)
    layer.calibrate(x, conv(x).detach())
    layer.train()
    xq, wq = layer.input_q(x), layer.weight_q(layer.weight)
    pre = torch.nn.functional.conv2d(xq, wq, layer.bias, padding=1)
    manual = (wq - layer.weight).abs().mean() + (xq - x).abs().mean() + (layer.output_q(pre) - pre).abs().mean()
    layer(x)
    loss = sqcl_loss(layer)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    loss.backward()
    assert all(q.interval.grad is not None and q.interval.grad != 0
               for q in (layer.weight_q, layer.input_q, layer.output_q))
    with pytest.raises(ValueError, match="no FQSR quantizer"):
        sqcl_loss(nn.Conv2d(1, 1, 1))


def test_restart_daia_and_training_step():
    fp = edsr(num_block=1).eval()
    q = srbinarize.convert(fp, "fqsr", bits_w=6, bits_a=6)
    assert restart_daia(q) > 0
    q.train()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(q(x), fp(x), rtol=1e-4, atol=1e-4)  # DAIA window open: pass-through
    for _ in range(19):
        q(x)
    out = q(x)  # 21st iteration: quantized, differentiable
    assert not torch.allclose(out, fp(x), atol=1e-5)
    (out.mean() + 0.3 * sqcl_loss(q)).backward()
    assert q.conv_first.weight.grad is not None and q.skip_adds.add.operand_q.interval.grad is not None


def test_checkpoint_roundtrip():
    fp = rcan().eval()
    q = srbinarize.convert(fp, "fqsr", bits_w=6, bits_a=6)
    rebuilt = srbinarize.convert(fp, "fqsr", bits_w=6, bits_a=6, calibrate=False)
    rebuilt.load_state_dict(q.state_dict())  # intervals, DAIA counters and signs travel in the state dict
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), rebuilt(x))


class InPlaceReuse(nn.Module):
    """``a += b`` where ``a`` is read again afterwards: replacing the add would change the result."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        keep = a
        a = a.add_(b)
        return self.c3(a + keep)


def test_in_place_add_with_later_reader_is_left_alone():
    model = InPlaceReuse().eval()
    q = srbinarize.convert(model, "fqsr", bits_s=8)
    plan = q.srbinarize_info.plan
    assert any("in-place add whose first operand is read afterwards" in m for m in plan.messages)
    assert len([r for r in plan.rows if r.kind == "add"]) == 1  # only `a + keep`


def _ort(path, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits_w", [8, 7])  # uint8 + 128 weights (u8u8 kernels) / int8 weights (u8s8)
def test_qdq_export_runs_fused_and_matches(tmp_path, bits_w):
    import onnx

    from srbinarize.export.qdq import deployed_output, export_qdq

    q = srbinarize.convert(edsr().eval(), "fqsr", bits_w=bits_w)
    path = export_qdq(q, tmp_path / "edsr_fqsr.onnx")
    opt_path = tmp_path / "opt.onnx"
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(opt_path)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opt_path).graph.node]
    # every conv with quantized input and output runs as an integer QLinearConv, every skip add as QLinearAdd
    assert ops.count("QLinearConv") == 10 and ops.count("QLinearAdd") == SKIP_ADDS["edsr"]
    fused, reference = _ort(path), _ort(path, optimize=False)
    # the exact bound of one step of the last quantized tensor, through the last conv and EDSR's /255
    last = q.conv_last
    one_step = (last.weight_q.integer(last.weight).abs().sum((1, 2, 3)).max() * last.weight_q.step()
                * last.input_q.step() / 255).item()
    for shape in [(1, 3, 20, 20), (2, 3, 13, 27)]:  # dynamic batch, height, width
        x = torch.rand(*shape)
        with torch.no_grad():
            want = q(x).numpy()
        # the graph is the layer: unfused ORT differs from PyTorch only where float summation order flips a tie
        plain = torch.from_numpy(reference.run(None, {"x": x.numpy()})[0]) - deployed_output(q, x)
        assert plain.abs().max() <= one_step
        got = fused.run(None, {"x": x.numpy()})[0]
        assert got.shape == want.shape
        assert abs(got - want).max() <= one_step
        assert abs(got - want).mean() < one_step / 5  # flips of single codes, not a drift


def test_qdq_export_below_8_bits_keeps_the_code(tmp_path):
    from srbinarize.export.qdq import QdqExportError, deployed_output, export_qdq

    q = srbinarize.convert(msrresnet().eval(), "fqsr", **SETTINGS["4/4/8"])
    session = _ort(export_qdq(q, tmp_path / "m.onnx"), optimize=False)
    x = torch.rand(1, 3, 12, 12)
    diff = (torch.from_numpy(session.run(None, {"x": x.numpy()})[0]) - deployed_output(q, x)).abs()
    assert diff.median() < 1e-6 and diff.max() < 0.05  # same codes but for float ties (4-bit steps are coarse)
    with pytest.raises(QdqExportError, match="never calibrated"):
        export_qdq(srbinarize.convert(msrresnet().eval(), "fqsr", calibrate=False), tmp_path / "x.onnx")


def test_qdq_export_int4_containers(tmp_path):
    import onnx
    from onnx import TensorProto

    from srbinarize.export.qdq import INT4_OPSET, QdqExportError, deployed_output, export_qdq

    q = srbinarize.convert(msrresnet().eval(), "fqsr", **SETTINGS["4/4/8"])
    path = export_qdq(q, tmp_path / "m4.onnx", int4=True)
    graph = onnx.load(path).graph
    four_bit = {i.name: i.data_type for i in graph.initializer if i.data_type in (TensorProto.INT4, TensorProto.UINT4)}
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dq if four_bit.get(n.input[0]) == TensorProto.INT4]  # a constant code: a weight
    convs = [m for m in q.modules() if isinstance(m, FqsrConv2d)]
    assert len(weights) == len(convs)  # every conv's 4-bit weight code in int4
    assert TensorProto.UINT4 in four_bit.values()  # post-ReLU activations: uint4
    assert not [n for n in graph.node if n.op_type == "Clip"]  # 4-bit saturation is the clip; 8-bit skips need none
    assert onnx.load(path).opset_import[0].version == INT4_OPSET
    assert path.stat().st_size < 0.7 * export_qdq(q, tmp_path / "m8.onnx").stat().st_size
    x = torch.rand(2, 3, 12, 15)
    for optimize in (False, True):  # onnxruntime runs it with float convs: the codes of the PyTorch model
        got = torch.from_numpy(_ort(path, optimize).run(None, {"x": x.numpy()})[0])
        diff = (got - deployed_output(q, x)).abs()
        assert diff.median() < 1e-6 and diff.max() < 0.05  # but for float ties
    with pytest.raises(QdqExportError, match="at most 4 bits"):
        export_qdq(srbinarize.convert(msrresnet().eval(), "fqsr"), tmp_path / "x.onnx", int4=True)


def test_export_straight_from_a_training_loop_keeps_no_autograd_state(tmp_path):
    """SQCL's term lives for one step: deepcopy, pickle and export_onnx (QDQ) work right after training."""
    import copy
    import io

    import onnx

    q = srbinarize.convert(edsr().eval(), "fqsr").train()
    opt = torch.optim.Adam(q.parameters(), 1e-4)
    x = torch.rand(2, 3, 12, 12)
    for _ in range(2):
        loss = q(x).abs().mean() + 0.3 * sqcl_loss(q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(qz.last_error is not None for qz in q.modules() if isinstance(qz, IntervalQuantizer))
    copied = copy.deepcopy(q)  # raised "Only Tensors created explicitly by the user ..." before
    assert all(qz.last_error is None for qz in copied.modules() if isinstance(qz, IntervalQuantizer))
    torch.save(q, io.BytesIO())
    report = srbinarize.export_onnx(q, tmp_path / "m.onnx")  # one export for every recipe: QDQ here
    assert report.qdq and not report.packed and "quantized (QDQ)" in str(report)
    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    q.eval()
    assert all(qz.last_error is None for qz in q.modules() if isinstance(qz, IntervalQuantizer))
