"""The conversion pass on real SR architectures: roles, semantics, gradients, input sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, edsr
from torch import nn
from torch.overrides import TorchFunctionMode

import srbinarize
from srbinarize.convert import default_calibration_batch
from srbinarize.layers import ScalesConv2d
from srbinarize.layers.scales import ScalesConfig

# Binary layers expected per model: the body's k x k convs on feature maps, nothing else.
EXPECTED_BINARY = {
    "edsr": {f"body.{b}.conv{i}" for b in range(4) for i in (1, 2)} | {"conv_after_body"},
    "msrresnet": {f"body.{b}.conv{i}" for b in range(3) for i in (1, 2)},
    "rcan": {f"body.{g}.residual_group.{b}.rcab.{i}" for g in range(2) for b in range(2) for i in (0, 2)}
    | {"body.0.conv", "body.1.conv", "conv_after_body"},
    "rrdbnet": {f"body.0.rdb{r}.conv{i}" for r in (1, 2, 3) for i in range(1, 6)} | {"conv_body"},
    "rrdbnet_x2": {f"body.0.rdb{r}.conv{i}" for r in (1, 2, 3) for i in range(1, 6)} | {"conv_body"},
    "timm": {f"body.{b}.conv{i}" for b in range(2) for i in (1, 2)},
    "widening": {"widen", "narrow"},
}
EXPECTED_HEAD = {"edsr": {"conv_first"}, "msrresnet": {"conv_first"}, "rcan": {"conv_first"},
                 "rrdbnet": {"conv_first"}, "rrdbnet_x2": {"conv_first"}, "timm": {"head"}, "widening": {"head"}}

ALL_OFF = {"binarize_weights": False, "binarize_activations": False, "spatial_rescale": False,
           "channel_rescale": False}


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request):
    torch.manual_seed(0)
    fp = MODELS[request.param]().eval()
    return request.param, fp, srbinarize.convert(fp, "scales")


def test_roles_and_replacements(converted):
    name, _fp, binary = converted
    table = srbinarize.summary(binary)
    binary_layers = {s.row.name for s in table.layers if s.weight_bits == 1}
    assert binary_layers == EXPECTED_BINARY[name]
    assert {s.row.name for s in table.layers if s.row.role == "head"} == EXPECTED_HEAD[name]
    for s in table.layers:
        assert (s.row.role == "body") or s.weight_bits == 32, f"{s.row.name} ({s.row.role}) must stay FP"
    # Everything that is not binary in the body is a channel-attention conv acting on pooled vectors.
    for s in table.layers:
        if s.row.role == "body" and s.weight_bits == 32:
            assert s.row.pooled_input and "pooled" in s.row.note
    assert table.ops_after < table.ops_before and table.param_bytes_after < table.param_bytes_before


def test_input_model_untouched_and_other_input_size(converted):
    _name, fp, binary = converted
    assert not any(isinstance(m, ScalesConv2d) for m in fp.modules())
    x = torch.rand(1, 3, 20, 36)  # traced at 48x48
    with torch.no_grad():
        y, ref = binary(x), fp(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()


def test_gradients_reach_every_parameter(converted):
    _name, _fp, binary = converted
    binary = binary.train()
    binary.zero_grad()
    binary(torch.rand(2, 3, 16, 16)).abs().mean().backward()
    for layer_name, layer in binary.named_modules():
        if not isinstance(layer, ScalesConv2d):
            continue
        for pname, p in layer.named_parameters():
            assert p.grad is not None, f"{layer_name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{layer_name}.{pname} gradient not finite"
            assert p.grad.abs().sum() > 0, f"{layer_name}.{pname} gradient is zero"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_binarization_off_reproduces_fp(name):
    fp = MODELS[name]().eval()
    same = srbinarize.convert(fp, "scales", **ALL_OFF).eval()
    assert any(isinstance(m, ScalesConv2d) for m in same.modules())
    x = torch.rand(2, 3, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(same(x), fp(x), atol=1e-5, rtol=1e-5)


class _ConvWeights(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.conv2d:
            self.weights.append(args[1].detach())
        return func(*args, **(kwargs or {}))


def test_binary_conv_sees_two_values_per_output_channel():
    binary = srbinarize.convert(edsr(), "scales", spatial_rescale=False, channel_rescale=False)
    layer = binary.get_submodule("body.1.conv1")
    with _ConvWeights() as mode:
        layer(torch.rand(1, 16, 8, 8))
    (weight,) = mode.weights
    effective = weight * layer.output_scale().view(-1, 1, 1, 1)
    for out_channel in effective:
        assert out_channel.unique().numel() == 2
    assert set(weight.unique().tolist()) == {-1.0, 1.0}


def test_calibration_fits_each_layer_to_its_fp_output():
    """Initialised from the FP conv and calibration data, a SCALES conv approximates the FP conv's output
    on FP inputs far better than the same layer without calibration."""
    fp = edsr(num_feat=32).eval()
    calibrated = srbinarize.convert(fp, "scales")
    raw = srbinarize.convert(fp, "scales", calibrate=False)
    seen = {}
    hook = fp.body[1].conv1.register_forward_hook(lambda m, i, o: seen.update(x=i[0].clone(), y=o.clone()))
    with torch.no_grad():
        fp(default_calibration_batch(calibrated.srbinarize_info.recipe.calibration, 3))
        hook.remove()
        err_cal = (calibrated.get_submodule("body.1.conv1")(seen["x"]) - seen["y"]).pow(2).mean()
        err_raw = (raw.get_submodule("body.1.conv1")(seen["x"]) - seen["y"]).pow(2).mean()
    assert err_cal < 0.75 * err_raw  # random weights: a binary conv explains about a third of the energy


def test_calibration_offset_puts_the_inputs_mean_into_the_bias():
    """``sign(x - beta)`` drops the input's mean; fitted with an offset, the calibrated conv has no mean error per
    channel, a lower error, a bias even where the FP conv had none, and its FP side is still the FP conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    x = torch.relu(torch.randn(8, 16, 12, 12)) + 0.5  # like a post-ReLU feature map: a large mean per channel
    with torch.no_grad():
        y = conv(x)
    error, mean_error = {}, {}
    for fit in (False, True):
        layer = ScalesConv2d.from_float(conv, ScalesConfig(skip="never", fit_offset=fit))
        assert (layer.bias is not None) == fit
        layer.calibrate(x, y)
        with torch.no_grad():
            d = layer(x) - y
            error[fit], mean_error[fit] = float(d.pow(2).mean()), float(d.mean(dim=(0, 2, 3)).abs().max())
            layer.set_binarization(0.0)  # the progressive ramp's FP side: the pretrained conv exactly
            torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    assert mean_error[True] < 1e-4 < 0.1 * mean_error[False]
    assert error[True] < 0.8 * error[False]


def test_untraceable_model_falls_back_to_module_paths():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Conv2d(8, 8, 3, padding=1)
            self.last = nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x):
            feat = self.head(x)
            if feat.mean() > 1e9:  # control flow on a value: torch.fx cannot trace this
                feat = feat * 2
            return self.last(self.body(feat))

    with pytest.warns(UserWarning, match="could not be traced nor exported"):
        binary = srbinarize.convert(DataDependent())
    roles = {r.name: r.role for r in binary.srbinarize_info.plan.rows}
    assert roles == {"head": "head", "body": "body", "last": "tail"}
    assert isinstance(binary.body, ScalesConv2d)
    binary(torch.rand(1, 3, 10, 10))


def test_leaf_fallback_inside_traced_model():
    """A block with shape-dependent control flow is kept whole; its convs are still found and converted."""

    class PadToEven(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            if x.shape[-1] % 2:  # shape-dependent: untraceable with symbolic shapes
                x = torch.nn.functional.pad(x, (0, 1))[..., :-1]
            return self.conv(x) + x

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PadToEven(), PadToEven(), nn.Conv2d(8, 3, 3, padding=1))
    binary = srbinarize.convert(model)
    plan = binary.srbinarize_info.plan
    assert plan.traced and plan.leaves == ["1", "2"]
    assert {r.name for r in plan.by_role("body")} == {"1.conv", "2.conv"}
    assert isinstance(binary.get_submodule("1.conv"), ScalesConv2d)


def test_model_without_layers_is_one_clear_error():
    with pytest.raises(srbinarize.ConversionError, match=r"Sequential has no Conv2d.*nothing to convert"):
        srbinarize.convert(nn.Sequential(nn.ReLU(), nn.PixelShuffle(2)))


def test_model_rejecting_every_example_input_is_one_clear_error():
    class NeedsFiveChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(5, 5, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(srbinarize.ConversionError, match=r"NeedsFiveChannels rejects.*example_input"):
        srbinarize.convert(NeedsFiveChannels())
    binary = srbinarize.convert(NeedsFiveChannels(), example_input=torch.rand(1, 5, 12, 12))
    assert binary(torch.rand(1, 5, 9, 9)).shape == (1, 5, 9, 9)


class _ESA(nn.Module):
    """RFDN's enhanced spatial attention: shrink, attend, `F.interpolate` back to the input size, gate."""

    def __init__(self, c: int = 16):
        super().__init__()
        f = c // 4
        self.conv1, self.conv_f = nn.Conv2d(c, f, 1), nn.Conv2d(f, f, 1)
        self.conv2, self.conv3 = nn.Conv2d(f, f, 3, stride=2), nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, c, 1)

    def forward(self, x):
        c1_ = self.conv1(x)
        c3 = self.conv3(torch.nn.functional.max_pool2d(self.conv2(c1_), kernel_size=7, stride=3))
        c3 = torch.nn.functional.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(c3 + self.conv_f(c1_)))


class _AttentionSR(nn.Module):
    """Blocks with ESA (the RFDN family), a global residual and a pixel-shuffle upsampler."""

    def __init__(self, c: int = 16, blocks: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(blocks))
        self.att = nn.ModuleList(_ESA(c) for _ in range(blocks))
        self.up = nn.Sequential(nn.Conv2d(c, 3 * 4, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x):
        h = f = self.head(x)
        for conv, att in zip(self.convs, self.att, strict=True):
            h = att(torch.relu(conv(h))) + h
        return self.up(h + f)


def test_attention_upsampling_is_part_of_its_block():
    """ESA's interpolate returns to the head's resolution: its convs stay body, only the upsampler is tail."""
    q = srbinarize.convert(_AttentionSR().eval(), "scales", example_input=torch.rand(1, 3, 32, 32), calibrate=False)
    plan = q.srbinarize_info.plan
    assert {r.name for r in plan.by_role("tail")} == {"up.0"}
    body = {r.name: r for r in plan.by_role("body")}
    assert {f"att.{b}.{c}" for b in (0, 1) for c in ("conv1", "conv_f", "conv2", "conv3", "conv4")} <= set(body)
    kept = {n for n, r in body.items() if not r.replaced_by}
    assert kept == {"att.0.conv2", "att.1.conv2"}  # stride 2: SCALES cannot replace it
    assert all("stride" in body[n].note for n in kept)


_act = nn.LeakyReLU(0.1)  # a module-level activation, called inside a block (as FMEN does)


class _InPlaceBlock(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.data.size()  # read for its size only (IMDTN's channel_shuffle)
        out = torch.sigmoid(self.gate(_act(self.conv(x))))
        out *= x.view(b, c, h, w)  # in place on the sigmoid's output, which its backward needs
        return out


class _InPlaceSR(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.block = nn.Conv2d(3, 8, 3, padding=1), _InPlaceBlock()
        self.tail = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x):
        f = self.head(x)
        h = self.block(f)
        h += f
        return torch.nn.functional.pixel_shuffle(self.tail(h), 2)


@pytest.mark.parametrize("recipe", ["scales", "fqsr"])
def test_inplace_ops_and_foreign_modules_trace_and_train(recipe, tmp_path):
    fp = _InPlaceSR().eval()
    x = torch.rand(2, 3, 12, 12)
    q = srbinarize.convert(fp, recipe, example_input=x[:1])
    assert not q.srbinarize_info.plan.leaves  # traced through the module-level activation
    targets = [n.target for n in q.graph.nodes]
    assert not any(getattr(t, "__name__", "") in ("imul", "iadd") for t in targets)
    assert not any(n.op == "call_function" and n.args[1:] == ("data",) for n in q.graph.nodes)
    q.train()
    opt = torch.optim.Adam(q.parameters(), 1e-4)
    for _ in range(2):
        loss = q(x).abs().mean()
        opt.zero_grad()
        loss.backward()  # FMEN's `out *= x` after a sigmoid failed here before
        opt.step()
    report = srbinarize.export_onnx(q, tmp_path / "m.onnx", x[:1])  # straight from training
    session = srbinarize.ort_session(tmp_path / "m.onnx")
    for size in (12, 20):  # the size read through `.data` is not baked into the file
        y = torch.rand(1, 3, size, size)
        assert session.run(None, {"x": y.numpy()})[0].shape == (1, 3, 2 * size, 2 * size)
    assert bool(report.qdq) == (recipe == "fqsr")


class _Range(nn.Module):
    """A nearest x2 upsampler trained (so to speak) on [0, ``r``]: it adds ``r / 255`` and clamps to [0, r]."""

    def __init__(self, r: float, offset: float = 1.0):
        super().__init__()
        self.r, self.offset = r, offset
        self.conv = nn.Conv2d(3, 12, 1)  # one layer, so that convert accepts it
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()

    def forward(self, x):
        up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        zero = torch.nn.functional.pixel_shuffle(self.conv(x), 2)
        return (up + zero + self.offset * self.r / 255).clamp(0, self.r)


def test_input_range_detection_wrapper_and_spec(tmp_path):
    from srbinarize.models.input_range import (
        InputRangeError,
        ScaledRange,
        check_input_range,
        detect_input_range,
        resolve_input_range,
    )
    from srbinarize.models.spec import ModelSpec

    assert detect_input_range(_Range(255.0))[0] == 255.0
    assert detect_input_range(_Range(1.0))[0] == 1.0
    with pytest.raises(InputRangeError, match=r"^Flat: its output matches its input in neither .* 0\.\d+ fed \[0, 1\]"):
        detect_input_range(_Range(1.0, offset=60.0), "Flat")
    _, r, message = resolve_input_range(_Range(1.0, offset=60.0), name="Flat")  # the CLI's lenient form
    assert r == 1.0 and message.startswith("warning: Flat:") and message.endswith("using [0, 1]")
    for bad in (2, 0, -255, "abc", None):
        with pytest.raises(InputRangeError, match=r"must be 1 .* or 255"):
            check_input_range(bad, "--input-range")

    wrapped, r, _ = resolve_input_range(_Range(255.0))
    assert isinstance(wrapped, ScaledRange) and r == 255.0
    assert set(wrapped.state_dict()) == {"model.conv.weight", "model.conv.bias"}
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(wrapped(x), ((_Range(255.0)(x * 255)) / 255))
    q = srbinarize.convert(_Range(255.0), "fqsr", input_range=255, example_input=x)
    assert q.srbinarize_info.input_range == 255.0
    assert {r.name for r in q.srbinarize_info.plan.rows} == {"model.conv"}  # the scalings are no layers

    spec = ModelSpec("srbinarize.models.zoo:Nothing", {}, 255.0)
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert "input_range" not in ModelSpec("a.b:C").to_json()  # range-1 specs read as before
    with pytest.raises(InputRangeError, match="model description: input_range must be 1"):
        ModelSpec.from_json('{"target": "a.b:C", "input_range": 3}')


def test_export_records_the_input_range(tmp_path):
    import onnx

    fp = _AttentionSR().eval()
    for r in (1.0, 255.0):
        q = srbinarize.convert(fp, "scales", input_range=r, example_input=torch.rand(1, 3, 32, 32))
        srbinarize.export_onnx(q, tmp_path / "m.onnx")
        meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
        assert meta == {"srbinarize.input_range": f"{r:g}", "srbinarize.io_range": "1"}


def test_checkpoint_of_a_255_model_rebuilds_the_wrapper(tmp_path):
    from srbinarize.checkpoint import load_model, save_model
    from srbinarize.models.spec import ModelSpec

    spec = ModelSpec("basicsr.archs.edsr_arch:EDSR", {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8,
                                                       "num_block": 1, "upscale": 2}, input_range=255.0)
    fp = spec.build().eval()
    assert type(fp).__name__ == "ScaledRange"
    q = srbinarize.convert(fp, "scales").eval()
    assert q.srbinarize_info.input_range == 255.0
    rebuilt = load_model(save_model(q, tmp_path / "m.safetensors", spec)).eval()
    assert rebuilt.srbinarize_info.input_range == 255.0
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), q(x))


class _GroupedSR(nn.Module):
    """IMDTN's grouped convs and MobileSR's depthwise convs in a small body."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.widen = nn.Conv2d(16, 32, 1, groups=2)
        self.narrow = nn.Conv2d(32, 16, 3, padding=1)
        self.tail = nn.Conv2d(16, 12, 3, padding=1)

    def forward(self, x):
        f = self.head(x)
        h = self.narrow(self.widen(torch.relu(self.depthwise(torch.relu(self.grouped(f))))))
        return torch.nn.functional.pixel_shuffle(self.tail(h + f), 2)


@pytest.mark.parametrize("skip", ["always", "never"])
def test_scales_binarizes_grouped_convs(skip, tmp_path):
    fp = _GroupedSR().eval()
    x = torch.rand(2, 3, 16, 16)
    same = srbinarize.convert(fp, "scales", skip=skip, **ALL_OFF).eval()  # the identity delta per group
    with torch.no_grad():
        torch.testing.assert_close(same(x), fp(x), rtol=0, atol=1e-5)
    q = srbinarize.convert(fp, "scales", skip=skip).eval()
    layers = {n: m for n, m in q.named_modules() if isinstance(m, ScalesConv2d)}
    assert set(layers) == {"grouped", "depthwise", "widen", "narrow"}
    assert [layers[n].groups for n in ("grouped", "depthwise", "widen")] == [4, 16, 2]
    report = srbinarize.export_onnx(q, tmp_path / "m.onnx", x[:1], remainder="fp32")
    assert sum("no grouped binary kernel" in line for line in report.fp) == 3
    session = srbinarize.ort_session(tmp_path / "m.onnx")
    for size in (16, 20):
        y = torch.rand(1, 3, size, size)
        with torch.no_grad():
            want = q(y).numpy()
        assert abs(session.run(None, {"x": y.numpy()})[0] - want).max() <= 1e-4


def test_a_model_that_normalises_its_input_takes_either_range_and_gets_0_1():
    """basicsr's EDSR scales its input by img_range itself: both probes match, [0, 1] is chosen, no warning."""
    from srbinarize.models import load_pretrained
    from srbinarize.models.input_range import detect_input_range, resolve_input_range

    model, _ = load_pretrained("zoo:edsr-x2")
    r, message = detect_input_range(model, "zoo:edsr-x2")
    assert r == 1.0 and "matches its input fed either range" in message
    wrapped, r, message = resolve_input_range(model, name="zoo:edsr-x2")
    assert wrapped is model and not message.startswith("warning")
