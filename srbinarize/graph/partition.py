"""Head / body / tail roles of an SR network's layers, read off the structure of its graph.

- head: layers no other layer feeds (the conv on the image input);
- tail: layers after a feature upsampler (PixelShuffle, interpolate, Upsample, ConvTranspose), layers
  that feed a pixel shuffle directly (the upsampler's own convs), layers after the global residual add,
  and layers no other layer follows (the conv producing the image);
- body: the rest.
An upsampling op applied to the image itself (MSRResNet's bicubic base) is not a feature upsampler.
Names of modules play no part. The result is a `Plan`: one `LayerRow` per conv / linear.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

LAYER_KINDS: dict[type, str] = {nn.Conv2d: "conv2d", nn.Linear: "linear", nn.ConvTranspose2d: "conv_transpose2d"}
_UPSAMPLE_MODULES = (nn.PixelShuffle, nn.Upsample, nn.ConvTranspose2d)
_UPSAMPLE_FUNCTIONS = {F.pixel_shuffle, F.interpolate, F.upsample, torch.pixel_shuffle}
_SHUFFLES_MODULES = (nn.PixelShuffle,)
_ADDS = {operator.add, operator.iadd, torch.add}


def layer_kind(module: nn.Module) -> str | None:
    for cls, kind in LAYER_KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


@dataclass
class LayerRow:
    """One conv / linear of the model and what the pass decided about it."""

    name: str
    kind: str
    role: str
    module: str  # short description of the original layer, e.g. "Conv2d 64->64 3x3"
    params: int = 0  # parameters of the original layer
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    in_leaf: str | None = None  # the untraceable block it sits in, reached by module path
    replaced_by: str | None = None
    note: str = ""

    @property
    def pooled_input(self) -> bool:
        """Acts on globally pooled vectors (channel attention), not on feature maps."""
        return self.kind == "conv2d" and self.in_shape is not None and self.in_shape[-2:] == (1, 1)


@dataclass
class Plan:
    rows: list[LayerRow]
    traced: bool
    global_residual: str | None = None
    leaves: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def row(self, name: str) -> LayerRow:
        return next(r for r in self.rows if r.name == name)

    def by_role(self, role: str) -> list[LayerRow]:
        return [r for r in self.rows if r.role == role]


def describe_layer(module: nn.Module) -> str:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        k = "x".join(map(str, module.kernel_size))
        extra = "" if module.stride == (1, 1) else f" s{module.stride[0]}"
        return f"{type(module).__name__} {module.in_channels}->{module.out_channels} {k}{extra}"
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    return type(module).__name__


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _contains_layers(module: nn.Module) -> bool:
    return any(layer_kind(m) for m in module.modules())


def _is_upsample(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _UPSAMPLE_MODULES)
    return node.op == "call_function" and node.target in _UPSAMPLE_FUNCTIONS


def _is_shuffle(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _SHUFFLES_MODULES)
    return node.op == "call_function" and node.target in (F.pixel_shuffle, torch.pixel_shuffle)


def is_add(node: fx.Node) -> bool:
    """An element-wise add of two tensors (`+`, `+=`, torch.add, Tensor.add / add_)."""
    tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensor_args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def partition_graph(gm: fx.GraphModule, leaves: list[str]) -> Plan:
    """Assign a role to every layer node of a traced model (layers inside leaves inherit their leaf's)."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    layer_nodes = [n for n in nodes if n.op == "call_module" and _contains_layers(modules[n.target])]
    is_layer = set(layer_nodes)

    after_layer: dict[fx.Node, bool] = {}  # some layer is an ancestor
    for n in nodes:
        after_layer[n] = any(p in is_layer or after_layer[p] for p in n.all_input_nodes)
    before_layer: dict[fx.Node, bool] = {}  # some layer is a descendant
    for n in reversed(nodes):
        before_layer[n] = any(u in is_layer or before_layer[u] for u in n.users)

    head = {n for n in layer_nodes if not after_layer[n]}
    tail: set[fx.Node] = set()
    # The upsampler and everything after it. ConvTranspose is itself the upsampler.
    for n in nodes:
        if _is_upsample(n, modules) and (after_layer[n] or n in is_layer):
            if n in is_layer:
                tail.add(n)
            tail |= _descendants(n) & is_layer
    # Convs feeding a pixel shuffle through single-input ops only: the upsampler's convs.
    for n in layer_nodes:
        if _reaches_shuffle(n, modules, is_layer):
            tail.add(n)
    tail |= {n for n in layer_nodes if not before_layer[n]}

    global_residual = _global_residual(nodes, head, is_layer, tail)
    if global_residual is not None:
        tail |= _descendants(global_residual) & is_layer
    tail -= head

    rows: list[LayerRow] = []
    for n in layer_nodes:
        role = "head" if n in head else "tail" if n in tail else "body"
        module = modules[n.target]
        if layer_kind(module):
            rows.append(LayerRow(n.target, layer_kind(module), role, describe_layer(module), _params(module)))
            continue
        for sub_name, sub in module.named_modules():
            if layer_kind(sub):
                rows.append(
                    LayerRow(f"{n.target}.{sub_name}", layer_kind(sub), role, describe_layer(sub), _params(sub),
                             in_leaf=n.target)
                )
    return Plan(rows, traced=True, global_residual=global_residual.name if global_residual else None, leaves=leaves)


def partition_by_order(model: nn.Module, reason: str) -> Plan:
    """Fallback when the model cannot be traced: roles from module registration order.

    First layer = head; layers registered after the first upsampling module, and the last layer = tail.
    """
    named = [(name, m) for name, m in model.named_modules() if layer_kind(m)]
    upsample_seen, rows = False, []
    for i, (name, m) in enumerate(named):
        upsample_seen |= any(isinstance(s, _UPSAMPLE_MODULES) for s in _modules_before(model, name))
        role = "head" if i == 0 else "tail" if upsample_seen or i == len(named) - 1 else "body"
        rows.append(LayerRow(name, layer_kind(m), role, describe_layer(m), _params(m)))
    message = f"torch.fx could not trace the model ({reason}); roles come from module registration order"
    return Plan(rows, traced=False, messages=[message])


def _modules_before(model: nn.Module, name: str) -> list[nn.Module]:
    out = []
    for other, m in model.named_modules():
        if other == name:
            break
        out.append(m)
    return out


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def _reaches_shuffle(node: fx.Node, modules: dict[str, nn.Module], is_layer: set[fx.Node]) -> bool:
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if _is_shuffle(n, modules):
            return True
        if n in is_layer or len(n.all_input_nodes) > 1:
            continue
        stack.extend(n.users)
    return False


def _global_residual(nodes, head, is_layer, tail) -> fx.Node | None:
    """The add that joins the head's output to the body's: only tail layers come after it."""
    head_outputs = set(head)
    for n in nodes:  # single-input ops right after a head layer still carry the head output
        if n not in is_layer and len(n.all_input_nodes) == 1 and n.all_input_nodes[0] in head_outputs:
            head_outputs.add(n)
    for n in reversed(nodes):
        if not is_add(n) or not any(a in head_outputs for a in n.all_input_nodes):
            continue
        if _descendants(n) & is_layer <= tail:
            return n
    return None
