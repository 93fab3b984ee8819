"""Parameter groups: learnable quantizer intervals train at a rate relative to their size."""

from __future__ import annotations

import pytest
import torch
from conftest import edsr

import srbinarize
from srbinarize.layers.fqsr import fqsr_quantizers
from srbinarize.train.optim import parameter_groups


def _fqsr_edsr() -> torch.nn.Module:
    torch.manual_seed(0)
    fp = edsr(num_block=1).eval()
    return srbinarize.convert(fp, "fqsr", bits_w=6, bits_a=6, calibration_data=torch.rand(2, 3, 16, 16) * 255)


def test_groups_cover_every_trainable_parameter_once():
    model = _fqsr_edsr()
    model.conv_first.weight.requires_grad_(False)
    groups = parameter_groups(model, 5e-4, interval_lr=1e-2)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)
    quantizers = fqsr_quantizers(model)
    assert len(groups) == 1 + len(quantizers)
    for q, group in zip(quantizers, groups[1:], strict=True):
        assert group["params"] == [q.interval] and group["weight_decay"] == 0.0
        assert group["lr"] == pytest.approx(1e-2 * q.interval.abs().item())
    assert len(parameter_groups(model, 5e-4)) == 1  # no interval_lr: one group at the network's rate
    only_body = parameter_groups(model, 5e-4, 1e-2, include=lambda name: name.startswith("body"))
    assert all(n.startswith("body") for g in only_body for n, p in model.named_parameters()
               if any(p is q for q in g["params"]))


def test_adam_moves_intervals_by_a_share_of_their_size():
    """One Adam step moves each interval by about interval_lr x |I| (Adam's first step is lr x sign(grad))."""
    model = _fqsr_edsr().train()
    before = {id(q): q.interval.item() for q in fqsr_quantizers(model)}
    sizes = [abs(v) for v in before.values()]
    assert max(sizes) / min(sizes) > 100  # weights (~0.1) and 0-255 activations: one rate cannot fit both
    opt = torch.optim.Adam(parameter_groups(model, 5e-4, interval_lr=1e-2))
    x = torch.rand(2, 3, 16, 16) * 255
    model(x).sub(x.repeat_interleave(2, -1).repeat_interleave(2, -2)).abs().mean().backward()
    opt.step()
    for q in fqsr_quantizers(model):
        if q.interval.grad is not None and abs(q.interval.grad.item()) > 1e-6:  # well above Adam's eps
            moved = abs(q.interval.item() - before[id(q)]) / abs(before[id(q)])
            assert moved == pytest.approx(1e-2, rel=0.1)
