"""Regional compilation (`train.compile = true`): each block and the head are compiled on their own.

A whole-model `torch.compile` sees the model's depth in its graph, so every depth growth (and every
stage) recompiled the whole model: measured ~17 s for the first step after a tiny stack x4 on a CPU,
against 0.2 s per steady step. Here `Block.forward` and `Transformer.head` are compiled instead, while
the loop over the blocks stays in Python. All blocks run the same code with the same shapes, and
torch.compile keys its cache on the code, with the block's parameters as graph inputs (dynamo's
inlining of nn.Modules), so every block of the model, and every block a depth growth adds, reuses the
graphs compiled for the first one: a depth growth compiles nothing. Width growth changes the shapes
and recompiles each region once. The graphs per region: the first block (no pending residual) and the
others; training, and evaluation under no_grad.

Only `forward` is compiled, not `__call__`: module hooks (FSDP2's all-gathers) stay outside the graph.
The compiled function is an attribute of the module, which makes a reference cycle through the bound
method: `uncompile_regions` removes it, so an old model dropped after growth is freed at once rather
than at the next garbage collection.
"""

from __future__ import annotations

import torch

# What torch.compile lowers the graphs with. Tests use "aot_eager" (the same graph capture, guards and
# recompilation decisions, no code generation, so seconds instead of a minute on a CPU).
BACKEND = "inductor"


def compile_regions(model: torch.nn.Module) -> None:
    """Compile every block's forward and the head of `model` (a fastgrow Transformer) in place."""
    for block in model.layers:
        block.forward = torch.compile(block.forward, backend=BACKEND)
    model.head = torch.compile(model.head, backend=BACKEND)


def uncompile_regions(model: torch.nn.Module) -> None:
    """Undo compile_regions (the model runs eagerly again and holds no compiled function)."""
    for block in model.layers:
        block.__dict__.pop("forward", None)
    model.__dict__.pop("head", None)
