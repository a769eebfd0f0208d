"""Walking unpickled checkpoints without recursion, and without copying shared references.

An unpickled object is a graph, not a tree: a pickle can nest containers 100 000 deep (a recursive walk
overflows the stack), refer to one container from many places (`[L, L]` nested 45 deep is a tree of
2**45 leaves, though the pickle is 2 KiB), or hold cycles. `rebuild` visits each distinct node once, with
an explicit stack, and gives every reference to a node the same result, so its cost is the size of the
graph the unpickler built, which is bounded by the pickle's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class Cycle(ValueError):
    """A container holds itself (through any number of others); no checkpoint torch.save writes does."""


def rebuild(
    root: Any,
    children: Callable[[Any], Sequence[Any] | None],
    leaf: Callable[[Any], tuple[Any, bool]],
    build: Callable[[Any, list[tuple[Any, bool]]], Any],
) -> tuple[Any, bool]:
    """Map the graph under `root` bottom-up; return its result and whether any leaf was flagged.

    `children(node)`: a container's children in order, or None for a leaf; `leaf(node)`: a leaf's result
    and flag; `build(node, results)`: a container's result from its children's (result, flag) pairs, in
    order. A container's flag is whether any child's is set. Raises Cycle for a container that holds itself.
    """
    done: dict[int, tuple[Any, bool]] = {}
    active: set[int] = set()  # containers whose children are being visited: the current node's ancestors
    stack: list[tuple[Any, Sequence[Any], bool]] = []  # (container, its children, whether they are all done)

    def visit(node: Any) -> None:
        """Settle a leaf now (no trip through the stack); queue a container."""
        kids = children(node)
        if kids is None:
            done[id(node)] = leaf(node)
        else:
            stack.append((node, kids, False))

    visit(root)
    while stack:
        node, kids, ready = stack.pop()
        key = id(node)
        if ready:
            results = [done[id(k)] for k in kids]
            done[key] = (build(node, results), True in (flag for _, flag in results))
            active.discard(key)
            continue
        if key in done:  # a container queued twice (shared by siblings): settled the first time
            continue
        if key in active:
            raise Cycle("a container holds itself")
        active.add(key)
        stack.append((node, kids, True))
        for k in reversed(kids):
            if id(k) not in done:
                visit(k)
    return done[id(root)]
