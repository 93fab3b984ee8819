"""Tiny SR models shared by the tests: real basicsr and timm classes, small configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def edsr(num_block: int = 4, num_feat: int = 16, upscale: int = 2) -> nn.Module:
    from basicsr.archs.edsr_arch import EDSR

    return EDSR(3, 3, num_feat=num_feat, num_block=num_block, upscale=upscale)


def msrresnet(num_block: int = 3, upscale: int = 4) -> nn.Module:
    from basicsr.archs.srresnet_arch import MSRResNet

    return MSRResNet(num_feat=16, num_block=num_block, upscale=upscale)


def rcan(upscale: int = 2) -> nn.Module:
    from basicsr.archs.rcan_arch import RCAN

    return RCAN(3, 3, num_feat=16, num_group=2, num_block=2, squeeze_factor=4, upscale=upscale)


def rrdbnet(scale: int = 4) -> nn.Module:
    from basicsr.archs.rrdbnet_arch import RRDBNet

    return RRDBNet(3, 3, scale=scale, num_feat=16, num_block=1, num_grow_ch=8)


class TimmSR(nn.Module):
    """An SR network assembled from timm layers: ResNet basic blocks with squeeze-excite, pixel-shuffle tail."""

    def __init__(self, feat: int = 16, blocks: int = 2, scale: int = 2):
        super().__init__()
        from timm.layers import SqueezeExcite
        from timm.models.resnet import BasicBlock

        self.head = nn.Conv2d(3, feat, 3, padding=1)
        self.body = nn.Sequential(*[BasicBlock(feat, feat, attn_layer=SqueezeExcite) for _ in range(blocks)])
        self.upsample = nn.Sequential(nn.Conv2d(feat, 3 * scale**2, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x):
        feat = self.head(x)
        return self.upsample(self.body(feat) + feat)


class WideningSR(nn.Module):
    """A body whose convs change the channel count (16 -> 32 -> 16), with an interpolate upsampler."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.widen = nn.Conv2d(16, 32, 3, padding=1)
        self.narrow = nn.Conv2d(32, 16, 3, padding=1)
        self.up = nn.Conv2d(16, 16, 3, padding=1)
        self.last = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        feat = self.head(x)
        body = self.narrow(torch.relu(self.widen(feat))) + feat
        up = torch.nn.functional.interpolate(body, scale_factor=2, mode="nearest")
        return self.last(torch.relu(self.up(up)))


MODELS = {
    "edsr": edsr,
    "msrresnet": msrresnet,
    "rcan": rcan,
    "rrdbnet": rrdbnet,
    "rrdbnet_x2": lambda: rrdbnet(scale=2),
    "timm": TimmSR,
    "widening": WideningSR,
}
