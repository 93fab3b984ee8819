"""BatchNorm folding: a conv followed by a BatchNorm2d becomes one conv (exact with the BN's eval statistics).

    w_fold = w * gamma / sqrt(var + eps)        b_fold = (b - mean) * gamma / sqrt(var + eps) + beta

A pair is folded when the BN's only input is the conv's output, the conv's only user is the BN, each
module is called exactly once in the graph and the BN keeps running statistics. Anything else (a BN after
an add, a shared module, a BN inside an untraceable block) is left as it is.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn

from .trace import trace


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, nn.BatchNorm2d)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place; the conv gains a bias if it had none."""
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
    new_bias = (bias - bn.running_mean.double()) * factor + beta
    conv.weight.copy_((conv.weight.double() * factor.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def fold_bn_graph(gm: fx.GraphModule) -> list[str]:
    """Fold every conv -> BatchNorm2d pair of a traced module in place; return the names of the folded BNs."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = modules[src.target], modules[node.target]
        if not _foldable(conv, bn) or calls[src.target] != 1 or calls[node.target] != 1 or len(node.args) != 1:
            continue
        fold_conv_bn(conv, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        folded.append(node.target)
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def fold_bn(model: nn.Module, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """A traced copy of ``model`` with every conv -> BatchNorm2d pair folded into the conv; ``model`` is untouched.

    ``example_input`` checks the trace (default: a 1xCx32x32 image, C from the first conv). The folded
    model computes what ``model.eval()`` computes; training then no longer normalizes by batch statistics.
    """
    work = copy.deepcopy(model).eval()
    if example_input is None:
        first = next((m for m in work.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ValueError(f"{type(model).__name__} has no Conv2d: pass example_input=... to trace it")
        example_input = torch.rand(1, first.in_channels, 32, 32)
    gm = trace(work, example_input).module
    fold_bn_graph(gm)
    return gm.train(model.training)
