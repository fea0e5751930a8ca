"""Graph rewrites before lowering: ReLU folded into the op that produces its input.

A ReLU right after a convolution, a linear layer, a batch norm or an add is applied by that op's
task as an epilogue when nothing else reads the op's raw output: one task and one buffer less per
tile in the forward, and the backward masks the gradient with the (post-ReLU) output the op
already kept. The ReLU's output value is replaced by its input's everywhere.
"""
from __future__ import annotations

from lotus_rt.graph.ir import Graph

EPILOGUE_HOSTS = ("conv", "linear", "batchnorm", "add")


def fuse_relu(graph: Graph) -> int:
    """Fold every foldable ReLU into its producer, in place; returns how many were folded."""
    folded = 0
    changed = True
    while changed:
        changed = False
        consumers, producer = graph.consumers(), graph.producer()
        for op in graph.ops:
            if op.kind != "relu":
                continue
            (source,) = op.inputs
            host = producer.get(source)
            if (host is None or host.kind not in EPILOGUE_HOSTS or host.attrs.get("relu")
                    or len(consumers[source]) != 1 or source in graph.outputs):
                continue
            host.attrs["relu"] = True
            _replace_value(graph, op.output, source)
            graph.ops.remove(op)
            folded += 1
            changed = True
            break
    return folded


def _replace_value(graph: Graph, old: int, new: int) -> None:
    for op in graph.ops:
        if old in op.inputs:
            op.inputs = tuple(new if v == old else v for v in op.inputs)
    graph.outputs = [new if v == old else v for v in graph.outputs]
