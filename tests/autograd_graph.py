"""Walk an autograd graph: the no-copy tests look for Unbind / Stack / Clone nodes in it."""
import torch


def graph_node_names(t: torch.Tensor) -> list:
    """Type names of every autograd node reachable from ``t``, each node once, in walk order."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return names
