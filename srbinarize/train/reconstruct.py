"""Block-wise reconstruction: each converted block learns to reproduce its FP teacher block.

The FP model holds, block by block, the very function each binary block must approximate. Before
end-to-end finetuning, the body is split into units (residual blocks: the outermost module around the
converted layers that is not a plain container such as ``nn.Sequential``), and the units are optimized
in dataflow order. Unit ``k`` is trained to match the teacher's output of the same module, from the
student's own input (what the already-reconstructed units before it produce), with every other
parameter frozen:

    loss_k = || U_k^student(x_k^student) - U_k^teacher(x_k^teacher) ||^2 / mean(U_k^teacher(.)^2)

The unit is cut out of the student's graph as a GraphModule of its own (sharing the student's modules),
so a step runs that unit only. For a pool of LR batches, the student's unit inputs (the units before it
are frozen by then) and the teacher's unit outputs are computed once per unit, as many as fit in
``cache_mb``, from the previous unit's examples when the unit reads only that unit's output; the teacher
is never modified. `srbinarize.train.phases.reconstruction` runs all units with checkpoints, as the
first phase of `finetune`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..convert import conversion_info
from .optim import parameter_groups

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Reached(Exception):
    def __init__(self, value):
        super().__init__()
        self.value = value


@dataclass(frozen=True)
class Unit:
    """A block of the student optimized as a whole."""

    path: str  # module path, the same in student and teacher
    nodes: tuple[str, ...]  # the student graph nodes inside the block, in graph order
    inputs: tuple[str, ...]  # the nodes outside the block whose values it reads
    layers: tuple[str, ...]  # converted layers inside it

    @property
    def output_node(self) -> str:
        return self.nodes[-1]

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
        inside = [n for n in nodes if _in_module(n, path)]
        if not inside:
            continue
        names = {n.name for n in inside}
        inputs = dict.fromkeys(a.name for n in inside for a in n.all_input_nodes if a.name not in names)
        out.append(Unit(path, tuple(n.name for n in inside), tuple(inputs), tuple(layers)))
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


def unit_module(student: fx.GraphModule, unit: Unit) -> fx.GraphModule:
    """The unit cut out of the student's graph: inputs ``unit.inputs``, output the unit's output.

    It shares the student's modules and parameters, so training it trains the student.
    """
    graph = fx.Graph()
    env: dict[str, fx.Node] = {name: graph.placeholder(name) for name in unit.inputs}
    by_name = {n.name: n for n in student.graph.nodes}
    for name in unit.nodes:
        env[name] = graph.node_copy(by_name[name], lambda a: env[a.name])
    graph.output(env[unit.output_node])
    return fx.GraphModule(student, graph)


class _Capture(fx.Interpreter):
    """Runs a GraphModule until the values of ``names`` are known and returns them (in that order)."""

    def __init__(self, gm: fx.GraphModule, names: Sequence[str]):
        super().__init__(gm)
        self.names = list(names)
        self.found: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.names:
            self.found[n.name] = value
            if len(self.found) == len(self.names):
                raise _Reached([self.found[name] for name in self.names])
        return value


@torch.no_grad()
def unit_inputs(student: fx.GraphModule, unit: Unit, x: torch.Tensor) -> list[torch.Tensor]:
    """The values the unit reads when the student runs on image ``x`` (computes no further)."""
    try:
        _Capture(student, unit.inputs).run(x)
    except _Reached as reached:
        return reached.value
    raise RuntimeError(f"the inputs {unit.inputs} of unit {unit.path} were not reached")


def student_output(student: fx.GraphModule, unit: Unit, x: torch.Tensor) -> torch.Tensor:
    """The student's output of ``unit`` on input image ``x`` (runs no further than the unit)."""
    return unit_module(student, unit)(*unit_inputs(student, unit, x))


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
    stopped: bool = False  # ``on_step`` asked to stop before the last step
    # (student unit inputs, teacher unit output) of the pool's batches, for chaining into the next unit
    examples: list[tuple[list, torch.Tensor]] = field(default_factory=list, repr=False)


# on_step(step, loss, optimizer, schedule) after each step (0-based step); returning True stops the unit.
StepCallback = Callable[[int, float, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], bool]
# restore(optimizer, schedule) -> the step to continue from (resuming a unit)
Restore = Callable[[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], int]


MAX_POOL = 32


def pool_size(steps: int) -> int:
    """Batches a unit of ``steps`` steps trains on: each seen about 4 times, 4 to `MAX_POOL` of them."""
    return max(4, min(MAX_POOL, steps // 4))


def _cosine(steps: int) -> Callable[[int], float]:
    return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))


def reconstruct_unit(
    student: fx.GraphModule,
    teacher: nn.Module,
    unit: Unit,
    pool: Sequence[torch.Tensor],
    steps: int,
    lr: float = 5e-3,
    cache_mb: float = 1024,
    restore: Restore | None = None,
    on_step: StepCallback | None = None,
    previous: UnitResult | None = None,
    interval_lr: float | None = None,
) -> UnitResult:
    """Optimize the parameters under ``unit.path`` for ``steps`` Adam steps (cosine schedule).

    The first `pool_size` (``steps``) batches of ``pool`` (LR images) are used cyclically; their unit inputs and teacher
    targets are computed once, for as many batches as fit in ``cache_mb`` (at least one). When the unit
    reads only the output of the ``previous`` unit, they come from that unit's examples (one pass of each
    unit, not of the network before it). Every other parameter is frozen during the call. ``restore``
    resumes a unit (it loads the optimizer and schedule and returns the step to go on from); ``on_step`` is
    called after each step (progress, checkpoints) and may stop the unit. ``interval_lr``: the relative rate
    of quantizer intervals (`srbinarize.train.optim`).
    """
    groups = parameter_groups(student, lr, interval_lr, include=unit.owns)
    trainable = {name: p.requires_grad for name, p in student.named_parameters()}
    for name, p in student.named_parameters():
        p.requires_grad_(unit.owns(name) and trainable[name])
    optimizer = torch.optim.Adam(groups, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(steps))
    start = restore(optimizer, schedule) if restore is not None else 0
    first = last = float("nan")
    stopped = False
    student.train()
    try:
        examples = _examples(student, teacher, unit, pool[: pool_size(steps)], cache_mb, previous)
        module = unit_module(student, unit)
        for step in range(start, steps):
            inputs, target = examples[step % len(examples)]
            out = module(*inputs)
            loss = (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            last = loss.item()
            first = last if step == start else first
            if on_step is not None and on_step(step, last, optimizer, schedule) and step + 1 < steps:
                stopped = True
                break
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(trainable[name])
    return UnitResult(unit, steps, first, last, stopped, examples)


@torch.no_grad()
def _examples(student, teacher, unit: Unit, pool: Sequence[torch.Tensor], cache_mb: float,
              previous: UnitResult | None) -> list[tuple[list, torch.Tensor]]:
    """(student unit inputs, teacher unit output) for the pool's batches, as many as fit in ``cache_mb``."""
    chained = previous.examples if previous is not None and unit.inputs == (previous.unit.output_node,) else []
    if chained:
        student_before, teacher_block = unit_module(student, previous.unit), teacher.get_submodule(unit.path)
    examples = []
    used = 0.0
    for i, x in enumerate(pool):
        if i < len(chained):
            inputs = [student_before(*chained[i][0])]
            target = teacher_block(chained[i][1])
        else:
            inputs = unit_inputs(student, unit, x)
            target = teacher_output(teacher, unit, x)
        size = sum(t.numel() * t.element_size() for t in [*inputs, target] if isinstance(t, torch.Tensor))
        if examples and used + size > cache_mb * 2**20:
            break
        examples.append((inputs, target))
        used += size
    return examples
