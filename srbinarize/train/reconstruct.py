"""Block-wise reconstruction: each converted block learns to reproduce its FP teacher block.

The FP model holds, block by block, the very function each binary block must approximate. Before
end-to-end finetuning, the body is split into units (residual blocks: the outermost module around the
converted layers that is not a plain container such as ``nn.Sequential``), and the units are optimized
in dataflow order. Unit ``k`` is trained to match the teacher's output of the same module, from the
student's own input (what the already-reconstructed units before it produce), with every other
parameter frozen:

    loss_k = || U_k^student(x_k^student) - U_k^teacher(x_k^teacher) ||^2 / mean(U_k^teacher(.)^2)

Both networks run only as far as unit ``k`` (an `fx.Interpreter` stops the student at the unit's output
node, a hook stops the teacher). The teacher's outputs for a fixed pool of batches are computed once per
unit and cached (bounded by ``cache_mb``); the teacher is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..convert import conversion_info

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Reached(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


@dataclass(frozen=True)
class Unit:
    """A block of the student optimized as a whole."""

    path: str  # module path, the same in student and teacher
    output_node: str  # the student graph node that produces the unit's output
    layers: tuple[str, ...]  # converted layers inside it

    def owns(self, name: str) -> bool:
        return name == self.path or name.startswith(self.path + ".")


def reconstruction_units(student: nn.Module) -> list[Unit]:
    """The units of a converted, traced student in dataflow order (empty if it was not traced)."""
    info = conversion_info(student)
    if info is None or not isinstance(student, fx.GraphModule):
        return []
    converted = [r.name for r in info.plan.rows if r.replaced_by and r.role == "body"]
    nodes = list(student.graph.nodes)
    units: dict[str, list[str]] = {}
    for name in converted:
        node = next((n for n in nodes if n.op == "call_module" and n.target == name), None)
        if node is None:  # inside a leaf: the leaf's node carries the module stack
            node = next(n for n in nodes if n.op == "call_module" and name.startswith(str(n.target) + "."))
        units.setdefault(_unit_path(node, name), []).append(name)
    out = []
    for path, layers in units.items():
        last = max((i for i, n in enumerate(nodes) if _in_module(n, path)), default=None)
        if last is not None:
            out.append(Unit(path, nodes[last].name, tuple(layers)))
    order = {n.name: i for i, n in enumerate(nodes)}
    return sorted(out, key=lambda u: order[u.output_node])


def _unit_path(node: fx.Node, layer: str) -> str:
    """The outermost non-container module (not the root) on the layer's module stack."""
    for path, cls in node.meta.get("nn_module_stack", {}).values():
        if not issubclass(cls, _CONTAINERS):
            return path
    return layer


def _in_module(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack", {}).values()
    return any(p == path for p, _ in stack) or (node.op == "call_module" and str(node.target).startswith(path + "."))


class _RunTo(fx.Interpreter):
    """Runs a GraphModule node by node and stops with the value of one node."""

    def __init__(self, gm: fx.GraphModule, stop: str):
        super().__init__(gm)
        self.stop = stop

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name == self.stop:
            raise _Reached(value)
        return value


def student_output(student: fx.GraphModule, unit: Unit, x: torch.Tensor) -> torch.Tensor:
    """The student's output of ``unit`` on input image ``x`` (runs no further than the unit)."""
    try:
        _RunTo(student, unit.output_node).run(x)
    except _Reached as reached:
        return reached.value
    raise RuntimeError(f"node {unit.output_node} was not reached")


@torch.no_grad()
def teacher_output(teacher: nn.Module, unit: Unit, x: torch.Tensor) -> torch.Tensor:
    """The FP teacher's output of the module ``unit.path`` on ``x`` (stops right after it)."""

    def stop(_module, _inputs, output):
        raise _Reached(output)

    handle = teacher.get_submodule(unit.path).register_forward_hook(stop)
    try:
        teacher(x)
    except _Reached as reached:
        return reached.value
    finally:
        handle.remove()
    raise RuntimeError(f"teacher module {unit.path} was not called")


@dataclass
class UnitResult:
    unit: Unit
    steps: int
    first_loss: float
    last_loss: float


def reconstruct_unit(
    student: fx.GraphModule,
    teacher: nn.Module,
    unit: Unit,
    batches: Iterator[torch.Tensor],
    steps: int,
    lr: float = 5e-4,
    pool: int = 16,
    cache_mb: float = 1024,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    on_step: Callable[[int, float, Callable[[], dict]], None] | None = None,
) -> UnitResult:
    """Optimize the parameters under ``unit.path`` for ``steps`` steps; every other parameter is frozen.

    ``batches`` yields LR images; the first ``pool`` of them are reused cyclically, with the teacher's
    outputs cached while they fit in ``cache_mb``. ``start_step`` / ``optimizer_state`` resume a unit;
    ``on_step(step, loss, state)`` is called after every step (progress, checkpoints); ``state()`` returns
    the ``optimizer_state`` that resumes the unit after that step.
    """
    params = [p for name, p in student.named_parameters() if unit.owns(name)]
    frozen = {name: p.requires_grad for name, p in student.named_parameters()}
    for name, p in student.named_parameters():
        p.requires_grad_(unit.owns(name) and frozen[name])
    optimizer = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        schedule.load_state_dict(optimizer_state["schedule"])
    inputs = [next(batches) for _ in range(pool)]
    cache: dict[int, torch.Tensor] = {}
    cached_bytes = 0.0
    first = last = float("nan")
    student.train()
    try:
        for step in range(start_step, steps):
            i = step % pool
            target = cache.get(i)
            if target is None:
                target = teacher_output(teacher, unit, inputs[i])
                if cached_bytes + target.numel() * target.element_size() <= cache_mb * 2**20:
                    cache[i] = target
                    cached_bytes += target.numel() * target.element_size()
            out = student_output(student, unit, inputs[i])
            loss = (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            last = loss.item()
            first = last if step == start_step else first
            if on_step is not None:
                on_step(step, last, lambda: {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(frozen[name])
    return UnitResult(unit, steps, first, last)
