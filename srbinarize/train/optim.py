"""Parameter groups of the training loops: the network's parameters, and learnable quantizer intervals apart.

An interval (FQSR's ``I``) lives on the scale of the data it quantizes: about 0.1 for a conv's weights, 50-250
for the activations of a model that works on 0-255 pixels. Adam moves every parameter by about its learning
rate per step whatever its gradient's size, so one rate cannot fit both: at a rate that suits the weights
(5e-4) an interval of 150 does not move in a thousand steps. With ``interval_lr`` each interval gets its own
group at ``interval_lr x |I|`` (taken when the optimizer is built): a *relative* rate, the same share of
every interval per step whatever its scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..layers.fqsr import fqsr_quantizers


def parameter_groups(model: nn.Module, lr: float, interval_lr: float | None = None,
                     include: Callable[[str], bool] = lambda name: True) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters of ``model`` whose names pass ``include``.

    Without ``interval_lr`` (None) every parameter is in one group at ``lr``. With it, each learnable
    quantizer interval is a group of its own at ``interval_lr x |I|``, without weight decay.
    """
    intervals = {id(q.interval) for q in fqsr_quantizers(model)} if interval_lr is not None else set()
    network, groups = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or not include(name):
            continue
        if id(p) in intervals:
            groups.append({"params": [p], "lr": interval_lr * max(float(p.detach().abs()), 1e-8),
                           "weight_decay": 0.0})
        else:
            network.append(p)
    return [g for g in ({"params": network, "lr": lr}, *groups) if g["params"]]
