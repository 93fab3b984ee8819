"""Tracing SR models with torch.fx, with the workarounds real SR code needs.

- Tensor attributes reassigned in ``forward`` (basicsr's ``self.mean = self.mean.type_as(x)``) would be
  left holding a Proxy: every plain tensor attribute is saved before tracing and restored after.
- A submodule whose forward cannot be traced (shape-dependent Python control flow) becomes a leaf: it
  is kept whole as one ``call_module`` node, and layers inside it are reached by module path.
- A plain function that fails the same way (basicsr's ``pixel_unshuffle`` asserts on sizes) is wrapped:
  it becomes one ``call_function`` node and tracing starts again.
- A parameter-free module that is not a submodule of the model (FMEN's module-level
  ``act = nn.LeakyReLU(0.1)``, called inside its blocks) is traced through: its ops join the graph.
- In-place tensor ops of the graph (``out *= x`` after a sigmoid, ``h += x``) become their out-of-place
  forms where nothing later reads the overwritten tensor: autograd needs the sigmoid's output intact, and
  a replaced layer's output may be saved for backward. If the graph then no longer reproduces the model,
  the in-place ops are kept.
- ``x.data`` read only for its size (IMDTN's ``channel_shuffle``: ``x.data.size()``) becomes ``x``: the
  ONNX exporter's trace treats ``.data`` as a constant, which would bake the example's size into the file.
- The traced module is checked numerically against the original on an example input.
"""

from __future__ import annotations

import contextlib
import operator
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn


class TraceFailure(RuntimeError):
    """The model could not be traced as a whole (a reason, not a torch.fx traceback)."""


@dataclass
class TraceResult:
    module: fx.GraphModule
    leaves: list[str] = field(default_factory=list)  # qualified names of modules kept whole


class _AutoLeafTracer(fx.Tracer):
    """A tracer that turns a submodule into a leaf when tracing through it fails."""

    def __init__(self, leaf_types: Sequence[type] = (), wrapped: Sequence[Callable] = ()):
        super().__init__(autowrap_functions=tuple(wrapped))
        self.leaf_types = tuple(leaf_types)
        self.auto_leaves: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if m is not self.root and not _installed(self, m) and next(_state(m), None) is None:
            return forward(*args, **kwargs)  # a stateless module from outside the model: trace through it
        if m is self.root or self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        checkpoint = list(self.graph.nodes)[-1] if len(self.graph.nodes) else None
        module_stack = self.module_stack.copy()
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # Drop what the failed attempt recorded, then keep the module whole.
            _erase_after(self.graph, checkpoint)
            self.module_stack = module_stack
            path = self.path_of_module(m)
            self.auto_leaves.append(path)
            return self.create_proxy("call_module", path, args, kwargs)


def _installed(tracer: fx.Tracer, m: nn.Module) -> bool:
    try:
        tracer.path_of_module(m)
    except NameError:
        return False
    return True


def _state(m: nn.Module):
    yield from m.parameters()
    yield from m.buffers()


_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}
_VIEWS = {"view", "reshape", "view_as", "reshape_as", "transpose", "permute", "flatten", "unflatten", "squeeze",
          "unsqueeze", "expand", "expand_as", "narrow", "chunk", "split", "unbind", "t", "select", "as_strided",
          "getitem", "unfold", "movedim", "diagonal", "detach"}


def _is_view(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", node.target) if node.op == "call_function" else node.target
    return node.op in ("call_function", "call_method") and str(name) in _VIEWS


def functionalize_inplace(gm: fx.GraphModule) -> int:
    """Turn the graph's in-place tensor ops into out-of-place ones where that keeps the function; returns how many.

    An op is rewritten when the tensor it overwrites is no view (so no other tensor shares its memory) and
    no node after it reads that tensor.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in _INPLACE_OPERATORS:
            out_of_place = ("call_function", _INPLACE_OPERATORS[n.target])
        elif (n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_")
              and hasattr(torch.Tensor, n.target[:-1])):
            out_of_place = ("call_method", n.target[:-1])
        else:
            continue
        target = n.args[0] if n.args else None
        if not isinstance(target, fx.Node) or target.op == "placeholder" or _is_view(target):
            continue
        if any(order[u] > order[n] for u in target.users if u is not n):
            continue
        n.op, n.target = out_of_place
        count += 1
    if count:
        gm.recompile()
    return count


def _drop_data_for_sizes(gm: fx.GraphModule) -> int:
    """``x.data.size()`` / ``x.data.shape`` -> ``x.size()`` / ``x.shape``; returns how many ``.data`` went."""
    count = 0
    for n in list(gm.graph.nodes):
        if not (n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] == "data"):
            continue
        if all((u.op == "call_method" and u.target in ("size", "dim")) or
               (u.op == "call_function" and u.target is getattr and u.args[1:] == ("shape",)) for u in n.users):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            count += 1
    if count:
        gm.recompile()
    return count


def _erase_after(graph: fx.Graph, last_kept: fx.Node | None) -> None:
    nodes = list(graph.nodes)
    start = nodes.index(last_kept) + 1 if last_kept is not None else 0
    for node in reversed(nodes[start:]):
        graph.erase_node(node)


@contextlib.contextmanager
def _preserved_tensor_attributes(model: nn.Module) -> Iterator[None]:
    saved = [
        (module, name, value)
        for module in model.modules()
        for name, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    ]
    try:
        yield
    finally:
        for module, name, value in saved:
            object.__setattr__(module, name, value)


def trace(model: nn.Module, example: torch.Tensor, leaf_types: Sequence[type] = ()) -> TraceResult:
    """Trace ``model`` into a GraphModule that computes the same function (checked on ``example``)."""
    wrapped: list[Callable] = []
    while True:
        tracer = _AutoLeafTracer(leaf_types, wrapped)
        with _preserved_tensor_attributes(model):
            try:
                graph = tracer.trace(model)
                break
            except Exception as err:
                culprit = _failing_function(err)
                if culprit is None or culprit in wrapped or len(wrapped) >= 8:
                    raise TraceFailure(f"{type(err).__name__}: {err}".splitlines()[0]) from err
                wrapped.append(culprit)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    with torch.no_grad():
        expected = model(example)
    _drop_data_for_sizes(gm)
    if functionalize_inplace(gm) and not _reproduces(gm, example, expected):
        gm = fx.GraphModule(model, _retrace(tracer, model, wrapped), class_name=type(model).__name__)
        _drop_data_for_sizes(gm)
    if not _reproduces(gm, example, expected):
        raise TraceFailure("the traced graph does not reproduce the model's output on the example input")
    return TraceResult(gm, sorted(set(tracer.auto_leaves)))


def _retrace(tracer: _AutoLeafTracer, model: nn.Module, wrapped: list[Callable]) -> fx.Graph:
    """The graph traced again as it was (with its in-place ops)."""
    again = _AutoLeafTracer(tracer.leaf_types, wrapped)
    with _preserved_tensor_attributes(model):
        return again.trace(model)


def _reproduces(gm: fx.GraphModule, example: torch.Tensor, expected: torch.Tensor) -> bool:
    with torch.no_grad():
        got = gm(example)
    return isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(
        got, expected, rtol=1e-4, atol=1e-5)


def _failing_function(err: BaseException) -> Callable | None:
    """The innermost module-level function outside torch in whose body tracing failed, if any."""
    tb, frames = err.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    for frame in reversed(frames):
        if frame.f_code.co_filename.startswith(torch_dir):
            continue
        fn = frame.f_globals.get(frame.f_code.co_name)
        return fn if isinstance(fn, types.FunctionType) and fn.__code__ is frame.f_code else None
    return None
