"""BAM recipe: accumulation chains formed from the graph, the accumulated binary weights and activations."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import WideningSR, edsr
from recipe_checks import assert_deployed_matches, assert_fp_when_off, assert_trains, convert_small, msrresnet_x2
from torch import nn

import srbinarize
from srbinarize.layers import BamConv2d

MODELS = {"edsr": edsr, "msrresnet": msrresnet_x2}
OFF = {"binarize_weights": False, "binarize_activations": False}


class TinyChain(nn.Module):
    """One residual block of three 2->2 1x1 convs between a head and a tail conv."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 2, 3, padding=1)
        self.c1, self.c2, self.c3 = (nn.Conv2d(2, 2, 1) for _ in range(3))
        self.tail = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        f = self.head(x)
        return self.tail(f + self.c3(torch.relu(self.c2(torch.relu(self.c1(f))))))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converts_trains_and_switches_off(name):
    fp = MODELS[name]().eval()
    model = convert_small(fp, "bam")
    assert all(isinstance(model.get_submodule(f"body.{b}.conv{i}"), BamConv2d)
               for b in range(len(fp.body)) for i in (1, 2))
    assert_trains(model, fp)
    assert_fp_when_off(fp, "bam", **OFF)


def test_accumulated_binary_weight_of_the_nth_conv_by_hand():
    model = srbinarize.convert(TinyChain(), "bam", calibrate=False)
    c1, c2, c3 = (model.get_submodule(n) for n in ("c1", "c2", "c3"))
    assert c3._weight_chain == [c1, c2] and c2._weight_chain == [c1] and c3.extra_inputs() == ["c1", "c2"]
    with torch.no_grad():
        c1.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.25]]).view(2, 2, 1, 1))
        c2.weight.copy_(torch.tensor([[0.5, 1.0], [-1.0, 2.0]]).view(2, 2, 1, 1))
        c3.weight.copy_(torch.tensor([[0.25, 0.5], [1.0, -0.5]]).view(2, 2, 1, 1))
        c3.alpha.copy_(torch.tensor([0.5, -1.0, 2.0]))
        c3.weight_bn["weight"].copy_(torch.tensor([1.0, -1.0]))
        c3.weight_bn["bias"].copy_(torch.tensor([-1.5, 0.5]))
        c2.alpha.copy_(torch.tensor([2.0, 1.0]))
        c2.weight_bn["weight"].fill_(1.0)
        c2.weight_bn["bias"].fill_(0.0)
    # c3: v = 0.5 W1 - W2 + 2 W3 = [[0.5, -1], [3.25, -2.875]]; per row (v - mean) / std = [1, -1];
    # affine: row 0 [1, -1] - 1.5 = [-0.5, -2.5]; row 1 -[1, -1] + 0.5 = [-0.5, 1.5]; signs [[-1, -1], [-1, 1]];
    # times E|W3| per row: 0.375, 0.75.
    expected3 = torch.tensor([[-0.375, -0.375], [-0.75, 0.75]])
    # c2: v = 2 W1 + W2 = [[2.5, -3], [0, 2.5]] -> signs [[1, -1], [-1, 1]], times E|W2| = 0.75, 1.5.
    expected2 = torch.tensor([[0.75, -0.75], [-1.5, 1.5]])
    for conv, expected in ((c3, expected3), (c2, expected2)):
        d = conv.deployed()
        torch.testing.assert_close((d.weight_pm1 * d.scale.view(-1, 1, 1, 1)).view(2, 2), expected)

    # Activations of c3: sum_i b_i * E(|A_i|) * A_i, BN (running stats), sign, then the binary conv.
    with torch.no_grad():
        for conv, b in ((c1, 1.0), (c2, 2.0), (c3, 0.5)):
            conv.beta_scale.fill_(b)
        c3.bias.zero_()
        c3.act_bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        c3.act_bn.running_var.copy_(torch.tensor([0.25, 4.0]))
        c3.act_bn.weight.fill_(1.0)
        c3.act_bn.bias.fill_(0.0)
    a1, a2, a3 = (torch.tensor(v).view(1, 2, 1, 1) for v in ([1.0, -3.0], [0.5, 0.5], [-1.0, 2.0]))
    # terms: 1 * 2 * [1, -3] + 2 * 0.5 * [0.5, 0.5] + 0.5 * 1.5 * [-1, 2] = [1.75, -4.0]
    torch.testing.assert_close(c3.accumulated_activation(a3, (a1, a2)).flatten(), torch.tensor([1.75, -4.0]))
    # BN: (1.75 - 1) / 0.5 > 0 -> +1, (-4 + 1) / 2 < 0 -> -1; y = expected3 @ [1, -1] = [0, -1.5]
    c3.eval()
    with torch.no_grad():
        torch.testing.assert_close(c3(a3, a1, a2).flatten(), torch.tensor([0.0, -1.5]), rtol=0, atol=1e-4)


def test_summary_shows_the_chains_of_the_graph():
    model = convert_small(edsr(num_block=4), "bam")
    text = str(srbinarize.summary(model))
    notes = {line.split()[0]: line for line in text.splitlines() if "BamConv2d" in line}
    for b in range(4):
        assert notes[f"body.{b}.conv1"].endswith(f"BAM chain S{b + 1} 1/2 (w+a), L1 {b + 1}/4 (w)")
        assert notes[f"body.{b}.conv2"].endswith(f"BAM chain S{b + 1} 2/2 (w+a)")
        assert f"S{b + 1} (short range, weights+activations; body.{b}): body.{b}.conv1 -> body.{b}.conv2" in text
    assert notes["conv_after_body"].endswith("BAM single-layer: only layer of block conv_after_body")
    assert "L1 (long range, weights;" in text and " -> ".join(f"body.{b}.conv1" for b in range(4)) in text
    # The graph itself: each block's second conv reads the block input (its first conv's input) as well.
    calls = {n.target: n for n in model.graph.nodes if n.op == "call_module"}
    for b in range(4):
        first, second = calls[f"body.{b}.conv1"], calls[f"body.{b}.conv2"]
        assert second.args[1] is first.args[0] and len(first.args) == 1


def test_shape_change_degrades_to_single_layers():
    model = convert_small(WideningSR(), "bam")
    table = srbinarize.summary(model)
    rows = {s.row.name: s.row for s in table.layers}
    for name in ("widen", "narrow"):
        assert isinstance(model.get_submodule(name), BamConv2d)
        assert "BAM single-layer: weight shape" in rows[name].note and "differs" in rows[name].note
    assert any("binarized alone" in m for m in table.messages)
    x = torch.rand(1, 3, 12, 12)
    model(x).sum().backward()


def test_copy_checkpoint_and_deployed_form():
    fp = edsr(num_block=2).eval()
    model = convert_small(fp, "bam").eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(x), y)
        assert twin.get_submodule("body.1.conv1")._weight_chain[0] is twin.get_submodule("body.0.conv1")
        rebuilt = srbinarize.convert(fp, "bam", calibrate=False).eval()
        rebuilt.load_state_dict(model.state_dict())
        torch.testing.assert_close(rebuilt(x), y)
    assert_deployed_matches(model)
