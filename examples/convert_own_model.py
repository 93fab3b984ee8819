"""Convert an SR network nobody here wrote, with a recipe of your own, and look at what changed.

    .venv/bin/python examples/convert_own_model.py
"""

from pathlib import Path

import torch
import yaml
from torch import nn

import srbinarize


class TinySR(nn.Module):
    """Head conv, residual body, pixel-shuffle tail: the usual SR shape, with made-up names."""

    def __init__(self, feat: int = 32, blocks: int = 3, scale: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, feat, 3, padding=1)
        self.trunk = nn.ModuleList(
            nn.Sequential(nn.Conv2d(feat, feat, 3, padding=1), nn.PReLU(feat), nn.Conv2d(feat, feat, 3, padding=1))
            for _ in range(blocks)
        )
        self.to_rgb = nn.Sequential(nn.Conv2d(feat, 3 * scale**2, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x):
        feat = self.stem(x)
        out = feat
        for block in self.trunk:
            out = out + block(out)
        return self.to_rgb(out + feat)


def main() -> None:
    fp = TinySR().eval()  # load your pretrained weights here

    # A recipe is a file: start from SCALES and keep only the learnable scale/threshold (the paper's "LSF").
    recipe = srbinarize.load_recipe("scales").to_dict()
    recipe["name"] = "scales_lsf"
    recipe["layers"]["conv2d"].update(spatial_rescale=False, channel_rescale=False)
    path = Path("runs/examples/scales_lsf.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))

    for name in ("scales", str(path)):
        binary = srbinarize.convert(fp, name)
        print(f"\n=== {name}")
        print(srbinarize.summary(binary, input_size=(64, 64)))
        with torch.no_grad():
            x = torch.rand(1, 3, 40, 56)
            print(f"output {tuple(binary(x).shape)}, mean |binary - FP| = {(binary(x) - fp(x)).abs().mean():.4f}")


if __name__ == "__main__":
    main()
