"""Which packed matmul runs after which: the chain along which each decode matmul prefetches the
next one's weights into L2 (``efficientqat.kernels.l2_prefetch``).

The order is recorded, not guessed from module names: one dry forward of a single token in which
every :class:`PackedLinear` only notes that it was called and returns zeros (no kernel, no
dequantization, so it is instant even for a 7B model and tunes nothing). Fused q/k/v and gate/up
layers (``fused_projections``) are recorded as the one matmul they are. The last matmul of the
step is chained to the first, which the next token's step starts with.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from efficientqat.qlinear import PackedLinear


@contextmanager
def _recording_calls(layers: list[PackedLinear]) -> Iterator[list[PackedLinear]]:
    """Within the block, each layer's forward appends the layer to the yielded list and returns zeros."""
    order: list[PackedLinear] = []

    def stand_in(layer: PackedLinear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            order.append(layer)
            return x.new_zeros(*x.shape[:-1], layer.out_features)
        return forward

    for layer in layers:
        layer.forward = stand_in(layer)
    try:
        yield order
    finally:
        for layer in layers:
            del layer.forward


def packed_call_order(model: nn.Module) -> list[PackedLinear]:
    """The packed layers of ``model`` in the order one forward of one token calls them (each once)."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not layers:
        return []
    device = layers[0].qweight.device
    with torch.no_grad(), _recording_calls(layers) as order:
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    return list(dict.fromkeys(order))


def chain_prefetch_(model: nn.Module) -> int:
    """Give every packed layer the one called after it (the last gets the first) as
    ``prefetch_next``, kept out of the module tree and the state dict; returns the chain's length."""
    order = packed_call_order(model)
    if len(order) < 2:
        return 0
    for layer, after in zip(order, order[1:] + order[:1]):
        layer.__dict__["prefetch_next"] = after
    return len(order)
