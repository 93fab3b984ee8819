"""Reachability in fx graphs: the nodes upstream or downstream of a node."""

from __future__ import annotations

from torch import fx


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node whose value flows into ``node``."""
    return _closure(node, lambda n: n.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that uses the value of ``node``, directly or not."""
    return _closure(node, lambda n: n.users)


def _closure(node: fx.Node, step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(step(node))
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen
