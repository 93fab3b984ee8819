"""BatchNorm folding on an SRResNet with BN (the original architecture; basicsr's MSRResNet dropped BN)."""

from __future__ import annotations

import torch
from torch import nn

import srbinarize


class BnBlock(nn.Module):
    def __init__(self, feat: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(feat, feat, 3, padding=1), nn.BatchNorm2d(feat)
        self.act = nn.PReLU()
        self.conv2, self.bn2 = nn.Conv2d(feat, feat, 3, padding=1, bias=False), nn.BatchNorm2d(feat)

    def forward(self, x):
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class SRResNetBN(nn.Module):
    """Ledig et al.'s SRResNet: residual blocks conv-BN-PReLU-conv-BN, conv-BN after the body, x2 shuffle."""

    def __init__(self, feat: int = 16, blocks: int = 2):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, feat, 9, padding=4), nn.PReLU())
        self.body = nn.Sequential(*[BnBlock(feat) for _ in range(blocks)])
        self.conv_after, self.bn_after = nn.Conv2d(feat, feat, 3, padding=1), nn.BatchNorm2d(feat)
        self.up = nn.Sequential(nn.Conv2d(feat, feat * 4, 3, padding=1), nn.PixelShuffle(2), nn.PReLU())
        self.bn_on_sum = nn.BatchNorm2d(feat)  # after an add: not foldable, must stay
        self.last = nn.Conv2d(feat, 3, 9, padding=4)

    def forward(self, x):
        feat = self.head(x)
        body = self.bn_on_sum(self.bn_after(self.conv_after(self.body(feat))) + feat)
        return self.last(self.up(body))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


def test_fold_bn_is_exact_in_eval():
    model = SRResNetBN().eval()
    _randomize_bn(model)
    x = torch.rand(2, 3, 20, 24)
    folded = srbinarize.fold_bn(model)
    remaining = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert remaining == ["bn_on_sum"]  # the five conv->BN pairs are gone, the BN after the add stays
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6  # the original is untouched
    with torch.no_grad():
        expected, got = model(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # another input size: nothing was baked in
    y = torch.rand(1, 3, 13, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(y), model(y), rtol=1e-5, atol=1e-5)


def test_fold_bn_keeps_training_mode_and_gives_bias():
    model = SRResNetBN().train()
    folded = srbinarize.fold_bn(model)
    assert folded.training
    assert folded.get_submodule("body.0.conv2").bias is not None  # the BN's shift lands in a new bias


def test_convert_folds_bn_first():
    model = SRResNetBN().eval()
    _randomize_bn(model)
    q = srbinarize.convert(model, "fqsr", bits_s=32)
    info = q.srbinarize_info
    assert any("BatchNorm folded" in m for m in info.plan.messages)
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in q.named_modules() if n != "bn_on_sum")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref, got = model(x), q(x)
    # 8-bit weights and activations: close to the BN model, which only works if the BN was folded correctly
    assert (got - ref).abs().max() / ref.abs().max() < 0.05
