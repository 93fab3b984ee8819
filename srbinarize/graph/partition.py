"""Head / body / tail roles of an SR network's layers, read off the structure of its graph.

- head: layers no other layer feeds (the conv on the image input);
- tail: layers after the network's upsampler (PixelShuffle, interpolate, Upsample, ConvTranspose), layers
  that feed a pixel shuffle directly (the upsampler's own convs), layers after the global residual add,
  and layers no other layer follows (the conv producing the image);
- body: the rest.
An upsampling op applied to the image itself (MSRResNet's bicubic base) is not a feature upsampler. The
network's upsampler is where the resolution changes for good: an upsampling op whose output is no larger
than the body's working resolution (the head's output) belongs to its block. That is the attention of the
RFDN family (ESA: a strided conv and a max pool shrink the features, `F.interpolate` brings the attention
map back to the input resolution, a sigmoid of it gates the features); its layers stay body. The sizes
come from one forward pass on the example input; without one every upsampling op after a layer counts.
Names of modules play no part. The result is a `Plan`: one `LayerRow` per conv / linear.

The graph is the torch.fx trace when the model traces (`partition_graph`), else the ATen graph of
``torch.export`` (`partition_exported`), whose nodes remember the module they ran in; the same rules
read both. Only when both fail do roles come from module registration order (`partition_by_order`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .walk import descendants

LAYER_KINDS: dict[type, str] = {nn.Conv2d: "conv2d", nn.Linear: "linear", nn.ConvTranspose2d: "conv_transpose2d"}
_UPSAMPLE_MODULES = (nn.PixelShuffle, nn.Upsample, nn.ConvTranspose2d)
_UPSAMPLE_FUNCTIONS = {F.pixel_shuffle, F.interpolate, F.upsample, torch.pixel_shuffle}
_SHUFFLE_FUNCTIONS = {F.pixel_shuffle, torch.pixel_shuffle, torch.ops.aten.pixel_shuffle.default}
_ADDS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_ATEN_LAYERS = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default, torch.ops.aten.convolution.default,
                torch.ops.aten.conv_transpose2d.input}


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


def is_add(node: fx.Node) -> bool:
    """An element-wise add of two tensors (`+`, `+=`, torch.add, Tensor.add / add_, aten.add)."""
    tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensor_args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def _is_aten_upsample(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and (name.startswith(("upsample_", "_upsample_", "pixel_shuffle"))
                                           or node.target is torch.ops.aten.conv_transpose2d.input)


@dataclass
class _Graph:
    """What the role rules need from a graph: its nodes, which are layers, which upsample or shuffle."""

    nodes: list[fx.Node]
    layer_names: dict[fx.Node, str]  # layer node -> path of the module (a layer, or a leaf holding layers)
    upsamples: set[fx.Node]
    shuffles: set[fx.Node]
    sizes: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # spatial size of 4-D outputs

    def network_upsamples(self, head: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
        """The upsampling / shuffle ops that raise the resolution above the head's output (all, without sizes)."""
        body = [self.sizes[n] for n in head if n in self.sizes]
        if not body:
            return self.upsamples, self.shuffles
        limit = max(h * w for h, w in body)

        def raises(n: fx.Node) -> bool:
            size = self.sizes.get(n)
            return size is None or size[0] * size[1] > limit

        return {n for n in self.upsamples if raises(n)}, {n for n in self.shuffles if raises(n)}


def _roles(g: _Graph) -> tuple[dict[fx.Node, str], fx.Node | None]:
    nodes, is_layer = g.nodes, set(g.layer_names)
    after_layer: dict[fx.Node, bool] = {}  # some layer is an ancestor
    for n in nodes:
        after_layer[n] = any(p in is_layer or after_layer[p] for p in n.all_input_nodes)
    before_layer: dict[fx.Node, bool] = {}  # some layer is a descendant
    for n in reversed(nodes):
        before_layer[n] = any(u in is_layer or before_layer[u] for u in n.users)

    head = {n for n in is_layer if not after_layer[n]}
    upsamples, shuffles = g.network_upsamples(head)
    tail: set[fx.Node] = set()
    for n in nodes:  # the upsampler and everything after it; a ConvTranspose is itself the upsampler
        if n in upsamples and (after_layer[n] or n in is_layer):
            if n in is_layer:
                tail.add(n)
            tail |= descendants(n) & is_layer
    tail |= {n for n in is_layer if _reaches_shuffle(n, shuffles, is_layer)}  # the upsampler's convs
    tail |= {n for n in is_layer if not before_layer[n]}
    global_residual = _global_residual(nodes, head, is_layer, after_layer)
    if global_residual is not None:
        tail |= descendants(global_residual) & is_layer
    tail -= head
    roles = {n: "head" if n in head else "tail" if n in tail else "body" for n in is_layer}
    return roles, global_residual


class _Sizes(fx.Interpreter):
    """Runs a graph module once and keeps the spatial size of every 4-D tensor a node produces."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.sizes: dict[fx.Node, tuple[int, int]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            self.sizes[n] = (int(out.shape[-2]), int(out.shape[-1]))
        return out


def spatial_sizes(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, tuple[int, int]]:
    """Spatial size of each node's output on ``example`` (4-D tensors only)."""
    interp = _Sizes(gm)
    with torch.no_grad():
        interp.run(example)
    return interp.sizes


def partition_graph(gm: fx.GraphModule, leaves: list[str], example: torch.Tensor | None = None) -> Plan:
    """Roles of the layers of a traced model; layers inside a leaf (untraceable block) inherit its role.

    ``example`` (an input the model accepts) gives the sizes that tell a block's own upsampling (attention)
    from the network's upsampler.
    """
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    calls = {n: modules[n.target] for n in nodes if n.op == "call_module"}
    g = _Graph(
        nodes,
        {n: n.target for n, m in calls.items() if _contains_layers(m)},
        {n for n, m in calls.items() if isinstance(m, _UPSAMPLE_MODULES)}
        | {n for n in nodes if n.op == "call_function" and n.target in _UPSAMPLE_FUNCTIONS},
        {n for n, m in calls.items() if isinstance(m, nn.PixelShuffle)}
        | {n for n in nodes if n.op == "call_function" and n.target in _SHUFFLE_FUNCTIONS},
        spatial_sizes(gm, example) if example is not None else {},
    )
    roles, residual = _roles(g)
    rows: list[LayerRow] = []
    for n, path in g.layer_names.items():
        module = modules[path]
        if layer_kind(module):
            rows.append(LayerRow(path, layer_kind(module), roles[n], describe_layer(module), _params(module)))
            continue
        for sub_name, sub in module.named_modules():
            if layer_kind(sub):
                rows.append(LayerRow(f"{path}.{sub_name}", layer_kind(sub), roles[n], describe_layer(sub),
                                     _params(sub), in_leaf=path))
    return Plan(rows, traced=True, global_residual=residual.name if residual else None, leaves=leaves)


def partition_exported(model: nn.Module, example: torch.Tensor, reason: str) -> Plan:
    """Roles from the ATen graph of ``torch.export`` (for models torch.fx cannot trace).

    The model itself is left as it is: its layers are then replaced by module path.
    """
    message = f"torch.fx could not trace the model ({reason}); roles come from its torch.export graph"
    try:
        exported = torch.export.export(model, (example,), strict=False)
    except Exception as err:
        return partition_by_order(model, f"{reason}; torch.export: {type(err).__name__}: {str(err).splitlines()[0]}")
    modules = dict(model.named_modules())
    nodes = list(exported.graph_module.graph.nodes)
    layer_names = {}
    for n in nodes:
        stack = n.meta.get("nn_module_stack") if n.op == "call_function" and n.target in _ATEN_LAYERS else None
        path = next(iter(reversed(stack.values())))[0] if stack else None
        if path in modules and layer_kind(modules[path]):
            layer_names[n] = path
    sizes = {}
    for n in nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 4:
            sizes[n] = (int(val.shape[-2]), int(val.shape[-1]))
    g = _Graph(nodes, layer_names, {n for n in nodes if _is_aten_upsample(n)},
               {n for n in nodes if n.op == "call_function" and n.target in _SHUFFLE_FUNCTIONS}, sizes)
    roles, residual = _roles(g)
    rows, seen = [], set()
    for n, path in layer_names.items():
        if path not in seen:  # a module called twice keeps the role of its first call
            seen.add(path)
            m = modules[path]
            rows.append(LayerRow(path, layer_kind(m), roles[n], describe_layer(m), _params(m)))
    order = {name: i for i, name in enumerate(name for name, m in model.named_modules() if layer_kind(m))}
    rows += [LayerRow(name, layer_kind(modules[name]), "body", describe_layer(modules[name]),
                      _params(modules[name]), note="never called on the example input")
             for name in order if name not in seen]
    return Plan(rows, traced=False, global_residual=residual.name if residual else None, messages=[message])


def partition_by_order(model: nn.Module, reason: str) -> Plan:
    """Last resort when no graph can be had: roles from module registration order.

    First layer = head; layers registered after the first upsampling module, layers sharing a container
    with a PixelShuffle, and the last layer = tail.
    """
    named = [(name, m) for name, m in model.named_modules() if layer_kind(m)]
    shuffle_parents = {name.rpartition(".")[0] for name, m in model.named_modules() if isinstance(m, nn.PixelShuffle)}
    upsample_seen, rows = False, []
    for i, (name, m) in enumerate(named):
        upsample_seen |= any(isinstance(s, _UPSAMPLE_MODULES) for s in _modules_before(model, name))
        in_upsampler = name.rpartition(".")[0] in shuffle_parents
        role = "head" if i == 0 else "tail" if upsample_seen or in_upsampler or i == len(named) - 1 else "body"
        rows.append(LayerRow(name, layer_kind(m), role, describe_layer(m), _params(m)))
    message = f"the model could not be traced nor exported ({reason}); roles come from module registration order"
    return Plan(rows, traced=False, messages=[message])


def _modules_before(model: nn.Module, name: str) -> list[nn.Module]:
    out = []
    for other, m in model.named_modules():
        if other == name:
            break
        out.append(m)
    return out


def _reaches_shuffle(node: fx.Node, shuffles: set[fx.Node], is_layer: set[fx.Node]) -> bool:
    """The node's output reaches a pixel shuffle through single-input ops only."""
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n in shuffles:
            return True
        if n in is_layer or len(n.all_input_nodes) > 1:
            continue
        stack.extend(n.users)
    return False


def _global_residual(nodes, head, is_layer, after_layer) -> fx.Node | None:
    """The add that joins the head's output to the body's output.

    The last add with a head-output operand and a body-output operand, after which no add merges two
    feature branches (an add of the upsampled image, as in MSRResNet, is not a feature merge).
    """
    head_outputs = set(head)
    for n in nodes:  # single-input ops right after a head layer still carry the head output
        if n not in is_layer and len(n.all_input_nodes) == 1 and n.all_input_nodes[0] in head_outputs:
            head_outputs.add(n)
    for n in reversed(nodes):
        operands = n.all_input_nodes
        if not is_add(n) or not any(a in head_outputs for a in operands):
            continue
        if not all(a in head_outputs or (after_layer[a] or a in is_layer) for a in operands):
            continue
        later_merges = [d for d in descendants(n) if is_add(d) and all(after_layer[a] or a in is_layer
                                                                          for a in d.all_input_nodes)]
        if not later_merges:
            return n
    return None
